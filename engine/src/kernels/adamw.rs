//! Launchers for `kernels/adamw.cu`: the optimizer's per-variable passes over contiguous f32 tensors,
//! one kernel each. `training::optim` takes them where [`supports`] says so and keeps the candle ops
//! as the plain path and the reference (engine/tests/gpu_kernels.rs compares the two).
//!
//! AdamW writes three tensors (param, m, v) in one kernel, but an in-place op lends the `&mut` storage
//! of one tensor only. Nesting them lends more: [`adamw_step`] is an in-place op on param (g read),
//! whose CUDA body runs in-place ops on m and then v, so the kernel gets each of the three through a
//! `&mut` of its own, under that tensor's write lock, and m and v stay separate `Var`s (the checkpoint
//! and the plain path are untouched). The price is that m and v must not share storage with each other,
//! with param or with g: a second write lock on a storage already held would wait forever. candle
//! checks param against g; the optimizer allocates m and v itself, one fresh buffer each.

use super::with_storage_mut;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, DType, InplaceOp2, Layout, Result, Tensor};

const MODULE: &str = "adamw";
const THREADS: usize = 256;

/// The most blocks, and so partial sums, [`sum_squares`] uses for one tensor.
pub const PARTIALS: usize = 128;

/// Contiguous f32 on CUDA: the tensors the kernels take.
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous()
}

fn contiguous(l: &Layout, dims: &[usize], what: &str) -> Result<()> {
    if !l.is_contiguous() || l.dims() != dims {
        bail!(
            "{what} must be contiguous with shape {dims:?} (got {:?})",
            l.dims()
        )
    }
    Ok(())
}

fn grid(n: usize, max_blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS).clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One AdamW update's scalars, folded on the host in f64; the kernel takes them as f32, as candle's
/// scalar ops (`affine`) do.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// The factor the gradient is multiplied by first (gradient clipping's).
    pub grad_scale: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1 / √(1 − β₂ᵗ)
    pub inv_sqrt_bc2: f64,
    /// 1 − lr · weight_decay
    pub decay: f64,
    /// lr / (1 − β₁ᵗ)
    pub step_size: f64,
}

/// torch.optim.AdamW's update of `param` and its moments `m`, `v` from the gradient `g`, in place: all
/// four contiguous f32 of one shape, m and v each in a storage of its own (see the module's comment).
pub fn adamw_step(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    step: &AdamWStep,
) -> Result<()> {
    if !m.device().same_device(param.device()) || !v.device().same_device(param.device()) {
        bail!("the moments must be on their parameter's device")
    }
    param.inplace_op2(g, &Update { m, v, step })
}

struct Update<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    step: &'a AdamWStep,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-f32"
    }
    super::cuda_only!(inplace 2);
    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let dims = pl.dims();
        contiguous(pl, dims, "the parameter")?;
        contiguous(gl, dims, "the gradient")?;
        with_storage_mut(self.m, |m, ml| {
            contiguous(ml, dims, "the first moment")?;
            with_storage_mut(self.v, |v, vl| {
                contiguous(vl, dims, "the second moment")?;
                let n = pl.shape().elem_count();
                let func =
                    p.device
                        .get_or_load_custom_func("adamw_f32", MODULE, super::ptx::ADAMW)?;
                let mut pv = p.as_cuda_slice_mut::<f32>()?.slice_mut(pl.start_offset()..);
                let mut mv = m.as_cuda_slice_mut::<f32>()?.slice_mut(ml.start_offset()..);
                let mut vv = v.as_cuda_slice_mut::<f32>()?.slice_mut(vl.start_offset()..);
                let gv = g.as_cuda_slice::<f32>()?.slice(gl.start_offset()..);
                let s = self.step;
                let f = |x: f64| x as f32;
                let scalars = [
                    f(s.grad_scale),
                    f(s.beta1),
                    f(1.0 - s.beta1),
                    f(s.beta2),
                    f(1.0 - s.beta2),
                    f(s.inv_sqrt_bc2),
                    f(s.eps),
                    f(s.decay),
                    f(s.step_size),
                ];
                let n_i = n as i64;
                let mut launch = func.builder();
                launch
                    .arg(&mut pv)
                    .arg(&mut mv)
                    .arg(&mut vv)
                    .arg(&gv)
                    .arg(&n_i);
                for x in &scalars {
                    launch.arg(x);
                }
                // SAFETY: arguments match the kernel; the four hold n elements each (checked above),
                // and param, m and v are written through the `&mut` their write locks lend.
                unsafe { launch.launch(grid(n, 1 << 16)) }.w()?;
                Ok(())
            })
        })
    }
}

/// Writes partial sums of g² (contiguous f32) to `partials` ((PARTIALS,) f32 zeros on entry): they add
/// up to Σ g². One partial per block, in a fixed order, so the same on every run.
pub fn sum_squares(partials: &Tensor, g: &Tensor) -> Result<()> {
    partials.inplace_op2(g, &SumSquares)
}

struct SumSquares;

impl InplaceOp2 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares-f32"
    }
    super::cuda_only!(inplace 2);
    fn cuda_fwd(
        &self,
        out: &mut CudaStorage,
        ol: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        contiguous(ol, &[PARTIALS], "the partial sums")?;
        contiguous(gl, gl.dims(), "the gradient")?;
        let n = gl.shape().elem_count();
        let func =
            out.device
                .get_or_load_custom_func("sum_squares_f32", MODULE, super::ptx::ADAMW)?;
        let mut ov = out
            .as_cuda_slice_mut::<f32>()?
            .slice_mut(ol.start_offset()..);
        let gv = g.as_cuda_slice::<f32>()?.slice(gl.start_offset()..);
        let n_i = n as i64;
        let mut launch = func.builder();
        launch.arg(&gv).arg(&n_i).arg(&mut ov);
        // SAFETY: arguments match the kernel; g holds n elements, and at most PARTIALS blocks write
        // one partial each to the PARTIALS elements lent by the write lock.
        unsafe { launch.launch(grid(n, PARTIALS)) }.w()?;
        Ok(())
    }
}
