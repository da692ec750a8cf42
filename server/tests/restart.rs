//! Restarts, kill -9 included: every job is still listed, unfinished ones become `interrupted` (and can be
//! resumed), finished ones are kept as they were, and their logs replay.

mod common;

use app::{EventBody, JobEvent, JobKind, JobStatus};
use common::{curl, Binary};
use futures_util::StreamExt;
use serde_json::{json, Value};
use server::store::{now_ms, Store};
use tokio_tungstenite::tungstenite::Message;

const RUNNING: &str = "11111111-1111-4111-8111-111111111111";
const DONE: &str = "22222222-2222-4222-8222-222222222222";

fn status_event(job: &str, seq: u64, status: JobStatus) -> JobEvent {
    JobEvent {
        job_id: job.into(),
        seq,
        at: now_ms(),
        body: EventBody::Status { status },
    }
}

/// A database as a killed server leaves it: one training run mid-way, one generation finished.
fn seed_database(data: &std::path::Path) {
    std::fs::create_dir_all(data).unwrap();
    let store = Store::open(&data.join("studio.db")).unwrap();
    let params =
        json!({"keywords": ["k"], "settings": {}, "dataset_bytes": 1, "dataset_images": 1});
    store
        .insert_job(RUNNING, JobKind::Training, &params, None, None)
        .unwrap();
    store
        .record_event(&status_event(RUNNING, 1, JobStatus::Queued))
        .unwrap();
    store
        .record_event(&status_event(RUNNING, 2, JobStatus::Training))
        .unwrap();
    let step = EventBody::Step {
        step: 5,
        total: 10,
        loss: Some(0.5),
        learning_rate: Some(1e-4),
        seconds_per_step: Some(0.5),
        eta_seconds: Some(2.5),
        preview: None,
        image: None,
    };
    store
        .record_event(&JobEvent {
            job_id: RUNNING.into(),
            seq: 3,
            at: now_ms(),
            body: step,
        })
        .unwrap();
    store
        .insert_job(
            DONE,
            JobKind::Generation,
            &json!({"prompt": "p"}),
            None,
            None,
        )
        .unwrap();
    store
        .record_event(&status_event(DONE, 1, JobStatus::Completed))
        .unwrap();
    store
        .set_result(DONE, &json!({"image": format!("/images/{DONE}")}))
        .unwrap();
}

fn statuses(url: &str) -> Vec<(String, String)> {
    let (_, body) = curl(&[&format!("{url}/jobs/")]);
    let jobs: Value = serde_json::from_str(&body).unwrap();
    let mut list: Vec<(String, String)> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().to_owned(),
                j["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

#[tokio::test]
async fn a_running_job_is_interrupted_after_a_kill_and_finished_ones_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    seed_database(dir.path());
    let s = Binary::start(dir.path(), &[]);
    let expected = vec![
        (RUNNING.to_owned(), "interrupted".to_owned()),
        (DONE.to_owned(), "completed".to_owned()),
    ];
    assert_eq!(statuses(&s.url), expected);
    let (_, body) = curl(&[&format!("{}/train/status/{RUNNING}", s.url)]);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            status["status"].as_str(),
            status["step"].as_u64(),
            status["loss"].as_f64()
        ),
        (Some("interrupted"), Some(5), Some(0.5))
    );
    let (_, body) = curl(&[&format!("{}/jobs/{DONE}", s.url)]);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["result"]["image"],
        format!("/images/{DONE}")
    );

    // The training stream replays the log, the interruption last, then closes.
    let ws = format!("{}/ws/train/{RUNNING}", s.url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let mut events = Vec::new();
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        events.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    let kinds: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["status"].as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("status", Some("queued")),
            ("status", Some("training")),
            ("step", None),
            ("status", Some("interrupted"))
        ]
    );

    // kill -9 and start again: the same jobs, the same states, no second interruption event.
    s.kill();
    let s = Binary::start(dir.path(), &[]);
    assert_eq!(statuses(&s.url), expected);
    let (_, body) = curl(&[&format!("{}/jobs/{RUNNING}", s.url)]);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "interrupted"
    );
    // This seeded job has no dataset on disk: resuming says so.
    let (status, body) = curl(&["-X", "POST", &format!("{}/train/{RUNNING}/resume", s.url)]);
    assert!(body.contains("upload it again"), "{body}");
    assert_eq!(
        (status, common::error_code(&body)),
        (409, "conflict".into())
    );
}
