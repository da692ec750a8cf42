//! With the `cuda` feature: compiles `kernels/*.cu` to PTX with nvcc (the same toolchain and compute
//! capability detection candle's own kernels use: `CUDA_COMPUTE_CAP` or nvidia-smi) and writes their
//! sources as `&str` constants to `$OUT_DIR/ptx.rs`, loaded at run time by the CUDA driver.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        println!("cargo::rerun-if-changed=kernels");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            // Headers are not sources: a change to one rebuilds the kernels that include it.
            .watch(["kernels/attention.cuh"])
            .args(["-std=c++17", "-O3", "--use_fast_math"])
            .build_ptx()
            .and_then(|ptx| ptx.write(out.join("ptx.rs")))
            .expect("compiling the engine's CUDA kernels (needs nvcc: set CUDA_HOME or PATH)");
    }
}
