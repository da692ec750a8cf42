//! The models the studio knows by name: the one place that says where each comes from and
//! what its defaults are.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub title: &'static str,
    /// A hub repository in diffusers' layout, or a local folder in that layout.
    pub source: PresetSource,
    /// Whether the hub repository needs an accepted license and a token.
    pub gated: bool,
    /// T5 sequence length: FLUX.1-dev was trained with 512 tokens, schnell with 256.
    pub t5_max_len: usize,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    /// The LoRA applied when a request names none (`"lora": "none"` turns it off).
    pub lora: Option<PresetLora>,
    /// The first-block step cache's threshold when a request sets none (`sampling::step_cache`);
    /// `None`: every step in full, exact.
    pub step_cache: Option<f64>,
    /// The GPU memory (bytes) the model's memory plan may use when `--gpu-memory` is not given: `None`
    /// lets it use what the GPU has free when the model loads (docs/memory.md).
    pub gpu_memory: Option<u64>,
}

/// A preset's own LoRA.
#[derive(Debug, Clone, Serialize)]
pub struct PresetLora {
    /// A hub reference, `owner/repo:file.safetensors`.
    pub source: &'static str,
    pub scale: f64,
    /// Put in front of the prompt when it lacks them.
    pub trigger_words: &'static [&'static str],
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", content = "location", rename_all = "lowercase")]
pub enum PresetSource {
    Hub(&'static str),
    /// A folder inside this source tree (test models the project makes itself).
    Bundled(&'static str),
}

impl PresetSource {
    pub fn to_source(&self) -> crate::hub::Source {
        match self {
            Self::Hub(repo) => crate::hub::Source::Hub(repo.to_string()),
            Self::Bundled(rel) => crate::hub::Source::Local(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel),
            ),
        }
    }
}

pub const FLUX_DEV: &str = "flux-dev";
pub const FLUX_SCHNELL: &str = "flux-schnell";
/// FLUX.1-Fill-dev: inpainting and outpainting, the masked image and the mask as extra input channels
/// (FluxFillPipeline).
pub const FLUX_FILL_DEV: &str = "flux-fill-dev";
/// FLUX.1-Kontext-dev: edits by instruction, the input image's tokens beside the noise's
/// (FluxKontextPipeline).
pub const FLUX_KONTEXT_DEV: &str = "flux-kontext-dev";
/// A 1 MB FLUX with random weights in diffusers' layout: exercises every code path on a CPU
/// in milliseconds, and draws noise.
pub const FLUX_TINY: &str = "flux-tiny";

/// The built-in model: FLUX's architecture at 11M parameters on 64x64 pixels, conditioned on MiniLM,
/// trained by this project on emoji (docs/builtin-model.md): pictures of what was asked, in seconds on
/// a CPU, with no download and no token. The studio's default when FLUX.1-dev cannot run.
pub const BUILTIN_EMOJI: &str = "builtin-emoji";

pub static PRESETS: &[Preset] = &[
    Preset {
        name: FLUX_DEV,
        title: "FLUX.1 [dev]",
        source: PresetSource::Hub("black-forest-labs/FLUX.1-dev"),
        gated: true,
        t5_max_len: 512,
        steps: 28,
        guidance: 3.5,
        width: 1024,
        height: 1024,
        lora: Some(PresetLora {
            source: "strangerzonehf/Flux-Super-Realism-LoRA:super-realism.safetensors",
            scale: 1.0,
            trigger_words: &["Super Realism"],
        }),
        step_cache: None,
        gpu_memory: None,
    },
    Preset {
        name: FLUX_SCHNELL,
        title: "FLUX.1 [schnell]",
        source: PresetSource::Hub("black-forest-labs/FLUX.1-schnell"),
        gated: false,
        t5_max_len: 256,
        steps: 4,
        guidance: 0.0,
        width: 1024,
        height: 1024,
        lora: None,
        step_cache: None,
        gpu_memory: None,
    },
    Preset {
        name: FLUX_FILL_DEV,
        title: "FLUX.1 Fill [dev] (inpainting, outpainting)",
        source: PresetSource::Hub("black-forest-labs/FLUX.1-Fill-dev"),
        gated: true,
        t5_max_len: 512,
        // diffusers' FluxFillPipeline example: 50 steps at guidance 30.
        steps: 50,
        guidance: 30.0,
        width: 1024,
        height: 1024,
        lora: None,
        step_cache: None,
        gpu_memory: None,
    },
    Preset {
        name: FLUX_KONTEXT_DEV,
        title: "FLUX.1 Kontext [dev] (edits by instruction)",
        source: PresetSource::Hub("black-forest-labs/FLUX.1-Kontext-dev"),
        gated: true,
        t5_max_len: 512,
        // FluxKontextPipeline's defaults.
        steps: 28,
        guidance: 2.5,
        width: 1024,
        height: 1024,
        lora: None,
        step_cache: None,
        gpu_memory: None,
    },
    Preset {
        name: BUILTIN_EMOJI,
        title: "Built-in emoji model (64x64, runs on a CPU)",
        source: PresetSource::Bundled("assets/builtin-emoji"),
        gated: false,
        // Unused: the model reads prompts with MiniLM (its model_index.json says how many tokens).
        t5_max_len: 24,
        steps: 20,
        // A classifier-free guidance scale for this model.
        guidance: 4.0,
        width: 64,
        height: 64,
        lora: None,
        step_cache: None,
        gpu_memory: None,
    },
    Preset {
        name: FLUX_TINY,
        title: "Tiny FLUX (random weights, for tests)",
        source: PresetSource::Bundled("tests/fixtures/tiny-flux-dev"),
        gated: false,
        t5_max_len: 32,
        steps: 4,
        guidance: 3.5,
        width: 64,
        height: 64,
        lora: None,
        step_cache: None,
        gpu_memory: None,
    },
];

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The files of a diffusers FLUX repository the studio needs (not the BFL single files at
/// its root, which duplicate the transformer and autoencoder).
pub fn is_needed_file(path: &str) -> bool {
    const PARTS: [&str; 7] = [
        "scheduler/",
        "text_encoder/",
        "text_encoder_2/",
        "tokenizer/",
        "tokenizer_2/",
        "transformer/",
        "vae/",
    ];
    const KINDS: [&str; 4] = [".json", ".txt", ".model", ".safetensors"];
    path == "model_index.json"
        || (PARTS.iter().any(|p| path.starts_with(p)) && KINDS.iter().any(|k| path.ends_with(k)))
}
