//! FLUX's gated residual `r + x · gate`, forward and backward: one kernel each on CUDA in bf16.

use super::Kernels;
use candle_core::Tensor;

/// `r + x · gate`: the gated residual after every attention and MLP, gate (B, 1, C).
pub fn gated_add(
    kernels: Kernels,
    r: &Tensor,
    x: &Tensor,
    gate: &Tensor,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[r, x, gate]) {
        let value = crate::kernels::fused_ops::gated_add(
            &r.detach().contiguous()?,
            &x.detach().contiguous()?,
            &gate.detach(),
        )?;
        return super::differentiable3([r, x, gate], value, move |i, o, g| {
            gated_add_backward(kernels, i, o, g)
        });
    }
    r + x.broadcast_mul(gate)?
}

/// The gradients of r, x and gate of [`gated_add`]: g, g·gate, and Σ g·x over the tokens (in f32); one
/// kernel on the fused path.
pub fn gated_add_backward(
    kernels: Kernels,
    [_, x, gate]: [&Tensor; 3],
    _: &Tensor,
    g: &Tensor,
) -> candle_core::Result<[Tensor; 3]> {
    use candle_core::DType;
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[x, g]) {
        let (dx, d_gate) = crate::kernels::fused_ops::gated_add_backward(
            &x.detach().contiguous()?,
            &gate.detach(),
            &g.contiguous()?,
        )?;
        return Ok([g.clone(), dx, d_gate.to_dtype(gate.dtype())?]);
    }
    let d_gate = (g.to_dtype(DType::F32)? * x.to_dtype(DType::F32)?)?
        .sum_keepdim(1)?
        .to_dtype(gate.dtype())?;
    Ok([g.clone(), g.broadcast_mul(gate)?, d_gate])
}
