//! Attention: softmax(q kᵀ / √D) v over heads. On CUDA in bf16, FlashAttention kernels
//! (`kernels::flash_attn`) forward and backward; otherwise candle's ops, chunked so memory stays linear in the
//! sequence, which are also the reference the kernels are checked against.

use super::Kernels;
use candle_core::Tensor;

/// softmax(q kᵀ / √D) v over (B, H, L, D) heads, returned as (B, L, H·D). On the fused path the value
/// comes from the kernel even in training, with [`attention_backward`] as its gradient: the graph then
/// keeps q, k, v, the output and the rows' log-sum-exp, not the (L × L) scores of every head.
pub fn attention(
    kernels: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[q, k, v]) && crate::kernels::flash_attn::supports(q) {
        let (b, h, l, d) = q.dims4()?;
        let scale = 1.0 / (d as f32).sqrt();
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        if [q, k, v].iter().all(|t| !t.track_op()) {
            let hopper = kernels.newest_instructions();
            return crate::kernels::flash_attn::flash_attn(&qd, &kd, &vd, scale, hopper)?
                .reshape((b, l, h * d));
        }
        let (value, lse) = crate::kernels::flash_attn::flash_attn_lse(
            &qd,
            &kd,
            &vd,
            scale,
            kernels.newest_instructions(),
        )?;
        return crate::ops::autodiff::with_gradient3(
            [q, k, v],
            value.reshape((b, l, h * d))?,
            move |qkv, o, g| attention_backward(kernels, qkv, o, g, Some(&lse)),
        );
    }
    plain_attention(q, k, v)
}

/// [`attention`] recording no graph, with what [`attention_backward`] reads besides q, k, v and the
/// output: the rows' log-sum-exp where the fused kernel ran (None on the plain path).
pub fn attention_saved(
    kernels: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if kernels.fused_value(&[q, k, v]) && crate::kernels::flash_attn::supports(q) {
        let (b, h, l, d) = q.dims4()?;
        let (value, lse) = crate::kernels::flash_attn::flash_attn_lse(
            q,
            k,
            v,
            1.0 / (d as f32).sqrt(),
            kernels.newest_instructions(),
        )?;
        return Ok((value.reshape((b, l, h * d))?, Some(lse)));
    }
    Ok((plain_attention(q, k, v)?, None))
}

/// The gradients of q, k and v of [`attention`] from the gradient `g` of its output `o` (both (B, L, H·D)
/// rows; `g` may be a narrow of wider rows) and, from the fused forward, the rows' log-sum-exp `lse`
/// ([`attention_saved`]): with it on the GPU, the kernels of [`crate::kernels::flash_attn::backward`]
/// read `g` where it lies and never write the scores; otherwise [`plain_attention_backward`].
pub fn attention_backward(
    kernels: Kernels,
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    g: &Tensor,
    lse: Option<&Tensor>,
) -> candle_core::Result<[Tensor; 3]> {
    let (_, h, _, d) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if let (Some(lse), true) = (lse, kernels.fused_value(&[q, g])) {
        let delta = crate::kernels::fused_ops::head_dot(g, o)?;
        let scale = 1.0 / (d as f32).sqrt();
        let hopper = kernels.newest_instructions();
        return crate::kernels::flash_attn::backward([q, k, v], g, lse, &delta, scale, hopper);
    }
    let _ = lse; // read on the fused path only
    plain_attention_backward(
        [q, k, v],
        &column_heads(o, 0, h, d)?,
        &column_heads(g, 0, h, d)?,
    )
}

/// The (B, H, L, D) heads of the columns `first .. first + H·D` of `t` (B, L, W), in one copy when the
/// columns fall on whole heads of a row.
pub fn column_heads(t: &Tensor, first: usize, h: usize, d: usize) -> candle_core::Result<Tensor> {
    let (b, l, w) = t.dims3()?;
    let rows = if t.is_contiguous() && w.is_multiple_of(d) && first.is_multiple_of(d) {
        t.reshape((b, l, w / d, d))?.narrow(2, first / d, h)?
    } else {
        t.narrow(2, first, h * d)?
            .contiguous()?
            .reshape((b, l, h, d))?
    };
    rows.transpose(1, 2)?.contiguous()
}

/// FlashAttention's backward in candle ops, with the output `o` and its gradient `g` as (B, H, L, D)
/// heads: the probabilities computed again rather than kept, and `rowsum(g ⊙ o)` standing in for
/// `rowsum(dP ⊙ P)` in softmax's backward. The reference the kernels are checked against.
pub fn plain_attention_backward(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    g: &Tensor,
) -> candle_core::Result<[Tensor; 3]> {
    use candle_core::{DType, D};
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let p = candle_nn::ops::softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)?;
    let dv = p.t()?.matmul(g)?;
    let delta = (g * o)?
        .to_dtype(DType::F32)?
        .sum_keepdim(D::Minus1)?
        .to_dtype(g.dtype())?;
    let ds = (&p * g.matmul(&v.t()?)?.broadcast_sub(&delta)?)?;
    drop(p);
    let dq = (ds.matmul(k)? * scale)?;
    let dk = (ds.t()?.matmul(q)? * scale)?;
    Ok([dq, dk, dv])
}

/// The unfused attention: materialises the scores of every head, for [`SCORES_PER_CHUNK`] of them at a
/// time, so memory stays linear in the sequence (a 1360x768 image has 4.6K tokens: 21M scores a head).
pub fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    // Scaling q (L·D values) is cheaper than scaling the scores (L·L).
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    softmax_attention(&q, k, v, q.dtype())?
        .transpose(1, 2)?
        .reshape((b, l, h * d))
}

/// Scores held at once by [`softmax_attention`]: 256 MB in f32.
pub const SCORES_PER_CHUNK: usize = 1 << 26;

/// softmax(q kᵀ) v over any leading dimensions, q's rows in chunks of at most [`SCORES_PER_CHUNK`] scores,
/// the softmax in `softmax_dtype`.
pub fn softmax_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    attention_in_chunks(q, k, v, softmax_dtype, SCORES_PER_CHUNK)
}

fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_dtype: candle_core::DType,
    max_scores: usize,
) -> candle_core::Result<Tensor> {
    let rank = q.rank();
    let rows = q.dim(rank - 2)?;
    let keys = k.dim(rank - 2)?;
    let per_row = q.elem_count() / q.dim(rank - 1)? / rows * keys;
    let chunk = (max_scores / per_row.max(1)).clamp(1, rows);
    let attend = |q: &Tensor| -> candle_core::Result<Tensor> {
        let scores = q.matmul(&k.t()?)?.to_dtype(softmax_dtype)?;
        crate::ops::autodiff::softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?
            .matmul(v)
    };
    if chunk == rows {
        return attend(q);
    }
    let parts = (0..rows)
        .step_by(chunk)
        .map(|start| attend(&q.narrow(rank - 2, start, chunk.min(rows - start))?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, rank - 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn attention_in_chunks_equals_attention_at_once() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let whole = attention_in_chunks(&q, &k, &v, DType::F32, usize::MAX)?;
        // 2·3·37 scores a row: 5 rows a chunk, the last chunk 2 rows.
        let chunked = attention_in_chunks(&q, &k, &v, DType::F32, 5 * 2 * 3 * 37)?;
        let diff = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
