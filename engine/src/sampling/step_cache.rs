//! The first-block cache (ParaAttention's, as diffusers' `FirstBlockCacheConfig` applies it): each
//! step runs the transformer's first double block, and when what that block added to the image
//! tokens changed little since the last fully computed step, the other blocks are skipped and what
//! they added then is added again. Off unless a request or preset asks for it.

use crate::models::flux::{FluxInputs, FluxTransformer};
use anyhow::Result;
use candle_core::{DType, Tensor};

/// One denoising run's cache: make a new one for each run.
pub struct StepCache {
    threshold: f64,
    /// What the first block added at the last fully computed step.
    first_residual: Option<Tensor>,
    /// What the blocks after the first added at that step.
    rest_residual: Option<Tensor>,
    skipped: usize,
}

impl StepCache {
    /// Skips the rest of a step when the first block's residual moved by less than `threshold` of its
    /// size (mean absolute difference over mean absolute value) since the last computed step. At 0
    /// it never skips.
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            first_residual: None,
            rest_residual: None,
            skipped: 0,
        }
    }

    /// The steps that reused the cache so far.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The model's velocity for one step, reusing the cache where it may.
    pub fn forward(&mut self, model: &FluxTransformer, x: &FluxInputs) -> Result<Tensor> {
        let first = model.first_block(x)?;
        let residual = first.img_residual()?;
        if let (Some(previous), Some(rest)) = (&self.first_residual, &self.rest_residual) {
            if relative_change(&residual, previous)? < self.threshold {
                self.skipped += 1;
                let img = (first.img() + rest)?;
                return model.velocity(&img, &first);
            }
        }
        let img = model.remaining_blocks(&first)?;
        self.rest_residual = Some((&img - first.img())?);
        self.first_residual = Some(residual);
        model.velocity(&img, &first)
    }
}

/// mean |a - b| / mean |b|, in f32 whatever the model's dtype (a bf16 mean over a large tensor loses
/// the small differences the threshold is about).
fn relative_change(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let diff = (&a - &b)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    let size = b.abs()?.mean_all()?.to_scalar::<f32>()?;
    Ok(f64::from(diff) / f64::from(size))
}
