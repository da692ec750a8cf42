//! The committed classifier head with the real all-MiniLM-L6-v2 encoder, on the CPU.
//! These tests need `scripts/fetch-models` to have run; without the model they fail, saying so.

use std::path::PathBuf;
use std::sync::OnceLock;

use app::{ContextTurn, TurnKind, TurnRole};
use candle_core::Device;
use engine::classifier::{
    EncoderSource, Label, Metrics, PromptClassifier, SentenceEncoder, Split, DEFAULT_DATA_DIR,
    DEFAULT_ENCODER_DIR, DEFAULT_HEAD_PATH, HELD_OUT_SPLITS,
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

/// Bounds on the committed head, just under where it is (docs/classifier.md): per held-out file (the
/// hand-written chat classes of issue 20 with their context, and the generated split the first classifier
/// was measured on, 97.06% then) and over all held-out prompts together, where the issue asks 98%.
const MIN_ACCURACY: [(&str, f32); 2] = [("test.jsonl", 0.98), ("written-test.jsonl", 0.98)];
/// Over all held-out prompts together: the issue's goal.
const MIN_ACCURACY_ALL: f32 = 0.98;
/// Calibration bound for each predicted label (ECE over the prompts predicted that label, all
/// held-out prompts): what "image_request, 0.9" means must be right to within a few points.
const MAX_ECE_PER_LABEL: f32 = 0.03;

#[test]
fn committed_head_reaches_its_accuracy_on_the_held_out_prompts_with_calibrated_confidence() {
    let dir = repo_root().join(DEFAULT_DATA_DIR);
    let held_out = Split::load_held_out(&dir).unwrap();
    let mut all_p = Vec::new();
    for (name, split) in &held_out {
        let p = classifier()
            .image_request_probabilities(&split.texts(), &split.last_answers())
            .unwrap();
        let m = Metrics::compute(&p, &split.targets());
        let (_, min) = MIN_ACCURACY
            .iter()
            .find(|(file, _)| file == name)
            .expect("a bound for every held-out file");
        assert!(
            m.accuracy >= *min,
            "{name}: accuracy {:.4} < {min}\n{m}",
            m.accuracy
        );
        all_p.extend(p);
    }
    let all = Split::join(held_out.iter().map(|(_, s)| s));
    assert!(
        all.examples.len() > 1700,
        "the held-out sets look truncated"
    );
    let m = Metrics::compute(&all_p, &all.targets());
    assert!(
        m.accuracy >= MIN_ACCURACY_ALL,
        "held-out accuracy {:.4} < {MIN_ACCURACY_ALL}\n{m}",
        m.accuracy
    );
    for (label, ece) in [
        ("image_request", m.ece_image_request),
        ("conversation", m.ece_conversation),
    ] {
        assert!(
            ece < MAX_ECE_PER_LABEL,
            "ECE of predicted {label} {ece:.4} >= {MAX_ECE_PER_LABEL}\n{m}"
        );
    }
}

#[test]
fn committed_head_was_trained_on_the_committed_data() {
    // The metadata records the data's hashes; a regenerated data set needs a retrained head.
    let meta_path = repo_root().join(DEFAULT_HEAD_PATH).with_extension("json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    for file in std::iter::once("train.jsonl").chain(HELD_OUT_SPLITS) {
        let path = repo_root().join(DEFAULT_DATA_DIR).join(file);
        let data = Split::load(&path).unwrap();
        assert_eq!(
            meta[file.trim_end_matches(".jsonl")]["sha256"],
            data.sha256,
            "{} changed since the head was trained: run train-classifier",
            path.display()
        );
    }
}

#[test]
fn held_out_prompts_are_never_trained_on() {
    let dir = repo_root().join(DEFAULT_DATA_DIR);
    let norm = |t: &str| {
        t.to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let train: std::collections::HashSet<String> = Split::load(&dir.join("train.jsonl"))
        .unwrap()
        .examples
        .iter()
        .map(|e| norm(&e.text))
        .collect();
    for (name, split) in Split::load_held_out(&dir).unwrap() {
        let seen: Vec<&str> = split
            .examples
            .iter()
            .filter(|e| train.contains(&norm(&e.text)))
            .map(|e| e.text.as_str())
            .collect();
        assert!(seen.is_empty(), "{name} rows also in train: {seen:?}");
    }
}

fn after(kind: TurnKind, said: &str) -> Vec<ContextTurn> {
    vec![
        ContextTurn {
            role: TurnRole::User,
            text: said.into(),
            kind: TurnKind::Text,
        },
        ContextTurn {
            role: TurnRole::Assistant,
            text: said.into(),
            kind,
        },
    ]
}

fn label(prompt: &str, context: &[ContextTurn]) -> (Label, f32) {
    let p = classifier()
        .image_request_probability(prompt, context)
        .unwrap();
    let label = if p > 0.5 {
        Label::ImageRequest
    } else {
        Label::Conversation
    };
    (label, p)
}

#[test]
fn the_issue_examples_are_routed_right() {
    let image = after(TurnKind::Image, "a lighthouse on a cliff at dusk");
    let text = after(TurnKind::Text, "Why did the chicken cross the road?");
    let cases: [(&str, &[ContextTurn], Label); 13] = [
        ("can I see you in the kitchen?", &[], Label::Conversation),
        (
            "show me a woman cooking in a bright kitchen",
            &[],
            Label::ImageRequest,
        ),
        ("a beautiful woman", &[], Label::ImageRequest),
        ("red apple", &[], Label::ImageRequest),
        ("write a haiku about autumn", &[], Label::Conversation),
        ("compose a song", &[], Label::Conversation),
        ("give me a recipe for pancakes", &[], Label::Conversation),
        // A follow-up asks for a picture after a picture...
        ("another one", &image, Label::ImageRequest),
        ("same but at night", &image, Label::ImageRequest),
        ("make it bigger", &image, Label::ImageRequest),
        // ...and for more words after words; alone, "another one" has nothing to redraw, and a
        // chat reply is the cheaper mistake.
        ("another one", &text, Label::Conversation),
        ("another one", &[], Label::Conversation),
        // Thanks after a picture is still conversation.
        ("thank you, that's lovely", &image, Label::Conversation),
    ];
    for (prompt, context, want) in cases {
        let (got, p) = label(prompt, context);
        let after = app::last_answer(context);
        assert_eq!(got, want, "{prompt:?} after {after:?}: p(image) = {p}");
    }
}

#[test]
fn committed_head_reads_the_context() {
    // A head trained before the context existed ignores it; this one must not.
    assert!(classifier().reads_context());
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
    let kinds = [None, Some(TurnKind::Image), Some(TurnKind::Text)];
    let answers: Vec<Option<TurnKind>> = (0..prompts.len()).map(|i| kinds[i % 3]).collect();
    let batch = classifier()
        .image_request_probabilities(&prompts, &answers)
        .unwrap();
    assert_eq!(batch.len(), prompts.len());
    for ((prompt, b), answer) in prompts.iter().zip(&batch).zip(&answers) {
        let context = answer
            .map(|kind| after(kind, "earlier"))
            .unwrap_or_default();
        let s = classifier()
            .image_request_probability(prompt, &context)
            .unwrap();
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
