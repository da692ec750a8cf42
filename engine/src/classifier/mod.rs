//! The prompt classifier: routes a chat message to image generation or to conversation.
//!
//! A BERT-family sentence encoder (all-MiniLM-L6-v2 by default, installed by
//! `scripts/fetch-models`) embeds the prompt; a small head turns the embedding into a calibrated
//! probability. The head file (`train-classifier`, committed under `engine/assets/`) also holds
//! the encoder's last layers as this project fine-tuned them, which run in place of the
//! pretrained ones.

mod data;
mod encoder;
mod finetune;
mod head;
mod label;
mod metrics;
mod top;
mod train;

use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::Device;

pub use data::{Example, Split, DEFAULT_DATA_DIR};
pub use encoder::{pool, EncoderSource, SentenceEncoder, DEFAULT_ENCODER_DIR};
pub use finetune::{finetune, TuneConfig};
pub use head::{Head, DEFAULT_HEAD_PATH};
pub use label::Label;
pub use metrics::{Metrics, ReliabilityBin};
pub use top::TopLayers;
pub use train::{fit_temperature, train_head, EpochReport, TrainConfig};

/// Batches for many prompts at once: large enough to use both cores well, small enough that
/// sorting by length keeps padding low.
const BATCH: usize = 32;

pub struct PromptClassifier {
    encoder: SentenceEncoder,
    head: Head,
}

impl PromptClassifier {
    pub fn load(encoder: &EncoderSource, head: &Path, device: &Device) -> Result<Self> {
        let head = Head::load(head, device)?;
        let encoder = SentenceEncoder::load_with_top(encoder, device, head.top.clone())?;
        Self::from_parts(encoder, head)
    }

    /// Fails when the head was trained on embeddings of another width than this encoder's.
    pub fn from_parts(encoder: SentenceEncoder, head: Head) -> Result<Self> {
        let expected = head.input_size()?;
        ensure!(
            expected == encoder.hidden_size(),
            "the classifier head expects {expected}-wide embeddings but the encoder gives {}; \
             train a head for this encoder",
            encoder.hidden_size()
        );
        Ok(Self { encoder, head })
    }

    /// The calibrated probability that the prompt asks for an image rather than conversation.
    pub fn image_request_probability(&self, prompt: &str) -> Result<f32> {
        let p = self
            .head
            .image_probabilities(&self.encoder.embed(&[prompt])?)?;
        Ok(p[0])
    }

    /// `image_request_probability` for many prompts, in their order, batched for speed.
    pub fn image_request_probabilities(&self, prompts: &[&str]) -> Result<Vec<f32>> {
        let embeddings = self.encoder.embed_all(prompts, BATCH)?;
        self.head.image_probabilities(&embeddings)
    }
}
