use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Bounds on generation requests that hold for every model; a preset may narrow them further.
pub mod limits {
    /// Width and height must be multiples of this (the autoencoder's and patchifier's stride).
    pub const SIZE_MULTIPLE: u32 = 16;
    pub const MIN_SIZE: u32 = 64;
    pub const MAX_SIZE: u32 = 2048;
    pub const MAX_STEPS: u32 = 100;
    pub const MAX_GUIDANCE: f32 = 30.0;
    pub const MAX_LORA_SCALE: f32 = 4.0;
    /// Far above what T5's 512 tokens can use; stops megabyte prompts reaching the tokenizer.
    pub const MAX_PROMPT_CHARS: usize = 4000;
    /// Images of one request, made as one batch.
    pub const MAX_IMAGES: u32 = 4;
    /// The step cache's threshold is a relative change: beyond 1 every step after the first would be
    /// skipped.
    pub const MAX_STEP_CACHE: f32 = 1.0;
    /// An input image's (or mask's) encoded size, after base64: a 2048x2048 photo as PNG fits.
    pub const MAX_INPUT_BYTES: usize = 12 * 1024 * 1024;
    /// An input image's (or mask's) sides as decoded, before it is scaled to the generation's size.
    pub const MAX_INPUT_SIDE: u32 = 8192;
    /// `strength` when an input image comes without one: enough of the schedule reruns to change the
    /// picture, little enough that its layout and colours stay (diffusers' FluxImg2ImgPipeline uses 0.6).
    pub const DEFAULT_STRENGTH: f32 = 0.75;

    /// The generation's size for an input image of `width` x `height` when the request gives no size:
    /// the input's, scaled down (keeping its shape) until both sides fit in `MAX_SIZE`, then each side
    /// rounded to the nearest multiple of `SIZE_MULTIPLE`, at least `MIN_SIZE`. With one side given, the
    /// other follows the input's shape by the same rounding.
    pub fn size_for_input(
        input: (u32, u32),
        width: Option<u32>,
        height: Option<u32>,
    ) -> (u32, u32) {
        let (w, h) = (f64::from(input.0.max(1)), f64::from(input.1.max(1)));
        let round = |v: f64| {
            let m = f64::from(SIZE_MULTIPLE);
            ((v / m).round() * m).clamp(f64::from(MIN_SIZE), f64::from(MAX_SIZE)) as u32
        };
        match (width, height) {
            (Some(w), Some(h)) => (w, h),
            (Some(x), None) => (x, round(f64::from(x) * h / w)),
            (None, Some(y)) => (round(f64::from(y) * w / h), y),
            (None, None) => {
                let scale = (f64::from(MAX_SIZE) / w.max(h)).min(1.0);
                (round(w * scale), round(h * scale))
            }
        }
    }
}

/// How a generation's transformer multiplies (docs/performance.md, "Precision").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 weights and products: diffusers' numerics. Needs the transformer loaded in bf16.
    Exact,
    /// The transformer's products in fp8 (`float8_e4m3fn` weights with a scale per tensor, on the FP8
    /// tensor cores of Ada and Hopper GPUs): faster, not exact. A bf16 transformer gets an fp8 copy of
    /// its layers for the run, LoRAs merged in; one loaded in fp8 runs as it is.
    Fp8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Fp8 => "fp8",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// The names the API takes (`--precision`, `STUDIO_PRECISION`).
    fn from_str(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "exact" => Ok(Self::Exact),
            "fp8" => Ok(Self::Fp8),
            _ => Err(format!("unknown precision `{name}`: choose exact or fp8")),
        }
    }
}

/// `POST /generate/` and the first message of the generation WebSocket. Fields not listed here are ignored,
/// as the original service ignored them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Random when absent; the response says which seed was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    /// A multiple of 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// A multiple of 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// A trained `model_id`, a file of the server's LoRA folder by name, a hub LoRA (`owner/repo` or
    /// `owner/repo:file.safetensors`), or `"none"`; the preset's LoRA when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_scale: Option<f32>,
    /// A preset id from `GET /models/`; the server's default preset when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How many images to make, 1 to 4 (default 1), as one batch: image `i` is the one a single
    /// request with `seed + i` makes. More than one are listed in the answer's `images`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_images: Option<u32>,
    /// The first-block step cache's threshold, 0 to 1 (e.g. 0.1): a step whose first block changed
    /// by less than this (relative) since the last full step reuses the rest of that step. Faster,
    /// not exact; 0 runs every step in full. The preset's setting when absent (off for all presets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_cache: Option<f32>,
    /// `exact` or `fp8`; the server's `--precision` when absent, else the model as it is loaded (bf16,
    /// unless its memory plan or `--weights` chose another format). A precision the loaded model cannot
    /// run (`exact` on an fp8 or GGUF transformer; either on GGUF; `fp8` where the plan has no room for
    /// the copy) is refused with 422 before the job is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// An image to start from (image-to-image), to repaint under `mask` (inpainting), or to edit by the
    /// prompt (a FLUX.1-Kontext model): base64 PNG or JPEG, a `data:image/...;base64,` prefix allowed.
    /// It is scaled to cover the generation's size and centre-cropped to it; without `width` and
    /// `height` the size is the input's, rounded to a multiple of 16 within the limits
    /// (`limits::size_for_input`). Not kept in the job's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Instead of `image`: a completed generation of this studio, by its `job_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_job: Option<String>,
    /// Which image of `image_job` (0 for the first, as `/images/{job_id}/{index}` numbers them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_index: Option<u32>,
    /// How much of the schedule reruns from the input image, above 0 and at most 1: 1 starts from noise,
    /// small values stay close to the image. 0.75 when an input image comes without it. FLUX.1-Fill and
    /// Kontext models ignore it, as diffusers' pipelines do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// Inpainting: base64 PNG or JPEG of the input image's size, white where the image is repainted,
    /// black where it is kept (grey values in between); scaled and cropped with the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
}

impl GenerateRequest {
    /// Whether the request starts from an input image (`image` or `image_job`).
    pub fn has_input(&self) -> bool {
        self.image.is_some() || self.image_job.is_some()
    }

    /// Checks the bounds every model shares; the message names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        use limits::*;
        if self.prompt.trim().is_empty() {
            return Err("prompt must not be empty".into());
        }
        if self.prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(format!(
                "prompt is longer than {MAX_PROMPT_CHARS} characters"
            ));
        }
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = value {
                if !(MIN_SIZE..=MAX_SIZE).contains(&v) || v % SIZE_MULTIPLE != 0 {
                    return Err(format!(
                        "{name} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}, got {v}"
                    ));
                }
            }
        }
        if let Some(steps) = self.steps {
            if !(1..=MAX_STEPS).contains(&steps) {
                return Err(format!(
                    "steps must be between 1 and {MAX_STEPS}, got {steps}"
                ));
            }
        }
        if let Some(g) = self.guidance {
            if !(0.0..=MAX_GUIDANCE).contains(&g) {
                return Err(format!(
                    "guidance must be between 0 and {MAX_GUIDANCE}, got {g}"
                ));
            }
        }
        if let Some(n) = self.num_images {
            if !(1..=MAX_IMAGES).contains(&n) {
                return Err(format!(
                    "num_images must be between 1 and {MAX_IMAGES}, got {n}"
                ));
            }
        }
        if let Some(t) = self.step_cache {
            if !(0.0..=MAX_STEP_CACHE).contains(&t) {
                return Err(format!(
                    "step_cache must be between 0 and {MAX_STEP_CACHE}, got {t}"
                ));
            }
        }
        if let Some(s) = self.lora_scale {
            if !(-MAX_LORA_SCALE..=MAX_LORA_SCALE).contains(&s) {
                return Err(format!(
                    "lora_scale must be between -{MAX_LORA_SCALE} and {MAX_LORA_SCALE}, got {s}"
                ));
            }
        }
        self.validate_input()
    }

    /// The input image's fields, before anything is decoded: which go together, and their ranges.
    fn validate_input(&self) -> Result<(), String> {
        use limits::*;
        if self.image.is_some() && self.image_job.is_some() {
            return Err("give either image (base64) or image_job (a job id), not both".into());
        }
        if self.image_index.is_some() && self.image_job.is_none() {
            return Err("image_index picks an image of image_job; give image_job too".into());
        }
        if !self.has_input() {
            if self.mask.is_some() {
                return Err(
                    "mask needs the image it masks: give image (base64) or image_job".into(),
                );
            }
            if self.strength.is_some() {
                return Err(
                    "strength needs an input image: give image (base64) or image_job".into(),
                );
            }
        }
        if let Some(s) = self.strength {
            if !(s > 0.0 && s <= 1.0) {
                return Err(format!("strength must be above 0 and at most 1, got {s}"));
            }
        }
        for (name, value) in [("image", &self.image), ("mask", &self.mask)] {
            if value.as_ref().is_some_and(|v| v.len() > MAX_INPUT_BYTES) {
                return Err(format!(
                    "{name} is larger than {} MiB of base64",
                    MAX_INPUT_BYTES >> 20
                ));
            }
        }
        Ok(())
    }
}

/// `POST /generate/` answer, and the `result` event of the generation WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// The image as base64-encoded PNG: the first of `images` when there are several.
    pub image: String,
    /// The first image's seed.
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub model: String,
    /// The prompt as sent to the model (trigger words included).
    pub prompt: String,
    pub elapsed_ms: u64,
    /// The job that made it; the PNG stays downloadable at `/images/{job_id}`.
    pub job_id: String,
    /// The LoRAs applied, in order, with the scale each was applied at (empty for none).
    #[serde(default)]
    pub loras: Vec<AppliedLora>,
    /// Every image, in seed order, when the request asked for more than one (`num_images`); absent
    /// for one, whose answer is `image` alone, as it always was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<BatchImage>,
    /// What the step cache did, when the generation ran with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_cache: Option<StepCacheReport>,
    /// Everything needed to make the image again, as its PNG carries it (absent in records made before
    /// PNGs carried recipes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<crate::Recipe>,
}

/// One image of a request for several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchImage {
    /// Base64-encoded PNG (in the job's record: its URL, `/images/{job_id}/{index}`).
    pub image: String,
    pub seed: u64,
}

/// The step cache's effect on one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepCacheReport {
    pub threshold: f32,
    /// Denoising steps that reused the cache instead of running the whole transformer.
    pub skipped_steps: u32,
}

/// One LoRA a generation used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppliedLora {
    /// As the request named it (or the preset's default).
    pub name: String,
    pub scale: f32,
    /// Modules of the file that were not applied: text-encoder adapters (the studio adapts the
    /// transformer only). Absent when everything was applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_plain_prompt_and_rejects_out_of_range_fields() {
        assert!(request("a cat").validate().is_ok());
        assert!(request("  ").validate().unwrap_err().contains("prompt"));
        let odd = GenerateRequest {
            width: Some(1000),
            ..request("a")
        };
        assert!(odd.validate().unwrap_err().contains("width"));
        let ok = GenerateRequest {
            width: Some(1024),
            height: Some(512),
            steps: Some(4),
            ..request("a")
        };
        assert!(ok.validate().is_ok());
        let zero = GenerateRequest {
            steps: Some(0),
            ..request("a")
        };
        assert!(zero.validate().unwrap_err().contains("steps"));
        let nan = GenerateRequest {
            guidance: Some(f32::NAN),
            ..request("a")
        };
        assert!(nan.validate().unwrap_err().contains("guidance"));
        for n in [0, 5] {
            let many = GenerateRequest {
                num_images: Some(n),
                ..request("a")
            };
            assert!(many.validate().unwrap_err().contains("num_images"), "{n}");
        }
        let four = GenerateRequest {
            num_images: Some(4),
            step_cache: Some(0.1),
            ..request("a")
        };
        assert!(four.validate().is_ok());
        let cache = GenerateRequest {
            step_cache: Some(-0.1),
            ..request("a")
        };
        assert!(cache.validate().unwrap_err().contains("step_cache"));
    }
}
