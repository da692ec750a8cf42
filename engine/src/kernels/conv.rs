//! Launcher for `kernels/conv.cu`: the tap sum of a 3x3 convolution done as one matrix product.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CustomOp2, Layout, Result, Shape, Tensor};

const MODULE: &str = "conv";

/// Output (B, Cout, H, W) from the taps product of the input upsampled by `up`, (B, 9·Cout,
/// (H/up)·(W/up)), and the bias (Cout,): `ops::conv::tap_sum` is the plain path and the reference.
pub fn tap_sum(taps: &Tensor, bias: &Tensor, h: usize, w: usize, up: usize) -> Result<Tensor> {
    taps.apply_op2_no_bwd(bias, &TapSum { h, w, up })
}

struct TapSum {
    h: usize,
    w: usize,
    up: usize,
}

impl CustomOp2 for TapSum {
    fn name(&self) -> &'static str {
        "conv3x3-tap-sum-bf16"
    }
    super::cuda_only!(2);
    fn cuda_fwd(
        &self,
        t: &CudaStorage,
        tl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (h, w, up) = (self.h, self.w, self.up);
        let &[batch, rows, np] = tl.dims() else {
            bail!(
                "conv taps must be (B, 9·Cout, (H/up)·(W/up)), got {:?}",
                tl.dims()
            )
        };
        let cout = rows / 9;
        let fits = up > 0 && h % up == 0 && w % up == 0 && np == (h / up) * (w / up);
        if rows % 9 != 0 || !fits || !tl.is_contiguous() || batch * cout > 65535 {
            bail!(
                "conv taps {:?} do not fit a contiguous {h}x{w} output upsampled by {up}",
                tl.dims()
            )
        }
        if bl.dims() != [cout] || !bl.is_contiguous() {
            bail!(
                "conv bias must be a contiguous ({cout},), got {:?}",
                bl.dims()
            )
        }
        let (CudaStorageSlice::BF16(ts), CudaStorageSlice::BF16(bs)) = (&t.slice, &b.slice) else {
            bail!("the fused convolution takes bf16 only")
        };
        let (tv, bv) = (ts.slice(tl.start_offset()..), bs.slice(bl.start_offset()..));
        let dev = &t.device;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc(batch * cout * h * w) }?;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, (batch * cout) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (cout_i, h_i, w_i, up_i) = (cout as i32, h as i32, w as i32, up as i32);
        let func = dev.get_or_load_custom_func("conv3x3_tap_sum_bf16", MODULE, super::ptx::CONV)?;
        let mut launch = func.builder();
        launch
            .arg(&tv)
            .arg(&bv)
            .arg(&out)
            .arg(&cout_i)
            .arg(&h_i)
            .arg(&w_i)
            .arg(&up_i);
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, Shape::from((batch, cout, h, w))))
    }
}
