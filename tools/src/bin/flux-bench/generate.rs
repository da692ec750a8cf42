//! `flux-bench generate`: end-to-end generation, timed per step.

use crate::timing::{median, step_flops, sync};
use anyhow::Result;
use candle_core::Device;
use engine::hub::Source;
use engine::models::flux::FluxConfig;
use engine::ops::Kernels;
use engine::pipeline::{Control, FluxPipeline, GenerateParams, LoadOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers FLUX folder.
    #[arg(long)]
    model: PathBuf,
    /// The image's side in pixels.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// T5 tokens of the prompt.
    #[arg(long, default_value_t = 512)]
    t5_len: usize,
}

pub fn run(a: &Args, device: &Device, kernels: Kernels) -> Result<()> {
    let (model, size, steps, t5_len) = (a.model.as_path(), a.size, a.steps, a.t5_len);
    let cfg = FluxConfig::from_diffusers_json(&serde_json::from_slice(&std::fs::read(
        model.join("transformer/config.json"),
    )?)?)?;
    let opts = LoadOptions {
        source: Source::Local(model.to_path_buf()),
        transformer_file: None,
        t5_max_len: t5_len,
        text_encoder_dir: engine::classifier::DEFAULT_ENCODER_DIR.into(),
        kernels,
        weights: None,
        memory: Default::default(),
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
    let flops = step_flops(&cfg, (size / 16) * (size / 16), t5_len);
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
        let step = median(step_times[1..].to_vec());
        runs.push(serde_json::json!({"total_s": t.elapsed().as_secs_f64(),
            "encode_ms": out.timings.encode_ms, "denoise_ms": out.timings.denoise_ms,
            "decode_ms": out.timings.decode_ms, "median_step_s": step, "step_tflops": flops / step / 1e12}));
    }
    println!(
        "{}",
        serde_json::json!({"what": "generate", "size": size, "steps": steps, "load_s": load_s, "runs": runs,
            "flops_per_step": flops})
    );
    Ok(())
}
