//! Scaled dot-product attention over (B, H, L, D) heads, returned as (B, L, H·D). On CUDA in bf16
//! with head dim 128 (FLUX) it runs the fused kernel of [`crate::kernels::flash_attn`]; everywhere
//! else (CPU, f32, tests) the plain matmul → softmax → matmul, which is also the reference the fused
//! kernel is checked against (`flux-bench attention`).

use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernel on or off for this process: benchmarks time both paths in one run.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

/// softmax(q kᵀ / √D) v, taking the fused kernel where it applies.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if FUSED.load(Ordering::Relaxed) && crate::kernels::flash_attn::supports(q) {
        let (b, h, l, d) = q.dims4()?;
        let scale = 1.0 / (d as f32).sqrt();
        return crate::kernels::flash_attn::flash_attn(q, k, v, scale)?.reshape((b, l, h * d));
    }
    plain(q, k, v)
}

/// The unfused path: materialises the (L × L) scores of every head.
pub fn plain(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    // Scaling q (L·D values) is cheaper than scaling the scores (L·L).
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let scores = q.matmul(&k.t()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(v)?.transpose(1, 2)?.reshape((b, l, h * d))
}
