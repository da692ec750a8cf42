//! The API's contract is the types of `app`, and /openapi.json shows them: one error-code enum whose
//! every code has one status, the typed training settings, and one message type on the generation
//! WebSocket, a refused request included.

mod common;

use std::sync::Arc;
use std::time::Duration;

use app::{ContextTurn, ErrorCode, JobEvent, TurnKind};
use common::{config, FakeGeneration, FakeTraining};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use server::jobs::capability::{Capabilities, Classification};
use tokio_tungstenite::tungstenite::Message;

async fn studio() -> (tempfile::TempDir, String) {
    studio_with(None).await
}

async fn studio_with(
    classification: Option<Arc<dyn Classification>>,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let caps = Capabilities {
        generation: Some(Arc::new(FakeGeneration::new(Duration::ZERO))),
        classification,
        classification_error: None,
        training: Some(Arc::new(FakeTraining {
            steps: 2,
            step_time: Duration::ZERO,
        })),
        chat: None,
        chat_error: None,
        workers: Vec::new(),
    };
    let running = server::start(&config(dir.path()), caps).await.unwrap();
    (dir, format!("http://{}", running.addr))
}

#[tokio::test]
async fn the_openapi_document_shows_the_error_codes_and_the_training_settings() {
    let (_dir, url) = studio().await;
    let doc: Value = reqwest::get(format!("{url}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    let codes: Vec<&str> = schemas["ErrorCode"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no ErrorCode enum in {}", schemas["ErrorCode"]))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let all: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, all);
    for field in ["steps", "rank", "learning_rate", "resolution", "model"] {
        assert!(
            schemas["TrainSettingsForm"]["properties"]
                .get(field)
                .is_some(),
            "{field} missing from {}",
            schemas["TrainSettingsForm"]
        );
    }
    assert!(schemas["ErrorDetail"]["properties"].get("files").is_some());
    for (schema, field) in [
        ("GenerateRequest", "num_images"),
        ("GenerateRequest", "step_cache"),
        ("GenerateResponse", "images"),
        ("GenerateResponse", "step_cache"),
        ("BatchImage", "seed"),
        ("StepCacheReport", "skipped_steps"),
    ] {
        assert!(
            schemas[schema]["properties"].get(field).is_some(),
            "{schema}.{field} missing from {}",
            schemas[schema]
        );
    }
    assert!(schemas.get("JobEvent").is_some());
}

#[tokio::test]
async fn every_error_answers_with_the_status_of_its_code() {
    let (_dir, url) = studio().await;
    let http = reqwest::Client::new();
    for (method, path, body) in [
        ("GET", "/jobs/not-a-uuid", None),
        ("GET", "/jobs/3f2a0d7e-8c1b-4d7a-9c55-0123456789ab", None),
        ("POST", "/generate/", Some("{")),
        (
            "POST",
            "/generate/",
            Some(r#"{"prompt": "x", "width": 100000}"#),
        ),
        ("DELETE", "/health", None),
    ] {
        let mut request = http.request(method.parse().unwrap(), format!("{url}{path}"));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let answer: app::ErrorBody = response.json().await.unwrap();
        assert_eq!(
            status,
            answer.error.code.status(),
            "{method} {path}: {answer:?}"
        );
    }
}

#[tokio::test]
async fn a_refused_generation_request_is_a_job_event_like_every_other_message() {
    let (_dir, url) = studio().await;
    let ws = format!("{}/ws/generate", url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws).await.unwrap();
    socket
        .send(Message::Text(r#"{"prompt": "x", "width": 100000}"#.into()))
        .await
        .unwrap();
    let Some(Ok(Message::Text(text))) = socket.next().await else {
        panic!("no message");
    };
    let event: JobEvent = serde_json::from_str(&text).unwrap();
    assert_eq!((event.job_id.as_str(), event.seq), ("", 0), "{text}");
    match event.body {
        app::EventBody::Error { error } => assert_eq!(error.code, ErrorCode::Validation),
        other => panic!("not an error: {other:?}"),
    }
    // An accepted one: the same type throughout.
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws).await.unwrap();
    socket
        .send(Message::Text(r#"{"prompt": "x", "steps": 2}"#.into()))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        let event: JobEvent = serde_json::from_str(&text).unwrap();
        assert!(!event.job_id.is_empty());
        seqs.push(event.seq);
    }
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// A stand-in that answers from the context alone: 0.9 after an image, 0.2 otherwise. Enough to see
/// that the route hands the context on; the real classifier is tested in engine/tests/classifier.rs.
struct ReadsTheLastAnswer;

impl Classification for ReadsTheLastAnswer {
    fn image_request_probability(
        &self,
        _prompt: &str,
        context: &[ContextTurn],
    ) -> anyhow::Result<f32> {
        Ok(match app::last_answer(context) {
            Some(TurnKind::Image) => 0.9,
            _ => 0.2,
        })
    }
}

#[tokio::test]
async fn classify_takes_an_optional_context_and_answers_as_the_original_contract_does() {
    let (_dir, url) = studio_with(Some(Arc::new(ReadsTheLastAnswer))).await;
    let http = reqwest::Client::new();
    let classify = |body: Value| {
        let request = http.post(format!("{url}/classify/")).json(&body);
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    // Without context: the original request and answer, nothing more.
    let (status, answer) = classify(serde_json::json!({"prompt": "another one"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["label"], "conversation");
    assert!((answer["confidence"].as_f64().unwrap() - 0.8).abs() < 1e-6);
    assert_eq!(answer.as_object().unwrap().len(), 3, "{answer}");
    // With the turns before it, as the chat sends them.
    let context = serde_json::json!([
        {"role": "user", "text": "a fox in the snow", "kind": "text"},
        {"role": "assistant", "text": "a fox in the snow", "kind": "image"},
    ]);
    let (status, answer) =
        classify(serde_json::json!({"prompt": "another one", "context": context})).await;
    assert_eq!(
        (status, &answer["label"]),
        (200, &Value::from("image_request"))
    );
    // Refused before the classifier runs: too many turns, an unknown kind.
    let turn = serde_json::json!({"role": "user", "text": "hi", "kind": "text"});
    let long = vec![turn; app::MAX_CONTEXT_TURNS + 1];
    let (status, answer) = classify(serde_json::json!({"prompt": "x", "context": long})).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "validation");
    let unknown = serde_json::json!([{"role": "assistant", "kind": "video"}]);
    let (status, answer) = classify(serde_json::json!({"prompt": "x", "context": unknown})).await;
    assert_eq!(status, 422, "{answer}");

    // /openapi.json shows the optional context.
    let doc: Value = reqwest::get(format!("{url}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    let request = &schemas["ClassifyRequest"];
    assert!(request["properties"].get("context").is_some(), "{request}");
    assert_eq!(
        request["required"],
        serde_json::json!(["prompt"]),
        "{request}"
    );
    assert_eq!(
        schemas["TurnKind"]["enum"],
        serde_json::json!(["image", "text"]),
        "{}",
        schemas["TurnKind"]
    );
}
