//! The engine's FLUX pipeline behind the server's `Generation` seam: presets and their state,
//! request planning, and one resident pipeline on the worker thread.

use crate::config::ServeConfig;
use crate::jobs::capability::{
    Control, Generated, Generation, GenerationPlan, LoraChoice, StepUpdate,
};
use anyhow::Result;
use app::{GenerateRequest, ModelState, PresetInfo};
use candle_core::Device;
use engine::hub::{DownloadProgress, Source};
use engine::pipeline::{self, FluxPipeline, GenerateParams, LoadOptions};
use engine::presets::{self, Preset, PresetSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct FluxGeneration {
    default_preset: &'static Preset,
    resident: Arc<Resident>,
}

/// The one pipeline in memory, shared by generation and training: GPU memory holds one FLUX at a time.
pub struct Resident {
    device: Device,
    loaded: Mutex<Option<(&'static str, Arc<FluxPipeline>)>>,
    downloads: Arc<Mutex<HashMap<&'static str, f32>>>,
}

impl FluxGeneration {
    pub fn new(config: &ServeConfig) -> Result<Self> {
        let device = config.device.select()?;
        let default_preset = match &config.preset {
            Some(name) => presets::find(name).ok_or_else(|| {
                anyhow::anyhow!("unknown preset `{name}`: choose one of {}", preset_names())
            })?,
            None => auto_preset(&device),
        };
        tracing::info!("default model: {} on {:?}", default_preset.name, device);
        Ok(Self {
            default_preset,
            resident: Arc::new(Resident {
                device,
                loaded: Mutex::new(None),
                downloads: Arc::default(),
            }),
        })
    }

    /// The model holder, for the trainer to share.
    pub fn resident(&self) -> &Arc<Resident> {
        &self.resident
    }

    pub fn default_preset_info(&self) -> &'static Preset {
        self.default_preset
    }

    fn pipeline(&self, preset: &'static Preset) -> Result<Arc<FluxPipeline>> {
        self.resident.pipeline(preset)
    }
}

impl Resident {
    /// The preset's pipeline, loaded (and downloaded) on first use. Another preset replaces the resident
    /// one, unless a training run is using it.
    pub fn pipeline(&self, preset: &'static Preset) -> Result<Arc<FluxPipeline>> {
        let mut resident = self.loaded.lock().expect("pipeline lock poisoned");
        if let Some((name, p)) = resident.as_ref() {
            if *name == preset.name {
                return Ok(p.clone());
            }
            if Arc::strong_count(p) > 1 {
                anyhow::bail!(
                    "{name} is in use by a training run; {} can be used when it ends (or cancel it)",
                    preset.name
                );
            }
        }
        // Free the old model before loading the next one.
        *resident = None;
        let downloads = self.downloads.clone();
        let name = preset.name;
        let progress = Arc::new(move |p: &DownloadProgress| {
            let f = if p.files_total == 0 {
                0.0
            } else {
                let file = if p.file_total == 0 {
                    0.0
                } else {
                    p.file_bytes as f32 / p.file_total as f32
                };
                (p.files_done as f32 + file) / p.files_total as f32
            };
            downloads
                .lock()
                .expect("download lock poisoned")
                .insert(name, f);
        });
        tracing::info!("loading {}", preset.title);
        let loaded = FluxPipeline::load(&LoadOptions::from_preset(preset), &self.device, progress);
        self.downloads
            .lock()
            .expect("download lock poisoned")
            .remove(name);
        let p = Arc::new(loaded?);
        *resident = Some((preset.name, p.clone()));
        Ok(p)
    }

    fn state(&self, p: &Preset) -> ModelState {
        if let Ok(r) = self.loaded.try_lock() {
            if r.as_ref().is_some_and(|(n, _)| *n == p.name) {
                return ModelState::Loaded;
            }
        }
        if let Some(f) = self
            .downloads
            .lock()
            .expect("download lock poisoned")
            .get(p.name)
        {
            return ModelState::Downloading { progress: *f };
        }
        let on_disk = match (&p.source, p.source.to_source()) {
            (PresetSource::Hub(repo), _) => engine::hub::is_cached(repo, "model_index.json"),
            (_, Source::Local(dir)) => dir.join("model_index.json").is_file(),
            (_, Source::Hub(_)) => false,
        };
        if on_disk {
            ModelState::Ready
        } else {
            ModelState::Absent
        }
    }
}

fn preset_names() -> String {
    presets::PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// FLUX.1-dev on a GPU; without one, the small preset that runs on a CPU, announced in the log
/// and named in every response's `model`.
fn auto_preset(device: &Device) -> &'static Preset {
    let name = if device.is_cuda() {
        presets::FLUX_DEV
    } else {
        tracing::warn!(
            "no CUDA GPU: the default model is {} (FLUX.1-dev needs an NVIDIA GPU); pass --preset to choose",
            presets::FLUX_TINY
        );
        presets::FLUX_TINY
    };
    presets::find(name).expect("built-in preset")
}

impl Generation for FluxGeneration {
    fn presets(&self) -> Vec<PresetInfo> {
        presets::PRESETS
            .iter()
            .map(|p| PresetInfo {
                id: p.name.to_string(),
                description: p.title.to_string(),
                state: self.resident.state(p),
            })
            .collect()
    }

    fn default_preset(&self) -> String {
        self.default_preset.name.to_string()
    }

    fn plan(&self, r: &GenerateRequest, lora: LoraChoice) -> Result<GenerationPlan, String> {
        let preset = match &r.model {
            Some(m) => presets::find(m)
                .ok_or_else(|| format!("unknown model `{m}`: choose one of {}", preset_names()))?,
            None => self.default_preset,
        };
        match lora {
            LoraChoice::PresetDefault | LoraChoice::Disabled => {}
            LoraChoice::Trained { .. } | LoraChoice::Named(_) => return Err(
                "LoRA adapters are not supported by this build yet: omit `lora` or send \"none\""
                    .into(),
            ),
        }
        Ok(GenerationPlan {
            model: preset.name.to_string(),
            prompt: r.prompt.clone(),
            width: r.width.unwrap_or(preset.width as u32),
            height: r.height.unwrap_or(preset.height as u32),
            steps: r.steps.unwrap_or(preset.steps as u32),
            guidance: r.guidance.unwrap_or(preset.guidance as f32),
            seed: r.seed.unwrap_or_default(),
            lora,
            lora_scale: r.lora_scale.unwrap_or(1.0),
        })
    }

    fn generate(
        &self,
        plan: &GenerationPlan,
        on_step: &mut dyn FnMut(&StepUpdate) -> Control,
    ) -> Result<Generated> {
        let preset = presets::find(&plan.model)
            .ok_or_else(|| anyhow::anyhow!("unknown model `{}`", plan.model))?;
        let pipe = self.pipeline(preset)?;
        let params = GenerateParams {
            prompt: plan.prompt.clone(),
            width: plan.width as usize,
            height: plan.height as usize,
            steps: plan.steps as usize,
            guidance: plan.guidance as f64,
            seed: plan.seed,
        };
        let out = pipe.generate(&params, &mut |p| {
            let update = StepUpdate {
                step: p.step as u32,
                total: p.total as u32,
                preview: p.preview().ok(),
            };
            match on_step(&update) {
                Control::Continue => pipeline::Control::Continue,
                Control::Cancel => pipeline::Control::Cancel,
            }
        })?;
        Ok(Generated {
            image: out.image,
            seed: out.seed,
        })
    }
}
