//! What the tools share, and the workspace's own checks: the module graph (no import cycles) and the
//! figures tables rendered from the GPU runs' records.

pub mod bench_tables;
pub mod module_graph;
