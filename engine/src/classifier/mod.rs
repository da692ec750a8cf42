//! The prompt classifier: routes a chat message to image generation or to conversation.
//!
//! A BERT-family sentence encoder (all-MiniLM-L6-v2 by default, installed by
//! `scripts/fetch-models`) embeds the prompt; a small head turns the embedding, with what the
//! conversation's last answer was (`context`), into a calibrated probability. The head file (`train-classifier`, committed under `engine/assets/`) also holds
//! the encoder's last layers as this project fine-tuned them, which run in place of the
//! pretrained ones.

mod bert;
mod context;
mod data;
mod encoder;
mod head;
mod label;
mod metrics;

use std::path::Path;

use anyhow::{ensure, Result};
use app::{ContextTurn, TurnKind};
use candle_core::Device;

pub use context::{context_features, context_tensor, CONTEXT_FEATURES};
pub use data::{Example, Split, DEFAULT_DATA_DIR, HELD_OUT_SPLITS};
pub use encoder::{length_order, pool, EncoderSource, SentenceEncoder, DEFAULT_ENCODER_DIR};
pub use head::{Head, DEFAULT_HEAD_PATH};
pub use label::Label;
pub use metrics::{Metrics, ReliabilityBin};

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
        let width = encoder.hidden_size();
        ensure!(
            expected == width || expected == width + CONTEXT_FEATURES,
            "the classifier head expects {expected}-wide inputs but the encoder gives {width}-wide \
             embeddings; train a head for this encoder",
        );
        Ok(Self { encoder, head })
    }

    /// Whether the head reads the context (heads trained before it existed do not).
    pub fn reads_context(&self) -> bool {
        self.head
            .input_size()
            .is_ok_and(|w| w > self.encoder.hidden_size())
    }

    /// The calibrated probability that the prompt asks for an image rather than conversation, given
    /// the turns before it (oldest first; empty for a message judged alone).
    pub fn image_request_probability(&self, prompt: &str, context: &[ContextTurn]) -> Result<f32> {
        let embedding = self.encoder.embed(&[prompt])?;
        let context = context_tensor(&[app::last_answer(context)], self.encoder.device())?;
        Ok(self.head.image_probabilities(&embedding, &context)?[0])
    }

    /// `image_request_probability` for many prompts, in their order, batched for speed; each
    /// prompt comes with its conversation's last answer (`app::last_answer`).
    pub fn image_request_probabilities(
        &self,
        prompts: &[&str],
        last_answers: &[Option<TurnKind>],
    ) -> Result<Vec<f32>> {
        ensure!(
            prompts.len() == last_answers.len(),
            "one last answer per prompt"
        );
        let embeddings = self.encoder.embed_all(prompts, BATCH)?;
        let context = context_tensor(last_answers, self.encoder.device())?;
        self.head.image_probabilities(&embeddings, &context)
    }
}
