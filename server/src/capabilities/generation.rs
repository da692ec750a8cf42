//! The engine's FLUX pipeline behind the server's `Generation` seam: presets and their state, request
//! planning with the LoRA a request asks for, and generation on the resident model.

use super::gpu_share::GpuShare;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Result;
use app::{AppliedLora, ErrorCode, GenerateRequest, PresetInfo};
use engine::hub::DownloadProgress;
use engine::lora::{self, FailedLora, LoraCache, LoraSource, LoraSpec, LoraStack};
use engine::pipeline::{self, FluxPipeline, GenerateParams, InputImage};
use engine::presets::{self, Preset};

use super::model_choice::{self, preset_names};
use super::resident_model::{self, PipelineLoader, ResidentModel};
use crate::config::{PrecisionDefaults, ServeConfig};
use crate::jobs::capability::{
    Control, Generated, Generation, GenerationPlan, Held, JobFailure, LoraChoice, StepUpdate,
};

/// LoRAs a worker is said to hold: as many as the engine's LoRA cache keeps loaded.
const HELD_LORAS: usize = 4;

pub struct FluxGeneration {
    default_preset: &'static Preset,
    resident: Arc<ResidentModel>,
    /// The operator's LoRA folder: the only server-side files a request may name.
    lora_dir: PathBuf,
    loras: LoraCache,
    /// The LoRAs of the last generations (by `LoraChoice::affinity_name`), newest first: what the
    /// LoRA cache holds, for the scheduler.
    recent_loras: Mutex<VecDeque<String>>,
    /// The precision of requests that set none, per preset (`--precision`).
    precision: PrecisionDefaults,
}

impl FluxGeneration {
    pub fn new(config: &ServeConfig) -> Result<Self> {
        Self::with_loader(config, Arc::new(FluxPipeline::load))
    }

    /// With another way to load pipelines than the engine's (a test's, that fails as a load can).
    pub fn with_loader(config: &ServeConfig, loader: Arc<PipelineLoader>) -> Result<Self> {
        Self::on_device(config, config.device.select()?, loader)
    }

    /// On a given device: one worker's, with its own resident model and memory plan.
    pub fn on_device(
        config: &ServeConfig,
        device: candle_core::Device,
        loader: Arc<PipelineLoader>,
    ) -> Result<Self> {
        let named = config
            .preset
            .as_deref()
            .map(model_choice::named)
            .transpose()?;
        let local = match &config.model_dir {
            Some(dir) => Some(resident_model::model_dir(
                named.unwrap_or_else(|| presets::find(presets::FLUX_DEV).expect("built-in preset")),
                dir,
            )?),
            None => None,
        };
        if let Some((name, dir)) = &local {
            let preset = presets::find(name).expect("built-in preset");
            if let Some(l) = preset.lora.as_ref().filter(|l| !hub_cached(l.source)) {
                tracing::warn!(
                    "{name} is served from {}; its LoRA {} is not in the hub cache, so generations go without it (a request naming it downloads it)",
                    dir.display(),
                    l.source
                );
            }
        }
        let default_preset =
            named.unwrap_or_else(|| model_choice::auto_preset(&device, local.is_some()));
        tracing::info!("default model: {} on {:?}", default_preset.name, device);
        let lora_dir = config
            .lora_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("loras"));
        let loras = LoraCache::new(&device, engine::device::compute_dtype(&device));
        Ok(Self {
            default_preset,
            resident: Arc::new(
                ResidentModel::new(device, config.gpu_memory, local, loader)
                    .with_weights(config.weights),
            ),
            lora_dir,
            loras,
            recent_loras: Mutex::default(),
            precision: config.precision.clone().unwrap_or_default(),
        })
    }

    /// The model holder, for the trainer to share.
    /// Shares this worker's GPU with the chat's language model when it is the GPU the chat runs on
    /// (the first): see `gpu_share`.
    pub fn sharing_the_chat_gpu(mut self, share: &Arc<GpuShare>) -> Self {
        let resident = Arc::get_mut(&mut self.resident)
            .expect("the resident model is not handed out before the worker is built");
        if resident.on_the_chat_gpu() {
            resident.share_gpu(share.clone());
        }
        self
    }

    pub fn resident(&self) -> &Arc<ResidentModel> {
        &self.resident
    }

    pub fn default_preset_info(&self) -> &'static Preset {
        self.default_preset
    }

    /// The LoRAs a request gets: the preset's unless it named one, none for `"none"`.
    fn lora_specs(
        &self,
        preset: &Preset,
        choice: &LoraChoice,
        scale: f32,
    ) -> Result<Vec<LoraSpec>, String> {
        let scale = f64::from(scale);
        Ok(match choice {
            LoraChoice::Disabled => Vec::new(),
            LoraChoice::PresetDefault => match &preset.lora {
                None => Vec::new(),
                // A local model folder means "no downloads": its preset's LoRA is used only when the
                // hub cache already holds it (a request can still name it to fetch it).
                Some(l) if self.resident.local_dir(preset).is_some() && !hub_cached(l.source) => {
                    Vec::new()
                }
                Some(l) => vec![LoraSpec::of_preset(l, scale).map_err(|e| e.to_string())?],
            },
            LoraChoice::Trained {
                model_id,
                file,
                keywords,
            } => vec![LoraSpec {
                name: model_id.clone(),
                source: LoraSource::Local(file.clone()),
                scale,
                trigger_words: keywords.clone(),
            }],
            LoraChoice::Named(name) => vec![LoraSpec {
                name: name.clone(),
                source: self.named_lora(name)?,
                scale,
                trigger_words: Vec::new(),
            }],
        })
    }

    /// A name with a slash is a hub reference; one without, a file of the LoRA folder.
    fn named_lora(&self, name: &str) -> Result<LoraSource, String> {
        if name.contains('/') || name.contains(':') {
            return LoraSource::hub(name).map_err(|e| {
                format!("lora {name:?} is not a trained model_id of this server, and {e}")
            });
        }
        let plain = !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if plain {
            for candidate in [name.to_string(), format!("{name}.safetensors")] {
                let path = self.lora_dir.join(candidate);
                if path.is_file() {
                    return Ok(LoraSource::Local(path));
                }
            }
        }
        Err(format!(
            "lora {name:?} is not a trained model_id of this server, a file in the LoRA folder ({}), or a hub LoRA (owner/repo or owner/repo:file.safetensors)",
            folder_listing(&self.lora_dir)
        ))
    }
}

/// The LoRA files of a folder, for error messages.
fn folder_listing(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "it holds none".into()
    } else {
        format!("it holds {}", names.join(", "))
    }
}

/// Whether a hub LoRA reference (`owner/repo:file`) is already in the hub cache.
fn hub_cached(reference: &str) -> bool {
    match LoraSource::hub(reference) {
        Ok(LoraSource::Hub {
            repo,
            file: Some(file),
        }) => engine::hub::is_cached(&repo, &file),
        _ => false,
    }
}

impl Generation for FluxGeneration {
    fn presets(&self) -> Vec<PresetInfo> {
        presets::PRESETS
            .iter()
            .map(|p| PresetInfo {
                id: p.name.to_string(),
                description: p.title.to_string(),
                state: self.resident.state(p),
                memory_plan: self
                    .resident
                    .memory_plan(p)
                    .map(|plan| resident_model::plan_info(&plan)),
                precision: self.precision.of(p.name),
            })
            .collect()
    }

    fn default_preset(&self) -> String {
        self.default_preset.name.to_string()
    }

    fn held(&self) -> Held {
        Held {
            models: self
                .resident
                .loaded_preset()
                .map(str::to_owned)
                .into_iter()
                .collect(),
            loras: self
                .recent_loras
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned()
                .collect(),
        }
    }

    fn memory_plan(&self) -> Option<app::MemoryPlanInfo> {
        self.resident
            .loaded_plan()
            .map(|plan| resident_model::plan_info(&plan))
    }

    fn plan(&self, r: &GenerateRequest, lora: LoraChoice) -> Result<GenerationPlan, String> {
        let preset = match &r.model {
            Some(m) => presets::find(m)
                .ok_or_else(|| format!("unknown model `{m}`: choose one of {}", preset_names()))?,
            None => self.default_preset,
        };
        let lora_scale = r.lora_scale.unwrap_or(1.0);
        let specs = self.lora_specs(preset, &lora, lora_scale)?;
        let width = r.width.unwrap_or(preset.width as u32);
        let height = r.height.unwrap_or(preset.height as u32);
        let default_precision = self.precision.of(preset.name);
        let precision = r.precision.or(default_precision);
        // A loaded model's plan refuses a size, or a precision, that it cannot run before the job is
        // queued; a model not yet loaded refuses it when its job loads it.
        if let Some(plan) = self.resident.memory_plan(preset) {
            plan.fit_at(width as usize, height as usize, precision)
                .map_err(|e| match (r.precision, default_precision) {
                    (None, Some(default)) => format!(
                        "{e} (this request's precision, {}, is the server's --precision / STUDIO_PRECISION for {}: send \"precision\" to choose another)",
                        default.as_str(),
                        preset.name
                    ),
                    _ => e.to_string(),
                })?;
        }
        Ok(GenerationPlan {
            model: preset.name.to_string(),
            prompt: lora::prompt_with_trigger_words(&r.prompt, &specs),
            width,
            height,
            steps: r.steps.unwrap_or(preset.steps as u32),
            guidance: r.guidance.unwrap_or(preset.guidance as f32),
            seed: r.seed.unwrap_or_default(),
            num_images: r.num_images.unwrap_or(1),
            step_cache: r.step_cache.or(preset.step_cache.map(|t| t as f32)),
            precision,
            lora,
            lora_scale,
            input: None,
        })
    }

    fn generate(
        &self,
        plan: &GenerationPlan,
        on_step: &mut dyn FnMut(&StepUpdate) -> Control,
    ) -> Result<Generated> {
        let preset = presets::find(&plan.model)
            .ok_or_else(|| anyhow::anyhow!("unknown model `{}`", plan.model))?;
        // A model that fits in no arrangement of the memory plan is the server's setting, not the request's.
        let pipe = self
            .resident
            .pipeline(preset)
            .map_err(|err| plan_refusal(err, ErrorCode::Unavailable))?;
        let specs = self
            .lora_specs(preset, &plan.lora, plan.lora_scale)
            .map_err(anyhow::Error::msg)?;
        let progress = Arc::new(|p: &DownloadProgress| {
            tracing::debug!("LoRA {}: {} / {} bytes", p.file, p.file_bytes, p.file_total);
        });
        let loras = LoraStack::load(&self.loras, specs, progress).map_err(lora_failure)?;
        if let Some(name) = plan.lora.affinity_name() {
            let mut recent = self
                .recent_loras
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            recent.retain(|n| n != name);
            recent.push_front(name.to_owned());
            recent.truncate(HELD_LORAS);
        }
        // Adapters belong to this generation only: a training run shares the model between requests.
        pipe.set_loras(&loras.scaled())?;
        let applied = loras
            .iter()
            .map(|(s, f)| AppliedLora {
                name: s.name.clone(),
                scale: s.scale as f32,
                skipped: f.skipped.clone(),
            })
            .collect();
        let params = GenerateParams {
            num_images: plan.num_images as usize,
            step_cache: plan.step_cache.map(f64::from),
            precision: plan.precision,
            input: plan.input.as_ref().map(|input| InputImage {
                image: input.image.clone(),
                strength: f64::from(input.strength),
                mask: input.mask.clone(),
            }),
            ..GenerateParams::new(
                plan.prompt.clone(),
                (plan.width as usize, plan.height as usize),
                plan.steps as usize,
                plan.guidance as f64,
                plan.seed,
            )
        };
        let out = pipe.generate(&params, &mut |p| {
            let update = StepUpdate {
                step: p.step as u32,
                total: p.total as u32,
                previews: (0..p.images())
                    .map(|i| p.preview(i))
                    .collect::<Result<_>>()
                    .unwrap_or_default(),
            };
            match on_step(&update) {
                Control::Continue => pipeline::Control::Continue,
                Control::Cancel => pipeline::Control::Cancel,
            }
        });
        pipe.set_loras(&[])?;
        let out = out.map_err(|err| {
            if JobFailure::is_out_of_memory(&err) {
                // What this job left cached goes; the next job encodes its prompt afresh.
                pipe.free_caches();
            }
            plan_refusal(err, ErrorCode::Validation)
        })?;
        Ok(Generated {
            images: out.images,
            seed: out.seed,
            loras: applied,
            skipped_steps: params.step_cache.map(|_| out.timings.skipped_steps as u32),
        })
    }
}

/// What the memory plan refused, with its reason and the setting to change, under `code`: a size it
/// cannot fit, found once the job loaded the model (422), or a model that fits in no arrangement (503).
fn plan_refusal(err: anyhow::Error, code: ErrorCode) -> anyhow::Error {
    match err
        .chain()
        .find_map(|c| c.downcast_ref::<engine::memory::NoFit>())
    {
        Some(no_fit) => anyhow::Error::new(JobFailure {
            code,
            message: no_fit.to_string(),
        }),
        None => err,
    }
}

/// A LoRA that could not be had: a hub one is the hub's or the name's fault (typed, so the request gets 422 or
/// 503); a local one that fails to load is reported as it is.
fn lora_failure(err: anyhow::Error) -> anyhow::Error {
    let from_hub = err
        .downcast_ref::<FailedLora>()
        .is_some_and(|failed| matches!(failed.0.source, LoraSource::Hub { .. }));
    if !from_hub {
        return err;
    }
    let code = if err.chain().any(|c| c.is::<engine::hub::NotFound>()) {
        JobFailure::LORA_NOT_FOUND
    } else {
        JobFailure::LORA_UNAVAILABLE
    };
    anyhow::Error::new(JobFailure {
        code,
        message: format!(
            "{err:#} (a LoRA can also be put in the server's LoRA folder and named by its file name)"
        ),
    })
}
