//! A cluster on one machine, all real parts: a throwaway PostgreSQL (Debian's `initdb`), two API nodes
//! (`studio serve --api-only`) and three worker nodes (`studio worker`) sharing it and one data folder,
//! on the tiny model on the CPU. Every job submitted through either API node runs exactly once and a
//! user's token sees only that user's jobs on every node; a worker killed mid-job, an API node killed
//! under its WebSockets and PostgreSQL restarting lose nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Api, Binary};
use futures_util::StreamExt;
use serde_json::{json, Value};
use server::store::throwaway::ThrowawayPostgres;
use tokio_tungstenite::tungstenite::Message;

/// Seconds a node holds a job without a heartbeat: short, so a killed worker's jobs come back soon.
const LEASE: &str = "2";

/// A `studio worker` process, killed (SIGKILL) on drop.
struct Worker(Child);

impl Worker {
    fn start(data: &Path, url: &str, name: &str) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_studio"))
            .current_dir(common::repo_root())
            .args(["worker", "--preset", "flux-tiny", "--device", "cpu"])
            .args([
                "--database",
                url,
                "--node-name",
                name,
                "--lease-seconds",
                LEASE,
            ])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting studio worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "studio worker ready", "worker {name}");
        Worker(child)
    }

    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    postgres: ThrowawayPostgres,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let postgres = ThrowawayPostgres::start()
            .expect("the cluster's tests need Debian's postgresql: run `bash scripts/postgres`");
        let out = Command::new(env!("CARGO_BIN_EXE_studio"))
            .args(["migrate", "--database", &postgres.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            postgres,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        self.postgres.url()
    }

    fn api(&self, name: &str) -> Binary {
        Binary::start(
            self.dir.path(),
            &[
                "--api-only",
                "--preset",
                "flux-tiny",
                "--device",
                "cpu",
                "--database",
                &self.url(),
                "--node-name",
                name,
                "--generation-queue",
                "200",
                "--lease-seconds",
                LEASE,
            ],
        )
    }

    fn worker(&self, name: &str) -> Worker {
        Worker::start(self.dir.path(), &self.url(), name)
    }

    /// One SQL query's rows, straight from PostgreSQL (its blocking client, off the async runtime).
    fn sql(&self, query: &str) -> Vec<postgres::Row> {
        tokio::task::block_in_place(|| {
            let mut client = postgres::Client::connect(&self.url(), postgres::NoTls).unwrap();
            client.query(query, &[]).unwrap()
        })
    }

    /// The node that holds a job now.
    fn node_of(&self, job: &str) -> Option<String> {
        self.sql(&format!("SELECT node FROM jobs WHERE id = '{job}'"))
            .first()
            .and_then(|row| row.get(0))
    }
}

fn dataset() -> Vec<u8> {
    let images: Vec<Vec<u8>> = (0..3).map(|_| common::tiny_png(64, 64)).collect();
    common::zip_of(&[
        ("a.png", &images[0]),
        ("b.png", &images[1]),
        ("c.png", &images[2]),
    ])
}

async fn generate(api: &Api, body: Value) -> Value {
    let (status, answer) = api.post("/generate/", body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn train(api: &Api, settings: &[(&str, &str)]) -> String {
    let (status, answer) = api.upload(dataset(), r#"["k"]"#, settings).await;
    assert_eq!(status, 202, "{answer}");
    answer["model_id"].as_str().unwrap().to_owned()
}

async fn wait_for(api: &Api, job: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1200 {
        let (_, record) = api.get(&format!("/jobs/{job}")).await;
        assert_ne!(record["status"], "failed", "{record}");
        if done(&record) {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job} did not get there in 120 s");
}

/// The job's statuses in its log, in order.
fn statuses(cluster: &Cluster, job: &str) -> Vec<String> {
    cluster
        .sql(&format!(
            "SELECT body FROM events WHERE job_id = '{job}' ORDER BY seq"
        ))
        .iter()
        .filter_map(|row| {
            let body: Value = serde_json::from_str(row.get::<_, &str>(0)).unwrap();
            (body["type"] == "status").then(|| body["status"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_jobs_over_two_api_nodes_each_run_exactly_once_on_three_workers() {
    let cluster = Cluster::new();
    let (first, second) = (cluster.api("api-1"), cluster.api("api-2"));
    let _workers: Vec<Worker> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| cluster.worker(n))
        .collect();
    let apis = [Api::new(first.url.clone()), Api::new(second.url.clone())];

    // 4 training runs and 96 generations, alternating between the API nodes, all at once.
    let mut trainings = Vec::new();
    for i in 0..4 {
        trainings.push(train(&apis[i % 2], &[("steps", "4"), ("sample_every", "0")]).await);
    }
    let generations = futures_util::future::join_all((0..96u64).map(|i| {
        let api = apis[i as usize % 2].clone();
        async move {
            let body = json!({"prompt": format!("a fox, take {i}"), "steps": 2, "seed": i});
            generate(&api, body).await["job_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }))
    .await;
    for id in &trainings {
        wait_for(&apis[0], id, |r| r["status"] == "completed").await;
    }

    let mut all = generations.clone();
    all.extend(trainings.iter().cloned());
    for job in &all {
        let statuses = statuses(&cluster, job);
        let started = statuses
            .iter()
            .filter(|s| *s == "running" || *s == "preparing")
            .count();
        assert_eq!(
            started, 1,
            "job {job} started {started} times: {statuses:?}"
        );
        assert_eq!(
            statuses.last().map(String::as_str),
            Some("completed"),
            "{job}"
        );
    }
    // Either API node lists all of them, and every worker took its share.
    let (_, listed) = apis[1].get("/jobs/?limit=200").await;
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 100);
    let nodes: Vec<String> = cluster
        .sql("SELECT DISTINCT node FROM jobs ORDER BY node")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(nodes, ["w1", "w2", "w3"]);
    // Images and LoRAs written by the workers are served by the API nodes.
    assert_eq!(
        apis[0].get(&format!("/images/{}", generations[1])).await.0,
        200
    );
    let (status, _) = apis[1].get(&format!("/loras/{}", trainings[0])).await;
    assert_eq!(status, 200);

    // A user's token, made against the shared store, works on every node and sees only that user's
    // jobs (from now on every request needs a token).
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args([
            "token",
            "create",
            "--user",
            "alice",
            "--database",
            &cluster.url(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let alice = |api: &Api| api.with_token(Some(token.trim()));
    let hers = generate(
        &alice(&apis[1]),
        json!({"prompt": "alice's fox", "steps": 2}),
    )
    .await;
    let (_, listed) = alice(&apis[0]).get("/jobs/?limit=200").await;
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [hers["job_id"].as_str().unwrap()]);
    assert_eq!(apis[0].get("/jobs/").await.0, 401);
}

/// Every event of a job's training stream until the server closes it (or goes away).
async fn stream(url: &str, job: &str, into: &mut Vec<Value>) {
    let ws = format!("{}/ws/train/{job}", url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        into.push(serde_json::from_str::<Value>(&text).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_workers_a_killed_api_node_and_a_postgresql_restart_lose_nothing() {
    let cluster = Cluster::new();
    let (first, second) = (cluster.api("api-1"), cluster.api("api-2"));
    let mut workers: Vec<(String, Worker)> = ["w1", "w2"]
        .iter()
        .map(|n| (n.to_string(), cluster.worker(n)))
        .collect();
    let kill = |workers: &mut Vec<(String, Worker)>, name: &str| {
        let at = workers
            .iter()
            .position(|(n, _)| n == name)
            .expect("a running worker");
        workers.remove(at).1.kill();
    };
    let (api1, api2) = (Api::new(first.url.clone()), Api::new(second.url.clone()));

    // A training run, watched live through API node 1.
    let run = train(
        &api1,
        &[
            ("steps", "40"),
            ("sample_every", "0"),
            ("checkpoint_every", "4"),
        ],
    )
    .await;
    let live = {
        let (url, run) = (first.url.clone(), run.clone());
        tokio::spawn(async move {
            let mut events = Vec::new();
            stream(&url, &run, &mut events).await;
            events
        })
    };
    let record = wait_for(&api2, &run, |r| r["step"].as_u64().unwrap_or(0) >= 9).await;
    let trainer = cluster.node_of(&run).expect("a node holds the run");
    // kill -9 of the worker mid-run, and of the API node under the WebSocket.
    kill(&mut workers, &trainer);
    first.kill();
    let before_kill = live.await.unwrap();
    assert!(
        before_kill.iter().any(|e| e["type"] == "step"),
        "the live stream showed no step before the kill"
    );

    // A generation long enough to be killed in the middle, through API node 2.
    workers.push(("w3".into(), cluster.worker("w3")));
    let long = {
        let api = api2.clone();
        tokio::spawn(async move {
            generate(&api, json!({"prompt": "a long fox", "steps": 100, "width": 128, "height": 128, "seed": 5}))
                .await
        })
    };
    let job = loop {
        let (_, list) = api2.get("/jobs/?kind=generation&status=running").await;
        if let Some(id) = list["jobs"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let node = cluster.node_of(&job).expect("a node runs the generation");
    kill(&mut workers, &node);
    workers.push(("w4".into(), cluster.worker("w4")));

    // PostgreSQL itself stops as in a crash and comes back while jobs wait and run.
    let batch = futures_util::future::join_all((0..6u64).map(|i| {
        let api = api2.clone();
        async move { generate(&api, json!({"prompt": "a fox", "steps": 2, "seed": i})).await }
    }));
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.postgres.stop().unwrap();
        cluster.postgres.start_server().unwrap();
    };
    let (answers, ()) = tokio::join!(batch, restart);
    assert_eq!(answers.len(), 6);

    // The killed generation ran again elsewhere and answered its waiting client.
    let answer = long.await.unwrap();
    assert_eq!(answer["job_id"], job.as_str());
    let statuses = statuses(&cluster, &job);
    assert_eq!(
        statuses.iter().filter(|s| *s == "running").count(),
        2,
        "{statuses:?}"
    );

    // The training run resumed from its checkpoint on another worker; a client reconnecting to the
    // other API node gets the whole story replayed, then the rest live.
    let done = wait_for(&api2, &run, |r| r["status"] == "completed").await;
    assert_eq!(done["step"], 40);
    assert!(record["step"].as_u64().unwrap() >= 9);
    let mut replayed = Vec::new();
    stream(&second.url, &run, &mut replayed).await;
    assert!(
        replayed.iter().any(|e| e["type"] == "log"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("resumed from the checkpoint at step "))),
        "the run started over instead of resuming"
    );
    assert_eq!(replayed.last().unwrap()["status"], "completed");
    let seqs: Vec<u64> = replayed.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gaps in {seqs:?}"
    );
}
