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
