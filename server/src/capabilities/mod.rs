//! The engine behind the capability traits of `jobs::capability`: per worker (one per device), generation
//! and LoRA training on one resident FLUX pipeline; the prompt classifier, and the chat's language model.

pub mod chat;
pub mod classification;
pub mod generation;
pub mod gpu_share;
pub mod model_choice;
pub mod resident_model;
pub mod training;

use std::sync::Arc;

use crate::config::ServeConfig;
use crate::jobs::capability::{
    Capabilities, Chat, Classification, Generation, Training, WorkerEngine,
};
use candle_core::Device;
use engine::pipeline::FluxPipeline;
use generation::FluxGeneration;
use gpu_share::GpuShare;
use training::FluxTraining;

/// The capabilities of this build, from its configuration. A classifier that fails to load leaves the server
/// running without it, the error shown by `/health` and in `/classify/`'s 503, so that generation is not held
/// hostage by a missing encoder; generation loads its models on first use, so only a bad setting stops it here.
pub fn from_config(config: &ServeConfig) -> anyhow::Result<Capabilities> {
    // The chat's language model runs on the first GPU, shared with the worker there.
    let gpu_share = Arc::new(GpuShare::default());
    let workers = worker_devices(config)?
        .into_iter()
        .map(|device| {
            let name = engine::device::device_name(&device);
            let generation =
                FluxGeneration::on_device(config, device, Arc::new(FluxPipeline::load))?
                    .sharing_the_chat_gpu(&gpu_share);
            // Training shares its worker's resident model: one FLUX in each device's memory.
            let trainer = FluxTraining::new(
                generation.resident().clone(),
                generation.default_preset_info(),
            );
            Ok(WorkerEngine {
                device: name,
                generation: Some(Arc::new(generation) as Arc<dyn Generation>),
                training: Some(Arc::new(trainer) as Arc<dyn Training>),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (classification, classification_error) = match classification::load(&config.classifier) {
        Ok(classifier) => (Some(Arc::new(classifier) as Arc<dyn Classification>), None),
        Err(e) => {
            tracing::warn!("prompt classification is unavailable: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    let (chat, chat_error) = match chat::load(&config.chat).map(|c| c.with_gpu_share(gpu_share)) {
        Ok(chat) => (Some(Arc::new(chat) as Arc<dyn Chat>), None),
        Err(e) => {
            tracing::warn!("the chat's language model is unavailable: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    Ok(Capabilities {
        generation: workers[0].generation.clone(),
        classification,
        classification_error,
        training: workers[0].training.clone(),
        chat,
        chat_error,
        workers,
    })
}

/// A device per worker: each GPU of `--gpus`, else `--workers` times the `--device`, which must then be
/// the CPU when there are several (two copies of a model on one GPU only compete for its memory).
fn worker_devices(config: &ServeConfig) -> anyhow::Result<Vec<Device>> {
    if let Some(gpus) = &config.gpus {
        return gpus.select();
    }
    let device = config.device.select()?;
    if config.workers > 1 && !device.is_cpu() {
        anyhow::bail!(
            "--workers {} runs several workers on the CPU, but the device is {}: use --gpus (e.g. --gpus all) for a worker per GPU, or --device cpu",
            config.workers,
            engine::device::device_name(&device)
        );
    }
    Ok(vec![device; config.workers as usize])
}
