//! The engine's FLUX pipeline behind the server's `Generation` seam: presets and their state,
//! request planning, and one resident pipeline on the worker thread.

use crate::config::ServeConfig;
use crate::jobs::capability::{
    Control, Generated, Generation, GenerationPlan, JobFailure, LoraChoice, StepUpdate,
};
use anyhow::Result;
use app::{AppliedLora, GenerateRequest, ModelState, PresetInfo};
use candle_core::Device;
use engine::hub::{DownloadProgress, Source};
use engine::lora::{self, LoraCache, LoraSource, LoraSpec};
use engine::pipeline::{self, FluxPipeline, GenerateParams, LoadOptions};
use engine::presets::{self, Preset, PresetSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct FluxGeneration {
    default_preset: &'static Preset,
    resident: Arc<Resident>,
    /// The operator's LoRA folder: the only server-side files a request may name.
    lora_dir: PathBuf,
    loras: LoraCache,
}

/// The one pipeline in memory, shared by generation and training: GPU memory holds one FLUX at a time.
pub struct Resident {
    device: Device,
    /// `--model-dir`: the preset it stands in for and the folder.
    local: Option<(&'static str, PathBuf)>,
    loaded: Mutex<Option<(&'static str, Arc<FluxPipeline>)>>,
    downloads: Arc<Mutex<HashMap<&'static str, f32>>>,
}

impl FluxGeneration {
    pub fn new(config: &ServeConfig) -> Result<Self> {
        let device = config.device.select()?;
        let named = match &config.preset {
            Some(name) => Some(presets::find(name).ok_or_else(|| {
                anyhow::anyhow!("unknown preset `{name}`: choose one of {}", preset_names())
            })?),
            None => None,
        };
        let local = match &config.model_dir {
            Some(dir) => Some(local_model(
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
        let default_preset = named.unwrap_or_else(|| auto_preset(&device, local.is_some()));
        tracing::info!("default model: {} on {:?}", default_preset.name, device);
        let lora_dir = config
            .lora_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("loras"));
        let loras = LoraCache::new(&device, engine::device::compute_dtype(&device));
        Ok(Self {
            default_preset,
            resident: Arc::new(Resident {
                device,
                local,
                loaded: Mutex::new(None),
                downloads: Arc::default(),
            }),
            lora_dir,
            loras,
        })
    }

    /// The model holder, for the trainer to share.
    pub fn resident(&self) -> &Arc<Resident> {
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
                Some(l) => vec![LoraSpec {
                    name: l.source.to_string(),
                    source: LoraSource::hub(l.source).map_err(|e| e.to_string())?,
                    scale: l.scale * scale,
                    trigger_words: l.trigger_words.iter().map(|w| w.to_string()).collect(),
                }],
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
        let mut options = LoadOptions::from_preset(preset);
        if let Some(dir) = self.local_dir(preset) {
            options.source = Source::Local(dir.to_path_buf());
        }
        tracing::info!("loading {} from {:?}", preset.title, options.source);
        let loaded = FluxPipeline::load(&options, &self.device, progress);
        self.downloads
            .lock()
            .expect("download lock poisoned")
            .remove(name);
        let p = Arc::new(loaded?);
        *resident = Some((preset.name, p.clone()));
        Ok(p)
    }

    /// The `--model-dir` folder, when it stands in for this preset.
    fn local_dir(&self, p: &Preset) -> Option<&Path> {
        self.local
            .as_ref()
            .filter(|(name, _)| *name == p.name)
            .map(|(_, dir)| dir.as_path())
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
            _ if self.local_dir(p).is_some() => true,
            (PresetSource::Hub(_), _) => engine::pipeline::LoadOptions::from_preset(p).is_ready(),
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

fn preset_names() -> String {
    presets::PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--model-dir` checked: a folder in diffusers' layout standing in for a hub preset.
fn local_model(preset: &'static Preset, dir: &Path) -> Result<(&'static str, PathBuf)> {
    anyhow::ensure!(
        matches!(preset.source, PresetSource::Hub(_)),
        "--model-dir stands in for a model downloaded from the hub; {} comes with the studio (choose flux-dev or flux-schnell with --preset)",
        preset.name
    );
    anyhow::ensure!(
        dir.join("model_index.json").is_file(),
        "--model-dir {}: no model_index.json there; it must be a FLUX model folder in diffusers' layout (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)",
        dir.display()
    );
    tracing::info!("{} comes from {}", preset.name, dir.display());
    Ok((preset.name, dir.to_path_buf()))
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

/// FLUX.1-dev where it can run: a CUDA GPU, and its weights on disk (`local`: --model-dir, or the
/// hub cache) or a token to download them (the repository is gated). Otherwise the built-in model,
/// which runs on a CPU with no download; the log says why, and every response names the model in `model`.
pub(crate) fn auto_preset(device: &Device, local: bool) -> &'static Preset {
    let dev = presets::find(presets::FLUX_DEV).expect("built-in preset");
    let reason = if !device.is_cuda() {
        Some("no CUDA GPU (FLUX.1-dev needs an NVIDIA GPU)")
    } else if !local && !flux_dev_obtainable(dev) {
        Some("FLUX.1-dev is not downloaded and no HF_TOKEN is set to download it (its repository is gated)")
    } else {
        None
    };
    match reason {
        None => dev,
        Some(reason) => {
            tracing::warn!(
                "{reason}: the default model is {}; pass --preset to choose",
                presets::BUILTIN_EMOJI
            );
            presets::find(presets::BUILTIN_EMOJI).expect("built-in preset")
        }
    }
}

fn flux_dev_obtainable(dev: &Preset) -> bool {
    let cached = match &dev.source {
        PresetSource::Hub(_) => engine::pipeline::LoadOptions::from_preset(dev).is_ready(),
        PresetSource::Bundled(_) => true,
    };
    cached || engine::hub::hf_token().is_some()
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
        let lora_scale = r.lora_scale.unwrap_or(1.0);
        let specs = self.lora_specs(preset, &lora, lora_scale)?;
        let prompt = lora::with_trigger_words(
            &r.prompt,
            specs
                .iter()
                .flat_map(|s| s.trigger_words.iter().map(String::as_str)),
        );
        Ok(GenerationPlan {
            model: preset.name.to_string(),
            prompt,
            width: r.width.unwrap_or(preset.width as u32),
            height: r.height.unwrap_or(preset.height as u32),
            steps: r.steps.unwrap_or(preset.steps as u32),
            guidance: r.guidance.unwrap_or(preset.guidance as f32),
            seed: r.seed.unwrap_or_default(),
            lora,
            lora_scale,
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
        let specs = self
            .lora_specs(preset, &plan.lora, plan.lora_scale)
            .map_err(anyhow::Error::msg)?;
        let mut files = Vec::with_capacity(specs.len());
        for spec in &specs {
            let name = spec.name.clone();
            let progress = Arc::new(move |p: &DownloadProgress| {
                tracing::debug!("LoRA {name}: {} / {} bytes", p.file_bytes, p.file_total);
            });
            let file = self
                .loras
                .get(&spec.source, progress)
                .map_err(|e| lora_failure(spec, e))?;
            files.push(file);
        }
        let stack: Vec<_> = files
            .iter()
            .zip(&specs)
            .map(|(f, s)| (&**f, s.scale))
            .collect();
        // Adapters belong to this generation only: a training run shares the model between requests.
        pipe.set_loras(&stack)?;
        let applied = specs
            .iter()
            .zip(&files)
            .map(|(s, f)| AppliedLora {
                name: s.name.clone(),
                scale: s.scale as f32,
                skipped: f.skipped.clone(),
            })
            .collect();
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
        });
        pipe.set_loras(&[])?;
        let out = out?;
        Ok(Generated {
            image: out.image,
            seed: out.seed,
            loras: applied,
        })
    }
}

/// A LoRA that could not be had: a hub one is the hub's or the name's fault (typed, so the request gets 422 or
/// 503); a local one that fails to load is reported as it is.
fn lora_failure(spec: &LoraSpec, err: anyhow::Error) -> anyhow::Error {
    if !matches!(spec.source, LoraSource::Hub { .. }) {
        return err.context(format!("LoRA {}", spec.name));
    }
    let code = if err.chain().any(|c| c.is::<engine::hub::NotFound>()) {
        JobFailure::LORA_NOT_FOUND
    } else {
        JobFailure::LORA_UNAVAILABLE
    };
    anyhow::Error::new(JobFailure {
        code,
        message: format!(
            "LoRA {}: {err:#} (a LoRA can also be put in the server's LoRA folder and named by its file name)",
            spec.name
        ),
    })
}
