//! The classifier's training (`tools::classifier_training`) with the real all-MiniLM-L6-v2
//! encoder, on the CPU. These tests need `scripts/fetch-models` to have run; without the model
//! they fail, saying so.

use std::path::PathBuf;

use app::TurnKind;
use candle_core::{Device, Tensor};
use engine::classifier::{pool, EncoderSource, SentenceEncoder, DEFAULT_ENCODER_DIR};
use tools::classifier_training::{finetune, Texts, TopLayers, TuneConfig};

fn encoder_source() -> EncoderSource {
    let encoder = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_ENCODER_DIR);
    assert!(
        encoder.join("model.safetensors").is_file(),
        "the MiniLM encoder is missing at {}: run scripts/fetch-models first",
        encoder.display()
    );
    EncoderSource::Dir(encoder)
}

#[test]
fn trainable_top_layers_compute_what_the_inference_bert_computes() {
    // Training runs the top layers on our own differentiable ops, inference on the engine's BERT
    // with fused kernels; with the pretrained weights both must give the pretrained embeddings.
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
    // Guards against gradients silently stopping before the encoder (fused kernels have no
    // backward pass), which would leave the "tuned" layers pretrained.
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
    let answers = [None, Some(TurnKind::Image), None, Some(TurnKind::Text)];
    let rows = Texts {
        texts: &texts,
        last_answers: &answers,
        targets: &targets,
    };
    let (head, _) = finetune(&source, rows, rows, &cfg).unwrap();
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
