//! Text to image with FLUX: encode the prompt, denoise seeded noise with Euler steps along the
//! flow-matching schedule, decode. One code path for the command line and the server.

use crate::hub::{Hub, ProgressFn, Source, Wanted};
use crate::lora::LoraFile;
use crate::memory::{self, ActivationShape, MemoryPlan, ModelMemory, Part};
use crate::models::autoencoder::{Autoencoder, Tiling};
use crate::models::codec::ImageCodec;
use crate::models::flux::{self, FluxConfig, FluxInputs, FluxTransformer, FluxWeights};
use crate::models::minilm::MiniLmPrompt;
use crate::models::text::{ClipEncoder, T5Encoder};
use crate::ops::Kernels;
use crate::presets::Preset;
use crate::sampling::edit::{self, Conditioning, EditModel};
use crate::sampling::{
    latents, preview::LatentPreview, schedule::ScheduleConfig, step_cache::StepCache,
};
use crate::weights::WeightFormat;
use anyhow::{bail, Context, Result};
use app::Precision;
use candle_core::{DType, Device, Tensor, Var};
use image::RgbImage;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// The seed of the first image; image `i` of a batch starts from the noise of `seed + i`, so
    /// each image of a batch is the one a single generation at its own seed makes.
    pub seed: u64,
    /// Images made as one batch through the transformer (at least 1).
    pub num_images: usize,
    /// The first-block step cache's threshold ([`StepCache`]); `None` runs every step in full.
    pub step_cache: Option<f64>,
    /// An image to start from or to edit; `None` is text to image.
    pub input: Option<InputImage>,
    /// How the transformer multiplies; `None`: the weights as loaded ([`MemoryPlan::precision_copy`]).
    pub precision: Option<Precision>,
}

/// The image a generation starts from or edits, and how. What the model does with it depends on the
/// model: a FLUX.1-Fill transformer reads the masked image and the mask as extra channels
/// (FluxFillPipeline), a FLUX.1-Kontext one reads the image's tokens beside the noise
/// (FluxKontextPipeline); any other model starts its denoising from the image's latents
/// (FluxImg2ImgPipeline) and, with a mask, keeps the unmasked part (FluxInpaintPipeline).
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    /// The generation's size (the caller resizes).
    pub image: RgbImage,
    /// How much of the schedule reruns, in (0, 1]: 1 starts from pure noise, small values stay close
    /// to the image (diffusers' `strength`). FLUX.1-Fill takes it as FluxFillPipeline does (1 is its
    /// default); FLUX.1-Kontext ignores it, as FluxKontextPipeline has none.
    pub strength: f64,
    /// The generation's size: white (255) where the image is repainted, black where it is kept.
    pub mask: Option<image::GrayImage>,
}

impl GenerateParams {
    /// One image at `seed`, every step computed in full, on the weights as loaded.
    pub fn new(
        prompt: impl Into<String>,
        (width, height): (usize, usize),
        steps: usize,
        guidance: f64,
        seed: u64,
    ) -> Self {
        Self {
            prompt: prompt.into(),
            width,
            height,
            steps,
            guidance,
            seed,
            num_images: 1,
            step_cache: None,
            input: None,
            precision: None,
        }
    }

    /// The seed of each image of the batch.
    pub fn seeds(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.num_images as u64).map(|i| self.seed.wrapping_add(i))
    }
}

/// What the per-step callback sees.
pub struct StepProgress<'a> {
    /// 1-based number of the step just taken.
    pub step: usize,
    pub total: usize,
    /// The packed latents after this step.
    pub latents: &'a Tensor,
    /// The model's estimate of the final image's latents at this step (sharper than `latents`).
    pub denoised: &'a Tensor,
    grid: (usize, usize),
    preview: &'a LatentPreview,
}

impl StepProgress<'_> {
    /// How many images the batch makes.
    pub fn images(&self) -> usize {
        self.denoised.dim(0).unwrap_or(1)
    }

    /// A small RGB picture of image `index`'s current estimate, one pixel per latent cell.
    pub fn preview(&self, index: usize) -> Result<RgbImage> {
        let one = self.denoised.narrow(0, index, 1)?;
        let z = latents::unpack(&one, self.grid.0, self.grid.1)?.squeeze(0)?;
        self.preview.render(&z)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// Returned (inside `anyhow::Error`) when the callback asked to stop.
#[derive(Debug, thiserror::Error)]
#[error("generation cancelled")]
pub struct Cancelled;

#[derive(Debug, Clone)]
pub struct Timings {
    pub encode_ms: u64,
    pub denoise_ms: u64,
    pub decode_ms: u64,
    /// Denoising steps whose transformer pass the step cache skipped (0 without the cache).
    pub skipped_steps: usize,
}

pub struct Generated {
    /// One image per seed of [`GenerateParams::seeds`], in order.
    pub images: Vec<RgbImage>,
    /// The first image's seed.
    pub seed: u64,
    pub timings: Timings,
}

impl Generated {
    /// The first image: the only one of a single generation.
    pub fn image(&self) -> &RgbImage {
        &self.images[0]
    }
}

/// Where to load a pipeline from, and its per-model settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub source: Source,
    /// A BFL-layout single file to use instead of the folder's `transformer/`.
    pub transformer_file: Option<PathBuf>,
    pub t5_max_len: usize,
    /// The MiniLM folder of a model conditioned on MiniLM (the built-in model), as
    /// `scripts/fetch-models` installs it.
    pub text_encoder_dir: PathBuf,
    /// The path of the models' ops: fused kernels where the build and the device have them.
    pub kernels: Kernels,
    /// The format the transformer's linear layers are held in when the user chose one (made from
    /// the checkpoint on load); otherwise the memory plan chooses, keeping a quantized checkpoint's own.
    pub weights: Option<WeightFormat>,
    /// What the memory plan is chosen from.
    pub memory: MemoryOptions,
}

/// What a model's memory plan ([`crate::memory`]) is chosen from, beside its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryOptions {
    /// The most GPU memory the model may use (`--gpu-memory`): the GPU's free memory when the model
    /// loads if less, or alone when not set. On a CPU only a set cap limits the plan.
    pub gpu_memory: Option<u64>,
    /// The image size (width, height) the plan is chosen for: the preset's default.
    pub size: (usize, usize),
    /// Decode in tiles always (`Some(true)`) or never (`Some(false)`); when `None` the plan decides
    /// for each size (tiles when a whole decode does not fit).
    pub tiled_decode: Option<bool>,
    /// The tiles' side in pixels.
    pub tile_pixels: usize,
    /// Stream at least these bytes of the transformer's blocks from host memory whatever the plan
    /// says (the tests' way to run the streaming path on a CPU); `None`: as the plan decides.
    pub streamed: Option<u64>,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            gpu_memory: None,
            size: (1024, 1024),
            tiled_decode: None,
            tile_pixels: memory::TILE_PIXELS,
            streamed: None,
        }
    }
}

impl LoadOptions {
    pub fn from_preset(p: &Preset) -> Self {
        Self {
            source: p.source.to_source(),
            transformer_file: None,
            t5_max_len: p.t5_max_len,
            text_encoder_dir: PathBuf::from(crate::classifier::DEFAULT_ENCODER_DIR),
            kernels: Kernels::default(),
            weights: None,
            memory: MemoryOptions {
                gpu_memory: p.gpu_memory,
                size: (p.width, p.height),
                ..MemoryOptions::default()
            },
        }
    }
}

impl LoadOptions {
    /// Whether loading would find every file it reads on this machine: the folder, or the cached
    /// snapshot of the hub repository, is complete. No network.
    pub fn is_ready(&self) -> bool {
        self.is_ready_in(&Hub::from_env())
    }

    /// [`Self::is_ready`] with this hub cache.
    pub fn is_ready_in(&self, hub: &Hub) -> bool {
        let dir = match &self.source {
            Source::Local(dir) => Some(dir.clone()),
            Source::Hub(repo) => hub.cached_snapshot(repo),
        };
        dir.is_some_and(|d| missing_files(&d, self.transformer_file.is_some()).is_empty())
    }

    /// The snapshot folder of a hub repository with the files these options load.
    fn snapshot(&self, hub: &Hub, repo: &str, progress: ProgressFn) -> Result<PathBuf> {
        let own_transformer = self.transformer_file.is_some();
        // With a transformer file, the folder's `transformer/` weights are not read: only its config.
        let file = |f: &str| {
            crate::presets::is_needed_file(f)
                && !(own_transformer
                    && f.starts_with("transformer/")
                    && f != "transformer/config.json")
        };
        let missing = |dir: &Path| missing_files(dir, own_transformer);
        hub.snapshot(
            repo,
            &Wanted {
                file: &file,
                missing: &missing,
            },
            progress,
        )
    }
}

/// The files loading a diffusers FLUX folder reads that are not there, relative to it (empty when
/// it is complete). `own_transformer`: a transformer file is given, the folder's weights are not
/// read.
pub fn missing_files(dir: &Path, own_transformer: bool) -> Vec<String> {
    let index: ModelIndex = match read_json(&dir.join("model_index.json"))
        .and_then(|j| Ok(serde_json::from_value(j)?))
    {
        Ok(index) => index,
        Err(_) => return vec!["model_index.json".into()],
    };
    let mut missing = Vec::new();
    let mut need = |rel: &str| {
        if !dir.join(rel).is_file() {
            missing.push(rel.to_string());
        }
    };
    need("scheduler/scheduler_config.json");
    let mut weights = vec!["vae", "text_encoder", "text_encoder_2"];
    if index.class_name == PIXEL_FLUX_CLASS {
        // Its text encoder (MiniLM) is installed apart from the model.
        weights.clear();
    } else {
        need("tokenizer_2/tokenizer.json");
        if !dir.join("tokenizer/tokenizer.json").is_file() {
            need("tokenizer/vocab.json");
            need("tokenizer/merges.txt");
        }
    }
    if !own_transformer {
        weights.push("transformer");
    }
    for part in weights {
        need(&format!("{part}/config.json"));
        // A GGUF file (city96's transformer or T5 encoder) stands for the part's safetensors.
        if matches!(crate::weights::gguf_file(&dir.join(part)), Ok(Some(_))) {
            continue;
        }
        for f in crate::weights::missing_safetensors(&dir.join(part)) {
            need(&format!("{part}/{f}"));
        }
    }
    missing
}

/// `_class_name` in the `model_index.json` of the built-in model: FLUX's transformer on pixels,
/// conditioned on MiniLM, with classifier-free guidance (docs/builtin-model.md).
pub const PIXEL_FLUX_CLASS: &str = "StudioPixelFlux";

/// The parts of `model_index.json` that say which kind of FLUX model a folder holds.
#[derive(Debug, serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    class_name: String,
    /// Pixel-space models: pixels per latent cell along a side.
    pixel_unshuffle: Option<usize>,
    /// MiniLM-conditioned models: the fixed number of token states.
    text_tokens: Option<usize>,
}

/// `_class_name` in the `model_index.json` of FLUX.1-Kontext-dev.
pub const KONTEXT_CLASS: &str = "FluxKontextPipeline";
/// `_class_name` in the `model_index.json` of FLUX.1-Fill-dev.
pub const FILL_CLASS: &str = "FluxFillPipeline";

impl ModelIndex {
    /// How the model takes an input image: its pipeline class says so, or a transformer that reads
    /// more channels than it predicts (FLUX.1-Fill's).
    fn edit_model(&self, cfg: &FluxConfig) -> EditModel {
        if self.class_name == KONTEXT_CLASS {
            EditModel::Kontext
        } else if self.class_name == FILL_CLASS || cfg.out_channels() != cfg.in_channels {
            EditModel::Fill
        } else {
            EditModel::Latents
        }
    }
}

/// Which text encoders a model reads its prompts with.
#[derive(Debug, Clone)]
enum TextSpec {
    /// FLUX's own: T5-XXL's hidden states and CLIP-L's pooled output.
    Flux { t5_max_len: usize },
    /// MiniLM's token states and sentence embedding.
    MiniLm { dir: PathBuf, tokens: usize },
}

/// The text encoders, which a training run frees once it has encoded its captions.
enum TextEncoders {
    Flux {
        t5: Box<T5Encoder>,
        clip: Box<ClipEncoder>,
    },
    MiniLm(Box<MiniLmPrompt>),
}

impl TextEncoders {
    /// The parts and parameter counts of these encoders' checkpoints.
    fn parameters(dir: &Path, spec: &TextSpec) -> Result<Vec<(Part, u64)>> {
        let count = |part: Part, path: &Path| -> Result<(Part, u64)> {
            let n = crate::weights::parameter_count(path)
                .with_context(|| format!("counting the {part}'s weights"))?;
            Ok((part, n))
        };
        match spec {
            TextSpec::Flux { .. } => Ok(vec![
                count(Part::T5, &dir.join("text_encoder_2"))?,
                count(Part::Clip, &dir.join("text_encoder"))?,
            ]),
            TextSpec::MiniLm { dir, .. } => Ok(vec![count(Part::MiniLm, dir).context(
                "this model reads prompts with MiniLM: run scripts/fetch-models to install it",
            )?]),
        }
    }

    /// With `t5_streamed`, T5's blocks stay in page-locked host memory and are copied to `device` layer
    /// by layer for each prompt (the plan's streamed placement); CLIP, small, is on `device`.
    fn load(
        dir: &Path,
        spec: &TextSpec,
        dtype: DType,
        device: &Device,
        kernels: Kernels,
        t5_streamed: bool,
    ) -> Result<Self> {
        match spec {
            TextSpec::Flux { t5_max_len } => {
                let t5 = T5Encoder::load(
                    &dir.join("text_encoder_2"),
                    &dir.join("tokenizer_2"),
                    *t5_max_len,
                    dtype,
                    device,
                    kernels,
                    t5_streamed,
                )?;
                if t5_streamed {
                    tracing::info!(
                        "T5: {} of its blocks' weights stay in host memory and are copied to {:?} for each new prompt",
                        memory::gib(t5.streamed_bytes()),
                        device.location()
                    );
                }
                let clip = ClipEncoder::load(
                    &dir.join("text_encoder"),
                    &dir.join("tokenizer"),
                    dtype,
                    device,
                )?;
                Ok(Self::Flux {
                    t5: Box::new(t5),
                    clip: Box::new(clip),
                })
            }
            TextSpec::MiniLm { dir, tokens } => Ok(Self::MiniLm(Box::new(
                MiniLmPrompt::load(dir, *tokens, device).context(
                    "this model reads prompts with MiniLM: run scripts/fetch-models to install it",
                )?,
            ))),
        }
    }

    fn encode(&mut self, prompt: &str) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Flux { t5, clip } => Ok((t5.encode(prompt)?, clip.encode(prompt)?)),
            Self::MiniLm(m) => m.encode(prompt),
        }
    }
}

/// Prompt encodings by prompt, most recently used last: a regeneration or a new seed skips the text
/// encoders. Each entry is small (T5's 512 states of 4096 values); a few cover a session's retries.
struct PromptCache {
    entries: VecDeque<(String, (Tensor, Tensor))>,
}

impl PromptCache {
    const CAPACITY: usize = 8;

    fn get(&mut self, prompt: &str) -> Option<(Tensor, Tensor)> {
        let i = self.entries.iter().position(|(p, _)| p == prompt)?;
        let entry = self.entries.remove(i)?;
        let value = entry.1.clone();
        self.entries.push_back(entry);
        Some(value)
    }

    fn put(&mut self, prompt: &str, value: (Tensor, Tensor)) {
        if self.entries.len() == Self::CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((prompt.to_string(), value));
    }
}

pub struct FluxPipeline {
    pub transformer: FluxTransformer,
    /// `None` while released; loaded again from `dir` by the next prompt.
    text: Mutex<Option<TextEncoders>>,
    dir: PathBuf,
    text_spec: TextSpec,
    /// Where the text encoders run: the CPU when the memory plan puts them there.
    text_device: Device,
    prompts: Mutex<PromptCache>,
    /// Prompts the text encoders have encoded (cache misses).
    encodings: AtomicUsize,
    memory: MemoryPlan,
    tiled_decode: Option<bool>,
    tiling: Tiling,
    /// The autoencoder, or pixels for a pixel-space model.
    pub codec: ImageCodec,
    pub schedule: ScheduleConfig,
    preview: LatentPreview,
    /// The model takes classifier-free guidance (`guidance` is its scale) rather than FLUX.1-dev's
    /// embedded guidance.
    cfg: bool,
    /// The transformer's weights as variables, by checkpoint name: loaded for a full fine-tune.
    weights: Vec<(String, Var)>,
    /// How the model takes an input image.
    edit: EditModel,
    device: Device,
    dtype: DType,
}

/// A generation's fp8 products on a bf16 transformer: on from its start, off again (the copies freed)
/// when the denoising ends, however it ends.
struct Fp8Run<'a>(Option<&'a FluxTransformer>);

impl<'a> Fp8Run<'a> {
    fn start(transformer: &'a FluxTransformer, on: bool) -> Self {
        if on {
            transformer.set_fp8_products(true);
        }
        Self(on.then_some(transformer))
    }
}

impl Drop for Fp8Run<'_> {
    fn drop(&mut self) {
        if let Some(transformer) = self.0 {
            transformer.set_fp8_products(false);
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

impl FluxPipeline {
    /// Resolves the source (from the hub cache, downloading what it lacks) and loads every
    /// component.
    pub fn load(opts: &LoadOptions, device: &Device, progress: ProgressFn) -> Result<Self> {
        Self::load_from(opts, &Hub::from_env(), device, progress)
    }

    /// [`Self::load`] with this hub and cache.
    pub fn load_from(
        opts: &LoadOptions,
        hub: &Hub,
        device: &Device,
        progress: ProgressFn,
    ) -> Result<Self> {
        let dir = match &opts.source {
            Source::Local(p) => p.clone(),
            Source::Hub(repo) => opts.snapshot(hub, repo, progress)?,
        };
        Self::load_dir(&dir, opts, device)
    }

    /// Loads a diffusers FLUX folder (model_index.json, transformer/, vae/, text_encoder*/,
    /// tokenizer*/, scheduler/).
    pub fn load_dir(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, opts, device, false)
    }

    /// Loads a folder for a full fine-tune: the transformer in f32, its weights variables
    /// ([`Self::weights`]) that the model computes with directly.
    pub fn load_dir_trainable(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, opts, device, true)
    }

    /// The transformer, placed as the plan says. Weights quantized on a GPU as they load (fp8 or GGUF
    /// from bf16) would each sit in the GPU's memory pool between the freed full-precision copies they
    /// were made from, holding on to memory the pool can then neither give back nor fit the text
    /// encoders into: those wait in host memory until the last block is read, the pool hands the
    /// freed memory back, and they come to the GPU one after another.
    pub fn load_transformer(
        weights: &FluxWeights,
        cfg: &FluxConfig,
        dtype: DType,
        device: &Device,
        kernels: Kernels,
        streamed: u64,
    ) -> Result<FluxTransformer> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(cuda), true) = (device, weights.quantizes()) {
            let mut transformer =
                FluxTransformer::load_streaming(weights, cfg, dtype, &Device::Cpu, kernels, 0)?;
            crate::kernels::pool::release_unused(cuda)?;
            tracing::info!("transformer read and converted in host memory; placing it on the GPU");
            transformer.place(device, streamed)?;
            tracing::info!("transformer placed");
            return Ok(transformer);
        }
        FluxTransformer::load_streaming(weights, cfg, dtype, device, kernels, streamed)
    }

    fn load_dir_with(
        dir: &Path,
        opts: &LoadOptions,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        if !dir.join("model_index.json").is_file() {
            bail!(
                "{} is not a diffusers FLUX folder (no model_index.json)",
                dir.display()
            );
        }
        let index: ModelIndex = serde_json::from_value(read_json(&dir.join("model_index.json"))?)
            .context("model_index.json")?;
        let pixel_model = index.class_name == PIXEL_FLUX_CLASS;
        if trainable && opts.weights.is_some_and(|f| f != WeightFormat::Bf16) {
            bail!("a full fine-tune trains the weights themselves in f32: load it without --weights (fp8 and GGUF bases are for LoRA training)");
        }
        let dtype = if trainable {
            DType::F32
        } else {
            crate::device::compute_dtype(device)
        };
        let plan = Self::plan_memory(dir, opts, &index, dtype, device, trainable)?;
        tracing::info!("memory plan of {}: {}", dir.display(), plan.summary());
        // The transformer loads in the plan's format.
        let opts = &LoadOptions {
            weights: Some(plan.transformer_format()),
            ..opts.clone()
        };
        let mut vars = Vec::new();
        let (weights, cfg) = match &opts.transformer_file {
            Some(file) => {
                let w = FluxWeights::open(file, dtype, device)?.in_format(opts.weights);
                // The folder's config, when there is one, knows what the file cannot tell.
                let cfg = match read_json(&dir.join("transformer/config.json")) {
                    Ok(json) => FluxConfig::from_diffusers_json(&json)?,
                    Err(_) => w.infer_config()?,
                };
                (w, cfg)
            }
            None => {
                let t = dir.join("transformer");
                let cfg = FluxConfig::from_diffusers_json(&read_json(&t.join("config.json"))?)?;
                let weights = if trainable {
                    vars = load_vars(&t, device)?;
                    let tensors = vars
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                        .collect();
                    FluxWeights::from_var_builder(candle_nn::VarBuilder::from_tensors(
                        tensors,
                        DType::F32,
                        device,
                    ))?
                } else {
                    FluxWeights::open(&t, dtype, device)?.in_format(opts.weights)
                };
                (weights, cfg)
            }
        };
        let streamed = opts.memory.streamed.unwrap_or(plan.streamed_bytes());
        let transformer =
            Self::load_transformer(&weights, &cfg, dtype, device, opts.kernels, streamed)?;
        if streamed > 0 {
            tracing::info!(
                "transformer: {} of its blocks' weights stay in host memory and are copied to {:?} at every step",
                memory::gib(transformer.streamed_bytes()),
                device.location()
            );
        }
        let edit = index.edit_model(&cfg);
        let mut formats: Vec<(WeightFormat, usize)> = Vec::new();
        for l in transformer.linears() {
            match formats.iter_mut().find(|(f, _)| *f == l.format()) {
                Some((_, n)) => *n += 1,
                None => formats.push((l.format(), 1)),
            }
        }
        let formats: Vec<String> = formats.iter().map(|(f, n)| format!("{n} {f}")).collect();
        tracing::info!("transformer linear layers: {}", formats.join(", "));
        let (text_spec, codec) = if pixel_model {
            let tokens = index
                .text_tokens
                .context("model_index.json of a pixel model lacks `text_tokens`")?;
            let factor = index
                .pixel_unshuffle
                .context("model_index.json of a pixel model lacks `pixel_unshuffle`")?;
            (
                TextSpec::MiniLm {
                    dir: opts.text_encoder_dir.clone(),
                    tokens,
                },
                ImageCodec::Pixels { factor },
            )
        } else {
            (
                TextSpec::Flux {
                    t5_max_len: opts.t5_max_len,
                },
                ImageCodec::Vae(Box::new(Autoencoder::load(
                    &dir.join("vae"),
                    dtype,
                    device,
                    opts.kernels,
                )?)),
            )
        };
        // On the CPU they keep the compute dtype: bf16 halves T5-XXL's host memory.
        let text_device = if plan.text_encoders_on_cpu() {
            Device::Cpu
        } else {
            device.clone()
        };
        // Encoders that leave the GPU after each prompt come in with the first one.
        let text = if plan.text_encoders_leave() {
            None
        } else {
            tracing::info!("loading the text encoders ({:?})", text_device.location());
            Some(TextEncoders::load(
                dir,
                &text_spec,
                dtype,
                &text_device,
                opts.kernels,
                plan.t5_streamed(),
            )?)
        };
        let schedule: ScheduleConfig =
            serde_json::from_value(read_json(&dir.join("scheduler/scheduler_config.json"))?)
                .context("scheduler_config.json")?;
        let preview = LatentPreview::fit(&codec, dtype, device)?;
        Ok(Self {
            transformer,
            text: Mutex::new(text),
            dir: dir.to_path_buf(),
            text_spec,
            text_device,
            prompts: Mutex::new(PromptCache {
                entries: VecDeque::new(),
            }),
            encodings: AtomicUsize::new(0),
            tiled_decode: opts.memory.tiled_decode,
            tiling: Tiling {
                sample: opts.memory.tile_pixels,
                overlap: memory::TILE_OVERLAP,
            },
            memory: plan,
            codec,
            schedule,
            preview,
            cfg: pixel_model,
            weights: vars,
            edit,
            device: device.clone(),
            dtype,
        })
    }

    /// The memory plan of a folder about to load: its parts counted from the checkpoints' headers, the
    /// budget from `opts` and the device. A full fine-tune (`trainable`) is planned unconstrained.
    fn plan_memory(
        dir: &Path,
        opts: &LoadOptions,
        index: &ModelIndex,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<MemoryPlan> {
        let pixel_model = index.class_name == PIXEL_FLUX_CLASS;
        let transformer_path = match &opts.transformer_file {
            Some(file) => file.clone(),
            None => dir.join("transformer"),
        };
        // A lone BFL file without the folder's config: FLUX.1's hidden size, every released FLUX.1's.
        let hidden = match read_json(&dir.join("transformer/config.json")) {
            Ok(json) => FluxConfig::from_diffusers_json(&json)?.hidden_size,
            Err(_) => FluxConfig::dev().hidden_size,
        };
        let mut parts = vec![(
            Part::Transformer,
            crate::weights::parameter_count(&transformer_path)
                .context("counting the transformer's weights")?,
        )];
        let (text_spec, text_tokens) = if pixel_model {
            let tokens = index.text_tokens.unwrap_or_default();
            (
                TextSpec::MiniLm {
                    dir: opts.text_encoder_dir.clone(),
                    tokens,
                },
                tokens,
            )
        } else {
            (
                TextSpec::Flux {
                    t5_max_len: opts.t5_max_len,
                },
                opts.t5_max_len,
            )
        };
        parts.extend(TextEncoders::parameters(dir, &text_spec)?);
        let (downscale, vae_channels) = if pixel_model {
            (index.pixel_unshuffle.unwrap_or(1), None)
        } else {
            let vae = crate::models::autoencoder::AutoencoderConfig::from_diffusers_json(
                &read_json(&dir.join("vae/config.json"))?,
            )?;
            parts.push((
                Part::Vae,
                crate::weights::parameter_count(&dir.join("vae"))
                    .context("counting the autoencoder's weights")?,
            ));
            (vae.downscale(), Some(vae.block_out_channels))
        };
        let model = ModelMemory {
            parts,
            shape: ActivationShape {
                hidden,
                downscale,
                text_tokens,
                batch: if pixel_model { 2 } else { 1 },
                image_sequences: if index.class_name == KONTEXT_CLASS {
                    2
                } else {
                    1
                },
                vae_channels,
                compute_bytes: dtype.size_in_bytes() as u64,
            },
        };
        let budget = if trainable {
            None
        } else {
            match (opts.memory.gpu_memory, crate::device::free_memory(device)?) {
                (Some(cap), Some(free)) => Some(cap.min(free)),
                (cap, free) => cap.or(free),
            }
        };
        let multiple = 2 * downscale;
        // A checkpoint already in fp8 or GGUF keeps its format unless the user chose another.
        let format = match opts.weights {
            Some(f) => Some(f),
            None => crate::weights::stored_format(&transformer_path)
                .context("reading the transformer's weight format")?,
        };
        Ok(MemoryPlan::choose(
            &model,
            budget,
            opts.memory.size,
            multiple,
            format,
        )?)
    }

    /// Where each part lives, in which format, and the sizes that fit.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.memory
    }

    /// Whether the text encoders are in memory now (a plan whose encoders leave the GPU frees them after
    /// each prompt).
    pub fn text_encoders_loaded(&self) -> bool {
        self.text
            .lock()
            .expect("text encoder lock poisoned")
            .is_some()
    }

    /// How many prompts the text encoders have encoded: the prompt cache answers the others.
    pub fn prompt_encodings(&self) -> usize {
        self.encodings.load(Ordering::Relaxed)
    }

    /// Frees what a failed job may have left: the cached prompt encodings and the text encoders (both
    /// come back with the next prompt).
    pub fn free_caches(&self) {
        self.prompts
            .lock()
            .expect("prompt cache lock poisoned")
            .entries
            .clear();
        self.release_text_encoders();
    }

    /// The transformer's weights as variables, when loaded with [`Self::load_dir_trainable`].
    pub fn weights(&self) -> &[(String, Var)] {
        &self.weights
    }

    /// Whether `guidance` is a classifier-free guidance scale (the model is run with and without the
    /// prompt) rather than an input of a guidance-distilled model.
    pub fn uses_cfg(&self) -> bool {
        self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the models compute in (LoRAs are loaded in it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sets exactly these LoRAs, each with its scale, for the next generations, replacing any
    /// adapters on the transformer (a training run's included): an empty list clears them. Set
    /// them before every generation; nothing else keeps them.
    pub fn set_loras(&self, loras: &[(&LoraFile, f64)]) -> Result<()> {
        crate::lora::apply(&self.transformer, loras)
    }

    /// Image sides must map to whole 2×2 patches of latent cells.
    pub fn size_multiple(&self) -> usize {
        2 * self.codec.downscale()
    }

    /// The prompt's token states (1, T, context_dim) and pooled vector (1, vec_dim): T5 and CLIP for
    /// FLUX, MiniLM for the built-in model.
    /// Answered from the prompt cache when the prompt was encoded lately; the text encoders leave the
    /// GPU afterwards when the memory plan says so.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let cache = || self.prompts.lock().expect("prompt cache lock poisoned");
        if let Some(hit) = cache().get(prompt) {
            return Ok(hit);
        }
        let mut text = self.text.lock().expect("text encoder lock poisoned");
        if text.is_none() {
            tracing::info!("loading the text encoders");
            *text = Some(TextEncoders::load(
                &self.dir,
                &self.text_spec,
                self.dtype,
                &self.text_device,
                self.transformer.kernels(),
                self.memory.t5_streamed(),
            )?);
        }
        let (txt, pooled) = text.as_mut().expect("loaded above").encode(prompt)?;
        if self.memory.text_encoders_leave() {
            *text = None;
        }
        drop(text);
        self.encodings.fetch_add(1, Ordering::Relaxed);
        let encoded = (
            txt.to_device(&self.device)?,
            pooled.to_device(&self.device)?,
        );
        cache().put(prompt, encoded.clone());
        Ok(encoded)
    }

    /// Frees the text encoders (T5-XXL alone is 9.5 GB in bf16) until a prompt needs them again: a
    /// training run, once its captions are encoded, trains without them.
    pub fn release_text_encoders(&self) {
        *self.text.lock().expect("text encoder lock poisoned") = None;
    }

    /// The latent grid (cells) of an image size.
    pub fn latent_grid(&self, width: usize, height: usize) -> (usize, usize) {
        let f = self.codec.downscale();
        (height / f, width / f)
    }

    /// The seeded starting noise of each seed, packed and stacked: (seeds, tokens, 64).
    pub fn batch_noise(
        &self,
        seeds: impl IntoIterator<Item = u64>,
        width: usize,
        height: usize,
    ) -> Result<Tensor> {
        let noise = seeds
            .into_iter()
            .map(|seed| self.initial_noise(seed, width, height))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&noise, 0)?)
    }

    /// Seeded starting noise, packed: (1, tokens, 64).
    pub fn initial_noise(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        let (h, w) = self.latent_grid(width, height);
        let c = self.codec.latent_channels();
        Ok(latents::pack(&latents::seeded_noise(
            seed,
            c,
            h,
            w,
            &self.device,
        )?)?)
    }

    /// Euler steps along `sigmas` from packed noise `x`; latents stay f32 between steps.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        x: Tensor,
        grid: (usize, usize),
        txt: &Tensor,
        pooled: &Tensor,
        sigmas: &[f64],
        guidance: f64,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Tensor> {
        self.denoise_guided(x, grid, (txt, pooled), None, sigmas, guidance, on_step)
    }

    /// [`Self::denoise`] with classifier-free guidance when `uncond` (the empty prompt's encodings) is
    /// given: each step runs the prompt and the empty prompt as one batch of two and moves along
    /// `v_uncond + guidance · (v_cond - v_uncond)`.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_guided(
        &self,
        x: Tensor,
        grid: (usize, usize),
        cond: (&Tensor, &Tensor),
        uncond: Option<(&Tensor, &Tensor)>,
        sigmas: &[f64],
        guidance: f64,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Tensor> {
        self.denoise_batch(x, grid, cond, uncond, sigmas, guidance, None, on_step)
    }

    /// [`Self::denoise_guided`] for a batch of images, `x` (images, tokens, 64), from one prompt's
    /// encodings (1, ..), which every image shares; with classifier-free guidance, the prompt's and
    /// the empty prompt's halves run as one batch of twice the images. With `cache`, steps go
    /// through the step cache.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_batch(
        &self,
        x: Tensor,
        grid: (usize, usize),
        cond: (&Tensor, &Tensor),
        uncond: Option<(&Tensor, &Tensor)>,
        sigmas: &[f64],
        guidance: f64,
        cache: Option<&mut StepCache>,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Tensor> {
        let none = Conditioning::None;
        self.denoise_edit(
            x, grid, cond, uncond, sigmas, guidance, cache, &none, on_step,
        )
    }

    /// [`Self::denoise_batch`] with what an edit adds to each step ([`Self::prepare_edit`] makes it).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_edit(
        &self,
        mut x: Tensor,
        grid: (usize, usize),
        cond: (&Tensor, &Tensor),
        uncond: Option<(&Tensor, &Tensor)>,
        sigmas: &[f64],
        guidance: f64,
        mut cache: Option<&mut StepCache>,
        edit: &Conditioning,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Tensor> {
        let dev = &self.device;
        let images = x.dim(0)?;
        let each = |t: &Tensor| -> Result<Tensor> {
            Ok(if images > 1 {
                Tensor::cat(&vec![t; images], 0)?
            } else {
                t.clone()
            })
        };
        let (txt, pooled) = match uncond {
            Some((u_txt, u_pooled)) => (
                Tensor::cat(&[each(cond.0)?, each(u_txt)?], 0)?,
                Tensor::cat(&[each(cond.1)?, each(u_pooled)?], 0)?,
            ),
            None => (each(cond.0)?, each(cond.1)?),
        };
        let batch = txt.dim(0)?;
        let img_ids = edit.image_ids(&flux::image_ids(grid.0 / 2, grid.1 / 2, dev)?)?;
        let tokens = x.dim(1)?;
        let txt_ids = flux::text_ids(txt.dim(1)?, dev)?;
        let g = Tensor::new(vec![guidance as f32; batch], dev)?;
        let embedded = self.transformer.config().guidance_embed.then_some(&g);
        let total = sigmas.len() - 1;
        x = x.to_dtype(DType::F32)?;
        for (i, pair) in sigmas.windows(2).enumerate() {
            let (sigma, next) = (pair[0], pair[1]);
            let t = Tensor::new(vec![sigma as f32; batch], dev)?;
            let img = edit.model_input(&x)?.to_dtype(self.dtype)?;
            let img = if batch > images {
                Tensor::cat(&[&img, &img], 0)?
            } else {
                img
            };
            let inputs = FluxInputs {
                img: &img,
                img_ids: &img_ids,
                txt: &txt,
                txt_ids: &txt_ids,
                timesteps: &t,
                y: &pooled,
                guidance: embedded,
            };
            let out = match cache.as_deref_mut() {
                Some(cache) => cache.forward(&self.transformer, &inputs)?,
                None => self.transformer.forward(&inputs)?,
            };
            let out = edit.velocity(out, tokens)?.to_dtype(DType::F32)?;
            let v = if uncond.is_some() {
                let (c, u) = (out.narrow(0, 0, images)?, out.narrow(0, images, images)?);
                (&u + ((c - &u)? * guidance)?)?
            } else {
                out
            };
            let denoised = (&x - (&v * sigma)?)?;
            x = edit.after_step((&x + (&v * (next - sigma))?)?, next)?;
            let p = StepProgress {
                step: i + 1,
                total,
                latents: &x,
                denoised: &denoised,
                grid,
                preview: &self.preview,
            };
            if on_step(&p) == Control::Cancel {
                return Err(Cancelled.into());
            }
        }
        Ok(x)
    }

    /// Packed model-space latents to pixels in [0, 1] (B, 3, H, W): in tiles when the memory plan
    /// says a whole decode of this size does not fit (or the load options ask for tiles).
    pub fn decode(&self, packed: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let z = latents::unpack(packed, grid.0, grid.1)?;
        let raw = self.codec.from_model_space(&z.to_dtype(self.dtype)?)?;
        let f = self.codec.downscale();
        let tiled = self.tiled_decode.unwrap_or_else(|| {
            self.memory
                .fit(grid.1 * f, grid.0 * f)
                .map_or(true, |fit| fit.tiled_decode)
        });
        let img = if tiled {
            self.codec.tiled_decode(&raw, self.tiling)?
        } else {
            self.codec.decode(&raw)?
        };
        let img = img.to_dtype(DType::F32)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0.0, 1.0)?)
    }

    pub fn generate(
        &self,
        p: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Generated> {
        let m = self.size_multiple();
        if p.width == 0
            || p.height == 0
            || !p.width.is_multiple_of(m)
            || !p.height.is_multiple_of(m)
        {
            bail!(
                "width and height must be positive multiples of {m} (got {}x{})",
                p.width,
                p.height
            );
        }
        if p.steps == 0 {
            bail!("steps must be at least 1");
        }
        if p.num_images == 0 {
            bail!("num_images must be at least 1");
        }
        check_input(self.edit, p.input.as_ref(), p.width, p.height)?;
        if p.input.is_some() {
            self.memory.fit_edit(p.width, p.height)?;
        }
        self.memory.fit_at(p.width, p.height, p.precision)?;
        let fp8_copy = self.memory.precision_copy(p.precision)? > 0;
        let t0 = Instant::now();
        let (txt, pooled) = self.encode_prompt(&p.prompt)?;
        let uncond = self.uncond_for(p.guidance)?;
        let grid = self.latent_grid(p.width, p.height);
        txt.device().synchronize()?;
        let t1 = Instant::now();
        let noise = self.batch_noise(p.seeds(), p.width, p.height)?;
        let sigmas = self.schedule.sigmas(p.steps, noise.dim(1)?);
        let (start, sigmas, edit) = match &p.input {
            Some(input) => self.prepare_edit(input, &noise, &sigmas)?,
            None => (noise, sigmas, Conditioning::None),
        };
        let mut cache = p.step_cache.map(StepCache::new);
        let fp8 = Fp8Run::start(&self.transformer, fp8_copy);
        let x = self.denoise_edit(
            start,
            grid,
            (&txt, &pooled),
            uncond.as_ref().map(|(t, p)| (t, p)),
            &sigmas,
            p.guidance,
            cache.as_mut(),
            &edit,
            on_step,
        )?;
        // The GPU runs ahead of the host: wait for the denoising, so that its time is not billed to
        // the decode.
        x.device().synchronize()?;
        drop(fp8);
        let t2 = Instant::now();
        // One image at a time: the autoencoder's activations at full size are large, and each image
        // decodes as it would alone.
        let images = (0..p.num_images)
            .map(|i| to_rgb(&self.decode(&x.narrow(0, i, 1)?, grid)?))
            .collect::<Result<Vec<_>>>()?;
        let t3 = Instant::now();
        Ok(Generated {
            images,
            seed: p.seed,
            timings: Timings {
                encode_ms: (t1 - t0).as_millis() as u64,
                denoise_ms: (t2 - t1).as_millis() as u64,
                decode_ms: (t3 - t2).as_millis() as u64,
                skipped_steps: cache.as_ref().map_or(0, StepCache::skipped),
            },
        })
    }
}

impl FluxPipeline {
    /// How this model takes an input image.
    pub fn edit_model(&self) -> EditModel {
        self.edit
    }

    /// An image (1, 3, H, W) in [-1, 1] as packed model-space latents (1, tokens, C·4), f32: the
    /// autoencoder's mean, where diffusers' pipelines draw a sample from the latent distribution with
    /// their generator. The mean is what the sample scatters around (FLUX's autoencoder spreads
    /// little), and keeps a seed's edit the same on every device. In tiles when the memory plan says a
    /// whole encode of this size does not fit.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = image.dims4()?;
        let image = image.to_dtype(self.dtype)?;
        let z = if self.memory.fit_edit(w, h)? {
            self.codec.tiled_encode(&image, self.tiling)?
        } else {
            self.codec.encode(&image)?
        }
        .mean;
        let z = self.codec.to_model_space(&z)?.to_dtype(DType::F32)?;
        Ok(latents::pack(&z)?)
    }

    /// Where an edit's denoising starts, the sigmas it runs, and what it adds to each step, from the
    /// input, each image's starting noise `noise` (images, tokens, C·4) and the whole schedule
    /// `sigmas`, as the diffusers pipeline of [`Self::edit_model`] does it:
    /// - any FLUX model (FluxImg2ImgPipeline): the schedule's last `strength` share, from the image's
    ///   latents noised to its first sigma; with a mask (FluxInpaintPipeline), the kept part put back,
    ///   noised to the next sigma, after every step;
    /// - FLUX.1-Fill (FluxFillPipeline): the same start, the masked image's latents and the mask as
    ///   extra channels;
    /// - FLUX.1-Kontext (FluxKontextPipeline): the whole schedule from the noise, the image's tokens
    ///   after the noise's.
    pub fn prepare_edit(
        &self,
        input: &InputImage,
        noise: &Tensor,
        sigmas: &[f64],
    ) -> Result<(Tensor, Vec<f64>, Conditioning)> {
        let (w, h) = (input.image.width() as usize, input.image.height() as usize);
        check_input(self.edit, Some(input), w, h)?;
        let dev = &self.device;
        let f = self.codec.downscale();
        let pixels = edit::image_tensor(&input.image, dev)?;
        let image = self.encode_image(&pixels)?;
        let mask = match &input.mask {
            Some(m) => Some(edit::mask_tensor(m, dev)?),
            None => None,
        };
        match self.edit {
            EditModel::Latents => {
                let sigmas = edit::strength_sigmas(sigmas, input.strength)?;
                let start = edit::scale_noise(&image, sigmas[0], noise)?;
                let cond = match mask {
                    Some(mask) => Conditioning::Inpaint {
                        mask: edit::inpaint_mask(&mask, f, self.codec.latent_channels())?,
                        image,
                        noise: noise.clone(),
                    },
                    None => Conditioning::None,
                };
                Ok((start, sigmas, cond))
            }
            EditModel::Fill => {
                let mask = mask.expect("check_input asks FLUX.1-Fill for a mask");
                let sigmas = edit::strength_sigmas(sigmas, input.strength)?;
                let start = edit::scale_noise(&image, sigmas[0], noise)?;
                let keep = mask.affine(-1.0, 1.0)?;
                let masked = self.encode_image(&pixels.broadcast_mul(&keep)?)?;
                let extra = Tensor::cat(&[masked, edit::fill_mask(&mask, f)?], 2)?;
                let cfg = self.transformer.config();
                let reads = noise.dim(2)? + extra.dim(2)?;
                if reads != cfg.in_channels {
                    bail!(
                        "this FLUX.1-Fill transformer reads {} channels, but the latents, the masked image and the mask make {reads}: its autoencoder does not fit it",
                        cfg.in_channels
                    );
                }
                Ok((start, sigmas, Conditioning::Channels(extra)))
            }
            EditModel::Kontext => {
                let (rows, cols) = self.latent_grid(w, h);
                let ids = edit::kontext_image_ids(rows / 2, cols / 2, dev)?;
                Ok((
                    noise.clone(),
                    sigmas.to_vec(),
                    Conditioning::Tokens {
                        latents: image,
                        ids,
                    },
                ))
            }
        }
    }

    /// The empty prompt's encodings when `guidance` calls for classifier-free guidance (a scale of 1
    /// is the prompt alone).
    pub fn uncond_for(&self, guidance: f64) -> Result<Option<(Tensor, Tensor)>> {
        if self.cfg && guidance != 1.0 {
            Ok(Some(self.encode_prompt("")?))
        } else {
            Ok(None)
        }
    }
}

/// Whether a model of this kind takes this input (or none) for a generation of (width, height): the
/// image and its mask at the generation's size (the caller resizes), a strength in (0, 1], a mask for
/// FLUX.1-Fill, none for FLUX.1-Kontext. [`FluxPipeline::generate`] checks it; a server can check it
/// before queueing a request.
pub fn check_input(
    model: EditModel,
    input: Option<&InputImage>,
    width: usize,
    height: usize,
) -> Result<()> {
    let Some(input) = input else {
        if model == EditModel::Fill {
            bail!("FLUX.1-Fill repaints part of an image: give an input image and a mask (white where it repaints)");
        }
        return Ok(());
    };
    match (model, &input.mask) {
        (EditModel::Fill, None) => {
            bail!("FLUX.1-Fill repaints part of an image: give a mask (white where it repaints)")
        }
        (EditModel::Kontext, Some(_)) => bail!(
            "FLUX.1-Kontext edits the whole image by instruction and takes no mask: inpaint with FLUX.1-Fill or another FLUX model"
        ),
        _ => {}
    }
    let (w, h) = (input.image.width() as usize, input.image.height() as usize);
    if (w, h) != (width, height) {
        bail!("the input image is {w}x{h} but the generation is {width}x{height}: resize the image to the generation's size");
    }
    if let Some(m) = &input.mask {
        let (mw, mh) = (m.width() as usize, m.height() as usize);
        if (mw, mh) != (width, height) {
            bail!("the mask is {mw}x{mh} but the generation is {width}x{height}: give a mask of the image's size");
        }
    }
    if !(input.strength > 0.0 && input.strength <= 1.0) {
        bail!("strength must be in (0, 1] (got {})", input.strength);
    }
    Ok(())
}

/// Reads a transformer folder's tensors into f32 variables, by checkpoint name.
fn load_vars(dir: &Path, device: &Device) -> Result<Vec<(String, Var)>> {
    let mut vars = Vec::new();
    for file in crate::weights::safetensors_files(dir)? {
        let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&file, device)
            .with_context(|| format!("reading {}", file.display()))?
            .into_iter()
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in tensors {
            vars.push((name, Var::from_tensor(&t.to_dtype(DType::F32)?)?));
        }
    }
    Ok(vars)
}

/// (1, 3, H, W) in [0, 1] to an 8-bit image, rounding as diffusers does.
pub fn to_rgb(pixels: &Tensor) -> Result<RgbImage> {
    let (_, _, h, w) = pixels.dims4()?;
    let data = (pixels.squeeze(0)?.permute((1, 2, 0))? * 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    RgbImage::from_raw(w as u32, h as u32, data).context("image buffer size")
}
