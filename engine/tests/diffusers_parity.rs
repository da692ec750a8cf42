//! Our FLUX components against diffusers/transformers on the same tiny checkpoints and inputs
//! (tests/fixtures, made by scripts/fixtures/make_flux_fixtures.py). f32 on the CPU: the
//! tolerances are relative to each reference's largest magnitude.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use engine::models::autoencoder::Autoencoder;
use engine::models::flux::{FluxConfig, FluxInputs, FluxTransformer, FluxWeights, Layout};
use engine::models::text::{clip_tokenizer, ClipEncoder, T5Encoder};
use engine::ops::Kernels;
use engine::pipeline::{Control, FluxPipeline, LoadOptions};
use engine::sampling::schedule::ScheduleConfig;

const FORWARD_TOL: f64 = 5e-5;
const PIPELINE_TOL: f64 = 1e-4;

fn dev_config() -> FluxConfig {
    let json =
        serde_json::from_slice(&std::fs::read(tiny_dev().join("transformer/config.json")).unwrap())
            .unwrap();
    FluxConfig::from_diffusers_json(&json).unwrap()
}

fn run_transformer(weights: &FluxWeights, cfg: &FluxConfig, reference: &str) {
    let r = common::reference(reference);
    let model =
        FluxTransformer::load(weights, cfg, DType::F32, &Device::Cpu, Kernels::Plain).unwrap();
    let out = common::forward_on_reference(&model, &r);
    assert_close(reference, &out, &r["out"], FORWARD_TOL);
}

#[test]
fn transformer_from_diffusers_sharded_folder() {
    let w = FluxWeights::open(&tiny_dev().join("transformer"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.layout, Layout::Diffusers);
    run_transformer(&w, &dev_config(), "transformer_dev");
}

#[test]
fn transformer_from_bfl_single_file() {
    let w = FluxWeights::open(
        &tiny_dev().join("flux1-tiny-dev.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(w.layout, Layout::Bfl);
    run_transformer(&w, &dev_config(), "transformer_dev");
}

#[test]
fn schnell_transformer_from_bf16_bfl_file() {
    let w = FluxWeights::open(
        &fixtures().join("tiny-flux-schnell.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = FluxConfig {
        guidance_embed: false,
        ..dev_config()
    };
    run_transformer(&w, &cfg, "transformer_schnell");
}

#[test]
fn guidance_model_refuses_to_run_without_guidance() {
    let w = FluxWeights::open(&tiny_dev().join("transformer"), DType::F32, &Device::Cpu).unwrap();
    let model =
        FluxTransformer::load(&w, &dev_config(), DType::F32, &Device::Cpu, Kernels::Plain).unwrap();
    let r = reference("transformer_dev");
    let err = model
        .forward(&FluxInputs {
            img: &r["hidden_states"],
            img_ids: &r["img_ids"],
            txt: &r["encoder_hidden_states"],
            txt_ids: &r["txt_ids"],
            timesteps: &r["timestep"],
            y: &r["pooled_projections"],
            guidance: None,
        })
        .expect_err("a guidance-distilled model without guidance must fail");
    assert!(err.to_string().contains("guidance"), "{err}");
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect()
}

#[test]
fn t5_tokens_and_hidden_states() {
    let r = reference("t5");
    let prompt = json("reference.json")["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let t5 = T5Encoder::load(
        &tiny_dev().join("text_encoder_2"),
        &tiny_dev().join("tokenizer_2"),
        32,
        DType::F32,
        &Device::Cpu,
        Kernels::Plain,
        false,
    )
    .unwrap();
    assert_eq!(t5.token_ids(&prompt).unwrap(), ids_of(&r["input_ids"]));
    let hidden = t5.encode(&prompt).unwrap();
    assert_close(
        "t5 last_hidden_state",
        &hidden,
        &r["last_hidden_state"],
        FORWARD_TOL,
    );
}

#[test]
fn clip_tokens_and_pooled_output() {
    let r = reference("clip");
    let prompt = json("reference.json")["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let clip = ClipEncoder::load(
        &tiny_dev().join("text_encoder"),
        &tiny_dev().join("tokenizer"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(clip.token_ids(&prompt).unwrap(), ids_of(&r["input_ids"]));
    let pooled = clip.encode(&prompt).unwrap();
    assert_close(
        "clip pooler_output",
        &pooled,
        &r["pooler_output"],
        FORWARD_TOL,
    );
}

/// FLUX.1-dev's `tokenizer/` ships only vocab.json + merges.txt: the tokenizer built from them
/// must give the same ids as transformers' for every test string.
#[test]
fn clip_tokenizer_from_vocab_and_merges() {
    let tmp = std::env::temp_dir().join(format!("clip-tok-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(tiny_dev().join("tokenizer").join(f), tmp.join(f)).unwrap();
    }
    let built = clip_tokenizer(&tmp).unwrap();
    let cases = json("reference.json")["tokenizers"]["cases"]
        .as_array()
        .unwrap()
        .clone();
    assert!(cases.len() >= 3);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["clip"]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = built.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "ids for {text:?}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn autoencoder_decode_and_encode() {
    let r = reference("vae");
    let vae = Autoencoder::load(
        &tiny_dev().join("vae"),
        DType::F32,
        &Device::Cpu,
        Kernels::Plain,
    )
    .unwrap();
    assert_eq!(vae.config.downscale(), 2);
    assert_close(
        "vae decode",
        &vae.decode(&r["latent"]).unwrap(),
        &r["decoded"],
        FORWARD_TOL,
    );
    let dist = vae.encode(&r["image"]).unwrap();
    assert_close("vae encode mean", &dist.mean, &r["enc_mean"], FORWARD_TOL);
    assert_close("vae encode std", &dist.std, &r["enc_std"], FORWARD_TOL);
}

#[test]
fn schedules_match_diffusers() {
    let s = json("schedule.json");
    let dev: ScheduleConfig = serde_json::from_value(s["dev_scheduler_config"].clone()).unwrap();
    let schnell: ScheduleConfig =
        serde_json::from_value(s["schnell_scheduler_config"].clone()).unwrap();
    assert_eq!(dev, ScheduleConfig::dev());
    assert_eq!(schnell, ScheduleConfig::schnell());
    let cases = s["schedules"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let cfg = if case["scheduler"] == "dev" {
            &dev
        } else {
            &schnell
        };
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let len = case["image_seq_len"].as_u64().unwrap() as usize;
        let want: Vec<f64> = case["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = cfg.sigmas(n, len);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            // diffusers computes the shift in f32.
            assert!(
                (a - b).abs() < 1e-6,
                "{} steps at {len} tokens: {got:?} vs {want:?}",
                n
            );
        }
    }
}

/// The whole FluxPipeline run: prompt encoding, four Euler steps from the same initial
/// latents, decode.
#[test]
fn four_step_pipeline_matches_diffusers() {
    let r = reference("pipeline");
    let meta = json("reference.json")["pipeline"].clone();
    let opts = LoadOptions {
        source: engine::hub::Source::Local(tiny_dev()),
        transformer_file: None,
        t5_max_len: meta["max_sequence_length"].as_u64().unwrap() as usize,
        text_encoder_dir: engine::classifier::DEFAULT_ENCODER_DIR.into(),
        kernels: engine::ops::Kernels::Plain,
        weights: None,
        memory: Default::default(),
    };
    let pipe = FluxPipeline::load_dir(&tiny_dev(), &opts, &Device::Cpu).unwrap();
    let (txt, pooled) = pipe
        .encode_prompt(meta["prompt"].as_str().unwrap())
        .unwrap();
    assert_close("prompt_embeds", &txt, &r["prompt_embeds"], FORWARD_TOL);
    assert_close(
        "pooled_prompt_embeds",
        &pooled,
        &r["pooled_prompt_embeds"],
        FORWARD_TOL,
    );

    let (w, h) = (
        meta["width"].as_u64().unwrap() as usize,
        meta["height"].as_u64().unwrap() as usize,
    );
    let grid = pipe.latent_grid(w, h);
    let init = r["init_latents"].clone();
    let sigmas = pipe.schedule.sigmas(4, init.dim(1).unwrap());
    let want_sigmas = r["sigmas"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (a, b) in sigmas.iter().zip(&want_sigmas) {
        assert!((a - b).abs() < 1e-6);
    }
    let mut steps = Vec::new();
    let out = pipe
        .denoise(init, grid, &txt, &pooled, &sigmas, 3.5, &mut |p| {
            steps.push(p.latents.clone());
            Control::Continue
        })
        .unwrap();
    assert_eq!(steps.len(), 4);
    for (i, s) in steps.iter().enumerate() {
        assert_close(
            &format!("latents after step {}", i + 1),
            s,
            &r[&format!("step_{}", i + 1)],
            PIPELINE_TOL,
        );
    }
    assert_close("final latents", &out, &r["final_latents"], PIPELINE_TOL);
    let image = pipe
        .decode(&out, grid)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    assert_close("decoded image", &image, &r["image"], PIPELINE_TOL);
}
