//! `studio generate`: prompt to PNG on the same pipeline code the server runs.

use anyhow::{Context, Result};
use engine::device::DeviceChoice;
use engine::hub::{DownloadProgress, Source};
use engine::pipeline::{Control, FluxPipeline, GenerateParams, LoadOptions};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to draw.
    pub prompt: String,
    /// Where to write the PNG.
    #[arg(short, long, default_value = "image.png")]
    output: PathBuf,
    /// Model preset (flux-dev, flux-schnell, flux-tiny).
    #[arg(long, env = "STUDIO_PRESET", default_value = engine::presets::FLUX_DEV)]
    preset: String,
    /// A local diffusers FLUX folder or a hub repository id, instead of the preset's.
    #[arg(long)]
    model: Option<String>,
    /// A BFL-layout transformer file (e.g. flux1-dev.safetensors) to use instead of the folder's.
    #[arg(long)]
    transformer_file: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance: Option<f64>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Random seed; the same seed on the same device gives the same image.
    #[arg(long)]
    seed: Option<u64>,
    /// auto, cpu or cuda.
    #[arg(long, env = "STUDIO_DEVICE", default_value = "auto")]
    device: DeviceChoice,
}

pub fn run(a: Args) -> Result<()> {
    let preset = engine::presets::find(&a.preset).with_context(|| {
        let names: Vec<_> = engine::presets::PRESETS.iter().map(|p| p.name).collect();
        format!(
            "unknown preset `{}`: choose one of {}",
            a.preset,
            names.join(", ")
        )
    })?;
    let device = a.device.select()?;
    let mut opts = LoadOptions::from_preset(preset);
    if let Some(m) = &a.model {
        opts.source = Source::parse(m)?;
    }
    opts.transformer_file = a.transformer_file.clone();
    eprintln!("loading {} on {:?}", preset.title, device);
    let progress = Arc::new(|p: &DownloadProgress| {
        eprint!(
            "\rdownloading {} ({}/{} files): {:.0} / {:.0} MB   ",
            p.file,
            p.files_done,
            p.files_total,
            p.file_bytes as f64 / 1e6,
            p.file_total as f64 / 1e6
        );
    });
    let pipe = FluxPipeline::load(&opts, &device, progress)?;
    let params = GenerateParams {
        prompt: a.prompt,
        width: a.width.unwrap_or(preset.width),
        height: a.height.unwrap_or(preset.height),
        steps: a.steps.unwrap_or(preset.steps),
        guidance: a.guidance.unwrap_or(preset.guidance),
        seed: a.seed.unwrap_or_else(rand_seed),
    };
    let out = pipe.generate(&params, &mut |p| {
        eprint!("\rstep {}/{}", p.step, p.total);
        Control::Continue
    })?;
    eprintln!();
    out.image
        .save(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({}x{}, seed {}; text {} ms, denoise {} ms, decode {} ms)",
        a.output.display(),
        params.width,
        params.height,
        out.seed,
        out.timings.encode_ms,
        out.timings.denoise_ms,
        out.timings.decode_ms
    );
    Ok(())
}

fn rand_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}
