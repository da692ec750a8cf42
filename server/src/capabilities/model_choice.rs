//! Which preset serves: the one named (`--preset`), else FLUX.1-dev where it can run, else the built-in
//! model. The server and `studio generate` choose alike.

use anyhow::Result;
use candle_core::Device;
use engine::presets::{self, Preset, PresetSource};

/// The preset of that name, or an error naming every choice.
pub fn named(name: &str) -> Result<&'static Preset> {
    presets::find(name)
        .ok_or_else(|| anyhow::anyhow!("unknown preset `{name}`: choose one of {}", preset_names()))
}

/// Every preset's name, for error messages.
pub fn preset_names() -> String {
    presets::PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// FLUX.1-dev where it can run: a CUDA GPU, and its weights on disk (`local`: --model-dir, or the
/// hub cache) or a token to download them (the repository is gated). Otherwise the built-in model,
/// which runs on a CPU with no download; the log says why, and every response names the model in `model`.
pub fn auto_preset(device: &Device, local: bool) -> &'static Preset {
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
