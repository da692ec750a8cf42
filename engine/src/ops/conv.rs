//! The autoencoder's 2-D convolutions: the 3x3 kind as nine taps' matrix products and a fused sum on
//! CUDA in bf16 (`kernels::conv`), candle's convolution otherwise.

use super::Kernels;
use candle_core::{Module, Tensor};

/// A 2-D convolution. The 3x3 stride-1 padding-1 kind with a bias (nearly all of the autoencoder's
/// work) runs on CUDA in bf16 as one matrix product per image (and group of output channels),
/// [`conv_taps`], and a fused [`tap_sum`]; candle's im2col path gathers a 9·Cin-row copy of the input
/// first, and that copy, not the product, bounded its speed. Everything else takes candle's convolution.
pub fn conv2d(
    kernels: Kernels,
    x: &Tensor,
    conv: &candle_nn::Conv2d,
) -> candle_core::Result<Tensor> {
    upsample_conv2d(kernels, x, conv, 1)
}

/// [`conv2d`] of `x` upsampled `up` times by nearest neighbour (the autoencoder's upsamplers). On the
/// fused path the upsampled input is never made: the taps of `x` itself are summed at the output's
/// positions divided by `up`, a quarter of the product's work and memory for `up` = 2.
pub fn upsample_conv2d(
    kernels: Kernels,
    x: &Tensor,
    conv: &candle_nn::Conv2d,
    up: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    #[cfg(feature = "cuda")]
    if let Some(bias) = conv.bias() {
        let c = conv.config();
        let k = conv.weight().dims();
        if kernels.fused(&[x])
            && k[2..] == [3, 3]
            && (c.padding, c.stride, c.dilation, c.groups) == (1, 1, 1, 1)
        {
            // One image and a group of output channels at a time: the taps are 9·Cout/Cin times the
            // input's size, and at 1024x1024 they were what set the generation's peak memory.
            let cout = k[0];
            let group = (MAX_TAP_ELEMENTS / (9 * h * w)).clamp(1, cout);
            let images = (0..x.dim(0)?)
                .map(|i| {
                    let image = x.narrow(0, i, 1)?;
                    let parts = (0..cout)
                        .step_by(group)
                        .map(|c0| {
                            let n = group.min(cout - c0);
                            let taps = conv_taps(&image, &conv.weight().narrow(0, c0, n)?)?;
                            let bias = bias.narrow(0, c0, n)?;
                            crate::kernels::conv::tap_sum(&taps, &bias, up * h, up * w, up)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 1)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Tensor::cat(&images, 0);
        }
    }
    if up == 1 {
        conv.forward(x)
    } else {
        conv.forward(&x.upsample_nearest2d(up * h, up * w)?)
    }
}

/// The most tap values made at once (512 MiB in bf16): larger convolutions go a group of output
/// channels at a time.
#[cfg(feature = "cuda")]
const MAX_TAP_ELEMENTS: usize = 1 << 28;

/// Every tap's contribution at every input position: the nine (Cout, Cin) tap matrices of `weight`
/// (Cout, Cin, 3, 3) stacked times x (B, Cin, H, W), as (B, 9·Cout, H·W).
pub fn conv_taps(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (cout, cin, _, _) = weight.dims4()?;
    let (b, _, h, w) = x.dims4()?;
    let stacked = weight.permute((2, 3, 0, 1))?.reshape((9 * cout, cin))?;
    let flat = x.reshape((b, cin, h * w))?;
    let per_image = (0..b)
        .map(|i| stacked.matmul(&flat.get(i)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&per_image, 0)
}

/// The convolution's output (B, Cout, H, W) from [`conv_taps`] of the input upsampled `up` times
/// (taps (B, 9·Cout, (H/up)·(W/up))): bias plus, for each tap (kh, kw), its rows at position
/// (y + kh - 1, x + kw - 1), zero outside the image (the padding), summed in f32. The plain path of
/// `kernels::conv::tap_sum`.
pub fn tap_sum(
    taps: &Tensor,
    bias: &Tensor,
    h: usize,
    w: usize,
    up: usize,
) -> candle_core::Result<Tensor> {
    let (b, rows, _) = taps.dims3()?;
    let cout = rows / 9;
    let taps32 = taps
        .to_dtype(candle_core::DType::F32)?
        .reshape((b, rows, h / up, w / up))?
        .upsample_nearest2d(h, w)?
        .reshape((b, 9, cout, h, w))?
        .pad_with_zeros(3, 1, 1)?
        .pad_with_zeros(4, 1, 1)?;
    let mut sum = bias
        .to_dtype(candle_core::DType::F32)?
        .reshape((1, cout, 1, 1))?
        .broadcast_as((b, cout, h, w))?
        .contiguous()?;
    for kh in 0..3 {
        for kw in 0..3 {
            let tap = taps32.narrow(1, kh * 3 + kw, 1)?.squeeze(1)?;
            sum = (sum + tap.narrow(2, kh, h)?.narrow(3, kw, w)?)?;
        }
    }
    sum.to_dtype(taps.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_convolution_as_taps_equals_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 5, 7, 6), &dev)?;
        let weight = Tensor::randn(0f32, 1., (4, 5, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1., 4, &dev)?;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
        // As it is, and upsampled twice by nearest neighbour first (the autoencoder's upsamplers).
        for up in [1, 2] {
            let (h, w) = (7 * up, 6 * up);
            let want = conv.forward(&x.upsample_nearest2d(h, w)?)?;
            let ours = tap_sum(&conv_taps(&x, &weight)?, &bias, h, w, up)?;
            assert_eq!(ours.dims(), want.dims());
            let diff = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "up {up}: {diff}");
        }
        Ok(())
    }
}
