//! CLIP as FLUX.1-dev ships it, where the tiny fixture differs: a `tokenizer/` with only vocab.json
//! and merges.txt, read by transformers 4's slow `CLIPTokenizer` (the class its model_index.json
//! names), on CJK and unusual Unicode; and the text encoder config's `eos_token_id: 2`, which makes
//! transformers pool at argmax(input_ids). References made by scripts/fixtures/make_clip_fixtures.py.

mod common;

use candle_core::{DType, Device};
use common::*;
use engine::models::text::{clip_tokenizer, ClipEncoder};
use std::path::Path;

/// The tiny tokenizer as FLUX.1-dev lays its own out: no tokenizer.json.
fn slow_layout(dir: &Path) {
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(tiny_dev().join("tokenizer").join(f), dir.join(f)).unwrap();
    }
}

fn cases() -> Vec<(String, Vec<u32>)> {
    json("clip_slow_tokenizer.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap();
            (
                c["text"].as_str().unwrap().to_string(),
                ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect()
}

#[test]
fn cjk_and_unusual_unicode_give_the_slow_clip_tokenizers_ids() {
    let dir = tempfile::tempdir().unwrap();
    slow_layout(dir.path());
    let mut tok = clip_tokenizer(dir.path()).unwrap();
    // Truncated and padded to 77 with the end-of-text token, as FluxPipeline asks.
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: 77,
        ..Default::default()
    }))
    .unwrap();
    tok.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(77),
        pad_id: eos,
        pad_token: "<|endoftext|>".into(),
        ..Default::default()
    }));
    let cases = cases();
    assert!(cases.len() >= 9);
    for (text, want) in cases {
        let got = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "ids for {text:?}");
    }
}

#[test]
fn the_real_configs_eos_id_2_pools_at_argmax_as_transformers_does() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tokenizer) = (
        dir.path().join("text_encoder"),
        dir.path().join("tokenizer"),
    );
    std::fs::create_dir_all(&model).unwrap();
    std::fs::create_dir_all(&tokenizer).unwrap();
    slow_layout(&tokenizer);
    std::fs::copy(
        tiny_dev().join("text_encoder/model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let mut config = json_at(&tiny_dev().join("text_encoder/config.json"));
    // openai/clip-vit-large-patch14's special ids, as in FLUX.1-dev's text_encoder/config.json.
    config["bos_token_id"] = 0.into();
    config["eos_token_id"] = 2.into();
    config["pad_token_id"] = 1.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();

    let r = reference("clip_legacy_pooling");
    let clip = ClipEncoder::load(&model, &tokenizer, DType::F32, &Device::Cpu).unwrap();
    let prompt = "a fox #! reading under a tree";
    let ids = clip.token_ids(prompt).unwrap();
    assert_eq!(ids, ids_of(&r["input_ids"]));
    // The prompt holds id 2 (a bare `#`): pooling there, at the config's eos id, would differ.
    assert!(ids.contains(&2));
    assert_close(
        "pooled with eos_token_id 2",
        &clip.encode(prompt).unwrap(),
        &r["pooled"],
        FORWARD_TOL,
    );
}

fn json_at(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// As the other parity tests of the f32 encoders.
const FORWARD_TOL: f64 = 5e-5;

fn ids_of(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect()
}
