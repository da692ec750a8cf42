//! The seam where the models plug in. Each capability is a trait object handed to the server at start;
//! one that is absent makes its routes answer 503 with the reason below (or its load error). Implementations
//! own their models; the large ones load on first use, the small classifier at start. Each worker (one per
//! device) has its own `Generation` and `Training` ([`WorkerEngine`]), whose `generate`, `start` and `step`
//! are only ever called on that worker's thread, so a device's memory is never contended.

use std::path::PathBuf;
use std::sync::Arc;

use app::{ErrorCode, GenerateRequest, PresetInfo, TrainSettingsForm};
use image::RgbImage;

/// A failed job that is not the studio's fault, with the error code clients get (its HTTP answer is
/// [`ErrorCode::status`]); any other error of a job is reported as the studio's (`generation_failed`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JobFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl JobFailure {
    /// A hub LoRA that does not exist: the request named it wrongly (422).
    pub const LORA_NOT_FOUND: ErrorCode = ErrorCode::LoraNotFound;
    /// A hub LoRA that could not be fetched (network, hub, token): worth retrying later (503).
    pub const LORA_UNAVAILABLE: ErrorCode = ErrorCode::LoraUnavailable;
    /// The device ran out of memory inside the job: smaller sizes or fewer LoRAs may fit (503).
    pub const OUT_OF_MEMORY: ErrorCode = ErrorCode::OutOfMemory;
    /// The data directory's disk is full: the operator's to fix (507).
    pub const DISK_FULL: ErrorCode = ErrorCode::InsufficientStorage;

    /// Whether the device ran out of memory: cudarc reports `CUDA_ERROR_OUT_OF_MEMORY`, and there is
    /// no typed error to match through candle.
    pub fn is_out_of_memory(err: &anyhow::Error) -> bool {
        format!("{err:#}").contains("OUT_OF_MEMORY")
    }

    /// The code and message a failed job reports: a [`JobFailure`] anywhere in the chain as it is, a
    /// CUDA out-of-memory error as [`JobFailure::OUT_OF_MEMORY`], anything else under `fallback`.
    pub fn describe(err: &anyhow::Error, fallback: ErrorCode) -> (ErrorCode, String) {
        // candle appends a backtrace to its errors, on lines of their own: for the log, not the client.
        let full = format!("{err:#}");
        let text = full.lines().next().unwrap_or_default().trim_end();
        if let Some(failure) = err.chain().find_map(|c| c.downcast_ref::<JobFailure>()) {
            return (failure.code, text.to_string());
        }
        let disk_full = err.chain().any(|c| {
            c.downcast_ref::<std::io::Error>().is_some_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
            })
        });
        if disk_full {
            return (
                Self::DISK_FULL,
                format!("the server's disk is full: free space in its data directory and retry ({text})"),
            );
        }
        if Self::is_out_of_memory(err) {
            return (
                Self::OUT_OF_MEMORY,
                format!("the GPU ran out of memory for this job: try a smaller size or fewer LoRAs, or use a GPU with more memory ({text})"),
            );
        }
        (fallback, text.to_string())
    }
}

/// Text-to-image. Planning runs on the request path and must be cheap; generating runs on the worker.
pub trait Generation: Send + Sync {
    /// The presets with their weights' state, for `GET /models/`.
    fn presets(&self) -> Vec<PresetInfo>;

    /// The preset used when a request names none.
    fn default_preset(&self) -> String;

    /// The loaded model's memory plan, for `/health`; `None` while no model is loaded (or the
    /// capability has no plan).
    fn memory_plan(&self) -> Option<app::MemoryPlanInfo> {
        None
    }

    /// The models and LoRAs it holds in memory now, for the scheduler to send jobs where they are
    /// (LoRAs by [`LoraChoice::affinity_name`]). Empty when the capability keeps nothing resident.
    fn held(&self) -> Held {
        Held::default()
    }

    /// Resolves a request (already checked by `GenerateRequest::validate`, seed filled in) against its preset:
    /// defaults, trigger words, the LoRA. An `Err` is answered 422 with its text.
    fn plan(&self, request: &GenerateRequest, lora: LoraChoice) -> Result<GenerationPlan, String>;

    /// Runs the plan; `on_step` is called after every denoising step and returns `Control::Cancel` once the job
    /// is cancelled, after which the implementation should stop and return (any result is then discarded).
    fn generate(
        &self,
        plan: &GenerationPlan,
        on_step: &mut dyn FnMut(&StepUpdate) -> Control,
    ) -> anyhow::Result<Generated>;
}

/// Which LoRA a request asked for, with the server's trained LoRAs already resolved to files.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LoraChoice {
    /// The request named none: the preset's own LoRA, if it has one.
    PresetDefault,
    /// `"none"`.
    Disabled,
    /// A `model_id` of a completed training job of this server.
    Trained {
        model_id: String,
        file: PathBuf,
        keywords: Vec<String>,
    },
    /// Anything else, for the engine to resolve (a hub repository, say).
    Named(String),
}

impl LoraChoice {
    /// The name a worker holding this LoRA is known to hold it by; `None` for none, and for the preset's
    /// own LoRA, which comes with the model.
    pub fn affinity_name(&self) -> Option<&str> {
        match self {
            LoraChoice::Trained { model_id, .. } => Some(model_id),
            LoraChoice::Named(name) => Some(name),
            LoraChoice::PresetDefault | LoraChoice::Disabled => None,
        }
    }
}

/// What a worker holds in memory: model presets, and LoRAs by [`LoraChoice::affinity_name`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub models: Vec<String>,
    pub loras: Vec<String>,
}

/// Everything the engine needs for one image, with every default applied. Serialized, it is what a
/// cluster's worker node reads from the shared queue (the input image as PNG).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationPlan {
    pub model: String,
    /// The prompt as sent to the model, trigger words included.
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// The first image's seed; image `i` has `seed + i`.
    pub seed: u64,
    /// Images made as one batch (1 to `app::limits::MAX_IMAGES`).
    pub num_images: u32,
    /// The step cache's threshold; `None`: every step in full.
    pub step_cache: Option<f32>,
    /// How the transformer multiplies; `None`: the weights as loaded.
    #[serde(default)]
    pub precision: Option<app::Precision>,
    pub lora: LoraChoice,
    pub lora_scale: f32,
    /// The image to start from or edit, already at `width` x `height`; set by the server after
    /// `Generation::plan` (which leaves it `None`).
    pub input: Option<PlanInput>,
}

/// A generation's input image, fitted to the plan's size (`crate::input`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanInput {
    #[serde(with = "png")]
    pub image: RgbImage,
    /// White where the image is repainted.
    #[serde(with = "png")]
    pub mask: Option<image::GrayImage>,
    /// In (0, 1].
    pub strength: f32,
    /// `(job_id, index)` when it is an earlier generation's image.
    pub job: Option<(String, u32)>,
}

pub struct StepUpdate {
    /// 1-based.
    pub step: u32,
    pub total: u32,
    /// A small rendering of each image's current latent, in order, when the engine can make them
    /// cheaply (else empty).
    pub previews: Vec<RgbImage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

pub struct Generated {
    /// One image per seed of the plan, in order.
    pub images: Vec<RgbImage>,
    /// The first image's seed.
    pub seed: u64,
    /// The LoRAs applied, in order.
    pub loras: Vec<app::AppliedLora>,
    /// Steps the step cache skipped, when the plan ran with it.
    pub skipped_steps: Option<u32>,
}

/// Prompt classification: small, CPU-bound; runs on tokio's blocking pool, beside the worker.
pub trait Classification: Send + Sync {
    /// Probability (0..1) that the prompt asks for an image rather than conversation, given the turns
    /// before it (oldest first; empty when the caller sent none).
    fn image_request_probability(
        &self,
        prompt: &str,
        context: &[app::ContextTurn],
    ) -> anyhow::Result<f32>;
}

/// The chat's language model: answers a conversation, streaming its text. Runs on tokio's blocking pool,
/// one answer at a time (the implementation serializes them).
pub trait Chat: Send + Sync {
    /// The model answers are written by, as responses name it.
    fn model(&self) -> String;

    /// Answers the last user turn of `turns` (system first); `on_text` gets each piece as it is decoded
    /// and returns `Control::Cancel` to stop there, after which the part written so far is returned.
    fn answer(
        &self,
        turns: &[engine::chat::Turn],
        settings: &engine::chat::SamplingSettings,
        on_text: &mut dyn FnMut(&str) -> Control,
    ) -> anyhow::Result<engine::chat::Answer>;

    /// The `k` sections of the studio's own docs nearest to `question`, nearest first, with their cosine
    /// similarity.
    fn studio_docs(
        &self,
        question: &str,
        k: usize,
    ) -> anyhow::Result<Vec<(f32, engine::chat::docs::DocChunk)>>;
}

/// LoRA training, advanced one optimizer step at a time so the worker can serve generations in between.
pub trait Training: Send + Sync {
    /// Checks the settings of `POST /train/` (typed and range-checked already) against the model they
    /// name (on the request path, cheap); `Err` is answered 422.
    fn check_settings(&self, settings: &TrainSettingsForm) -> Result<(), String>;

    /// Reads the dataset, caches encodings, loads what is needed: the `preparing` phase. With `spec.resume`,
    /// continues from the latest checkpoint in `spec.job_dir` when there is one.
    fn start(
        &self,
        spec: &TrainingSpec,
        report: &mut dyn FnMut(TrainingReport),
    ) -> anyhow::Result<Box<dyn TrainingRun>>;
}

pub trait TrainingRun {
    /// One optimizer step, plus samples and checkpoints when due. After `StepOutcome::Finished` the LoRA is at
    /// `spec.lora_file`. A run dropped between steps (cancel, shutdown) leaves its last checkpoint behind.
    fn step(&mut self, report: &mut dyn FnMut(TrainingReport)) -> anyhow::Result<StepOutcome>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSpec {
    pub model_id: String,
    /// The uploaded ZIP.
    pub dataset: PathBuf,
    /// The job's own folder: checkpoints go here, and nothing of the job goes anywhere else.
    pub job_dir: PathBuf,
    /// Sample images go here, named `[A-Za-z0-9_-]+.png`, and are announced by `TrainingReport::Sample`.
    pub samples_dir: PathBuf,
    /// Where the finished LoRA (safetensors) must be written.
    pub lora_file: PathBuf,
    pub keywords: Vec<String>,
    /// Boxed: a spec waits in the queue's tickets, which stay small.
    pub settings: Box<TrainSettingsForm>,
    pub resume: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainingReport {
    Log(String),
    Step {
        step: u32,
        total: u32,
        loss: f32,
        learning_rate: f64,
        /// Mean duration of recent steps.
        seconds_per_step: Option<f64>,
        /// Time left at that pace.
        eta_seconds: Option<f64>,
    },
    /// File name inside `samples_dir`, written with `recipe`.
    Sample {
        step: u32,
        file: String,
        recipe: Box<app::Recipe>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Continue,
    Finished,
}

/// One worker's engine: its device, and the generation and training that keep their models on it.
#[derive(Clone)]
pub struct WorkerEngine {
    /// As users read it: `cpu`, `cuda:1`.
    pub device: String,
    pub generation: Option<Arc<dyn Generation>>,
    pub training: Option<Arc<dyn Training>>,
}

/// The capabilities this server was built with; `None` means "not in this build".
#[derive(Clone, Default)]
pub struct Capabilities {
    /// The workers, one per device. Empty: one worker running `generation` and `training` (a test's
    /// stand-ins, say). When given, `generation` and `training` are the first worker's, used on the
    /// request path (planning, presets, settings checks).
    pub workers: Vec<WorkerEngine>,
    pub generation: Option<Arc<dyn Generation>>,
    pub classification: Option<Arc<dyn Classification>>,
    /// Why `classification` is `None` when the classifier failed to load (missing model files, say), so that
    /// `/health` and the 503 tell the operator what to fix.
    pub classification_error: Option<String>,
    pub training: Option<Arc<dyn Training>>,
    pub chat: Option<Arc<dyn Chat>>,
    /// Why `chat` is `None` when its model could not be set up (a missing file, say).
    pub chat_error: Option<String>,
}

pub const GENERATION_UNAVAILABLE: &str = "generation engine not available in this build yet";
pub const CLASSIFICATION_UNAVAILABLE: &str = "prompt classifier not available in this build yet";
pub const TRAINING_UNAVAILABLE: &str = "LoRA training not available in this build yet";
pub const CHAT_UNAVAILABLE: &str = "the chat's language model is not available in this build";

impl Capabilities {
    /// The workers to start: `workers`, or one on `generation` and `training`.
    pub fn worker_engines(&self) -> Vec<WorkerEngine> {
        if !self.workers.is_empty() {
            return self.workers.clone();
        }
        vec![WorkerEngine {
            device: "default".into(),
            generation: self.generation.clone(),
            training: self.training.clone(),
        }]
    }

    /// The classifier, or why there is none.
    pub fn classifier(&self) -> Result<Arc<dyn Classification>, &str> {
        self.classification.clone().ok_or_else(|| {
            self.classification_error
                .as_deref()
                .unwrap_or(CLASSIFICATION_UNAVAILABLE)
        })
    }

    /// The chat's model, or why there is none.
    pub fn chat(&self) -> Result<Arc<dyn Chat>, &str> {
        self.chat
            .clone()
            .ok_or_else(|| self.chat_error.as_deref().unwrap_or(CHAT_UNAVAILABLE))
    }

    /// For `/health`: (name, unavailability reason).
    pub fn states(&self) -> [(&'static str, Option<&str>); 4] {
        [
            (
                "generation",
                self.generation.is_none().then_some(GENERATION_UNAVAILABLE),
            ),
            ("classification", self.classifier().err()),
            (
                "training",
                self.training.is_none().then_some(TRAINING_UNAVAILABLE),
            ),
            ("chat", self.chat().err()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::JobFailure;
    use app::ErrorCode;

    #[test]
    fn a_failure_is_reported_by_its_cause() {
        let typed = anyhow::Error::new(JobFailure {
            code: JobFailure::LORA_NOT_FOUND,
            message: "LoRA a/b: no such file".into(),
        })
        .context("generating");
        assert_eq!(
            JobFailure::describe(&typed, ErrorCode::GenerationFailed).0,
            JobFailure::LORA_NOT_FOUND
        );
        // As candle passes a cudarc allocation failure up: with its backtrace on the following lines
        // (as the GPU machine's out-of-memory run showed), which stays out of the message.
        let oom = anyhow::anyhow!(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")\n   0: <unknown>\n   1: <unknown>"
        )
        .context("denoising step 3");
        let (code, message) = JobFailure::describe(&oom, ErrorCode::GenerationFailed);
        assert_eq!(code, JobFailure::OUT_OF_MEMORY);
        assert!(message.contains("smaller size"), "{message}");
        assert!(message.ends_with("out of memory\"))"), "{message}");
        let full = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::StorageFull))
            .context("writing the image");
        assert_eq!(
            JobFailure::describe(&full, ErrorCode::GenerationFailed).0,
            JobFailure::DISK_FULL
        );
        let other = anyhow::anyhow!("a NaN in the latents");
        assert_eq!(
            JobFailure::describe(&other, ErrorCode::GenerationFailed).0,
            ErrorCode::GenerationFailed
        );
    }
}

/// An image in a serialized plan: PNG, base64 (lossless, and a tenth of the raw pixels' JSON).
mod png {
    use std::io::Cursor;

    use base64::Engine as _;
    use image::{DynamicImage, GrayImage, RgbImage};
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub trait Pixels: Sized {
        fn encode(&self) -> image::ImageResult<Vec<u8>>;
        fn decode(png: &[u8]) -> image::ImageResult<Self>;
    }

    fn encode(image: DynamicImage) -> image::ImageResult<Vec<u8>> {
        let mut png = Vec::new();
        image.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
        Ok(png)
    }

    impl Pixels for RgbImage {
        fn encode(&self) -> image::ImageResult<Vec<u8>> {
            encode(DynamicImage::ImageRgb8(self.clone()))
        }
        fn decode(png: &[u8]) -> image::ImageResult<Self> {
            Ok(image::load_from_memory(png)?.to_rgb8())
        }
    }

    impl Pixels for GrayImage {
        fn encode(&self) -> image::ImageResult<Vec<u8>> {
            encode(DynamicImage::ImageLuma8(self.clone()))
        }
        fn decode(png: &[u8]) -> image::ImageResult<Self> {
            Ok(image::load_from_memory(png)?.to_luma8())
        }
    }

    impl<T: Pixels> Pixels for Option<T> {
        fn encode(&self) -> image::ImageResult<Vec<u8>> {
            self.as_ref().map_or(Ok(Vec::new()), Pixels::encode)
        }
        fn decode(png: &[u8]) -> image::ImageResult<Self> {
            (!png.is_empty()).then(|| T::decode(png)).transpose()
        }
    }

    pub fn serialize<T: Pixels, S: Serializer>(image: &T, s: S) -> Result<S::Ok, S::Error> {
        let png = image.encode().map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(png))
    }

    pub fn deserialize<'de, T: Pixels, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(D::Error::custom)?;
        T::decode(&png).map_err(D::Error::custom)
    }
}
