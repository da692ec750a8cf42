//! Ops of the FLUX transformer that have a fused CUDA kernel (`crate::kernels`, `cuda` feature) and a
//! plain candle path. The kernels run on CUDA in bf16 where their layout fits; everything else (CPU,
//! f32, tests) takes the plain path, which is also the reference the kernels are checked against
//! (`flux-bench kernels`, `flux-bench forward --compare-plain`).

use crate::models::autodiff;
use candle_core::{Module, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernels on or off for this process: benchmarks time both paths in one run.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused kernels are switched on (they are unless [`set_enabled`] turned them off): also
/// the switch of the optimizer's kernels (`training::optim`).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the fused kernels take these inputs: switched on, bf16 on a CUDA device, and no gradient to
/// carry (the kernels have no backward pass; a training forward takes the plain, differentiable path).
#[cfg(feature = "cuda")]
fn fused(inputs: &[&Tensor]) -> bool {
    enabled()
        && inputs.iter().all(|t| !t.track_op())
        && crate::kernels::fused_ops::supports(inputs[0])
}

/// Whether the fused kernels take these inputs' values even when they carry a gradient: the ops with a
/// hand-written backward ([`attention`], [`norm_modulate`], [`gated_add`]).
#[cfg(feature = "cuda")]
fn fused_value(inputs: &[&Tensor]) -> bool {
    enabled() && crate::kernels::fused_ops::supports(inputs[0])
}

/// A fused kernel's `value` of three inputs, with `backward` as its gradient where an input carries one.
#[cfg(feature = "cuda")]
fn differentiable3(
    inputs: [&Tensor; 3],
    value: Tensor,
    backward: fn([&Tensor; 3], &Tensor, &Tensor) -> candle_core::Result<[Tensor; 3]>,
) -> candle_core::Result<Tensor> {
    if inputs.iter().all(|t| !t.track_op()) {
        return Ok(value);
    }
    autodiff::with_gradient3(inputs, value, backward)
}

/// FLUX's norms: LayerNorm without affine and the q/k RMS norms, eps 1e-6.
const EPS: f32 = 1e-6;

/// softmax(q kᵀ / √D) v over (B, H, L, D) heads, returned as (B, L, H·D). On the fused path the value
/// comes from the kernel even in training, with [`attention_backward`] as its gradient: the graph then
/// keeps q, k, v, the output and the rows' log-sum-exp, not the (L × L) scores of every head.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_value(&[q, k, v]) && crate::kernels::flash_attn::supports(q) {
        let (b, h, l, d) = q.dims4()?;
        let scale = 1.0 / (d as f32).sqrt();
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        if [q, k, v].iter().all(|t| !t.track_op()) {
            return crate::kernels::flash_attn::flash_attn(&qd, &kd, &vd, scale)?.reshape((
                b,
                l,
                h * d,
            ));
        }
        let (value, lse) = crate::kernels::flash_attn::flash_attn_lse(&qd, &kd, &vd, scale)?;
        return autodiff::with_gradient3(
            [q, k, v],
            value.reshape((b, l, h * d))?,
            move |qkv, o, g| attention_backward(qkv, o, g, Some(&lse)),
        );
    }
    plain_attention(q, k, v)
}

/// [`attention`] recording no graph, with what [`attention_backward`] reads besides q, k, v and the
/// output: the rows' log-sum-exp where the fused kernel ran (None on the plain path).
pub fn attention_saved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if fused_value(&[q, k, v]) && crate::kernels::flash_attn::supports(q) {
        let (b, h, l, d) = q.dims4()?;
        let (value, lse) =
            crate::kernels::flash_attn::flash_attn_lse(q, k, v, 1.0 / (d as f32).sqrt())?;
        return Ok((value.reshape((b, l, h * d))?, Some(lse)));
    }
    Ok((plain_attention(q, k, v)?, None))
}

/// The gradients of q, k and v of [`attention`] from the gradient `g` of its output `o` (both (B, L, H·D)
/// rows; `g` may be a narrow of wider rows) and, from the fused forward, the rows' log-sum-exp `lse`
/// ([`attention_saved`]): with it on the GPU, the kernels of [`crate::kernels::flash_attn::backward`]
/// read `g` where it lies and never write the scores; otherwise [`plain_attention_backward`].
pub fn attention_backward(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    g: &Tensor,
    lse: Option<&Tensor>,
) -> candle_core::Result<[Tensor; 3]> {
    let (_, h, _, d) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if let (Some(lse), true) = (lse, fused_value(&[q, g])) {
        let delta = crate::kernels::fused_ops::head_dot(g, o)?;
        let scale = 1.0 / (d as f32).sqrt();
        return crate::kernels::flash_attn::backward([q, k, v], g, lse, &delta, scale);
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
        autodiff::softmax_last_dim(&scores)?
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

/// A linear layer's `x Wᵀ + b`: on the fused path one cuBLASLt product adds the bias as it writes its
/// output (candle's broadcasting add ran at a tenth of memory speed; a pass of its own cost 9 ms of a
/// 1024² training step).
pub fn linear(base: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Some(bias)) = (fused(&[x]), base.bias()) {
        // cuBLASLt reads the weight and bias as they are stored: row-major, contiguous (as loaded and
        // as merged); another layout takes candle's path.
        if !(base.weight().is_contiguous() && bias.is_contiguous()) {
            return base.forward(x);
        }
        let x = x.contiguous()?;
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        let mut out_dims = dims.to_vec();
        let y = crate::kernels::gemm::linear(&x.reshape((rows, k))?, base.weight(), bias)?;
        *out_dims.last_mut().expect("rank >= 1") = y.dim(1)?;
        return y.reshape(out_dims);
    }
    base.forward(x)
}

/// `LayerNorm(x) · (1 + scale) + shift`: FLUX's norm and modulation before every attention and MLP,
/// x (B, L, C), shift and scale (B, 1, C). On the fused path with [`norm_modulate_backward`] in training.
pub fn norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_value(&[x, shift, scale]) {
        let value = crate::kernels::fused_ops::norm_modulate(
            &x.detach().contiguous()?,
            &shift.detach(),
            &scale.detach(),
            EPS,
        )?;
        return differentiable3([x, shift, scale], value, norm_modulate_backward);
    }
    let c = x.dim(candle_core::D::Minus1)?;
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
    let normed = autodiff::layer_norm(x, &ones, &zeros, EPS)?;
    normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// The gradients of x, shift and scale of [`norm_modulate`] from its output's `g`, in f32: with
/// x̂ = (x − μ)/σ and g' = g·(1 + scale), dx = (g' − mean(g') − x̂·mean(g'·x̂))/σ; the modulation's
/// gradients are sums over the tokens. One kernel (and a column sum) on the fused path.
pub fn norm_modulate_backward(
    [x, shift, scale]: [&Tensor; 3],
    _: &Tensor,
    g: &Tensor,
) -> candle_core::Result<[Tensor; 3]> {
    use candle_core::{DType, D};
    #[cfg(feature = "cuda")]
    if fused_value(&[x, g]) {
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

/// `r + x · gate`: the gated residual after every attention and MLP, gate (B, 1, C).
pub fn gated_add(r: &Tensor, x: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_value(&[r, x, gate]) {
        let value = crate::kernels::fused_ops::gated_add(
            &r.detach().contiguous()?,
            &x.detach().contiguous()?,
            &gate.detach(),
        )?;
        return differentiable3([r, x, gate], value, gated_add_backward);
    }
    r + x.broadcast_mul(gate)?
}

/// The gradients of r, x and gate of [`gated_add`]: g, g·gate, and Σ g·x over the tokens (in f32); one
/// kernel on the fused path.
pub fn gated_add_backward(
    [_, x, gate]: [&Tensor; 3],
    _: &Tensor,
    g: &Tensor,
) -> candle_core::Result<[Tensor; 3]> {
    use candle_core::DType;
    #[cfg(feature = "cuda")]
    if fused_value(&[x, g]) {
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

/// tanh-approximated GELU, FLUX's MLP activation. With a gradient on CUDA its backward pass is one kernel
/// (candle composes it of a dozen elementwise ops).
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.track_op() && fused_value(&[x]) {
        let value = x.detach().gelu()?;
        return autodiff::with_gradient(x, value, |x, _, g| gelu_backward(x, g));
    }
    x.gelu()
}

/// `g · gelu′(x)` for [`gelu`]: one kernel on the fused path, in f32 otherwise, with
/// gelu′(x) = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3c·x²), t = tanh(√(2/π)(x + c·x³)), c = 0.044715.
pub fn gelu_backward(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::DType;
    #[cfg(feature = "cuda")]
    if fused_value(&[x, g]) {
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
    dst: &Tensor,
    at: usize,
    x: &Tensor,
    g: &Tensor,
) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if fused_value(&[x, g]) {
        return crate::kernels::fused_ops::gelu_backward_into(dst, at, x, g);
    }
    dst.slice_set(
        &gelu_backward(x, g)?.contiguous()?,
        candle_core::D::Minus1,
        at,
    )
}

/// `[a | gelu(m)]` along the last dim (tanh-approximated GELU, as FLUX's MLPs use): the single
/// block's attention output beside its MLP activation.
pub fn gelu_cat(a: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&[a, m]) {
        return crate::kernels::fused_ops::gelu_cat(&a.contiguous()?, m);
    }
    Tensor::cat(&[a, &gelu(m)?], candle_core::D::Minus1)
}

/// RoPE tables for a run of positions: cos and sin (L, D/2), and both side by side (L, D) for the
/// fused kernel.
#[derive(Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    #[cfg(feature = "cuda")]
    packed: Tensor,
}

impl Rope {
    pub fn new(cos: Tensor, sin: Tensor) -> candle_core::Result<Self> {
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
    qkv: &Tensor,
    heads: usize,
    scales: &QkScales,
    rope: &Rope,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let d = scales.q.dim(0)?;
    #[cfg(feature = "cuda")]
    if fused_value(&[qkv]) && d == crate::kernels::flash_attn::HEAD_DIM && qkv.is_contiguous() {
        let mut out = crate::kernels::fused_ops::qkv_heads(
            &qkv.detach(),
            &scales.both,
            &rope.packed,
            heads,
            EPS,
        )?;
        if qkv.track_op() {
            let (scales, rope) = (scales.clone(), rope.clone());
            out = autodiff::with_gradient(qkv, out, move |qkv, _, g| {
                let (gq, gk, gv) = (g.get(0)?, g.get(1)?, g.get(2)?);
                qkv_heads_grad(qkv, [&gq, &gk, &gv], 0, heads, &scales, &rope)
            })?;
        }
        return Ok((out.get(0)?, out.get(1)?, out.get(2)?));
    }
    let qkv = qkv.narrow(2, 0, 3 * heads * d)?;
    let qkv = qkv.reshape((b, l, 3, heads, d))?.permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let q = autodiff::rms_norm(&q, &scales.q, EPS)?;
    let k = autodiff::rms_norm(&k, &scales.k, EPS)?;
    let q = autodiff::rope_i(&q, &rope.cos, &rope.sin)?;
    let k = autodiff::rope_i(&k, &rope.cos, &rope.sin)?;
    Ok((q, k, v))
}

/// [`qkv_heads_backward`] from the heads' gradients `dq`, `dk`, `dv` (B, H, L', D) at the tokens
/// `at .. at + L` of `qkv`'s L rows (a double block's stream is a part of the joint attention): one
/// kernel reading them in place on the fused path.
pub fn qkv_heads_grad(
    qkv: &Tensor,
    [dq, dk, dv]: [&Tensor; 3],
    at: usize,
    heads: usize,
    scales: &QkScales,
    rope: &Rope,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_value(&[qkv, dq]) {
        let tables = Tensor::cat(&[&scales.both, &rope.packed], 0)?;
        return crate::kernels::fused_ops::qkv_heads_backward(
            qkv,
            [&dq.contiguous()?, &dk.contiguous()?, &dv.contiguous()?],
            at,
            &tables,
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
/// `g`: RoPE's backward is the rotation the other way (−sin), the RMS norm's
/// dx = r·(w·g) − x·r³·mean(w·g·x) with r = 1/√(mean(x²) + ε); v's passes through; the rows past
/// 3·H·D (a single block's MLP input) get none.
pub fn qkv_heads_backward(
    qkv: &Tensor,
    g: &Tensor,
    heads: usize,
    [scale_q, scale_k]: [&Tensor; 2],
    [cos, sin]: [&Tensor; 2],
) -> candle_core::Result<Tensor> {
    use candle_core::{DType, D};
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
        let unrotated = candle_nn::rotary_emb::rope_i(&g.get(i)?.contiguous()?, cos, &neg_sin)?;
        let x = raw.get(i)?.to_dtype(DType::F32)?;
        let gw = unrotated
            .to_dtype(DType::F32)?
            .broadcast_mul(&w.to_dtype(DType::F32)?)?;
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

/// GroupNorm over (B, C, H, W) with `plain`'s groups and parameters (`weight`, `bias` are its (C,)
/// affine, which candle keeps private), then SiLU when `silu`: the autoencoder's normalisation.
pub fn group_norm(
    x: &Tensor,
    plain: &candle_nn::GroupNorm,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&[x]) && x.rank() >= 3 && x.dims()[2..].iter().product::<usize>() % 8 == 0 {
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

/// A 2-D convolution. The 3x3 stride-1 padding-1 kind with a bias (nearly all of the autoencoder's
/// work) runs on CUDA in bf16 as one matrix product per image (and group of output channels),
/// [`conv_taps`], and a fused [`tap_sum`]; candle's im2col path, which gathers a 9·Cin-row copy of
/// the input first, ran those at 10 TFLOP/s. Everything else takes candle's convolution.
pub fn conv2d(x: &Tensor, conv: &candle_nn::Conv2d) -> candle_core::Result<Tensor> {
    upsample_conv2d(x, conv, 1)
}

/// [`conv2d`] of `x` upsampled `up` times by nearest neighbour (the autoencoder's upsamplers). On the
/// fused path the upsampled input is never made: the taps of `x` itself are summed at the output's
/// positions divided by `up`, a quarter of the product's work and memory for `up` = 2.
pub fn upsample_conv2d(
    x: &Tensor,
    conv: &candle_nn::Conv2d,
    up: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    #[cfg(feature = "cuda")]
    if let Some(bias) = conv.bias() {
        let c = conv.config();
        let k = conv.weight().dims();
        if fused(&[x])
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
    use candle_core::{DType, Device, Var};

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

    type Backward = fn([&Tensor; 3], &Tensor, &Tensor) -> candle_core::Result<[Tensor; 3]>;

    /// A hand-written backward (given the plain path's value, as the fused kernel's stands in for it on
    /// CUDA) against candle's autograd through the plain path, for inputs of these shapes.
    fn check(
        shapes: [&[usize]; 3],
        plain: impl Fn([&Tensor; 3]) -> candle_core::Result<Tensor>,
        backward: Backward,
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let vars = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::randn(0f32, 1.0, *s, &dev)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inputs = [0, 1, 2].map(|i| vars[i].as_tensor());
        let detached = inputs.map(|t| t.detach());
        let value = plain([&detached[0], &detached[1], &detached[2]])?;
        let weights = Tensor::randn(0f32, 1.0, value.shape(), &dev)?;
        let grads_of = |y: Tensor| (y * &weights)?.sum_all()?.backward();
        let ours = grads_of(autodiff::with_gradient3(inputs, value, backward)?)?;
        let want = grads_of(plain(inputs)?)?;
        for var in &vars {
            let (a, b) = (ours.get(var.as_tensor()), want.get(var.as_tensor()));
            let (a, b) = (a.expect("a gradient"), b.expect("a gradient"));
            assert_eq!(a.dims(), b.dims());
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 2e-5, "{diff}");
        }
        Ok(())
    }

    #[test]
    fn hand_written_backwards_match_autograd() -> candle_core::Result<()> {
        let heads: &[usize] = &[2, 3, 7, 8];
        check(
            [heads, heads, heads],
            |[q, k, v]| plain_attention(q, k, v),
            |qkv, o, g| attention_backward(qkv, o, g, None),
        )?;
        let (x, m): (&[usize], &[usize]) = (&[2, 5, 16], &[2, 1, 16]);
        check(
            [x, m, m],
            |[x, s, c]| norm_modulate(x, s, c),
            norm_modulate_backward,
        )?;
        check(
            [x, x, m],
            |[r, x, g]| gated_add(r, x, g),
            gated_add_backward,
        )?;
        Ok(())
    }

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
            let (q, k, v) = qkv_heads(x, heads, &scales, &rope)?;
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
