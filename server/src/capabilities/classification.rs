//! The engine's prompt classifier behind the server's `Classification` seam.

use anyhow::{Context, Result};
use app::ContextTurn;
use candle_core::Device;
use engine::classifier::{EncoderSource, PromptClassifier};

use crate::config::ClassifierConfig;
use crate::jobs::capability::Classification;

/// The classifier the settings name, always on the CPU: it is small and fast there, and GPU memory is left
/// to FLUX.
pub fn load(config: &ClassifierConfig) -> Result<PromptClassifier> {
    let encoder = EncoderSource::parse(&config.classifier_model)?;
    PromptClassifier::load(&encoder, &config.classifier_head, &Device::Cpu).with_context(|| {
        format!(
            "loading the prompt classifier (encoder {}, head {}; relative paths are taken from the \
             working directory, the repository root under scripts/run)",
            config.classifier_model,
            config.classifier_head.display()
        )
    })
}

impl Classification for PromptClassifier {
    fn image_request_probability(&self, prompt: &str, context: &[ContextTurn]) -> Result<f32> {
        PromptClassifier::image_request_probability(self, prompt, context)
    }
}
