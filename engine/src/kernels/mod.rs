//! The engine's own CUDA kernels: sources in `engine/kernels/*.cu`, compiled to PTX by the build
//! script with nvcc and loaded by the CUDA driver on first use. Only with the `cuda` feature.

pub mod adamw;
pub mod conv;
pub mod flash_attn;
pub mod fused_ops;
pub mod gemm;
pub mod group_norm;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}
