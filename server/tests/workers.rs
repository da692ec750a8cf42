//! Several workers in the real binary, on the CPU (`--workers`), with the real built-in and tiny models:
//! jobs run at once on different workers, a job goes to the worker that already holds its model, a
//! training run holds one worker while another serves generations, and every job completes exactly once.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use app::{EventBody, HealthResponse, JobList, JobStatus, WorkerState};
use common::Binary;
use serde_json::{json, Value};
use server::store::Store;

fn studio(data: &Path, workers: u32) -> Binary {
    Binary::start(
        data,
        &["--device", "cpu", "--workers", &workers.to_string()],
    )
}

async fn generate(http: &reqwest::Client, url: &str, request: Value) -> Value {
    let answer = http
        .post(format!("{url}/generate/"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

async fn job(http: &reqwest::Client, url: &str, id: &str) -> app::JobRecord {
    http.get(format!("{url}/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn health(http: &reqwest::Client, url: &str) -> HealthResponse {
    http.get(format!("{url}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// How many times the job's log says it completed.
fn completions(store: &Store, id: &str) -> usize {
    store
        .events_after(id, 0)
        .unwrap()
        .iter()
        .filter(|e| {
            e.body
                == EventBody::Status {
                    status: JobStatus::Completed,
                }
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn generations_run_at_once_on_different_workers_and_each_completes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let studio = studio(dir.path(), 2);
    let url = studio.url.clone();
    let http = reqwest::Client::new();
    let before = health(&http, &url).await;
    assert_eq!(before.workers.len(), 2, "{:?}", before.workers);
    assert!(before
        .workers
        .iter()
        .all(|w| w.device == "cpu" && w.state == WorkerState::Idle));

    let jobs: Vec<_> = (0..6u64)
        .map(|seed| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                generate(
                    &http,
                    &url,
                    json!({"prompt": "a fox", "steps": 8, "seed": seed}),
                )
                .await
            })
        })
        .collect();
    // While they run, /health shows both workers generating at the same moment.
    let mut both_busy = false;
    while !jobs.iter().all(|j| j.is_finished()) {
        let now = health(&http, &url).await;
        both_busy |= now
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Generating && w.current_job.is_some());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(both_busy, "the two workers never generated at once");

    let mut ids = HashSet::new();
    let mut per_worker: HashMap<u32, usize> = HashMap::new();
    for j in jobs {
        let body = j.await.unwrap();
        let id = body["job_id"].as_str().unwrap().to_owned();
        let record = job(&http, &url, &id).await;
        assert_eq!(record.status, JobStatus::Completed);
        *per_worker
            .entry(record.worker.expect("a worker ran it"))
            .or_default() += 1;
        ids.insert(id);
    }
    assert_eq!(ids.len(), 6);
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    let store = Store::open(&dir.path().join("studio.db")).unwrap();
    for id in &ids {
        assert_eq!(completions(&store, id), 1, "job {id}");
    }
    let list: JobList = http
        .get(format!("{url}/jobs/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.workers.len(), 2);
    assert!(list.workers.iter().all(|w| w.models == ["builtin-emoji"]));
    assert_eq!(
        list.workers.iter().map(|w| w.jobs_taken).sum::<u64>(),
        6,
        "{:?}",
        list.workers
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_for_a_resident_model_goes_to_the_worker_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let studio = studio(dir.path(), 2);
    let url = studio.url.clone();
    let http = reqwest::Client::new();
    let tiny = json!({"prompt": "a fox", "model": "flux-tiny", "steps": 2, "seed": 1});
    let emoji = json!({"prompt": "a fox", "model": "builtin-emoji", "steps": 2, "seed": 1});
    let worker_of = |body: Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            job(&http, &url, body["job_id"].as_str().unwrap())
                .await
                .worker
                .unwrap()
        }
    };
    let tiny_worker = worker_of(generate(&http, &url, tiny.clone()).await).await;
    // The other model goes to the worker that holds nothing rather than replace flux-tiny.
    let emoji_worker = worker_of(generate(&http, &url, emoji.clone()).await).await;
    assert_ne!(tiny_worker, emoji_worker);
    // From now on each model's jobs go where it is, however many jobs each worker has taken.
    for _ in 0..3 {
        assert_eq!(
            worker_of(generate(&http, &url, tiny.clone()).await).await,
            tiny_worker
        );
    }
    assert_eq!(
        worker_of(generate(&http, &url, emoji.clone()).await).await,
        emoji_worker
    );
    let workers = health(&http, &url).await.workers;
    assert_eq!(workers[tiny_worker as usize].models, ["flux-tiny"]);
    assert_eq!(workers[emoji_worker as usize].models, ["builtin-emoji"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_training_run_holds_one_worker_while_generations_complete_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("set.zip");
    let png = common::tiny_png(64, 64);
    std::fs::write(
        &zip,
        common::zip_of(&[("a.png", &png), ("b.png", &png), ("c.png", &png)]),
    )
    .unwrap();
    let data = dir.path().join("data");
    let studio = studio(&data, 2);
    let url = studio.url.clone();
    let http = reqwest::Client::new();
    let form = reqwest::multipart::Form::new()
        .part(
            "dataset",
            reqwest::multipart::Part::bytes(std::fs::read(&zip).unwrap()).file_name("set.zip"),
        )
        .text("keywords", r#"["zqx"]"#)
        .text("model", "flux-tiny")
        // Long enough to outlast the generations; cancelled at the end.
        .text("steps", "100000")
        .text("sample_every", "0")
        .text("checkpoint_every", "0");
    let accepted: Value = http
        .post(format!("{url}/train/"))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let training = accepted["model_id"].as_str().unwrap().to_owned();
    let trainer = common::eventually(async || {
        let record = job(&http, &url, &training).await;
        // `worker` is set when a worker claims the job, before it trains.
        record
            .worker
            .filter(|_| record.status == JobStatus::Training && record.step > 0)
    })
    .await;

    for seed in 0..3 {
        let body = generate(
            &http,
            &url,
            json!({"prompt": "a fox", "model": "builtin-emoji", "steps": 4, "seed": seed}),
        )
        .await;
        let record = job(&http, &url, body["job_id"].as_str().unwrap()).await;
        assert_ne!(
            record.worker,
            Some(trainer),
            "a generation waited on the trainer"
        );
    }
    let still = job(&http, &url, &training).await;
    assert_eq!(still.status, JobStatus::Training, "{still:?}");
    let workers = health(&http, &url).await.workers;
    assert_eq!(workers[trainer as usize].state, WorkerState::Training);
    assert_eq!(
        workers[trainer as usize].training_job.as_deref(),
        Some(training.as_str())
    );

    let cancelled = http
        .post(format!("{url}/jobs/{training}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success());
    common::eventually(async || {
        (job(&http, &url, &training).await.status == JobStatus::Cancelled).then_some(())
    })
    .await;
    // The trainer's worker is free again and takes generations.
    common::eventually(async || {
        let workers = health(&http, &url).await.workers;
        (workers[trainer as usize].state == WorkerState::Idle).then_some(())
    })
    .await;
}

#[test]
fn gpus_without_a_cuda_build_or_beside_workers_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_studio"))
            .current_dir(common::repo_root())
            .args(["serve", "--port", "0", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    if !cfg!(feature = "cuda") {
        let err = run(&["--gpus", "all"]);
        assert!(
            err.contains("--features cuda") && err.contains("--workers"),
            "{err}"
        );
    }
    let err = run(&["--gpus", "0,1", "--workers", "2"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = run(&["--gpus", "zero"]);
    assert!(err.contains("list of GPU numbers"), "{err}");
}
