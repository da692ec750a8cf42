//! `studio generate`: prompt to PNG on the same pipeline code the server runs.

use anyhow::{Context, Result};
use app::{Recipe, RecipeInput, RecipeLora};
use engine::device::DeviceChoice;
use engine::hub::{DownloadProgress, Source};
use engine::lora::{self, LoraCache, LoraSource, LoraSpec, LoraStack};
use engine::pipeline::{Control, FluxPipeline, GenerateParams, InputImage, LoadOptions};
use engine::presets::Preset;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::capabilities::model_choice;
use crate::recipe;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to draw.
    pub prompt: String,
    /// Where to write the PNG; with `--num-images`, image i > 0 goes beside it as `<stem>-<i>.png`.
    #[arg(short, long, default_value = "image.png")]
    output: PathBuf,
    /// Images to make as one batch (1 to 4); image i starts from seed + i.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=app::limits::MAX_IMAGES as i64))]
    num_images: u32,
    /// The first-block step cache's threshold (e.g. 0.1): steps whose first block changed less
    /// than this since the last full step reuse the rest of it. Faster, not exact. Default: the
    /// preset's (off).
    #[arg(long)]
    step_cache: Option<f64>,
    /// Model preset (flux-dev, flux-schnell, flux-fill-dev, flux-kontext-dev, builtin-emoji; flux-tiny for
    /// tests). Default: FLUX.1-dev on a CUDA GPU with its weights or an HF_TOKEN, else the built-in
    /// model, as the server chooses.
    #[arg(long, env = "STUDIO_PRESET")]
    preset: Option<String>,
    /// A local diffusers FLUX folder or a hub repository id, instead of the preset's.
    #[arg(long)]
    model: Option<String>,
    /// A transformer file to use instead of the folder's: BFL's or ComfyUI's single file (bf16 or
    /// fp8, e.g. flux1-dev.safetensors) or a GGUF file (e.g. city96's flux1-dev-Q8_0.gguf).
    #[arg(long)]
    transformer_file: Option<PathBuf>,
    /// The format the transformer's linear layers are held in: bf16, fp8, q8_0, q6_k, q5_k, q4_k or
    /// q4_0, made from the checkpoint as it loads. Not given: as the checkpoint stores them.
    #[arg(long, env = "STUDIO_WEIGHTS", value_parser = crate::config::parse_weights)]
    weights: Option<engine::weights::WeightFormat>,
    /// `exact` (bf16 products; needs the transformer in bf16) or `fp8` (fp8 products: faster, not
    /// exact). Default: the transformer as loaded. See docs/performance.md, "Precision".
    #[arg(long, env = "STUDIO_PRECISION")]
    precision: Option<app::Precision>,
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
    /// The most GPU memory the model may use (`16G`, `12GiB`): its memory plan is chosen to fit it.
    /// Default: the preset's own cap, else what the GPU has free. See docs/memory.md.
    #[arg(long, env = "STUDIO_GPU_MEMORY", value_parser = engine::memory::parse_size)]
    gpu_memory: Option<u64>,
    /// A LoRA to apply, `SOURCE[:scale]` (scale 1 when absent): a local .safetensors file, a hub
    /// repository `owner/repo` or `owner/repo:file.safetensors`. Repeat to stack several; any
    /// replaces the preset's own LoRA, and `none` turns that off.
    #[arg(long = "lora", value_name = "SOURCE[:SCALE]")]
    loras: Vec<String>,
    /// An image (PNG or JPEG) to start from, to inpaint with `--mask`, or to edit by the prompt (a
    /// FLUX.1-Kontext model). Scaled to cover the generation's size and centre-cropped; without
    /// `--width`/`--height` the size is the image's, rounded to a multiple of 16 within the limits.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// How much of the schedule reruns from `--image`, above 0 and at most 1 (default 0.75).
    #[arg(long, requires = "image", value_parser = parse_strength)]
    strength: Option<f32>,
    /// Inpainting: a mask of `--image`'s size, white where it is repainted, black where it is kept.
    #[arg(long, value_name = "FILE", requires = "image")]
    mask: Option<PathBuf>,
}

fn parse_strength(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("strength must be above 0 and at most 1, got {v}"))
    }
}

/// `SOURCE[:scale]`: a trailing `:number` is the scale.
fn lora_arg(arg: &str) -> Result<LoraSpec> {
    let (source, scale) = match arg.rsplit_once(':') {
        Some((s, n)) if n.parse::<f64>().is_ok() => (s, n.parse::<f64>()?),
        _ => (arg, 1.0),
    };
    Ok(LoraSpec {
        name: source.to_string(),
        source: LoraSource::parse(source)?,
        scale,
        trigger_words: Vec::new(),
    })
}

/// The LoRAs asked for on the command line, else the preset's own.
fn lora_specs(preset: &Preset, args: &[String]) -> Result<Vec<LoraSpec>> {
    if args.iter().any(|a| a == "none") {
        anyhow::ensure!(
            args.len() == 1,
            "--lora none cannot be combined with other LoRAs"
        );
        return Ok(Vec::new());
    }
    if !args.is_empty() {
        return args.iter().map(|a| lora_arg(a)).collect();
    }
    Ok(match &preset.lora {
        None => Vec::new(),
        Some(l) => vec![LoraSpec::of_preset(l, 1.0)?],
    })
}

pub fn run(a: Args) -> Result<()> {
    let device = a.device.select()?;
    let preset = match &a.preset {
        None => model_choice::auto_preset(&device, a.model.is_some()),
        Some(name) => model_choice::named(name)?,
    };
    let mut opts = LoadOptions::from_preset(preset);
    if let Some(m) = &a.model {
        opts.source = Source::parse(m)?;
    }
    opts.transformer_file = a.transformer_file.clone();
    opts.weights = a.weights;
    if let Some(cap) = a.gpu_memory {
        opts.memory.gpu_memory = Some(cap);
    }
    // A bad input image is refused before the model loads.
    let decoded = a
        .image
        .as_deref()
        .map(|image| crate::input::from_files(image, a.mask.as_deref()))
        .transpose()?;
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
    let specs = lora_specs(preset, &a.loras)?;
    let prompt = lora::prompt_with_trigger_words(&a.prompt, &specs);
    // The load logs the memory plan it chose.
    let pipe = FluxPipeline::load(&opts, &device, progress.clone())?;
    let cache = LoraCache::new(&device, pipe.dtype());
    let loras = LoraStack::load(&cache, specs, progress)?;
    for (spec, file) in loras.iter() {
        eprintln!(
            "LoRA {} ({} layout, {} modules) at scale {}",
            spec.name,
            file.format.name(),
            file.modules.len(),
            spec.scale
        );
        if !file.skipped.is_empty() {
            eprintln!(
                "  not applied: {} text-encoder modules ({}...): the studio adapts the transformer only",
                file.skipped.len(),
                file.skipped[0]
            );
        }
    }
    pipe.set_loras(&loras.scaled())?;
    let (width, height) = match &decoded {
        Some(input) => {
            let (w, h) = input.size(a.width.map(|w| w as u32), a.height.map(|h| h as u32));
            (w as usize, h as usize)
        }
        None => (
            a.width.unwrap_or(preset.width),
            a.height.unwrap_or(preset.height),
        ),
    };
    let strength = a.strength.unwrap_or(app::limits::DEFAULT_STRENGTH);
    let input = decoded.map(|d| d.fit(width as u32, height as u32, strength));
    let params = GenerateParams {
        num_images: a.num_images as usize,
        step_cache: a.step_cache.or(preset.step_cache),
        precision: a.precision,
        input: input.as_ref().map(|i| InputImage {
            image: i.image.clone(),
            strength: f64::from(i.strength),
            mask: i.mask.clone(),
        }),
        ..GenerateParams::new(
            prompt,
            (width, height),
            a.steps.unwrap_or(preset.steps),
            a.guidance.unwrap_or(preset.guidance),
            a.seed.unwrap_or_else(rand_seed),
        )
    };
    let out = pipe.generate(&params, &mut |p| {
        eprint!("\rstep {}/{}", p.step, p.total);
        Control::Continue
    })?;
    eprintln!();
    let recipe = Recipe {
        prompt: params.prompt.clone(),
        seed: params.seed,
        model: a.model.clone().unwrap_or_else(|| preset.name.to_string()),
        loras: loras
            .iter()
            .map(|(spec, _)| RecipeLora {
                name: spec.name.clone(),
                scale: spec.scale as f32,
            })
            .collect(),
        steps: params.steps as u32,
        guidance: params.guidance as f32,
        width: params.width as u32,
        height: params.height as u32,
        input: input.as_ref().map(|i| RecipeInput {
            job_id: None,
            index: None,
            strength: i.strength,
            masked: i.mask.is_some(),
        }),
        studio: Some(recipe::studio_version()),
    };
    for ((i, image), seed) in out.images.iter().enumerate().zip(params.seeds()) {
        let path = numbered(&a.output, i);
        let is_png = path
            .extension()
            .is_none_or(|e| e.eq_ignore_ascii_case("png"));
        // A PNG carries its recipe; another format (`-o fox.jpg`) is written as its extension says.
        if is_png {
            let png = recipe::encode_png(
                image,
                &Recipe {
                    seed,
                    ..recipe.clone()
                },
            )?;
            std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        } else {
            image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        eprintln!(
            "wrote {} ({}x{}, seed {seed})",
            path.display(),
            params.width,
            params.height
        );
    }
    let cache = match params.step_cache {
        Some(t) => format!(
            "; step cache {t}: {} of {} steps skipped",
            out.timings.skipped_steps, params.steps
        ),
        None => String::new(),
    };
    eprintln!(
        "text {} ms, denoise {} ms, decode {} ms{cache}",
        out.timings.encode_ms, out.timings.denoise_ms, out.timings.decode_ms
    );
    Ok(())
}

/// `image.png` for the first image, `image-1.png`, `image-2.png`, ... for the others.
fn numbered(output: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return output.to_path_buf();
    }
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    let name = match output.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    output.with_file_name(name)
}

fn rand_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}
