//! GPU checks and timings for FLUX, run beside diffusers on the same weights
//! (scripts/gpu/flux-parity-bench.sh):
//!   flux-bench forward  --model DIR --inputs REF.safetensors   one transformer step vs diffusers
//!   flux-bench generate --model DIR --size 1024 --steps 28     end-to-end timing

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use engine::device::DeviceChoice;
use engine::hub::Source;
use engine::models::flux::{FluxConfig, FluxInputs, FluxTransformer, FluxWeights};
use engine::pipeline::{Control, FluxPipeline, GenerateParams, LoadOptions};
use std::path::PathBuf;
use std::time::Instant;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(arg(&args, "--model").context("--model DIR")?);
    let device = DeviceChoice::Auto.select()?;
    match args.get(1).map(String::as_str) {
        Some("forward") => forward(
            &model,
            &arg(&args, "--inputs").context("--inputs FILE")?,
            &device,
        ),
        Some("generate") => generate(&model, &args, &device),
        _ => anyhow::bail!("usage: flux-bench forward|generate --model DIR ..."),
    }
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

fn forward(model: &std::path::Path, inputs: &str, device: &Device) -> Result<()> {
    let dtype = engine::device::compute_dtype(device);
    let t = model.join("transformer");
    let cfg: FluxConfig = FluxConfig::from_diffusers_json(&serde_json::from_slice(
        &std::fs::read(t.join("config.json"))?,
    )?)?;
    let t0 = Instant::now();
    let w = FluxWeights::open(&t, dtype, device)?;
    let m = FluxTransformer::load(&w, &cfg, dtype, device)?;
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let r = candle_core::safetensors::load(inputs, device)?;
    let run = || -> Result<Tensor> {
        m.forward(&FluxInputs {
            img: &r["hidden_states"],
            img_ids: &r["img_ids"],
            txt: &r["encoder_hidden_states"],
            txt_ids: &r["txt_ids"],
            timesteps: &r["timestep"],
            y: &r["pooled_projections"],
            guidance: r.get("guidance"),
        })
    };
    let out = run()?;
    sync(device)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        run()?;
        sync(device)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let ours = out.to_dtype(DType::F32)?.flatten_all()?;
    let want = r["out"].to_dtype(DType::F32)?.flatten_all()?;
    let diff = (&ours - &want)?.abs()?;
    let scale = want.abs()?.max(0)?.to_scalar::<f32>()?;
    let max_rel = diff.max(0)?.to_scalar::<f32>()? / scale;
    let mean_rel = diff.mean(0)?.to_scalar::<f32>()? / want.abs()?.mean(0)?.to_scalar::<f32>()?;
    let cos = ((&ours * &want)?.sum(0)?.to_scalar::<f32>()?)
        / (ours.sqr()?.sum(0)?.to_scalar::<f32>()?.sqrt()
            * want.sqr()?.sum(0)?.to_scalar::<f32>()?.sqrt());
    println!(
        "{}",
        serde_json::json!({"what": "forward", "load_s": load_s, "step_s": times,
            "max_abs_diff_over_max_abs": max_rel, "mean_abs_diff_over_mean_abs": mean_rel, "cosine": cos})
    );
    Ok(())
}

fn generate(model: &std::path::Path, args: &[String], device: &Device) -> Result<()> {
    let size: usize = arg(args, "--size").map_or(Ok(1024), |s| s.parse())?;
    let steps: usize = arg(args, "--steps").map_or(Ok(28), |s| s.parse())?;
    let t5_len: usize = arg(args, "--t5-len").map_or(Ok(512), |s| s.parse())?;
    let opts = LoadOptions {
        source: Source::Local(model.to_path_buf()),
        transformer_file: None,
        t5_max_len: t5_len,
    };
    let t0 = Instant::now();
    let pipe = FluxPipeline::load_dir(model, &opts, device)?;
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let params = GenerateParams {
        prompt: "a fox reading under a tree, watercolor".into(),
        width: size,
        height: size,
        steps,
        guidance: 3.5,
        seed: 0,
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let mut step_times = Vec::new();
        let mut last = Instant::now();
        let out = pipe.generate(&params, &mut |_| {
            let _ = device.synchronize();
            step_times.push(last.elapsed().as_secs_f64());
            last = Instant::now();
            Control::Continue
        })?;
        sync(device)?;
        let mut sorted = step_times[1..].to_vec();
        sorted.sort_by(f64::total_cmp);
        runs.push(serde_json::json!({"total_s": t.elapsed().as_secs_f64(),
            "encode_ms": out.timings.encode_ms, "denoise_ms": out.timings.denoise_ms,
            "decode_ms": out.timings.decode_ms, "median_step_s": sorted.get(sorted.len() / 2)}));
    }
    println!(
        "{}",
        serde_json::json!({"what": "generate", "size": size, "steps": steps, "load_s": load_s, "runs": runs})
    );
    Ok(())
}
