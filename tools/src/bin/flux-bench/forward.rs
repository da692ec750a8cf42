//! `flux-bench forward`: one transformer step against diffusers' output on the same inputs.

use crate::timing::{median, step_flops, sync, time_median};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use engine::models::flux::{FluxConfig, FluxInputs, FluxTransformer, FluxWeights};
use engine::ops::Kernels;
use engine::weights::WeightFormat;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers FLUX folder.
    #[arg(long)]
    model: PathBuf,
    /// diffusers' inputs and output of one step (scripts/gpu/flux-parity-bench.sh writes them); a
    /// `-f32` file beside it adds diffusers' f32 output.
    #[arg(long)]
    inputs: String,
    /// The model in f32 instead of the device's compute dtype.
    #[arg(long)]
    f32: bool,
    /// Also against a model built with candle's ops only.
    #[arg(long)]
    compare_plain: bool,
    /// Only the comparison with the references: no timed runs, no LoRA timings (a format's accuracy
    /// on a slow device, scripts/bench/block-accuracy.sh).
    #[arg(long, conflicts_with = "compare_plain")]
    accuracy_only: bool,
}

pub fn run(
    a: &Args,
    device: &Device,
    kernels: Kernels,
    weights: Option<WeightFormat>,
) -> Result<()> {
    let (model, inputs, f32) = (a.model.as_path(), a.inputs.as_str(), a.f32);
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
    let w = FluxWeights::open(&t, dtype, device)?.in_format(weights);
    let m = FluxTransformer::load(&w, &cfg, dtype, device, kernels)?;
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let r = candle_core::safetensors::load(inputs, device)?;
    let run = || -> Result<Tensor> { m.forward(&FluxInputs::from_diffusers_names(&r)) };
    let out = run()?;
    sync(device)?;
    let ours = out.to_dtype(DType::F32)?.flatten_all()?;
    let mut refs = vec![("diffusers_bf16", r["out"].clone())];
    let f32_file = inputs.replace(".safetensors", "-f32.safetensors");
    if let Ok(extra) = candle_core::safetensors::load(&f32_file, device) {
        refs.push(("diffusers_f32", extra["out_f32"].clone()));
    }
    let compared = |report: &mut serde_json::Value| -> Result<()> {
        for (name, want) in &refs {
            let want = want.to_dtype(DType::F32)?.flatten_all()?;
            report[*name] = compare(&ours, &want)?;
        }
        Ok(())
    };
    if a.accuracy_only {
        let mut report = serde_json::json!({"what": "forward", "dtype": format!("{dtype:?}"),
            "weights": weights.map_or("as stored".to_string(), |w| w.to_string()),
            "blocks": [cfg.depth, cfg.depth_single]});
        compared(&mut report)?;
        println!("{report}");
        return Ok(());
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        run()?;
        sync(device)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let (img_tokens, txt_tokens) = (
        r["hidden_states"].dim(1)?,
        r["encoder_hidden_states"].dim(1)?,
    );
    let flops = step_flops(&cfg, img_tokens, txt_tokens);
    let step = median(times.clone());
    let mut report = serde_json::json!({"what": "forward", "dtype": format!("{dtype:?}"), "load_s": load_s,
        "weights": weights.map_or("as stored".to_string(), |w| w.to_string()),
        "step_s": times, "flops_per_step": flops, "step_tflops": flops / step / 1e12});
    if !f32 {
        // The cost of LoRA adapters applied unmerged (as the studio applies them): one of rank 16 on
        // the attention projections, random (B not zero, so nothing is skipped), then two stacked.
        let lora = random_attention_lora(&cfg, 16, dtype, device)?;
        for (name, count) in [("lora_r16_step_s", 1), ("two_loras_r16_step_s", 2)] {
            let set = vec![(&lora, 1.0); count];
            engine::lora::apply(&m, &set)?;
            report[name] = time_median(device, 3, run)?.into();
        }
        engine::lora::apply(&m, &[])?;
    }
    if a.compare_plain {
        // The same weights in a model built with candle's ops only, after the fused one is gone.
        drop(m);
        let plain = FluxTransformer::load(&w, &cfg, dtype, device, Kernels::Plain)?;
        let run = || -> Result<Tensor> { plain.forward(&FluxInputs::from_diffusers_names(&r)) };
        let plain_out = run()?.to_dtype(DType::F32)?.flatten_all()?;
        report["plain_step_s"] = time_median(device, 3, run)?.into();
        report["fused_vs_plain"] = compare(&ours, &plain_out)?;
    }
    compared(&mut report)?;
    println!("{report}");
    Ok(())
}

/// A random rank-`rank` LoRA in diffusers' (PEFT) layout on every attention projection: what peft's
/// LoRA training of FLUX targets (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; to_q/k/v of the
/// single blocks).
fn random_attention_lora(
    cfg: &FluxConfig,
    rank: usize,
    dtype: DType,
    device: &Device,
) -> Result<engine::lora::LoraFile> {
    let c = cfg.hidden_size;
    let double = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    ];
    let layers = (0..cfg.depth)
        .flat_map(|i| double.map(|l| format!("transformer_blocks.{i}.attn.{l}")))
        .chain((0..cfg.depth_single).flat_map(|i| {
            ["to_q", "to_k", "to_v"].map(|l| format!("single_transformer_blocks.{i}.attn.{l}"))
        }));
    let mut tensors = std::collections::HashMap::new();
    for layer in layers {
        let a = Tensor::randn(0f32, 0.02, (rank, c), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 0.02, (c, rank), &Device::Cpu)?;
        tensors.insert(format!("transformer.{layer}.lora_A.weight"), a);
        tensors.insert(format!("transformer.{layer}.lora_B.weight"), b);
    }
    engine::lora::LoraFile::from_tensors(tensors, &Default::default(), dtype, device)
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
