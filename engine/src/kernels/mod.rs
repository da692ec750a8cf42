//! The engine's own CUDA kernels: sources in `engine/kernels/*.cu`, compiled to PTX by the build
//! script with nvcc and loaded by the CUDA driver on first use. Only with the `cuda` feature.

pub mod adamw;
pub mod conv;
pub mod flash_attn;
pub mod fp8;
pub mod fused_ops;
pub mod gemm;
pub mod group_norm;
pub mod pinned;
pub mod pool;

use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use std::cell::Cell;

/// The `cpu_fwd` of a custom op that has only a CUDA kernel: its callers check that the tensors are
/// on CUDA and take candle's ops otherwise, so reaching it is a caller's mistake, named by the op.
/// `cuda_only!(N)` for a `CustomOpN`, `cuda_only!(inplace N)` for an `InplaceOpN`.
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(
                "{} runs on CUDA only; the CPU takes candle's ops",
                self.name()
            )
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(
                "{} runs on CUDA only; the CPU takes candle's ops",
                self.name()
            )
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(
                "{} runs on CUDA only; the CPU takes candle's ops",
                self.name()
            )
        }
    };
    (inplace 2) => {
        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!(
                "{} runs on CUDA only; the CPU takes candle's ops",
                self.name()
            )
        }
    };
    (inplace 3) => {
        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!(
                "{} runs on CUDA only; the CPU takes candle's ops",
                self.name()
            )
        }
    };
}
use cuda_only;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Lends `t`'s storage to `f` under its write lock, through an in-place op (the only way candle lends
/// it): how a kernel writes more than the one output a custom op returns.
pub(crate) fn with_storage_mut(
    t: &Tensor,
    f: impl FnOnce(&mut CudaStorage, &Layout) -> Result<()>,
) -> Result<()> {
    struct Lend<F>(Cell<Option<F>>);
    impl<F: FnOnce(&mut CudaStorage, &Layout) -> Result<()>> InplaceOp1 for Lend<F> {
        fn name(&self) -> &'static str {
            "lend-storage"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            bail!("lending a storage is for CUDA tensors")
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            match self.0.take() {
                Some(f) => f(s, l),
                None => bail!("an in-place op ran twice"),
            }
        }
    }
    t.inplace_op1(&Lend(Cell::new(Some(f))))
}
