//! `flux-bench generate`: end-to-end generation, timed per step; with `--batch N`, N images in one
//! batch (images per minute beside diffusers' `num_images_per_prompt`); with `--step-cache T`, the
//! step cache's speed and its error against the full run at the same seed; with `--fp8-precision`,
//! the same for a request's fp8 precision (an fp8 copy of a bf16 transformer).

use crate::timing::{median, step_flops, sync};
use anyhow::Result;
use candle_core::Device;
use engine::hub::Source;
use engine::models::flux::FluxConfig;
use engine::ops::Kernels;
use engine::pipeline::{Control, FluxPipeline, GenerateParams, Generated, InputImage, LoadOptions};
use engine::sampling::edit::EditModel;
use engine::weights::WeightFormat;
use image::RgbImage;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers FLUX folder.
    #[arg(long)]
    model: PathBuf,
    /// The image's width in pixels (its side, without --height).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// The image's height in pixels, for a wide or tall image (e.g. --size 1360 --height 768).
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// T5 tokens of the prompt.
    #[arg(long, default_value_t = 512)]
    t5_len: usize,
    /// Images made as one batch through the transformer.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Also run with the first-block step cache at this threshold, and report its error.
    #[arg(long)]
    step_cache: Option<f64>,
    /// Also run at `"precision": "fp8"` (on a bf16 load: an fp8 copy of the transformer made for each
    /// run), and report its speed and its image's difference from the exact run at the same seed.
    #[arg(long)]
    fp8_precision: bool,
    /// Start from an input image (a fixed gradient of the size): image-to-image at this strength on
    /// a FLUX.1-dev folder, an instruction edit on a FLUX.1-Kontext one (the folder's model decides,
    /// as in the studio; Kontext ignores the strength).
    #[arg(long)]
    edit_strength: Option<f64>,
}

/// A smooth RGB gradient: an input image that every run of a size shares.
fn gradient(size: usize) -> RgbImage {
    let s = size as u32;
    RgbImage::from_fn(s, s, |x, y| {
        image::Rgb([
            (x * 255 / s) as u8,
            (y * 255 / s) as u8,
            ((x + y) * 127 / s) as u8,
        ])
    })
}

pub fn run(
    a: &Args,
    device: &Device,
    kernels: Kernels,
    weights: Option<WeightFormat>,
) -> Result<()> {
    let (model, size, steps, t5_len) = (a.model.as_path(), a.size, a.steps, a.t5_len);
    let height = a.height.unwrap_or(size);
    anyhow::ensure!(
        a.edit_strength.is_none() || height == size,
        "--edit-strength starts from a square gradient: leave --height out"
    );
    let cfg = FluxConfig::from_diffusers_json(&serde_json::from_slice(&std::fs::read(
        model.join("transformer/config.json"),
    )?)?)?;
    let opts = LoadOptions {
        source: Source::Local(model.to_path_buf()),
        transformer_file: None,
        t5_max_len: t5_len,
        text_encoder_dir: engine::classifier::DEFAULT_ENCODER_DIR.into(),
        kernels,
        weights,
        memory: Default::default(),
    };
    let t0 = Instant::now();
    let pipe = FluxPipeline::load_dir(model, &opts, device)?;
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let input = a.edit_strength.map(|strength| InputImage {
        image: gradient(size),
        strength,
        mask: None,
    });
    let mut params = GenerateParams {
        num_images: a.batch,
        input,
        ..GenerateParams::new(
            "a fox reading under a tree, watercolor",
            (size, height),
            steps,
            3.5,
            0,
        )
    };
    // A step of a batch computes each image's tokens: the products scale with the batch.
    // Kontext's sequence holds the input image's tokens beside the noise's.
    let image_tokens = (size / 16) * (height / 16);
    let kontext = a.edit_strength.is_some() && pipe.edit_model() == EditModel::Kontext;
    let tokens = if kontext {
        2 * image_tokens
    } else {
        image_tokens
    };
    let flops = step_flops(&cfg, tokens, t5_len) * a.batch as f64;
    let mut runs = Vec::new();
    let mut full = None;
    let prompt = params.prompt.clone();
    for time_of_day in ["at dawn", "at dusk"] {
        // A new prompt each run: the prompt cache would skip the text encoders of a repeated one,
        // which diffusers runs every time (the encoders' share is each run's `encode_ms`).
        params.prompt = format!("{prompt} {time_of_day}");
        let (run, out) = timed(&pipe, &params, device, flops)?;
        runs.push(run);
        full = Some(out);
    }
    let mut record = serde_json::json!({"what": "generate", "size": size, "height": height, "steps": steps, "batch": a.batch,
        "weights": weights.map_or("as stored".to_string(), |w| w.to_string()), "load_s": load_s, "runs": runs, "flops_per_step": flops,
        "plan": pipe.memory_plan().summary()});
    if let Some(strength) = a.edit_strength {
        record["edit"] =
            serde_json::json!({"model": format!("{:?}", pipe.edit_model()), "strength": strength});
    }
    if let (Some(threshold), Some(full)) = (a.step_cache, full.as_ref()) {
        let cached = GenerateParams {
            step_cache: Some(threshold),
            ..params.clone()
        };
        let mut cache_runs = Vec::new();
        for _ in 0..2 {
            let (mut run, out) = timed(&pipe, &cached, device, flops)?;
            run["skipped_steps"] = out.timings.skipped_steps.into();
            run["image_error"] = image_error(&out.images, &full.images).into();
            cache_runs.push(run);
        }
        record["step_cache"] = serde_json::json!({"threshold": threshold, "runs": cache_runs});
    }
    if let (true, Some(full)) = (a.fp8_precision, full.as_ref()) {
        let fp8 = GenerateParams {
            precision: Some(app::Precision::Fp8),
            ..params.clone()
        };
        let mut fp8_runs = Vec::new();
        for _ in 0..2 {
            let (mut run, out) = timed(&pipe, &fp8, device, flops)?;
            run["image_error"] = image_error(&out.images, &full.images).into();
            fp8_runs.push(run);
        }
        record["fp8_precision"] = serde_json::json!({"runs": fp8_runs});
    }
    println!("{record}");
    Ok(())
}

/// One generation, timed; with its images per minute and the median step (the first left out: it
/// warms up).
fn timed(
    pipe: &FluxPipeline,
    params: &GenerateParams,
    device: &Device,
    flops: f64,
) -> Result<(serde_json::Value, Generated)> {
    let t = Instant::now();
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    let out = pipe.generate(params, &mut |_| {
        let _ = device.synchronize();
        step_times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        Control::Continue
    })?;
    sync(device)?;
    let total = t.elapsed().as_secs_f64();
    let step = median(step_times[1..].to_vec());
    let run = serde_json::json!({"total_s": total, "images_per_minute": params.num_images as f64 * 60.0 / total,
        "encode_ms": out.timings.encode_ms, "denoise_ms": out.timings.denoise_ms,
        "decode_ms": out.timings.decode_ms, "median_step_s": step, "step_tflops": flops / step / 1e12,
        "image_digest": digest(&out.images)});
    Ok((run, out))
}

/// A digest of the images' pixels: runs of one prompt and seed under different memory plans (resident
/// or streamed layers of one format) must draw the same bytes.
fn digest(images: &[RgbImage]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for image in images {
        image.as_raw().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The largest difference of any channel of any pixel between two runs' images, over 255.
fn image_error(a: &[RgbImage], b: &[RgbImage]) -> f64 {
    let most = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.as_raw().iter().zip(y.as_raw()))
        .map(|(p, q)| p.abs_diff(*q))
        .max()
        .unwrap_or(0);
    f64::from(most) / 255.0
}
