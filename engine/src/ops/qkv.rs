//! From a layer's fused q|k|v rows to attention heads: split, q and k RMS-normed and rotated by FLUX's
//! RoPE, and the way back for training. One kernel each way on CUDA in bf16.

use super::{Kernels, EPS};
use candle_core::{DType, Tensor};

/// RoPE tables for a run of positions: cos and sin (L, D/2), and both side by side (L, D) for the
/// fused kernel. f32 whatever the model's dtype, and q and k are rotated in f32 then rounded to it
/// once, as Black Forest Labs' and diffusers' code rotate them.
#[derive(Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    #[cfg(feature = "cuda")]
    packed: Tensor,
}

impl Rope {
    pub fn new(cos: Tensor, sin: Tensor) -> candle_core::Result<Self> {
        if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 {
            candle_core::bail!(
                "RoPE tables are f32 (got {:?} and {:?})",
                cos.dtype(),
                sin.dtype()
            )
        }
        Ok(Self {
            #[cfg(feature = "cuda")]
            packed: Tensor::cat(&[&cos, &sin], 1)?,
            cos,
            sin,
        })
    }

    /// The tables of positions `start .. start + len`.
    pub fn rows(&self, start: usize, len: usize) -> candle_core::Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
            #[cfg(feature = "cuda")]
            packed: self.packed.narrow(0, start, len)?,
        })
    }
}

/// The q and k RMS-norm scales of one attention, (D,) each, and stacked (2, D) for the fused kernel.
#[derive(Clone)]
pub struct QkScales {
    pub q: Tensor,
    pub k: Tensor,
    #[cfg(feature = "cuda")]
    both: Tensor,
}

impl QkScales {
    pub fn new(q: Tensor, k: Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            #[cfg(feature = "cuda")]
            both: Tensor::stack(&[&q, &k], 0)?,
            q,
            k,
        })
    }
}

/// Fused q|k|v rows (B, L, ≥ 3·H·D) to (B, H, L, D) heads, q and k RMS-normed and rotated.
pub fn qkv_heads(
    kernels: Kernels,
    qkv: &Tensor,
    heads: usize,
    scales: &QkScales,
    rope: &Rope,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let d = scales.q.dim(0)?;
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[qkv])
        && d == crate::kernels::flash_attn::HEAD_DIM
        && qkv.is_contiguous()
    {
        let mut out = crate::kernels::fused_ops::qkv_heads(
            &qkv.detach(),
            &scales.both,
            &rope.packed,
            heads,
            EPS,
        )?;
        if qkv.track_op() {
            let (scales, rope) = (scales.clone(), rope.clone());
            out = crate::ops::autodiff::with_gradient(qkv, out, move |qkv, _, g| {
                let (gq, gk, gv) = (g.get(0)?, g.get(1)?, g.get(2)?);
                qkv_heads_grad(kernels, qkv, [&gq, &gk, &gv], 0, heads, &scales, &rope)
            })?;
        }
        return Ok((out.get(0)?, out.get(1)?, out.get(2)?));
    }
    let qkv = qkv.narrow(2, 0, 3 * heads * d)?;
    let qkv = qkv.reshape((b, l, 3, heads, d))?.permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let q = norm_and_rotate(&q, &scales.q, rope)?;
    let k = norm_and_rotate(&k, &scales.k, rope)?;
    Ok((q, k, v))
}

/// `x` RMS-normed by `scale` and rotated by `rope`, each in f32 and rounded to `x`'s dtype, as the
/// references and the fused kernel round them (candle's CPU norm rounds a bf16 row's rms and
/// quotient to bf16 on the way).
fn norm_and_rotate(x: &Tensor, scale: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
    use crate::ops::autodiff::{rms_norm, rope_i};
    let dtype = x.dtype();
    let x = rms_norm(&x.to_dtype(DType::F32)?, &scale.to_dtype(DType::F32)?, EPS)?;
    let x = x.to_dtype(dtype)?.to_dtype(DType::F32)?;
    rope_i(&x, &rope.cos, &rope.sin)?.to_dtype(dtype)
}

/// [`qkv_heads_backward`] from the heads' gradients `dq`, `dk`, `dv` (B, H, L', D) at the tokens
/// `at .. at + L` of `qkv`'s L rows (a double block's stream is a part of the joint attention): one
/// kernel reading them in place on the fused path.
pub fn qkv_heads_grad(
    kernels: Kernels,
    qkv: &Tensor,
    [dq, dk, dv]: [&Tensor; 3],
    at: usize,
    heads: usize,
    scales: &QkScales,
    rope: &Rope,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[qkv, dq]) {
        return crate::kernels::fused_ops::qkv_heads_backward(
            qkv,
            [&dq.contiguous()?, &dk.contiguous()?, &dv.contiguous()?],
            at,
            &scales.both,
            &rope.packed,
            heads,
            EPS,
        );
    }
    let l = qkv.dim(1)?;
    let part = |t: &Tensor| t.narrow(2, at, l);
    qkv_heads_backward(
        qkv,
        &Tensor::stack(&[part(dq)?, part(dk)?, part(dv)?], 0)?,
        heads,
        [&scales.q, &scales.k],
        [&rope.cos, &rope.sin],
    )
}

/// The gradient of the fused q|k|v rows of [`qkv_heads`] from that of its stacked (3, B, H, L, D) heads
/// `g`: RoPE's backward is the rotation the other way (−sin, in f32 as the forward's), the RMS norm's
/// dx = r·(w·g) − x·r³·mean(w·g·x) with r = 1/√(mean(x²) + ε); v's passes through; the rows past
/// 3·H·D (a single block's MLP input) get none.
pub fn qkv_heads_backward(
    qkv: &Tensor,
    g: &Tensor,
    heads: usize,
    [scale_q, scale_k]: [&Tensor; 2],
    [cos, sin]: [&Tensor; 2],
) -> candle_core::Result<Tensor> {
    use candle_core::D;
    let (b, l, width) = qkv.dims3()?;
    let d = scale_q.dim(0)?;
    let hd = heads * d;
    let raw = qkv
        .narrow(2, 0, 3 * hd)?
        .reshape((b, l, 3, heads, d))?
        .permute((2, 0, 3, 1, 4))?;
    let neg_sin = sin.neg()?;
    let mut parts = Vec::with_capacity(3);
    for (i, w) in [scale_q, scale_k].into_iter().enumerate() {
        let g = g.get(i)?.to_dtype(DType::F32)?.contiguous()?;
        let unrotated = candle_nn::rotary_emb::rope_i(&g, cos, &neg_sin)?;
        let x = raw.get(i)?.to_dtype(DType::F32)?;
        let gw = unrotated.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(EPS))?
            .sqrt()?
            .recip()?;
        let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?)?;
        parts.push(dx.to_dtype(qkv.dtype())?);
    }
    parts.push(g.get(2)?);
    let rows = Tensor::stack(&parts, 0)?
        .permute((1, 3, 0, 2, 4))?
        .reshape((b, l, 3 * hd))?;
    if width == 3 * hd {
        return Ok(rows);
    }
    let rest = Tensor::zeros((b, l, width - 3 * hd), rows.dtype(), rows.device())?;
    Tensor::cat(&[rows, rest], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn qkv_heads_backward_matches_autograd() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (heads, d, l) = (2, 8, 5);
        // A single block's rows: q | k | v | MLP input.
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, l, 3 * heads * d + 6), &dev)?)?;
        let scales = QkScales::new(
            Tensor::randn(1f32, 0.2, d, &dev)?,
            Tensor::randn(1f32, 0.2, d, &dev)?,
        )?;
        let angles = Tensor::randn(0f32, 1.0, (l, d / 2), &dev)?;
        let rope = Rope::new(angles.cos()?, angles.sin()?)?;
        let stacked = |x: &Tensor| -> candle_core::Result<Tensor> {
            let (q, k, v) = qkv_heads(Kernels::Plain, x, heads, &scales, &rope)?;
            Tensor::stack(&[q, k, v], 0)
        };
        let weights = Tensor::randn(0f32, 1.0, (3, 2, heads, l, d), &dev)?;
        let want = (stacked(qkv.as_tensor())? * &weights)?
            .sum_all()?
            .backward()?;
        let want = want.get(qkv.as_tensor()).expect("a gradient");
        let ours = qkv_heads_backward(
            &qkv.as_tensor().detach(),
            &weights,
            heads,
            [&scales.q, &scales.k],
            [&rope.cos, &rope.sin],
        )?;
        let diff = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 2e-5, "{diff}");
        Ok(())
    }
}
