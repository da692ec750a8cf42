//! Launchers for `kernels/conv.cu`: a 3x3 convolution as one matrix product, either of the taps
//! (then summed) or of the columns (im2col).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

const MODULE: &str = "conv";

/// Output (B, Cout, H, W) from the taps product of the input upsampled by `up`, (B, 9·Cout,
/// (H/up)·(W/up)), and the bias (Cout,): `fused::tap_sum` is the plain path and the reference.
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
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the fused convolution runs on CUDA only; the CPU takes the plain path")
    }
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
        if rows % 9 != 0 || !fits || !tl.is_contiguous() || h > 65535 || batch * cout > 65535 {
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
            grid_dim: (w.div_ceil(128) as u32, h as u32, (batch * cout) as u32),
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

/// The columns (9·Cin, rows·W) of output rows [y0, y0 + rows) of a 3x3 convolution with an H x W
/// output, on x (Cin, H/up, W/up) upsampled `up` times: `fused::im2col` is the plain path.
pub fn im2col(x: &Tensor, h: usize, w: usize, up: usize, y0: usize, rows: usize) -> Result<Tensor> {
    x.apply_op1_no_bwd(&Im2col { h, w, up, y0, rows })
}

struct Im2col {
    h: usize,
    w: usize,
    up: usize,
    y0: usize,
    rows: usize,
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col3x3-bf16"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the fused convolution runs on CUDA only; the CPU takes the plain path")
    }
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let Im2col { h, w, up, y0, rows } = *self;
        let &[cin, hs, ws] = xl.dims() else {
            bail!("im2col takes one image (Cin, H, W), got {:?}", xl.dims())
        };
        let fits = up > 0 && hs * up == h && ws * up == w && y0 + rows <= h && rows > 0;
        if !fits || !xl.is_contiguous() || rows > 65535 || 9 * cin > 65535 {
            bail!(
                "im2col of {:?} does not fit rows {y0}..{} of a {h}x{w} output upsampled by {up}",
                xl.dims(),
                y0 + rows
            )
        }
        let CudaStorageSlice::BF16(xs) = &x.slice else {
            bail!("the fused convolution takes bf16 only")
        };
        let xv = xs.slice(xl.start_offset()..);
        let dev = &x.device;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc(9 * cin * rows * w) }?;
        let cfg = LaunchConfig {
            grid_dim: (w.div_ceil(128) as u32, rows as u32, (9 * cin) as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [h, w, up, y0, rows].map(|v| v as i32);
        let func = dev.get_or_load_custom_func("im2col3x3_bf16", MODULE, super::ptx::CONV)?;
        let mut launch = func.builder();
        launch.arg(&xv).arg(&out);
        for a in &args {
            launch.arg(a);
        }
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, Shape::from((9 * cin, rows * w))))
    }
}
