//! Launcher for `kernels/group_norm.cu`: GroupNorm (+ SiLU) over bf16 (B, C, H, W) in two passes.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CustomOp3, Layout, Result, Shape, Tensor};

const MODULE: &str = "group_norm";
/// Elements of a group one block reduces: enough blocks to fill the GPU for the decoder's 32 groups.
const PIECE: usize = 16384;

/// GroupNorm of x (B, C, H, W) with `groups` groups, per-channel `weight` and `bias` (C,), then
/// SiLU when `silu`. H·W must be a multiple of 8.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &GroupNorm { groups, eps, silu })
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = xl.dims();
        if dims.len() < 3 || !xl.is_contiguous() || !xl.start_offset().is_multiple_of(8) {
            bail!("group norm input must be contiguous (B, C, ...), 16-byte aligned, got {dims:?}")
        }
        let (batch, channels) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let g = self.groups;
        if channels % g != 0 || !hw.is_multiple_of(8) {
            bail!("group norm needs C % groups == 0 and H·W % 8 == 0, got {dims:?} in {g} groups")
        }
        for (l, what) in [(wl, "weight"), (bl, "bias")] {
            if l.dims() != [channels] || !l.is_contiguous() {
                bail!("group norm {what} must be a contiguous ({channels},)")
            }
        }
        let (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ws), CudaStorageSlice::BF16(bs)) =
            (&x.slice, &w.slice, &b.slice)
        else {
            bail!("the fused group norm takes bf16 only")
        };
        let (xv, wv, bv) = (
            xs.slice(xl.start_offset()..),
            ws.slice(wl.start_offset()..),
            bs.slice(bl.start_offset()..),
        );
        let group_elems = channels / g * hw;
        let chunks = group_elems.div_ceil(PIECE).clamp(1, 1024);
        let dev = &x.device;
        let stats = dev.alloc_zeros::<f32>(batch * g * chunks * 3)?;
        // SAFETY: the apply kernel writes every element.
        let out = unsafe { dev.alloc(batch * channels * hw) }?;
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, (batch * g) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ge, ch, hw_i, ci, gi) = (
            group_elems as i64,
            chunks as i32,
            hw as i64,
            channels as i32,
            g as i32,
        );
        let silu = self.silu as i32;
        let stats_fn =
            dev.get_or_load_custom_func("group_norm_stats_bf16", MODULE, super::ptx::GROUP_NORM)?;
        let mut launch = stats_fn.builder();
        launch.arg(&xv).arg(&stats).arg(&ge).arg(&ch);
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let apply_fn =
            dev.get_or_load_custom_func("group_norm_apply_bf16", MODULE, super::ptx::GROUP_NORM)?;
        let mut launch = apply_fn.builder();
        launch.arg(&xv).arg(&stats).arg(&wv).arg(&bv).arg(&out);
        launch
            .arg(&ge)
            .arg(&ch)
            .arg(&hw_i)
            .arg(&ci)
            .arg(&gi)
            .arg(&self.eps)
            .arg(&silu);
        // SAFETY: as above.
        unsafe { launch.launch(cfg) }.w()?;
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, xl.shape().clone()))
    }
}
