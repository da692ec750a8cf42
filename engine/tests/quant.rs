//! fp8 and GGUF weights against their references (tests/fixtures/quant, made by
//! scripts/fixtures/make_quant_fixtures.py with torch and the `gguf` package): dequantization bit
//! for bit, a quantized layer's and the tiny FLUX model's error against the dense weights, LoRAs
//! and a LoRA training step on quantized bases.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use common::*;
use engine::hub::Source;
use engine::lora::{self, LoraFile};
use engine::models::flux::{FluxConfig, FluxTransformer, FluxWeights};
use engine::models::linear::{Linear, QuantizedWeight};
use engine::ops::Kernels;
use engine::pipeline::{Control, FluxPipeline, GenerateParams, LoadOptions};
use engine::weights::WeightFormat;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn quant() -> PathBuf {
    fixtures().join("quant")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = quant().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; run scripts/fixtures/make_quant_fixtures.py",
            path.display()
        )
    })
}

/// f32 bits of each value (NaNs, whatever their payload, as one pattern).
fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
        .collect()
}

fn config() -> FluxConfig {
    let json =
        serde_json::from_slice(&std::fs::read(tiny_dev().join("transformer/config.json")).unwrap())
            .unwrap();
    FluxConfig::from_diffusers_json(&json).unwrap()
}

/// The tiny transformer from `path`, its linear layers in `format` (`None`: as stored).
fn model(path: &Path, format: Option<WeightFormat>) -> FluxTransformer {
    let w = FluxWeights::open(path, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        .in_format(format);
    FluxTransformer::load(&w, &config(), DType::F32, &Device::Cpu, Kernels::Plain).unwrap()
}

fn layer<'a>(model: &'a FluxTransformer, name: &str) -> &'a Linear {
    model
        .linears()
        .into_iter()
        .find(|l| l.name() == name)
        .unwrap_or_else(|| panic!("no layer {name}"))
}

fn fp8_file() -> PathBuf {
    quant().join("flux1-tiny-dev-fp8.safetensors")
}

fn fp8_scaled_file() -> PathBuf {
    quant().join("flux1-tiny-dev-fp8-scaled.safetensors")
}

fn gguf_model_file(t: &str) -> PathBuf {
    quant().join(format!("flux1-tiny-dev-{t}.gguf"))
}

#[test]
fn every_fp8_code_widens_to_the_value_torch_gives_nan_included() {
    let f = load("fp8.safetensors");
    let codes = &f["codes"];
    assert_eq!((codes.dtype(), codes.elem_count()), (DType::F8E4M3, 256));
    let ours = bits(codes);
    assert_eq!(ours, bits(&f["values"]));
    // float8_e4m3fn has no infinities and two NaNs (0x7f, 0xff); zero has both signs.
    assert_eq!(ours.iter().filter(|b| **b == u32::MAX).count(), 2);
    assert_eq!(ours[0x80], (-0f32).to_bits());
}

#[test]
fn rounding_to_fp8_matches_torch_at_every_midpoint_and_at_random_values() {
    let f = load("fp8.safetensors");
    let ours = f["cast_in"].to_dtype(DType::F8E4M3).unwrap();
    assert_eq!(bits(&ours), bits(&f["cast_out"]));
}

#[test]
fn fp8_made_from_bf16_has_torchs_per_tensor_scale_and_values() {
    let f = load("fp8.safetensors");
    let Some(QuantizedWeight::Fp8 { weight, scale }) =
        QuantizedWeight::from_dense(&f["dense"], WeightFormat::Fp8).unwrap()
    else {
        panic!("fp8 asked for");
    };
    assert_eq!(
        scale.to_bits(),
        f["made_scale"].to_scalar::<f32>().unwrap().to_bits()
    );
    assert_eq!(bits(&weight), bits(&f["made"]));
}

/// BFL's fp8 file (no scales) and ComfyUI's scaled fp8 file (prefix, `scale_weight`, one
/// `weight_scale`, the `scaled_fp8` marker): every linear layer stays fp8, and its weight is torch's
/// `w.float() * scale` bit for bit.
#[test]
fn fp8_files_load_with_and_without_scale_tensors_as_torch_dequantizes_them() {
    let reference = load("fp8_layers.safetensors");
    for (file, kind) in [(fp8_file(), "plain"), (fp8_scaled_file(), "scaled")] {
        let m = model(&file, None);
        assert!(
            m.linears().iter().all(|l| l.format() == WeightFormat::Fp8),
            "{kind}"
        );
        let mut checked = 0;
        for (key, want) in &reference {
            let Some(name) = key.strip_prefix(&format!("{kind}.")) else {
                continue;
            };
            let got = layer(&m, name).base_weight(DType::F32).unwrap();
            assert_eq!(bits(&got), bits(want), "{kind} {name}");
            checked += 1;
        }
        assert_eq!(checked, 3, "{kind}");
    }
}

#[test]
fn gguf_blocks_dequantize_as_the_gguf_package_does() {
    let path = quant().join("blocks.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let reference = load("blocks.safetensors");
    for (name, dtype) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q6_k", GgmlDType::Q6K),
        ("q5_k", GgmlDType::Q5K),
        ("q4_k", GgmlDType::Q4K),
        ("q4_0", GgmlDType::Q4_0),
    ] {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        assert_eq!(q.dtype(), dtype, "{name}");
        let got = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(got.dims(), reference[name].dims(), "{name}");
        assert_eq!(bits(&got), bits(&reference[name]), "{name}");
    }
}

/// Each format's error on one layer (seeded normal weights and inputs, 512 inputs so that every
/// GGUF block size fits): largest difference from the f32 product relative to its largest value.
/// The bounds follow the formats' precision (fp8: 3 mantissa bits; GGUF: bits per weight, and on
/// the CPU the input rounded to 8 bits per block as llama.cpp does), with room over the measured
/// figures that docs/formats.md quotes.
#[test]
fn a_quantized_layer_stays_within_its_formats_error_of_the_dense_one() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let mut normal = |shape: &[usize]| {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.sample(rand_distr::StandardNormal))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (w, b, x) = (normal(&[64, 512]), normal(&[64]), normal(&[2, 16, 512]));
    let dense = Linear::new("dense", w.clone(), Some(b.clone()), Kernels::Plain);
    let want = candle_core::Module::forward(&dense, &x).unwrap();
    for (name, tolerance) in [
        ("fp8", 5e-2),
        ("q8_0", 2e-2),
        ("q6_k", 4e-2),
        ("q5_k", 7e-2),
        ("q4_k", 1.5e-1),
        ("q4_0", 1.5e-1),
    ] {
        let format = WeightFormat::parse(name).unwrap();
        let q = QuantizedWeight::from_dense(&w, format)
            .unwrap()
            .expect("quantizable");
        let layer = Linear::quantized(name, q, Some(b.clone()), Kernels::Plain).unwrap();
        let got = candle_core::Module::forward(&layer, &x).unwrap();
        let e = rel_err(&got, &want);
        eprintln!("layer {name}: relative error {e:.2e} (tolerance {tolerance:.1e})");
        assert!(e < tolerance, "{name}: {e:e}");
        assert!(e > 0.0, "{name}: the weight was not quantized");
    }
}

/// The transformer's output on the reference inputs, and a whole generation's latents, from each
/// quantized file against the f32 model: within each format's stated error.
#[test]
fn the_tiny_model_from_fp8_and_gguf_files_runs_within_the_stated_error() {
    let dense = model(&tiny_dev().join("transformer"), None);
    let r = reference("transformer_dev");
    let want = forward_on_reference(&dense, &r);
    let want_latents = generate(None, None);
    for (file, format, tolerance, latent_tolerance) in [
        (fp8_file(), WeightFormat::Fp8, 8e-2, 5e-2),
        (fp8_scaled_file(), WeightFormat::Fp8, 8e-2, 5e-2),
        (
            gguf_model_file("Q8_0"),
            WeightFormat::Gguf(GgmlDType::Q8_0),
            2e-2,
            2e-2,
        ),
        (
            gguf_model_file("Q4_0"),
            WeightFormat::Gguf(GgmlDType::Q4_0),
            2e-1,
            2e-1,
        ),
    ] {
        let m = model(&file, None);
        assert!(m.linears().iter().all(|l| l.format() == format));
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert_close(
            &format!("{name} forward"),
            &forward_on_reference(&m, &r),
            &want,
            tolerance,
        );
        let latents = generate(Some(&file), None);
        assert_close(
            &format!("{name} generation"),
            &latents,
            &want_latents,
            latent_tolerance,
        );
    }
}

/// The final latents of a 3-step generation of the tiny pipeline (its own transformer, or `file`),
/// its transformer in `weights`.
fn generate(file: Option<&Path>, weights: Option<WeightFormat>) -> Tensor {
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    let opts = LoadOptions {
        source: Source::Local(tiny_dev()),
        transformer_file: file.map(Path::to_path_buf),
        weights,
        kernels: Kernels::Plain,
        ..LoadOptions::from_preset(preset)
    };
    let pipe = FluxPipeline::load(&opts, &Device::Cpu, Arc::new(|_| {})).unwrap();
    let params = GenerateParams::new("a fox reading under a tree", (48, 32), 3, 3.5, 5);
    let mut last = None;
    pipe.generate(&params, &mut |p| {
        last = Some(p.latents.clone());
        Control::Continue
    })
    .unwrap();
    last.expect("a step")
}

/// `--weights fp8` and `--weights q8_0` make the bf16 checkpoint's linear layers fp8 and Q8_0 as it
/// loads (diffusers' folder layout here), within the same errors as the files made by torch and
/// the gguf package.
#[test]
fn weights_made_on_load_from_the_dense_checkpoint_run_within_the_stated_error() {
    let r = reference("transformer_dev");
    let want = forward_on_reference(&model(&tiny_dev().join("transformer"), None), &r);
    let want_latents = generate(None, None);
    for (format, tolerance) in [
        (WeightFormat::Fp8, 8e-2),
        (WeightFormat::Gguf(GgmlDType::Q8_0), 2e-2),
    ] {
        let m = model(&tiny_dev().join("transformer"), Some(format));
        assert!(m.linears().iter().all(|l| l.format() == format));
        assert_close(
            &format!("{format} made on load"),
            &forward_on_reference(&m, &r),
            &want,
            tolerance,
        );
        let latents = generate(None, Some(format));
        assert_close(
            &format!("{format} made on load, generation"),
            &latents,
            &want_latents,
            tolerance,
        );
    }
    // bf16 asked of an fp8 file: the stored weights dequantized, dense.
    let m = model(&fp8_scaled_file(), Some(WeightFormat::Bf16));
    assert!(m.linears().iter().all(|l| l.format() == WeightFormat::Bf16));
}

/// LoRAs of every layout (diffusers' to_q/to_k/to_v on the fused qkv and linear1 slices included)
/// on fp8 and GGUF bases give what they give on the same weights dequantized into a dense model:
/// exactly the same products for fp8 (the merge of the dense model only reorders additions), the
/// input's 8-bit rounding of the GGUF products on the CPU otherwise.
#[test]
fn loras_on_fp8_and_gguf_bases_equal_the_lora_on_the_dequantized_base() {
    let r = reference("transformer_dev");
    let loras = ["diffusers", "kohya", "bfl", "comfyui", "xlabs"];
    for (file, tolerance) in [
        (fp8_scaled_file(), 1e-5),
        (gguf_model_file("Q8_0"), 2e-2),
        (gguf_model_file("Q4_0"), 2e-2),
    ] {
        let quantized = model(&file, None);
        let dense = model(&file, Some(WeightFormat::Bf16));
        let bare = forward_on_reference(&quantized, &r);
        for name in loras {
            let lora = LoraFile::load(
                &fixtures().join("lora").join(format!("{name}.safetensors")),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            lora::apply(&quantized, &[(&lora, 0.8)]).unwrap();
            lora::apply(&dense, &[(&lora, 0.8)]).unwrap();
            let got = forward_on_reference(&quantized, &r);
            let want = forward_on_reference(&dense, &r);
            assert!(rel_err(&got, &bare) > 1e-2, "{name} changed nothing");
            let what = format!("{name} on {}", file.file_name().unwrap().to_string_lossy());
            assert_close(&what, &got, &want, tolerance);
        }
        lora::apply(&quantized, &[]).unwrap();
        assert_eq!(bits(&forward_on_reference(&quantized, &r)), bits(&bare));
    }
}

/// A LoRA training step on a frozen fp8 or GGUF base: the hand-written backward passes (with and
/// without gradient checkpointing) give every adapter the gradient it gets on the dense model of
/// the same dequantized weights. Training multiplies by the dequantized weight (GGUF's inference
/// kernels also round the input), so the gradient is the exact one of what the step computed.
#[test]
fn a_lora_training_step_on_a_quantized_base_gets_the_dense_bases_gradients() {
    use engine::training::lora::LoraSet;
    use engine::training::{flux_backward, Targets};
    let r = reference("transformer_dev");
    let trained =
        candle_core::safetensors::load(fixtures().join("trained-lora.safetensors"), &Device::Cpu)
            .unwrap();
    let inputs = engine::models::flux::FluxInputs::from_diffusers_names(&r);
    let target = r["hidden_states"].sin().unwrap();
    let mse =
        |pred: &Tensor| -> anyhow::Result<Tensor> { Ok((pred - &target)?.sqr()?.mean_all()?) };
    for file in [
        fp8_scaled_file(),
        gguf_model_file("Q8_0"),
        gguf_model_file("Q4_0"),
    ] {
        // f32 throughout on the same dequantized weights: only the order of additions differs.
        let tolerance = 1e-5;
        let run = |m: &FluxTransformer, checkpointing: bool| {
            let set = LoraSet::new(m, Targets::AllLinear, 4, 8.0, 0, &Device::Cpu).unwrap();
            set.load_peft_tensors(&trained).unwrap();
            set.attach(m, true);
            let (loss, grads) =
                flux_backward::loss_and_grads(m, &inputs, &mse, checkpointing).unwrap();
            let g: Vec<Tensor> = set
                .vars()
                .iter()
                .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
                .collect();
            LoraSet::detach(m);
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let quantized = model(&file, None);
        assert!(quantized
            .linears()
            .iter()
            .all(|l| l.format() != WeightFormat::Bf16));
        let dense = model(&file, Some(WeightFormat::Bf16));
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for checkpointing in [false, true] {
            let (loss, grads) = run(&quantized, checkpointing);
            let (want_loss, want) = run(&dense, checkpointing);
            assert!(
                ((loss - want_loss) / want_loss).abs() < tolerance as f32,
                "{name}: loss {loss} against {want_loss}"
            );
            let worst = grads
                .iter()
                .zip(&want)
                .map(|(g, w)| rel_err(g, w))
                .fold(0f64, f64::max);
            eprintln!("{name}, checkpointing {checkpointing}: worst adapter gradient difference {worst:.2e}");
            assert!(worst < tolerance, "{name}: gradients differ by {worst:e}");
        }
    }
}

/// city96-style T5 encoder GGUF files (llama.cpp's names, written by gguf-py's own name map) in the
/// model folder's `text_encoder_2/`: the F32 file gives the safetensors encoder's hidden states
/// exactly, the Q8_0 file within its format's error.
#[test]
fn t5_gguf_files_in_llama_cpps_names_encode_as_the_safetensors_encoder() {
    use engine::models::text::T5Encoder;
    let folder = tiny_dev().join("text_encoder_2");
    let tokenizer = tiny_dev().join("tokenizer_2");
    let prompt = "a fox reading under a tree";
    let encode = |dir: &Path| {
        T5Encoder::load(
            dir,
            &tokenizer,
            16,
            DType::F32,
            &Device::Cpu,
            engine::ops::Kernels::Plain,
            false,
        )
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
        .encode(prompt)
        .unwrap()
    };
    let want = encode(&folder);
    for (file, tolerance) in [("t5-tiny-F32.gguf", 0.0), ("t5-tiny-Q8_0.gguf", 2e-2)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(folder.join("config.json"), dir.path().join("config.json")).unwrap();
        std::fs::copy(quant().join(file), dir.path().join(file)).unwrap();
        let got = encode(dir.path());
        if tolerance == 0.0 {
            assert_eq!(bits(&got), bits(&want), "{file}");
        } else {
            assert_close(file, &got, &want, tolerance);
        }
    }
}

/// A model folder whose `transformer/` holds city96's GGUF file and whose `text_encoder_2/` holds a T5
/// GGUF file (each beside its config.json, no safetensors) counts as complete and generates as the
/// `--transformer-file` run of the same file does.
#[test]
fn a_model_folder_with_gguf_files_in_place_of_safetensors_is_complete_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&tiny_dev(), &root);
    for (part, file) in [
        ("transformer", "flux1-tiny-dev-Q8_0.gguf"),
        ("text_encoder_2", "t5-tiny-F32.gguf"),
    ] {
        for entry in std::fs::read_dir(root.join(part)).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap() != "config.json" {
                std::fs::remove_file(path).unwrap();
            }
        }
        assert!(
            !engine::pipeline::missing_files(&root, false).is_empty(),
            "{part} emptied"
        );
        std::fs::copy(quant().join(file), root.join(part).join(file)).unwrap();
    }
    assert_eq!(
        engine::pipeline::missing_files(&root, false),
        Vec::<String>::new()
    );
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    let opts = LoadOptions {
        source: Source::Local(root.clone()),
        kernels: Kernels::Plain,
        ..LoadOptions::from_preset(preset)
    };
    let pipe = FluxPipeline::load(&opts, &Device::Cpu, Arc::new(|_| {})).unwrap();
    let format = WeightFormat::Gguf(GgmlDType::Q8_0);
    assert!(pipe
        .transformer
        .linears()
        .iter()
        .all(|l| l.format() == format));
    let r = reference("transformer_dev");
    let want = forward_on_reference(&model(&gguf_model_file("Q8_0"), None), &r);
    assert_eq!(
        bits(&forward_on_reference(&pipe.transformer, &r)),
        bits(&want)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
