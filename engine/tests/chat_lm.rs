//! The chat's language model against transformers on the same GGUF files
//! (`scripts/fixtures/make_chat_lm_fixtures.py`): tiny random models in the llama and qwen2 layouts
//! with quantized blocks, and the shipped SmolLM2-135M-Instruct (`scripts/fetch-models`).

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::Device;
use engine::chat::{FinishReason, GgufChat, LanguageModel, Role, SamplingSettings, Turn};
use serde_json::Value;

fn dir() -> PathBuf {
    common::fixtures().join("chat-lm")
}

fn json(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/fixtures/make_chat_lm_fixtures.py",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Quantized matrices multiply 8-bit-quantized activations (as llama.cpp does) where transformers
/// dequantizes the weights and multiplies in f32: the logits agree to about a percent of their range.
const QUANTIZED_TOLERANCE: f32 = 0.03;

/// Largest difference relative to the reference's largest magnitude.
fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// Whether `id` is the reference's most likely token, or ties with it within the quantization error
/// (random weights make near-ties).
fn is_a_top_choice(id: usize, reference: &[f32]) -> bool {
    let best = reference[argmax(reference)];
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    best - reference[id] <= QUANTIZED_TOLERANCE * scale
}

fn shipped_model() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(engine::chat::DEFAULT_LM_FILE);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models first",
        path.display()
    );
    path
}

#[test]
fn tiny_llama_and_qwen2_ggufs_give_transformers_ids_and_logits() {
    let reference = json("reference.json");
    for (file, cases) in reference.as_object().unwrap() {
        let mut model = GgufChat::load(&dir().join(file), file, &Device::Cpu).unwrap();
        for case in cases.as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let expected = ids(&case["ids"]);
            let ours = model.encode(prompt).unwrap();
            assert_eq!(ours, expected, "{file}: ids of {prompt:?}");
            // One token at a time through the cache, each position against the reference.
            model.clear();
            let mut worst = 0f32;
            for row in case["logits"].as_array().unwrap() {
                let position = row["position"].as_u64().unwrap() as usize;
                let reference = floats(&row["logits"]);
                let logits: Vec<f32> = model
                    .logits(&ours[position..=position], position)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                worst = worst.max(relative_error(&logits, &reference));
                assert!(
                    is_a_top_choice(argmax(&logits), &reference),
                    "{file}: {prompt:?} at {position}"
                );
            }
            assert!(worst < QUANTIZED_TOLERANCE, "{file}: {prompt:?}: {worst}");
            // The whole prompt at once (the masked path) ends at the same last logits.
            model.clear();
            let all: Vec<f32> = model.logits(&ours, 0).unwrap().to_vec1().unwrap();
            let last = case["logits"].as_array().unwrap().last().unwrap();
            let error = relative_error(&all, &floats(&last["logits"]));
            assert!(
                error < QUANTIZED_TOLERANCE,
                "{file}: {prompt:?} at once: {error}"
            );
        }
    }
}

#[test]
fn the_shipped_smollm2_gives_transformers_top_logits_and_llama_cpp_ids() {
    let reference = json("smollm2-135m.json");
    let mut model = GgufChat::load(&shipped_model(), "smollm2-135m", &Device::Cpu).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        let ours = model.encode(prompt).unwrap();
        assert_eq!(ours, expected, "ids of {prompt:?}");
        let rows = case["logits"].as_array().unwrap();
        let first = rows[0]["position"].as_u64().unwrap() as usize;
        model.clear();
        model.logits(&ours[..first], 0).unwrap();
        for row in rows {
            let position = row["position"].as_u64().unwrap() as usize;
            let logits: Vec<f32> = model
                .logits(&ours[position..=position], position)
                .unwrap()
                .to_vec1()
                .unwrap();
            let top = ids(&row["top_ids"]);
            let top_logits = floats(&row["top_logits"]);
            assert_eq!(argmax(&logits), top[0] as usize, "at {position}");
            let ours_at_top: Vec<f32> = top.iter().map(|&i| logits[i as usize]).collect();
            let error = relative_error(&ours_at_top, &top_logits);
            assert!(error < QUANTIZED_TOLERANCE, "at {position}: {error}");
        }
    }
    let llama_cpp = reference["llama_cpp_ids"].as_array().expect(
        "smollm2-135m.json has no llama.cpp ids: install llama-cpp-python where the fixture script runs",
    );
    for case in llama_cpp {
        let text = case["text"].as_str().unwrap();
        assert_eq!(model.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
    }
}

#[test]
fn an_answer_stops_at_its_token_budget_and_when_the_caller_says_so() {
    let path = dir().join("tiny-llama.gguf");
    let mut model = GgufChat::load(&path, "tiny", &Device::Cpu).unwrap();
    let turns = [
        Turn::new(Role::System, "Be brief."),
        Turn::new(Role::User, "Hello!"),
    ];
    let settings = SamplingSettings {
        max_tokens: 12,
        temperature: 0.8,
        seed: 7,
        ..SamplingSettings::default()
    };
    let mut pieces = String::new();
    let answer = model
        .answer(&turns, &settings, &mut |p| {
            pieces.push_str(p);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(answer.tokens <= 12);
    assert!(answer.finish != FinishReason::Cancelled);
    assert_eq!(pieces, answer.text, "the streamed pieces make the answer");
    // Seeded: the same settings give the same answer.
    let again = model
        .answer(&turns, &settings, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(again.text, answer.text);
    let mut calls = 0;
    let stopped = model
        .answer(&turns, &settings, &mut |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(stopped.finish, FinishReason::Cancelled);
}

#[test]
fn the_shipped_model_greets_back_in_words() {
    let mut model = GgufChat::load(&shipped_model(), "smollm2-135m", &Device::Cpu).unwrap();
    let turns = [
        Turn::new(Role::System, "You are a helpful assistant."),
        Turn::new(Role::User, "Hello!"),
    ];
    let settings = SamplingSettings {
        max_tokens: 24,
        temperature: 0.0,
        ..SamplingSettings::default()
    };
    let answer = model
        .answer(&turns, &settings, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let words = answer.text.split_whitespace().count();
    assert!(words >= 3, "{answer:?}");
    assert!(
        !answer.text.contains("<|im_"),
        "special tokens stay out of the text: {answer:?}"
    );
}

#[test]
fn the_gpu_memory_a_model_takes_is_read_from_its_header() {
    let path = shipped_model();
    let memory = engine::chat::LmMemory::of_file(&path).unwrap();
    // The weights are the file's tensor data, less the alignment padding between tensors.
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let data = std::fs::metadata(&path).unwrap().len() - content.tensor_data_offset;
    let padding = 32 * content.tensor_infos.len() as u64;
    assert!(
        memory.weights <= data && data - memory.weights <= padding,
        "{} of {data}",
        memory.weights
    );
    // SmolLM2-135M: 30 layers, 9 heads of 64 (576 wide), 3 key/value heads, trained on 8192 tokens, so
    // the GPU's 4096: an f32 key/value cache, and a whole prompt's scores with their softmax.
    assert_eq!(memory.context, engine::chat::gguf::GPU_CONTEXT);
    let cache = 30 * 2 * 3 * 64 * 4096 * 4;
    let scores = 2 * 9 * 4096 * 4096 * 4;
    assert_eq!(memory.working, cache + scores + (256 << 20));
    assert_eq!(memory.total(), memory.weights + memory.working);
}
