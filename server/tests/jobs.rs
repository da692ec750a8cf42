//! The job system through HTTP and WebSockets, with stand-in capabilities plugged into the seam: results,
//! queue limits, cancel, streams, the training upload and its files.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{config, error_code, eventually, tiny_png, zip_of, Api, FakeGeneration, FakeTraining};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use server::jobs::capability::Capabilities;
use tokio_tungstenite::tungstenite::Message;

struct Studio {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    api: Api,
    gate: Arc<std::sync::atomic::AtomicBool>,
}

impl std::ops::Deref for Studio {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

async fn studio(step_time: Duration, generation_queue: usize, upload_limit: u64) -> Studio {
    let dir = tempfile::tempdir().unwrap();
    let generation = FakeGeneration::new(step_time);
    let gate = Arc::clone(&generation.gate);
    let caps = Capabilities {
        generation: Some(Arc::new(generation)),
        classification: None,
        classification_error: None,
        training: Some(Arc::new(FakeTraining {
            steps: 4,
            step_time: Duration::from_millis(20),
        })),
        chat: None,
        chat_error: None,
        workers: Vec::new(),
    };
    let mut cfg = config(dir.path());
    cfg.generation_queue = generation_queue;
    cfg.upload_limit = upload_limit;
    let running = server::start(&cfg, caps).await.unwrap();
    Studio {
        data: dir.path().to_path_buf(),
        _dir: dir,
        api: Api::new(format!("http://{}", running.addr)),
        gate,
    }
}

impl Studio {
    fn job_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.data.join("jobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }
}

#[tokio::test]
async fn generate_answers_the_contract_fields_and_keeps_the_image() {
    let s = studio(Duration::ZERO, 4, 1 << 20).await;
    let (status, body) = s
        .post(
            "/generate/",
            json!({"prompt": "a beautiful woman", "seed": 7, "width": 128, "height": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for field in [
        "image",
        "seed",
        "width",
        "height",
        "steps",
        "model",
        "prompt",
        "elapsed_ms",
    ] {
        assert!(body.get(field).is_some(), "missing {field}");
    }
    assert_eq!(
        (
            body["seed"].as_u64(),
            body["width"].as_u64(),
            body["height"].as_u64()
        ),
        (Some(7), Some(128), Some(64))
    );
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["image"].as_str().unwrap())
        .unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (128, 64));
    let job = body["job_id"].as_str().unwrap();
    let stored = s
        .http
        .get(format!("{}/images/{job}", s.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored.as_ref(), png.as_slice());
    let (_, record) = s.get(&format!("/jobs/{job}")).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["result"]["image"], format!("/images/{job}"));
    // The recorded result reads back as the answer's type, as the gallery reads it.
    let recorded: app::GenerateResponse = serde_json::from_value(record["result"].clone())
        .expect("a recorded result is a GenerateResponse");
    assert!(recorded.images.is_empty());
    // No seed given: one is chosen and reported.
    let (_, body) = s.post("/generate", json!({"prompt": "x"})).await;
    assert!(body["seed"].is_u64());
    // Validation before queueing.
    let (status, body) = s
        .post("/generate/", json!({"prompt": "x", "width": 1000}))
        .await;
    assert_eq!(
        (status, error_code(&body.to_string())),
        (422, "validation".into())
    );
    let (status, body) = s
        .post("/generate/", json!({"prompt": "x", "model": "huge"}))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = s
        .post(
            "/generate/",
            json!({"prompt": "x", "lora": "3f2a0d7e-8c1b-4d7a-9c55-0123456789ab"}),
        )
        .await;
    assert_eq!(status, 422);
    let (_, models) = s.get("/models/").await;
    assert_eq!(models["default_preset"], "tiny");
    assert_eq!(models["presets"][0]["state"], "loaded");
}

#[tokio::test]
async fn a_full_queue_answers_429_and_cancel_works_queued_and_running() {
    let s = studio(Duration::from_millis(5), 1, 1 << 20).await;
    s.gate.store(false, Ordering::SeqCst); // The worker holds the first job at its first step.
    let socket = |s: &Studio| tokio_tungstenite::connect_async(s.ws("/ws/generate"));
    let (mut first, _) = socket(&s).await.unwrap();
    first
        .send(Message::text(r#"{"prompt": "one", "steps": 50}"#))
        .await
        .unwrap();
    let queued: Value =
        serde_json::from_str(first.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        (queued["type"].as_str(), queued["status"].as_str()),
        (Some("status"), Some("queued"))
    );
    let running_id = queued["job_id"].as_str().unwrap().to_owned();
    eventually(async || {
        (s.get(&format!("/jobs/{running_id}")).await.1["status"] == "running").then_some(())
    })
    .await;
    // One waiting job fills the queue of one; the next is refused.
    let (mut second, _) = socket(&s).await.unwrap();
    second
        .send(Message::text(r#"{"prompt": "two"}"#))
        .await
        .unwrap();
    let queued: Value =
        serde_json::from_str(second.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    let waiting_id = queued["job_id"].as_str().unwrap().to_owned();
    let (status, body) = s.post("/generate/", json!({"prompt": "three"})).await;
    assert_eq!(
        (status, error_code(&body.to_string())),
        (429, "queue_full".into())
    );
    // Cancelling the waiting one is immediate; the running one stops at its next step.
    let (status, record) = s
        .post(&format!("/jobs/{waiting_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, record["status"].as_str()),
        (200, Some("cancelled"))
    );
    let (status, _) = s
        .post(&format!("/jobs/{running_id}/cancel/"), json!({}))
        .await;
    assert_eq!(status, 202);
    s.gate.store(true, Ordering::SeqCst);
    let mut last = Value::Null;
    while let Some(Ok(Message::Text(text))) = first.next().await {
        last = serde_json::from_str(&text).unwrap();
    }
    assert_eq!(last["status"], "cancelled");
    let (status, body) = s
        .post(&format!("/jobs/{running_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, error_code(&body.to_string())),
        (409, "conflict".into())
    );
    // The queue has room again.
    let (status, _) = s
        .post("/generate/", json!({"prompt": "four", "steps": 1}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn generation_websocket_streams_steps_then_the_result_and_closing_cancels() {
    let s = studio(Duration::from_millis(2), 4, 1 << 20).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(s.ws("/ws/generate"))
        .await
        .unwrap();
    socket
        .send(Message::text(
            r#"{"prompt": "a cat", "steps": 3, "seed": 5}"#,
        ))
        .await
        .unwrap();
    let mut types = Vec::new();
    let mut result = Value::Null;
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        let event: Value = serde_json::from_str(&text).unwrap();
        if event["type"] == "step" {
            assert!(event["preview"].as_str().is_some_and(|p| !p.is_empty()));
            assert_eq!(event["total"], 3);
        }
        if event["type"] == "result" {
            result = event.clone();
        }
        types.push(event["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        types,
        ["status", "status", "step", "step", "step", "result", "status"]
    );
    assert_eq!(result["seed"], 5);
    assert!(result["image"].as_str().is_some_and(|i| i.len() > 20));

    // Closing the socket mid-job cancels it.
    s.gate.store(false, Ordering::SeqCst);
    let (mut socket, _) = tokio_tungstenite::connect_async(s.ws("/ws/generate/"))
        .await
        .unwrap();
    socket
        .send(Message::text(r#"{"prompt": "a dog", "steps": 20}"#))
        .await
        .unwrap();
    let queued: Value =
        serde_json::from_str(socket.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    let id = queued["job_id"].as_str().unwrap().to_owned();
    drop(socket);
    s.gate.store(true, Ordering::SeqCst);
    eventually(async || {
        (s.get(&format!("/jobs/{id}")).await.1["status"] == "cancelled").then_some(())
    })
    .await;

    // A cancel message works too; bad first messages get an error event.
    let (mut socket, _) = tokio_tungstenite::connect_async(s.ws("/ws/generate"))
        .await
        .unwrap();
    socket.send(Message::text("{not json")).await.unwrap();
    let error: Value =
        serde_json::from_str(socket.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        (error["type"].as_str(), error["error"]["code"].as_str()),
        (Some("error"), Some("invalid_json"))
    );
    s.gate.store(false, Ordering::SeqCst);
    let (mut socket, _) = tokio_tungstenite::connect_async(s.ws("/ws/generate"))
        .await
        .unwrap();
    socket
        .send(Message::text(r#"{"prompt": "a bird", "steps": 20}"#))
        .await
        .unwrap();
    socket.next().await.unwrap().unwrap();
    socket
        .send(Message::text(r#"{"type": "cancel"}"#))
        .await
        .unwrap();
    s.gate.store(true, Ordering::SeqCst);
    let mut last = Value::Null;
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        last = serde_json::from_str(&text).unwrap();
    }
    assert_eq!(last["status"], "cancelled");
}

#[tokio::test]
async fn training_upload_streams_to_the_job_folder_and_runs_to_a_lora() {
    let s = studio(Duration::ZERO, 4, 1 << 20).await;
    let png = tiny_png(16, 16);
    let zip = zip_of(&[
        ("set/a.png", &png),
        ("set/a.txt", b"caption"),
        ("b.PNG", &png),
        ("notes.md", b"x"),
    ]);
    let (status, accepted) = s
        .upload(
            zip.clone(),
            r#"["realistic", "detailed", "high quality"]"#,
            &[("rank", "8")],
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["model_id"].as_str().unwrap().to_owned();
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["dataset_images"], 2);
    assert_eq!(accepted["settings"], json!({"rank": 8}));
    // The ZIP is stored byte for byte in the job's own folder, and nowhere else.
    assert_eq!(
        std::fs::read(s.data.join("jobs").join(&id).join("dataset.zip")).unwrap(),
        zip
    );
    assert_eq!(s.job_dirs(), vec![id.clone()]);
    assert_eq!(std::fs::read_dir(s.data.join("images")).unwrap().count(), 0);

    let status = eventually(async || {
        let (_, status) = s.get(&format!("/train/status/{id}")).await;
        (status["status"] == "completed").then_some(status)
    })
    .await;
    assert_eq!(
        (status["step"].as_u64(), status["total_steps"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(status["loss"], json!(0.25));
    assert_eq!(status["error"], Value::Null);
    assert_eq!(
        status["keywords"],
        json!(["realistic", "detailed", "high quality"])
    );

    // Replay of a finished job: the whole log, in order, then the socket closes.
    let (mut socket, _) = tokio_tungstenite::connect_async(s.ws(&format!("/ws/train/{id}")))
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        events.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["status", "status", "log", "status", "step", "step", "sample", "step", "step", "status"]
    );
    let sample_url = events[6]["url"].as_str().unwrap();
    let sample = s
        .http
        .get(format!("{}{sample_url}", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(sample.headers()["content-type"], "image/png");

    let (_, loras) = s.get("/loras/").await;
    assert_eq!(loras["loras"][0]["model_id"], id.as_str());
    let file = s
        .http
        .get(format!("{}/loras/{id}", s.url))
        .send()
        .await
        .unwrap();
    assert!(file.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains(&format!("{id}.safetensors")));
    assert_eq!(file.bytes().await.unwrap().as_ref(), b"fake safetensors");
    // The trained LoRA is usable at once, its keywords put in front of the prompt.
    let (status, body) = s
        .post(
            "/generate/",
            json!({"prompt": "a cat", "lora": id, "steps": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt"], "realistic, detailed, high quality, a cat");
    // A finished job resumes only when interrupted, cancelled or failed.
    let (status, _) = s.post(&format!("/train/{id}/resume"), json!({})).await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn training_websocket_follows_a_live_job_to_its_end() {
    let s = studio(Duration::ZERO, 4, 1 << 20).await;
    let (status, accepted) = s
        .upload(zip_of(&[("a.png", &tiny_png(16, 16))]), "one, two", &[])
        .await;
    assert_eq!(status, 202);
    assert_eq!(accepted["keywords"], json!(["one", "two"]));
    let id = accepted["model_id"].as_str().unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(s.ws(&format!("/ws/train/{id}")))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut last = Value::Null;
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        last = serde_json::from_str(&text).unwrap();
        seqs.push(last["seq"].as_u64().unwrap());
    }
    assert_eq!(last["status"], "completed");
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no event lost or repeated"
    );
}

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_nothing_behind() {
    let s = studio(Duration::ZERO, 4, 64 << 10).await;
    let (status, body) = s.upload(b"not a zip".to_vec(), "a", &[]).await;
    assert_eq!(
        (status, error_code(&body.to_string())),
        (422, "invalid_dataset".into())
    );
    let (status, body) = s.upload(zip_of(&[("readme.txt", b"x")]), "a", &[]).await;
    assert_eq!(status, 422);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no png"));
    let png = tiny_png(16, 16);
    let (status, _) = s.upload(zip_of(&[("a.png", &png)]), "[1, 2]", &[]).await;
    assert_eq!(status, 422);
    let (status, body) = s
        .upload(zip_of(&[("a.png", &png)]), "a", &[("rank", "\"big\"")])
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = s
        .upload(zip_of(&[("a.png", &vec![7u8; 100 << 10])]), "a", &[])
        .await;
    assert_eq!(
        (status, error_code(&body.to_string())),
        (413, "too_large".into())
    );
    let form = reqwest::multipart::Form::new().text("keywords", "a");
    let response = s
        .http
        .post(format!("{}/train/", s.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let response = s
        .http
        .post(format!("{}/train/", s.url))
        .json(&json!({"keywords": ["a"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert!(
        s.job_dirs().is_empty(),
        "refused uploads left {:?}",
        s.job_dirs()
    );
    let (_, jobs) = s.get("/jobs/").await;
    assert_eq!(jobs["jobs"], json!([]));
}
