//! Normalisations: FLUX's LayerNorm with its modulation (forward and backward), and the autoencoder's
//! GroupNorm (with its SiLU). One kernel each on CUDA in bf16 (`kernels::fused_ops`, `kernels::group_norm`).

use super::{Kernels, EPS};
use candle_core::{Module, Tensor};

/// `LayerNorm(x) · (1 + scale) + shift`: FLUX's norm and modulation before every attention and MLP,
/// x (B, L, C), shift and scale (B, 1, C). On the fused path with [`norm_modulate_backward`] in training.
pub fn norm_modulate(
    kernels: Kernels,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[x, shift, scale]) {
        let value = crate::kernels::fused_ops::norm_modulate(
            &x.detach().contiguous()?,
            &shift.detach(),
            &scale.detach(),
            EPS,
        )?;
        return super::differentiable3([x, shift, scale], value, move |i, o, g| {
            norm_modulate_backward(kernels, i, o, g)
        });
    }
    let c = x.dim(candle_core::D::Minus1)?;
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
    let normed = crate::ops::autodiff::layer_norm(x, &ones, &zeros, EPS)?;
    normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// The gradients of x, shift and scale of [`norm_modulate`] from its output's `g`, in f32: with
/// x̂ = (x − μ)/σ and g' = g·(1 + scale), dx = (g' − mean(g') − x̂·mean(g'·x̂))/σ; the modulation's
/// gradients are sums over the tokens. One kernel (and a column sum) on the fused path.
pub fn norm_modulate_backward(
    kernels: Kernels,
    [x, shift, scale]: [&Tensor; 3],
    _: &Tensor,
    g: &Tensor,
) -> candle_core::Result<[Tensor; 3]> {
    use candle_core::{DType, D};
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[x, g]) {
        let (dx, d_shift, d_scale) = crate::kernels::fused_ops::norm_modulate_backward(
            &x.detach().contiguous()?,
            &scale.detach(),
            &g.contiguous()?,
            EPS,
        )?;
        return Ok([
            dx,
            d_shift.to_dtype(shift.dtype())?,
            d_scale.to_dtype(scale.dtype())?,
        ]);
    }
    let c = x.dim(D::Minus1)? as f64;
    let (x32, g) = (x.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
    let centred = x32.broadcast_sub(&(x32.sum_keepdim(D::Minus1)? / c)?)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / c)?;
    let inv = (var + f64::from(EPS))?.sqrt()?.recip()?;
    let xhat = centred.broadcast_mul(&inv)?;
    let d_shift = g.sum_keepdim(1)?;
    let d_scale = (&g * &xhat)?.sum_keepdim(1)?;
    let gs = g.broadcast_mul(&(scale.to_dtype(DType::F32)? + 1.0)?)?;
    let m1 = (gs.sum_keepdim(D::Minus1)? / c)?;
    let m2 = ((&gs * &xhat)?.sum_keepdim(D::Minus1)? / c)?;
    let dx = (gs.broadcast_sub(&m1)? - xhat.broadcast_mul(&m2)?)?.broadcast_mul(&inv)?;
    Ok([
        dx.to_dtype(x.dtype())?,
        d_shift.to_dtype(shift.dtype())?,
        d_scale.to_dtype(scale.dtype())?,
    ])
}

/// GroupNorm over (B, C, H, W) with `plain`'s groups and parameters (`[weight, bias]` are its (C,)
/// affine, which candle keeps private), then SiLU when `silu`: the autoencoder's normalisation.
pub fn group_norm(
    kernels: Kernels,
    x: &Tensor,
    plain: &candle_nn::GroupNorm,
    [weight, bias]: [&Tensor; 2],
    groups: usize,
    eps: f32,
    silu: bool,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.fused(&[x]) && x.rank() >= 3 && x.dims()[2..].iter().product::<usize>() % 8 == 0 {
        return crate::kernels::group_norm::group_norm(
            &x.contiguous()?,
            weight,
            bias,
            groups,
            eps,
            silu,
        );
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (weight, bias, groups, eps);
    let y = plain.forward(x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}
