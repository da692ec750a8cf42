//! `flux-bench train`: LoRA training steps (forward, backward, clipping, AdamW) as the trainer takes
//! them, on random FLUX.1-dev-size weights unless --model gives a diffusers folder; peft's
//! bench_train_ref.py shapes. --profile-step brackets the last step with the CUDA profiler API, for
//! `ncu --profile-from-start off` (scripts/gpu/train-profile.sh).

use crate::random;
use crate::timing::sync;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use engine::models::flux::{image_ids, text_ids, FluxConfig, FluxInputs, FluxWeights};
use engine::ops::Kernels;
use engine::pipeline::FluxPipeline;
use engine::training::{flux_backward, lora::LoraSet, optim, Targets};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TargetsArg {
    /// The attention projections, as peft's FLUX LoRA training targets them.
    Attention,
    /// Every linear layer of the blocks.
    #[value(name = "all_linear")]
    AllLinear,
}

#[derive(clap::Args)]
pub struct Args {
    /// The image's side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Timed steps (after two warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// A diffusers FLUX folder instead of random FLUX.1-dev-size weights.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// T5 tokens of the caption.
    #[arg(long, default_value_t = 512)]
    t5_len: usize,
    #[arg(long, value_enum, default_value_t = TargetsArg::Attention)]
    targets: TargetsArg,
    /// Keeps every block's activations instead of running each block again before its backward.
    #[arg(long)]
    no_checkpointing: bool,
    /// Brackets the last step with the CUDA profiler API.
    #[arg(long)]
    profile_step: bool,
    /// GiB of the transformer's blocks streamed from host memory while training, as the studio
    /// streams them on a card where a step does not fit beside the resident base
    /// (`MemoryPlan::training_streamed`, logged by the trainer).
    #[arg(long, default_value_t = 0.0)]
    streamed_gib: f64,
}

/// `weights`: the frozen base's format (`--weights fp8`, a GGUF type), as a small card's memory plan
/// loads it; the adapters train in f32 over it either way.
pub fn run(
    a: &Args,
    device: &Device,
    kernels: Kernels,
    weights: Option<engine::weights::WeightFormat>,
) -> Result<()> {
    let (size, steps, rank, t5_len) = (a.size, a.steps, a.rank, a.t5_len);
    let (checkpointing, profile_step) = (!a.no_checkpointing, a.profile_step);
    let targets = match a.targets {
        TargetsArg::Attention => Targets::Attention,
        TargetsArg::AllLinear => Targets::AllLinear,
    };
    let dtype = engine::device::compute_dtype(device);
    let t0 = Instant::now();
    let (cfg, w) = match &a.model {
        Some(dir) => {
            let t = dir.join("transformer");
            let cfg = FluxConfig::from_diffusers_json(&serde_json::from_slice(&std::fs::read(
                t.join("config.json"),
            )?)?)?;
            (cfg, FluxWeights::open(&t, dtype, device)?)
        }
        None => (FluxConfig::dev(), random::flux_weights(dtype, device)?),
    };
    let w = w.in_format(weights);
    // As the studio loads it: a base converted to fp8 or GGUF as it is read waits in host memory and
    // then comes to the GPU in one run of allocations (on a small card the pool would otherwise hold
    // the freed full-precision copies between the converted weights).
    let streamed = (a.streamed_gib * (1u64 << 30) as f64) as u64;
    let model = FluxPipeline::load_transformer(&w, &cfg, dtype, device, kernels, streamed)?;
    drop(w);
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let lora = LoraSet::new(&model, targets, rank, rank as f64, 0, device)?;
    let mut adam = optim::AdamW::new(lora.vars(), 1e-4, kernels)?;
    let side = size / 16;
    let img =
        Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), device)?.to_dtype(dtype)?;
    let target = Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), device)?;
    let txt = Tensor::randn(0f32, 1.0, (1, t5_len, cfg.context_dim), device)?.to_dtype(dtype)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, cfg.vec_dim), device)?.to_dtype(dtype)?;
    let (img_ids, txt_ids) = (image_ids(side, side, device)?, text_ids(t5_len, device)?);
    let t = Tensor::new(&[0.5f32], device)?;
    let g = Tensor::new(&[1.0f32], device)?;
    let inputs = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &t,
        y: &pooled,
        guidance: cfg.guidance_embed.then_some(&g),
    };
    let mut times = Vec::new();
    let mut losses = Vec::new();
    // Where a step's time goes: the loss and gradients, the clipping, the AdamW update (synchronised
    // after each, so the sum is a little over the step's own time).
    let mut phases: [Vec<f64>; 3] = Default::default();
    for i in 0..steps + 2 {
        let profiled = profile_step && i == steps + 1;
        if profiled {
            sync(device)?;
            profiler(device, true)?;
        }
        let start = Instant::now();
        lora.attach(&model, true);
        let mse = |pred: &Tensor| -> Result<Tensor> {
            Ok((pred.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?)
        };
        let out = flux_backward::loss_and_grads(&model, &inputs, &mse, checkpointing);
        LoraSet::detach(&model);
        let (loss, grads) = out?;
        sync(device)?;
        let t_grads = start.elapsed().as_secs_f64();
        let clipped = optim::clip_grads(&adam.vars, &grads, 1.0, kernels)?;
        drop(grads);
        sync(device)?;
        let t_clip = start.elapsed().as_secs_f64();
        adam.step(&clipped.grads, clipped.scale, 1e-4)?;
        sync(device)?;
        let t_all = start.elapsed().as_secs_f64();
        if profiled {
            profiler(device, false)?;
        }
        // The first two steps warm up kernels and the allocator, as in peft's bench.
        if i >= 2 {
            times.push(t_all);
            phases[0].push(t_grads);
            phases[1].push(t_clip - t_grads);
            phases[2].push(t_all - t_clip);
            losses.push(loss.to_scalar::<f32>()?);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    println!(
        "{}",
        serde_json::json!({"what": "train",
            "median_grads_s": median(&phases[0]), "median_clip_s": median(&phases[1]),
            "median_adamw_s": median(&phases[2]), "size": size, "image_tokens": side * side, "text_tokens": t5_len,
            "rank": rank, "targets": format!("{targets:?}"), "checkpointing": checkpointing, "lora_params": lora.parameter_count(),
            "dtype": format!("{dtype:?}"), "weights": weights.map_or("as stored".into(), |w| w.to_string()),
            "load_s": load_s, "step_s": times,
            "median_step_s": median(&times), "losses": losses})
    );
    Ok(())
}

/// Starts or stops the attached CUDA profiler's collection (a no-op without one).
#[cfg(feature = "cuda")]
pub fn profiler(device: &Device, on: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
    // The profiler API acts on the thread's current context, which candle does not leave bound.
    device
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .bind_to_thread()?;
    if on {
        profiler_start()?
    } else {
        profiler_stop()?
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn profiler(_: &Device, _: bool) -> Result<()> {
    anyhow::bail!("--profile-step needs a CUDA build")
}
