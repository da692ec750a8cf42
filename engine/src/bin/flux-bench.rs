//! GPU checks and timings for FLUX, run beside diffusers on the same weights
//! (scripts/gpu/flux-parity-bench.sh):
//!   flux-bench forward  --model DIR --inputs REF.safetensors   one transformer step vs diffusers
//!   flux-bench generate --model DIR --size 1024 --steps 28     end-to-end timing
//!   flux-bench train --size 512 --steps 10 [--model DIR] [--rank 16] [--targets attention|all_linear]
//!       LoRA training steps (forward, backward, clipping, AdamW) as the trainer takes them, on random
//!       FLUX.1-dev-size weights unless --model gives a diffusers folder; peft's bench_train_ref.py shapes

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
    let device = DeviceChoice::Auto.select()?;
    if args.get(1).map(String::as_str) == Some("train") {
        return train(&args, &device);
    }
    let model = PathBuf::from(arg(&args, "--model").context("--model DIR")?);
    match args.get(1).map(String::as_str) {
        Some("forward") => forward(
            &model,
            &arg(&args, "--inputs").context("--inputs FILE")?,
            &device,
            args.iter().any(|a| a == "--f32"),
        ),
        Some("generate") => generate(&model, &args, &device),
        _ => anyhow::bail!("usage: flux-bench forward|generate --model DIR ... | train --size 512"),
    }
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

fn forward(model: &std::path::Path, inputs: &str, device: &Device, f32: bool) -> Result<()> {
    let dtype = if f32 {
        DType::F32
    } else {
        engine::device::compute_dtype(device)
    };
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
    let mut refs = vec![("diffusers_bf16", r["out"].clone())];
    let f32_file = inputs.replace(".safetensors", "-f32.safetensors");
    if let Ok(extra) = candle_core::safetensors::load(&f32_file, device) {
        refs.push(("diffusers_f32", extra["out_f32"].clone()));
    }
    let mut report = serde_json::json!({"what": "forward", "dtype": format!("{dtype:?}"), "load_s": load_s, "step_s": times});
    for (name, want) in refs {
        let want = want.to_dtype(DType::F32)?.flatten_all()?;
        report[name] = compare(&ours, &want)?;
    }
    println!("{report}");
    Ok(())
}

/// Relative max and mean absolute differences and the cosine similarity of two flat tensors.
fn compare(ours: &Tensor, want: &Tensor) -> Result<serde_json::Value> {
    let diff = (ours - want)?.abs()?;
    let max_rel = diff.max(0)?.to_scalar::<f32>()? / want.abs()?.max(0)?.to_scalar::<f32>()?;
    let mean_rel = diff.mean(0)?.to_scalar::<f32>()? / want.abs()?.mean(0)?.to_scalar::<f32>()?;
    let dot = (ours * want)?.sum(0)?.to_scalar::<f32>()?;
    let norms = ours.sqr()?.sum(0)?.to_scalar::<f32>()?.sqrt()
        * want.sqr()?.sum(0)?.to_scalar::<f32>()?.sqrt();
    Ok(
        serde_json::json!({"max_abs_diff_over_max_abs": max_rel, "mean_abs_diff_over_mean_abs": mean_rel, "cosine": dot / norms}),
    )
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

fn train(args: &[String], device: &Device) -> Result<()> {
    use engine::models::flux::{image_ids, text_ids};
    use engine::training::{lora::LoraSet, optim, Targets};
    let size: usize = arg(args, "--size").map_or(Ok(512), |s| s.parse())?;
    let steps: usize = arg(args, "--steps").map_or(Ok(10), |s| s.parse())?;
    let rank: usize = arg(args, "--rank").map_or(Ok(16), |s| s.parse())?;
    let t5_len: usize = arg(args, "--t5-len").map_or(Ok(512), |s| s.parse())?;
    let targets = match arg(args, "--targets").as_deref() {
        None | Some("attention") => Targets::Attention,
        Some("all_linear") => Targets::AllLinear,
        Some(other) => anyhow::bail!("--targets attention|all_linear, not {other}"),
    };
    let dtype = engine::device::compute_dtype(device);
    let t0 = Instant::now();
    let (cfg, w) = match arg(args, "--model") {
        Some(dir) => {
            let t = PathBuf::from(dir).join("transformer");
            let cfg = FluxConfig::from_diffusers_json(&serde_json::from_slice(&std::fs::read(
                t.join("config.json"),
            )?)?)?;
            (cfg, FluxWeights::open(&t, dtype, device)?)
        }
        None => (FluxConfig::dev(), FluxWeights::random(dtype, device)),
    };
    let model = FluxTransformer::load(&w, &cfg, dtype, device)?;
    drop(w);
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let lora = LoraSet::new(&model, targets, rank, rank as f64, 0, device)?;
    let mut adam = optim::AdamW::new(lora.vars(), 1e-4)?;
    let side = size / 16;
    let img =
        Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), device)?.to_dtype(dtype)?;
    let target = Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), device)?;
    let txt = Tensor::randn(0f32, 1.0, (1, t5_len, cfg.context_dim), device)?.to_dtype(dtype)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, cfg.vec_dim), device)?.to_dtype(dtype)?;
    let (img_ids, txt_ids) = (image_ids(side, side, device)?, text_ids(t5_len, device)?);
    let t = Tensor::new(&[0.5f32], device)?;
    let g = Tensor::new(&[1.0f32], device)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..steps + 2 {
        let start = Instant::now();
        lora.attach(&model, true);
        let pred = model.forward(&FluxInputs {
            img: &img,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            timesteps: &t,
            y: &pooled,
            guidance: cfg.guidance_embed.then_some(&g),
        });
        LoraSet::detach(&model);
        let loss = (pred?.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let (clipped, _) = optim::clipped_grads(&adam.vars, &grads, 1.0)?;
        drop(grads);
        adam.step(&clipped, 1e-4)?;
        sync(device)?;
        // The first two steps warm up kernels and the allocator, as in peft's bench.
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64());
            losses.push(loss.to_scalar::<f32>()?);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"what": "train", "size": size, "image_tokens": side * side, "text_tokens": t5_len,
            "rank": rank, "targets": format!("{targets:?}"), "lora_params": lora.parameter_count(),
            "dtype": format!("{dtype:?}"), "load_s": load_s, "step_s": times,
            "median_step_s": sorted.get(sorted.len() / 2), "losses": losses})
    );
    Ok(())
}
