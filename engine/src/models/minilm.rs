//! MiniLM (all-MiniLM-L6-v2, the classifier's sentence encoder) as the text encoder of the built-in
//! model: its token states stand in for T5's (padded with zeros to a fixed length, so that captions of
//! any length batch together) and its sentence embedding (mean-pooled, unit length) for CLIP's pooled
//! output.

use crate::classifier::{pool, EncoderSource, SentenceEncoder};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub struct MiniLmPrompt {
    encoder: SentenceEncoder,
    /// Token states per prompt: longer prompts are cut, shorter ones padded with zeros.
    tokens: usize,
}

impl MiniLmPrompt {
    pub fn load(dir: &Path, tokens: usize, device: &Device) -> Result<Self> {
        let encoder = SentenceEncoder::load(&EncoderSource::Dir(dir.to_path_buf()), device)?;
        Ok(Self { encoder, tokens })
    }

    /// Token states (1, tokens, 384) and the sentence embedding (1, 384), f32.
    pub fn encode(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let (hidden, mask) = self.encoder.bottom_states(&[prompt])?;
        let pooled = pool(&hidden, &mask)?;
        let states = hidden.broadcast_mul(&mask.to_dtype(DType::F32)?.unsqueeze(2)?)?;
        let (_, len, dim) = states.dims3()?;
        let kept = states.narrow(1, 0, len.min(self.tokens))?;
        let txt = if len < self.tokens {
            let pad = Tensor::zeros((1, self.tokens - len, dim), DType::F32, kept.device())?;
            Tensor::cat(&[&kept, &pad], 1)?
        } else {
            kept
        };
        Ok((txt, pooled))
    }
}
