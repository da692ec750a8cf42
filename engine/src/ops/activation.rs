//! FLUX's tanh-approximated GELU: its backward, and the single block's `[attention | gelu(mlp)]`, one
//! kernel each on CUDA in bf16.

use super::Kernels;
use candle_core::Tensor;

/// tanh-approximated GELU, FLUX's MLP activation. With a gradient on CUDA its backward pass is one kernel
/// (candle composes it of a dozen elementwise ops).
pub fn gelu(kernels: Kernels, x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.track_op() && kernels.fused_value(&[x]) {
        let value = x.detach().gelu()?;
        return crate::ops::autodiff::with_gradient(x, value, move |x, _, g| {
            gelu_backward(kernels, x, g)
        });
    }
    x.gelu()
}

/// `g · gelu′(x)` for [`gelu`]: one kernel on the fused path, in f32 otherwise, with
/// gelu′(x) = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3c·x²), t = tanh(√(2/π)(x + c·x³)), c = 0.044715.
pub fn gelu_backward(kernels: Kernels, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::DType;
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[x, g]) {
        return crate::kernels::fused_ops::gelu_backward(x, g);
    }
    const C: f64 = 0.044715;
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let x32 = x.to_dtype(DType::F32)?;
    let x2 = x32.sqr()?;
    let t = ((&x32 + (&x2 * &x32)?.affine(C, 0.0)?)? * k)?.tanh()?;
    let left = ((&t + 1.0)? * 0.5)?;
    let right =
        ((&x32 * 0.5)? * ((t.sqr()?.neg()? + 1.0)? * k)?)?.mul(&(x2.affine(3.0 * C, 1.0))?)?;
    (g.to_dtype(DType::F32)? * (left + right)?)?.to_dtype(g.dtype())
}

/// [`gelu_backward`] written into the columns `at ..` of the contiguous `dst` (B, L, W), in place: one
/// kernel reading `x` and `g` where they lie on the fused path (a single block's MLP columns).
pub fn gelu_backward_into(
    kernels: Kernels,
    dst: &Tensor,
    at: usize,
    x: &Tensor,
    g: &Tensor,
) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[x, g]) {
        return crate::kernels::fused_ops::gelu_backward_into(dst, at, x, g);
    }
    dst.slice_set(
        &gelu_backward(kernels, x, g)?.contiguous()?,
        candle_core::D::Minus1,
        at,
    )
}

/// `[a | gelu(m)]` along the last dim (tanh-approximated GELU, as FLUX's MLPs use): the single
/// block's attention output beside its MLP activation.
pub fn gelu_cat(kernels: Kernels, a: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.fused(&[a, m]) {
        return crate::kernels::fused_ops::gelu_cat(&a.contiguous()?, m);
    }
    Tensor::cat(&[a, &gelu(kernels, m)?], candle_core::D::Minus1)
}

/// Exact GELU, `x·Φ(x)` with the error function, as BERT-family encoders use it. On the CPU in f32
/// its erf is a rational approximation that the compiler vectorises (within 4e-7 of the true erf;
/// candle's is a scalar libm call per element, a fifth of a short prompt's time through MiniLM);
/// elsewhere it is candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !x.track_op() {
        x.apply_op1_no_bwd(&GeluErfCpu)
    } else {
        x.gelu_erf()
    }
}

/// The CPU f32 path of [`gelu_erf`].
struct GeluErfCpu;

impl candle_core::CustomOp1 for GeluErfCpu {
    fn name(&self) -> &'static str {
        "gelu-erf-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu-erf-cpu takes f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-cpu takes a contiguous tensor");
        };
        let out = data[start..end]
            .iter()
            .map(|&v| 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// erf(x) for f32 without branches or calls, so that loops over it vectorise (no `mul_add`: without
/// the FMA target feature it is a libm call per element): an odd rational
/// function of x on [-4, 4] (erf(±4) is ±1 in f32), the approximation Eigen and XLA use.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.9546e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA[1..].iter().fold(ALPHA[0], |p, &a| p * x2 + a);
    let q = BETA[1..].iter().fold(BETA[0], |q, &b| q * x2 + b);
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_vectorised_erf_stays_within_half_a_millionth_of_the_true_one() {
        // libm's erf (candle's reference) in f64, over [-6, 6] in steps of 1e-4.
        let worst = (-60_000..=60_000)
            .map(|i| i as f32 / 10_000.0)
            .map(|x| (erf(x) as f64 - candle_core::cpu::erf::erf_f64(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "worst error {worst}");
    }

    #[test]
    fn gelu_erf_on_the_cpu_matches_candles() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 3.0, (7, 300), &Device::Cpu)?;
        let diff = crate::ops::max_abs_diff(&gelu_erf(&x)?, &x.gelu_erf()?)?;
        assert!(diff < 2e-6, "largest difference {diff}");
        Ok(())
    }
}
