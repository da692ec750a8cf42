//! The committed classifier head with the real all-MiniLM-L6-v2 encoder, on the CPU.
//! These tests need `scripts/fetch-models` to have run; without the model they fail, saying so.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use engine::classifier::{
    finetune, pool, EncoderSource, Label, Metrics, PromptClassifier, SentenceEncoder, Split,
    TopLayers, TuneConfig, DEFAULT_DATA_DIR, DEFAULT_ENCODER_DIR, DEFAULT_HEAD_PATH,
};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn encoder_source() -> EncoderSource {
    let encoder = repo_root().join(DEFAULT_ENCODER_DIR);
    assert!(
        encoder.join("model.safetensors").is_file(),
        "the MiniLM encoder is missing at {}: run scripts/fetch-models first",
        encoder.display()
    );
    EncoderSource::Dir(encoder)
}

fn classifier() -> &'static PromptClassifier {
    static CLASSIFIER: OnceLock<PromptClassifier> = OnceLock::new();
    CLASSIFIER.get_or_init(|| {
        PromptClassifier::load(
            &encoder_source(),
            &repo_root().join(DEFAULT_HEAD_PATH),
            &Device::Cpu,
        )
        .expect("loading the classifier")
    })
}

#[test]
fn committed_head_reaches_97_percent_on_the_held_out_split() {
    let test = Split::load(&repo_root().join(DEFAULT_DATA_DIR).join("test.jsonl")).unwrap();
    assert!(test.examples.len() > 1000, "the test split looks truncated");
    let p = classifier()
        .image_request_probabilities(&test.texts())
        .unwrap();
    let m = Metrics::compute(&p, &test.targets());
    assert!(
        m.accuracy >= 0.97,
        "held-out accuracy {:.4} < 0.97\n{m}",
        m.accuracy
    );
    assert!(
        m.f1_macro >= 0.97,
        "held-out macro F1 {:.4} < 0.97\n{m}",
        m.f1_macro
    );
}

#[test]
fn committed_head_was_trained_on_the_committed_data() {
    // The metadata records the data's hashes; a regenerated data set needs a retrained head.
    let meta_path = repo_root().join(DEFAULT_HEAD_PATH).with_extension("json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    for split in ["train", "test"] {
        let file = repo_root()
            .join(DEFAULT_DATA_DIR)
            .join(format!("{split}.jsonl"));
        let data = Split::load(&file).unwrap();
        assert_eq!(
            meta[split]["sha256"],
            data.sha256,
            "{} changed since the head was trained: run train-classifier",
            file.display()
        );
    }
}

#[test]
fn the_issue_examples_are_routed_right() {
    let cases = [
        ("can I see you in the kitchen?", Label::Conversation),
        (
            "show me a woman cooking in a bright kitchen",
            Label::ImageRequest,
        ),
        ("a beautiful woman", Label::ImageRequest),
    ];
    for (prompt, want) in cases {
        let p = classifier().image_request_probability(prompt).unwrap();
        let got = if p > 0.5 {
            Label::ImageRequest
        } else {
            Label::Conversation
        };
        assert_eq!(got, want, "{prompt:?}: p(image) = {p}");
    }
}

#[test]
fn batch_equals_single() {
    // Different lengths, so that the batch pads most of them.
    let prompts = [
        "hi",
        "yes please",
        "a beautiful woman",
        "what lens should I buy for portraits?",
        "ultra detailed portrait of an old sailor, 85mm, golden hour, kodak portra 400, masterpiece",
        "my sister painted our kitchen yellow last weekend and it looks great",
        "génère une image d'un chat",
        "",
    ];
    let batch = classifier().image_request_probabilities(&prompts).unwrap();
    assert_eq!(batch.len(), prompts.len());
    for (prompt, b) in prompts.iter().zip(&batch) {
        let s = classifier().image_request_probability(prompt).unwrap();
        assert!((0.0..=1.0).contains(&s), "{prompt:?}: {s}");
        assert!((s - b).abs() < 1e-4, "{prompt:?}: single {s} vs batch {b}");
    }
}

#[test]
fn the_default_encoder_is_a_folder_even_when_missing() {
    // Read as a hub id it would send users to the network instead of to scripts/fetch-models.
    assert_eq!(
        EncoderSource::parse(DEFAULT_ENCODER_DIR).unwrap(),
        EncoderSource::Dir(DEFAULT_ENCODER_DIR.into())
    );
    assert!(matches!(
        EncoderSource::parse("sentence-transformers/all-MiniLM-L6-v2").unwrap(),
        EncoderSource::Hub { .. }
    ));
}

#[test]
fn a_missing_encoder_says_how_to_get_it() {
    let missing = repo_root().join("target/no-such-encoder");
    let err = SentenceEncoder::load(&EncoderSource::Dir(missing), &Device::Cpu)
        .err()
        .expect("loading from a missing folder must fail");
    assert!(err.to_string().contains("scripts/fetch-models"), "{err:#}");
}

#[test]
fn trainable_top_layers_compute_what_candle_bert_computes() {
    // Training runs the top layers on our own differentiable ops, inference on candle's fused
    // BertEncoder; with the pretrained weights both must give the pretrained embeddings.
    let source = encoder_source();
    let full = SentenceEncoder::load(&source, &Device::Cpu).unwrap();
    let top = SentenceEncoder::pretrained_top(&source, &Device::Cpu, 2).unwrap();
    let split = SentenceEncoder::load_with_top(&source, &Device::Cpu, top.clone()).unwrap();
    let layers = TopLayers::new(top, 2, full.config()).unwrap();
    let texts = ["a lighthouse at dusk, oil painting", "how are you?", "ok"];
    let max_diff = |a: Tensor, b: Tensor| -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap()
    };
    let reference = full.embed(&texts).unwrap();
    let (hidden, mask) = split.bottom_states(&texts).unwrap();
    let trainable = pool(&layers.forward(&hidden, &mask).unwrap(), &mask).unwrap();
    let diff = max_diff(reference.clone(), trainable);
    assert!(diff < 1e-4, "trainable layers differ by {diff}");
    let diff = max_diff(reference, split.embed(&texts).unwrap());
    assert!(diff < 1e-4, "split encoder differs by {diff}");
}

#[test]
fn fine_tuning_changes_the_encoder_layers() {
    // Guards against gradients silently stopping before the encoder (candle's fused kernels
    // have no backward pass), which would leave the "tuned" layers pretrained.
    let source = encoder_source();
    let texts = [
        "draw a cat",
        "hello there",
        "a red car, 35mm",
        "how was your day?",
    ];
    let targets = [1.0, 0.0, 1.0, 0.0];
    let cfg = TuneConfig {
        layers: 1,
        hidden: 0,
        epochs: 1,
        batch_size: 4,
        encoder_learning_rate: 1e-3,
        head_learning_rate: 1e-2,
        weight_decay: 0.0,
        seed: 1,
    };
    let (head, _) = finetune(&source, &texts, &targets, &texts, &targets, &cfg).unwrap();
    let before = SentenceEncoder::pretrained_top(&source, &Device::Cpu, 1).unwrap();
    let name = "layer.0.attention.self.query.weight";
    let change = (&head.top[name] - &before[name])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(change > 1e-5, "{name} did not move: {change}");
}
