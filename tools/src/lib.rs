//! What the tools share (the prompt classifier's training, for `train-classifier`), and the workspace's own checks: the module graph (no import cycles) and the
//! figures tables rendered from the GPU runs' records.

pub mod bench_tables;
pub mod classifier_training;
pub mod module_graph;
