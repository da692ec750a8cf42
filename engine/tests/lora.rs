//! LoRA files of every layout on the tiny FLUX against diffusers' outputs with the same files
//! (tests/fixtures/lora, made by scripts/fixtures/make_lora_fixtures.py), plus the errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use engine::lora::{self, LoraCache, LoraFile};
use engine::models::flux::{FluxConfig, FluxTransformer, FluxWeights};
use engine::ops::Kernels;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// As the transformer parity tests: the base model alone is 1.1e-5 from diffusers here.
const TOL: f64 = 5e-5;

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn model() -> FluxTransformer {
    streamed_model(0)
}

/// The tiny transformer with at least `streamed` bytes of its blocks streamed from host memory.
fn streamed_model(streamed: u64) -> FluxTransformer {
    let json =
        serde_json::from_slice(&std::fs::read(tiny_dev().join("transformer/config.json")).unwrap())
            .unwrap();
    let cfg = FluxConfig::from_diffusers_json(&json).unwrap();
    let w = FluxWeights::open(&tiny_dev().join("transformer"), DType::F32, &Device::Cpu).unwrap();
    FluxTransformer::load_streaming(&w, &cfg, DType::F32, &Device::Cpu, Kernels::Plain, streamed)
        .unwrap()
}

fn forward(model: &FluxTransformer) -> Tensor {
    let r = reference("transformer_dev");
    common::forward_on_reference(model, &r)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn cases() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(lora_dir().join("reference.json")).unwrap()).unwrap()
}

fn open(name: &str) -> LoraFile {
    LoraFile::load(
        &lora_dir().join(format!("{name}.safetensors")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
fn every_layout_gives_diffusers_output() {
    let model = model();
    let want = expected();
    let cases = cases();
    let mut checked = 0;
    for (name, case) in cases["cases"].as_object().unwrap() {
        let Some(format) = case["format"].as_str() else {
            continue; // the stacked case, below
        };
        let file = open(name);
        assert_eq!(file.format.name(), format, "{name}: detected layout");
        assert_eq!(
            file.modules.len() as u64,
            case["modules"].as_u64().unwrap(),
            "{name}: modules"
        );
        let skipped = match &case["skipped"] {
            serde_json::Value::Array(a) => a.len(),
            serde_json::Value::Number(n) => n.as_u64().unwrap() as usize,
            _ => 0,
        };
        assert_eq!(
            file.skipped.len(),
            skipped,
            "{name}: text-encoder modules reported"
        );
        lora::apply(&model, &[(&file, 1.0)]).unwrap();
        let out = forward(&model);
        // A LoRA that did nothing would fail here, not pass quietly.
        assert!(
            rel_err(&out, &want["base"]) > 1e-2,
            "{name} changed nothing"
        );
        assert_close(name, &out, &want[name.as_str()], TOL);
        checked += 1;
    }
    assert_eq!(checked, 8, "every layout file was checked");
    lora::apply(&model, &[]).unwrap();
    assert_close("cleared", &forward(&model), &want["base"], TOL);
}

#[test]
fn loras_on_a_transformer_streamed_from_host_memory_give_diffusers_output() {
    // A streamed layer keeps its adapters unmerged (its weight is copied in for each product).
    let model = streamed_model(u64::MAX);
    assert!(model.streamed_bytes() > 0);
    let want = expected();
    let cases = cases();
    let mut checked = 0;
    for (name, case) in cases["cases"].as_object().unwrap() {
        if case["format"].is_null() {
            continue;
        }
        lora::apply(&model, &[(&open(name), 1.0)]).unwrap();
        assert_close(name, &forward(&model), &want[name.as_str()], TOL);
        checked += 1;
    }
    assert!(checked > 0);
    lora::apply(&model, &[]).unwrap();
    assert_close("cleared", &forward(&model), &want["base"], TOL);
}

#[test]
fn text_encoder_modules_are_reported_by_name() {
    let file = open("kohya");
    assert_eq!(
        file.skipped,
        [
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te1_text_model_encoder_layers_1_mlp_fc1"
        ]
    );
}

/// Files with keys beside the transformer's adapters, as trainers write them: kohya's T5 adapters
/// (`lora_te3_`), ComfyUI's T5 adapters and norm/bias differences, a linear weight's `.diff`.
/// Reported by name where not applied, never a refusal; the output is diffusers' (or, for the
/// `.diff` diffusers refuses, the base weight plus the difference, as ComfyUI applies it).
#[test]
fn text_encoder_adapters_and_differences_are_applied_or_reported_never_refused() {
    let model = model();
    let want = expected();
    let dir = lora_dir();
    let extra: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference_extras.safetensors"), &Device::Cpu)
            .unwrap();
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference_extras.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (name, case) in cases {
        let file = open(name);
        assert_eq!(
            file.format.name(),
            case["format"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            file.modules.len() as u64,
            case["modules"].as_u64().unwrap(),
            "{name}: modules"
        );
        let mut skipped = file.skipped.clone();
        skipped.sort();
        let want_skipped: Vec<&str> = case["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(skipped, want_skipped, "{name}: reported by name");
        lora::apply(&model, &[(&file, 1.0)]).unwrap();
        let reference = case["reference"].as_str().unwrap();
        let target = extra.get(reference).unwrap_or_else(|| &want[reference]);
        assert_close(name, &forward(&model), target, TOL);
    }
    lora::apply(&model, &[]).unwrap();
    assert_close("cleared", &forward(&model), &want["base"], TOL);
}

#[test]
fn stacked_loras_with_their_own_scales() {
    let model = model();
    let case = &cases()["cases"]["stacked"];
    let files: Vec<LoraFile> = case["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| open(f.as_str().unwrap()))
        .collect();
    let weights: Vec<f64> = case["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    let stack: Vec<(&LoraFile, f64)> = files.iter().zip(weights).collect();
    lora::apply(&model, &stack).unwrap();
    assert_close("stacked", &forward(&model), &expected()["stacked"], TOL);
}

#[test]
fn a_new_set_replaces_the_old_one() {
    let model = model();
    let want = expected();
    lora::apply(&model, &[(&open("kohya_full"), 1.0)]).unwrap();
    lora::apply(&model, &[(&open("xlabs"), 1.0)]).unwrap();
    assert_close("xlabs after kohya", &forward(&model), &want["xlabs"], TOL);
    // Half the scale is half the update: the output moves off both the base and the full LoRA.
    lora::apply(&model, &[(&open("xlabs"), 0.5)]).unwrap();
    let half = forward(&model);
    assert!(rel_err(&half, &want["xlabs"]) > 1e-3 && rel_err(&half, &want["base"]) > 1e-3);
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_dir().join(format!("{name}.safetensors")), &Device::Cpu)
        .unwrap()
}

fn from_tensors(t: HashMap<String, Tensor>) -> anyhow::Result<LoraFile> {
    LoraFile::from_tensors(t, &HashMap::new(), DType::F32, &Device::Cpu)
}

#[test]
fn bfl_names_load_with_or_without_a_prefix() {
    let model = model();
    let want = &expected()["bfl"];
    for prefix in ["", "diffusion_model.", "transformer."] {
        let renamed = tensors("bfl")
            .into_iter()
            .map(|(k, v)| {
                (
                    format!("{prefix}{}", k.strip_prefix("base_model.model.").unwrap()),
                    v,
                )
            })
            .collect();
        let file = from_tensors(renamed).unwrap();
        lora::apply(&model, &[(&file, 1.0)]).unwrap();
        assert_close(
            &format!("bfl with prefix {prefix:?}"),
            &forward(&model),
            want,
            TOL,
        );
    }
}

#[test]
fn a_key_that_cannot_be_placed_is_named() {
    let model = model();
    let a = Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((64, 2), DType::F32, &Device::Cpu).unwrap();
    let pair = |stem: &str| {
        HashMap::from([
            (format!("{stem}.lora_A.weight"), a.clone()),
            (format!("{stem}.lora_B.weight"), b.clone()),
        ])
    };

    // A block this model lacks: the key is named, and the model keeps its adapters.
    lora::apply(&model, &[(&open("xlabs"), 1.0)]).unwrap();
    let file = from_tensors(pair("transformer.transformer_blocks.7.attn.to_q")).unwrap();
    let err = format!("{:#}", lora::apply(&model, &[(&file, 1.0)]).unwrap_err());
    assert!(
        err.contains("transformer.transformer_blocks.7.attn.to_q"),
        "{err}"
    );
    assert_close(
        "unchanged after the error",
        &forward(&model),
        &expected()["xlabs"],
        TOL,
    );

    // Shapes of another model.
    let file = from_tensors(pair("transformer.transformer_blocks.0.ff.net.2")).unwrap();
    let err = format!("{:#}", lora::apply(&model, &[(&file, 1.0)]).unwrap_err());
    assert!(
        err.contains("transformer.transformer_blocks.0.ff.net.2"),
        "{err}"
    );

    // Keys of kinds the studio does not apply.
    let mut t = pair("transformer.transformer_blocks.0.attn.to_q");
    t.insert(
        "transformer.transformer_blocks.0.attn.to_q.dora_scale".into(),
        b.clone(),
    );
    let err = format!("{:#}", from_tensors(t).unwrap_err());
    assert!(
        err.contains("transformer.transformer_blocks.0.attn.to_q.dora_scale"),
        "{err}"
    );
    let t = HashMap::from([(
        "single_blocks.0.processor.proj_lora.down.weight".into(),
        a.clone(),
    )]);
    let err = format!("{:#}", from_tensors(t).unwrap_err());
    assert!(
        err.contains("single_blocks.0.processor.proj_lora.down.weight"),
        "{err}"
    );

    // Half an adapter.
    let t = HashMap::from([("lora_unet_img_in.lora_down.weight".to_string(), a.clone())]);
    let err = format!("{:#}", from_tensors(t).unwrap_err());
    assert!(err.contains("lora_unet_img_in.lora_down.weight"), "{err}");

    // Only text-encoder modules: nothing to apply, and it says so.
    let t = HashMap::from([(
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".to_string(),
        a,
    )]);
    let err = format!("{:#}", from_tensors(t).unwrap_err());
    assert!(err.contains("text-encoder"), "{err}");
}

#[test]
fn the_cache_reads_a_file_once_until_it_changes() {
    let dir = std::env::temp_dir().join(format!("lora-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.safetensors");
    std::fs::copy(lora_dir().join("xlabs.safetensors"), &path).unwrap();
    let cache = LoraCache::new(&Device::Cpu, DType::F32);
    let first = cache.load(&path).unwrap();
    assert!(Arc::ptr_eq(&first, &cache.load(&path).unwrap()));
    std::fs::copy(lora_dir().join("bfl.safetensors"), &path).unwrap();
    let second = cache.load(&path).unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(second.format.name(), "bfl");
    assert_eq!(cache.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
