//! Training's gradients on a GPU: the hand-written backward passes of LoRA training (fused kernels with
//! and without gradient checkpointing, and the plain ops) against candle's autograd over the plain ops, each
//! measured against the same step in f32. Without a CUDA device it fails, saying where to run it:
//!
//! ```text
//! cargo test -p engine --features cuda --release --test gpu_kernels --test gpu_training
//! ```
#![cfg(feature = "cuda")]

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use common::{cuda_device, random_flux_weights};
use engine::models::flux::{image_ids, text_ids, FluxConfig, FluxInputs, FluxTransformer};
use engine::ops::Kernels;
use engine::training::{flux_backward, lora::LoraSet, Targets};

/// The adapters' gradients of one training step on a 4-block FLUX.1-dev-width model (random bf16 weights,
/// trained-looking adapters on every layer, 512x512): the fused path with checkpointing and without,
/// against the plain path (every op composed of candle's, its autograd throughout), and each of them
/// against the plain path in f32 on the same random draws (`vs_f32`): the bf16 paths differ from each
/// other by rounding, so the f32 one says which rounds less.
#[test]
fn training_gradients_are_as_close_to_f32_as_the_plain_paths() -> Result<()> {
    let device = &cuda_device();
    const SEED: u64 = 7;
    let dtype = engine::device::compute_dtype(device);
    let cfg = FluxConfig {
        depth: 2,
        depth_single: 2,
        ..FluxConfig::dev()
    };
    // The fused and the plain model on the same weights: the seed again before each draw.
    let load = |dtype: DType, kernels: Kernels| -> Result<FluxTransformer> {
        device.set_seed(SEED)?;
        let weights = random_flux_weights(dtype, device)?;
        FluxTransformer::load(&weights, &cfg, dtype, device, kernels)
    };
    let model = load(dtype, Kernels::Fused)?;
    let lora = LoraSet::new(&model, Targets::AllLinear, 16, 16.0, 0, device)?;
    for a in &lora.adapters {
        a.up.set(&Tensor::randn(0f32, 0.02, a.up.shape(), device)?)?;
    }
    let side = 32;
    let img =
        Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), device)?.to_dtype(dtype)?;
    let target = Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), device)?;
    let txt = Tensor::randn(0f32, 1.0, (1, 512, cfg.context_dim), device)?.to_dtype(dtype)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, cfg.vec_dim), device)?.to_dtype(dtype)?;
    let (img_ids, txt_ids) = (image_ids(side, side, device)?, text_ids(512, device)?);
    let t = Tensor::new(&[0.5f32], device)?;
    let g = Tensor::new(&[1.0f32], device)?;
    let inputs = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &t,
        y: &pooled,
        guidance: Some(&g),
    };
    let mse = |pred: &Tensor| -> Result<Tensor> {
        Ok((pred.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?)
    };
    let flat = |grads: &candle_core::backprop::GradStore| -> Result<Tensor> {
        let parts = lora
            .vars()
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .context("an adapter without a gradient")?
                    .flatten_all()
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    // The reference: the plain ops, each with candle's own backward, through candle's autograd.
    // After the inputs are drawn, so that they are the same draws as before the plain model existed.
    let plain_model = load(dtype, Kernels::Plain)?;
    lora.attach(&plain_model, true);
    let l = mse(&plain_model.forward(&inputs)?)?;
    let reference = l.backward();
    LoraSet::detach(&plain_model);
    let (plain_loss, plain) = (l.to_scalar::<f32>()?, flat(&reference?)?);
    let run = |model: &FluxTransformer, checkpointing: bool| -> Result<(f32, Tensor)> {
        lora.attach(model, true);
        let out = flux_backward::loss_and_grads(model, &inputs, &mse, checkpointing);
        LoraSet::detach(model);
        let (loss, grads) = out?;
        Ok((loss.to_scalar::<f32>()?, flat(&grads)?))
    };
    // The f32 reference: the same draws unrounded (the seed again), the same adapters and inputs.
    let f32 = DType::F32;
    let model32 = load(f32, Kernels::Plain)?;
    let (img32, txt32, pooled32) = (
        img.to_dtype(f32)?,
        txt.to_dtype(f32)?,
        pooled.to_dtype(f32)?,
    );
    let inputs32 = FluxInputs {
        img: &img32,
        txt: &txt32,
        y: &pooled32,
        ..inputs
    };
    lora.attach(&model32, true);
    let reference32 = mse(&model32.forward(&inputs32)?)?.backward();
    LoraSet::detach(&model32);
    drop(model32);
    let exact = flat(&reference32?)?;
    let distance = |grads: &Tensor, to: &Tensor| -> Result<serde_json::Value> {
        let dot = (grads * to)?.sum_all()?.to_scalar::<f32>()?;
        let norm =
            |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()) };
        let (a, b) = (norm(grads)?, norm(to)?);
        Ok(serde_json::json!({"cosine": dot / (a * b), "rel_l2": norm(&(grads - to)?)? / b}))
    };
    let compare = |(loss, grads): (f32, Tensor)| -> Result<serde_json::Value> {
        let mut r = distance(&grads, &plain)?;
        r["loss"] = serde_json::json!(loss);
        r["vs_f32"] = distance(&grads, &exact)?;
        Ok(r)
    };
    let plain_hand_written = compare(run(&plain_model, false)?)?;
    let fused_ckpt = compare(run(&model, true)?)?;
    let fused_saved = compare(run(&model, false)?)?;
    let plain_vs_f32 = distance(&plain, &exact)?;
    println!(
        "{}",
        serde_json::json!({"what": "train_check", "plain_loss": plain_loss,
            "plain_vs_f32": plain_vs_f32,
            "plain_hand_written": plain_hand_written, "fused_checkpointed": fused_ckpt,
            "fused_saved": fused_saved})
    );
    // Fails where a path is further from f32 than half again the plain bf16 path (each has its own
    // rounding, and the paths have come out within a few percent of each other), or the two fused
    // paths differ.
    let rel = |v: &serde_json::Value| v["rel_l2"].as_f64().unwrap_or(f64::INFINITY);
    let bound = 1.5 * rel(&plain_vs_f32);
    for (name, r) in [
        ("plain hand-written", &plain_hand_written),
        ("fused, checkpointed", &fused_ckpt),
        ("fused, saved", &fused_saved),
    ] {
        let err = rel(&r["vs_f32"]);
        anyhow::ensure!(
            err <= bound,
            "train-check: the {name} gradients are {err:.4} from f32, past {bound:.4}"
        );
    }
    anyhow::ensure!(
        (rel(&fused_ckpt) - rel(&fused_saved)).abs() < 1e-3,
        "train-check: checkpointing changes the gradients"
    );
    Ok(())
}
