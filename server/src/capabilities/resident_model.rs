//! A worker's one FLUX pipeline in memory, shared by its generation and training (a GPU holds one FLUX at a
//! time): loaded (and downloaded) on first use, replaced when another preset is asked for, and the state
//! of every preset's weights for `GET /models/`.

use crate::capabilities::gpu_share::GpuShare;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Result;
use app::{MemoryPart, MemoryPlanInfo, ModelState, PartPlacement};
use candle_core::Device;
use engine::hub::{DownloadProgress, ProgressFn, Source};
use engine::memory::{MemoryPlan, Placement};
use engine::pipeline::{FluxPipeline, LoadOptions};
use engine::presets::{Preset, PresetSource};
use engine::weights::WeightFormat;

use crate::jobs::panic_message;

/// How a pipeline is loaded: the engine's `FluxPipeline::load`, or in tests a loader that fails (or
/// panics) as a real load can, before or after calling it.
pub type PipelineLoader =
    dyn Fn(&LoadOptions, &Device, ProgressFn) -> Result<FluxPipeline> + Send + Sync;

pub struct ResidentModel {
    device: Device,
    /// `--gpu-memory`: the cap of every preset's memory plan, over the preset's own.
    gpu_memory: Option<u64>,
    /// `--model-dir`: the preset it stands in for and the folder.
    local: Option<(&'static str, PathBuf)>,
    /// The pipeline in memory and its preset's name. Locked only for a moment, never across a load: a load
    /// that fails or panics leaves it empty, and the next job loads again.
    loaded: Mutex<Option<(&'static str, Arc<FluxPipeline>)>>,
    /// The download progress (0..1) of each preset being downloaded.
    downloads: Arc<Mutex<HashMap<&'static str, f32>>>,
    loader: Arc<PipelineLoader>,
    /// `--weights`: the transformer's weight format, `None` for the checkpoint's own.
    weights: Option<WeightFormat>,
    /// The GPU shared with the chat's language model, when this worker's GPU is the one it runs on.
    gpu_share: Option<Arc<GpuShare>>,
}

/// Both locks guard values that are whole after any panic (each change is one assignment or one map
/// insert or removal), so a lock poisoned by a panic elsewhere is taken as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ResidentModel {
    /// `local`: a `--model-dir` and the preset it stands in for, checked by [`model_dir`].
    pub fn new(
        device: Device,
        gpu_memory: Option<u64>,
        local: Option<(&'static str, PathBuf)>,
        loader: Arc<PipelineLoader>,
    ) -> Self {
        Self {
            device,
            gpu_memory,
            local,
            loaded: Mutex::new(None),
            downloads: Arc::default(),
            loader,
            weights: None,
            gpu_share: None,
        }
    }

    /// Shares this worker's GPU with the chat's language model: plans leave the chat model's answers
    /// their memory, and the chat model learns what each plan counts on.
    pub fn share_gpu(&mut self, share: Arc<GpuShare>) {
        self.gpu_share = Some(share);
    }

    /// Whether the chat's language model would run on this worker's GPU (the first one).
    pub fn on_the_chat_gpu(&self) -> bool {
        matches!(
            self.device.location(),
            candle_core::DeviceLocation::Cuda { gpu_id: 0 }
        )
    }

    /// Loads the transformer's linear layers in `weights` (`--weights`), or as stored when `None`.
    pub fn with_weights(mut self, weights: Option<WeightFormat>) -> Self {
        self.weights = weights;
        self
    }

    /// The preset's pipeline, loaded (and downloaded) on first use. Another preset replaces the resident
    /// one, unless a training run is using it. Called on its worker's thread only, so loads never overlap.
    pub fn pipeline(&self, preset: &'static Preset) -> Result<Arc<FluxPipeline>> {
        {
            let mut loaded = lock(&self.loaded);
            if let Some((name, p)) = loaded.as_ref() {
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
            *loaded = None;
        }
        if let Some(share) = &self.gpu_share {
            share.flux_unloaded();
        }
        let p = Arc::new(self.load(preset)?);
        if let Some(share) = &self.gpu_share {
            share.flux_loaded(p.memory_plan());
        }
        *lock(&self.loaded) = Some((preset.name, p.clone()));
        Ok(p)
    }

    /// Loads the preset with its download progress shown by `GET /models/`. A panic in the load fails this
    /// call with its message, as a load error does.
    fn load(&self, preset: &'static Preset) -> Result<FluxPipeline> {
        let name = preset.name;
        // Shown as downloading from the loader's first progress report (a model on disk sends none) until
        // the load ends, however it ends.
        let _entry = DownloadEntry {
            downloads: &self.downloads,
            name,
        };
        let downloads = self.downloads.clone();
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
            lock(&downloads).insert(name, f);
        });
        let mut options = LoadOptions::from_preset(preset);
        options.weights = self.weights;
        if let Some(dir) = self.local_dir(preset) {
            options.source = Source::Local(dir.to_path_buf());
        }
        if let Some(cap) = self.gpu_memory {
            options.memory.gpu_memory = Some(cap);
        }
        if let Some(share) = &self.gpu_share {
            let free = engine::device::free_memory(&self.device)?;
            options.memory.gpu_memory = share.flux_budget(options.memory.gpu_memory, free);
        }
        tracing::info!("loading {} from {:?}", preset.title, options.source);
        catch_unwind(AssertUnwindSafe(|| {
            (self.loader)(&options, &self.device, progress)
        }))
        .unwrap_or_else(|panic| {
            anyhow::bail!(
                "loading {} failed: internal error: {}; the next request loads it again",
                preset.title,
                panic_message(&*panic)
            )
        })
    }

    /// The memory plan of the preset's pipeline, while it is loaded.
    pub fn memory_plan(&self, p: &Preset) -> Option<MemoryPlan> {
        lock(&self.loaded)
            .as_ref()
            .filter(|(n, _)| *n == p.name)
            .map(|(_, pipe)| pipe.memory_plan().clone())
    }

    /// The preset whose pipeline is in memory.
    pub fn loaded_preset(&self) -> Option<&'static str> {
        lock(&self.loaded).as_ref().map(|(name, _)| *name)
    }

    /// The loaded pipeline's memory plan, whichever preset it is.
    pub fn loaded_plan(&self) -> Option<MemoryPlan> {
        lock(&self.loaded)
            .as_ref()
            .map(|(_, pipe)| pipe.memory_plan().clone())
    }

    /// The `--model-dir` folder, when it stands in for this preset.
    pub fn local_dir(&self, p: &Preset) -> Option<&Path> {
        self.local
            .as_ref()
            .filter(|(name, _)| *name == p.name)
            .map(|(_, dir)| dir.as_path())
    }

    /// The state of a preset's weights for `GET /models/`: in memory, downloading, on disk or absent.
    pub fn state(&self, p: &Preset) -> ModelState {
        if lock(&self.loaded)
            .as_ref()
            .is_some_and(|(n, _)| *n == p.name)
        {
            return ModelState::Loaded;
        }
        if let Some(f) = lock(&self.downloads).get(p.name) {
            return ModelState::Downloading { progress: *f };
        }
        let on_disk = match (&p.source, p.source.to_source()) {
            _ if self.local_dir(p).is_some() => true,
            // Ready means loadable: every file a load reads is in the hub cache.
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

/// A memory plan as the API shows it.
pub fn plan_info(plan: &MemoryPlan) -> MemoryPlanInfo {
    MemoryPlanInfo {
        budget_bytes: plan.budget,
        parts: plan
            .parts
            .iter()
            .map(|p| MemoryPart {
                part: p.part.to_string(),
                placement: match p.placement {
                    Placement::Resident => PartPlacement::Resident,
                    Placement::WhileRunning => PartPlacement::WhileRunning,
                    Placement::Cpu => PartPlacement::Cpu,
                    Placement::Streamed => PartPlacement::Streamed,
                },
                format: p.format.to_string(),
                params: p.params,
                bytes: p.bytes,
                streamed_bytes: p.streamed,
            })
            .collect(),
        width: plan.reference.0 as u32,
        height: plan.reference.1 as u32,
        peak_bytes: plan.at_reference.peak,
        tiled_decode: plan.at_reference.tiled_decode,
        max_side: plan.max_side as u32,
        summary: plan.summary(),
    }
}

/// Removes a preset's download progress when dropped.
struct DownloadEntry<'a> {
    downloads: &'a Mutex<HashMap<&'static str, f32>>,
    name: &'static str,
}

impl Drop for DownloadEntry<'_> {
    fn drop(&mut self) {
        lock(self.downloads).remove(self.name);
    }
}

/// `--model-dir` checked: a folder in diffusers' layout standing in for a hub preset.
pub fn model_dir(preset: &'static Preset, dir: &Path) -> Result<(&'static str, PathBuf)> {
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
