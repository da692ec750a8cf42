//! The engine behind the capability traits of `jobs::capability`: generation and LoRA training on one
//! resident FLUX pipeline, the prompt classifier, and the chat's language model.

pub mod chat;
pub mod classification;
pub mod generation;
pub mod model_choice;
pub mod resident_model;
pub mod training;

use std::sync::Arc;

use crate::config::ServeConfig;
use crate::jobs::capability::{Capabilities, Chat, Classification};
use generation::FluxGeneration;
use training::FluxTraining;

/// The capabilities of this build, from its configuration. A classifier that fails to load leaves the server
/// running without it, the error shown by `/health` and in `/classify/`'s 503, so that generation is not held
/// hostage by a missing encoder; generation loads its models on first use, so only a bad setting stops it here.
pub fn from_config(config: &ServeConfig) -> anyhow::Result<Capabilities> {
    let generation = FluxGeneration::new(config)?;
    // Training shares generation's resident model: one FLUX in memory.
    let trainer = FluxTraining::new(
        generation.resident().clone(),
        generation.default_preset_info(),
    );
    let (classification, classification_error) = match classification::load(&config.classifier) {
        Ok(classifier) => (Some(Arc::new(classifier) as Arc<dyn Classification>), None),
        Err(e) => {
            tracing::warn!("prompt classification is unavailable: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    let (chat, chat_error) = match chat::load(&config.chat) {
        Ok(chat) => (Some(Arc::new(chat) as Arc<dyn Chat>), None),
        Err(e) => {
            tracing::warn!("the chat's language model is unavailable: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    Ok(Capabilities {
        generation: Some(Arc::new(generation)),
        classification,
        classification_error,
        training: Some(Arc::new(trainer)),
        chat,
        chat_error,
    })
}
