//! A cluster on one machine, all real parts: a throwaway PostgreSQL (Debian's `initdb`), an S3-compatible
//! server (moto's, from PyPI: `bash scripts/s3`), two API nodes (`studio serve --api-only`) and three
//! worker nodes (`studio worker`) sharing them and nothing else (each node has its own data folder), on
//! the tiny model on the CPU. Every job submitted through either API node runs exactly once and a
//! user's token sees only that user's jobs on every node; a worker killed mid-job, an API node killed
//! under its WebSockets and PostgreSQL restarting lose nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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
    fn start(data: &Path, url: &str, name: &str, s3: &S3) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_studio"))
            .current_dir(common::repo_root())
            .envs(s3.env())
            .args(["worker", "--preset", "flux-tiny", "--device", "cpu"])
            .args(["--file-store", "s3://studio"])
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

/// moto's S3-compatible server on a free port, with one bucket (`studio`); killed on drop.
struct S3 {
    server: Child,
    port: u16,
}

impl S3 {
    fn start() -> S3 {
        let program = std::env::var_os("STUDIO_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| common::repo_root().join("target/s3/bin/moto_server"));
        assert!(
            program.is_file(),
            "the cluster's tests need an S3-compatible server: run `bash scripts/s3` (moto's, from PyPI, \
             into target/s3), or set STUDIO_MOTO_SERVER to a moto_server"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let s3 = S3 { server, port };
        for _ in 0..300 {
            if make_bucket(port).is_ok_and(|status| status.contains(" 200 ")) {
                return s3;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("moto_server did not answer on port {port} in 30 s");
    }

    /// What a node needs to reach it (object_store reads the usual AWS variables).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "studio".into()),
            ("AWS_SECRET_ACCESS_KEY", "studio-secret".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// `PUT /studio`: moto makes the bucket without checking a signature. Its status line.
fn make_bucket(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port))?;
    http.write_all(
        b"PUT /studio HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )?;
    let mut answer = String::new();
    http.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

struct Cluster {
    postgres: ThrowawayPostgres,
    s3: S3,
    /// Each node's own data folder is a folder of this one, named after the node.
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let postgres = ThrowawayPostgres::start()
            .expect("the cluster's tests need Debian's postgresql: run `bash scripts/postgres`");
        studio(&["migrate", "--database", &postgres.url()]);
        Cluster {
            postgres,
            s3: S3::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        self.postgres.url()
    }

    fn folder(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    fn api(&self, name: &str) -> Binary {
        let env = self.s3.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Binary::start_with_env(
            &common::repo_root(),
            &self.folder(name),
            &[
                "--file-store",
                "s3://studio",
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
            &env,
        )
    }

    fn worker(&self, name: &str) -> Worker {
        Worker::start(&self.folder(name), &self.url(), name, &self.s3)
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

/// Runs a `studio` command to its end; its standard output.
fn studio(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "studio {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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
    // Either API node shows every node's workers, as their heartbeats announce them.
    assert_eq!(worker_nodes(&apis[0]).await, ["w1", "w2", "w3"]);
    // Either API node lists all of them, and every worker took its share.
    let (_, listed) = apis[1].get("/jobs/?limit=200").await;
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 100);
    let nodes: Vec<String> = cluster
        .sql("SELECT DISTINCT node FROM jobs ORDER BY node")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(nodes, ["w1", "w2", "w3"]);
    // Nothing but the store and the file store is shared: an image is in the folder of the one worker
    // that made it (and of the API node whose client waited for it); the other API node, serving it,
    // fetches it from the file store. Its LoRAs likewise.
    let job = &generations[1]; // sent through API node 2
    let image = |node: &str| {
        let name = format!("{job}.png");
        cluster.folder(node).join("images").join(name).is_file()
    };
    let makers = ["w1", "w2", "w3"].iter().filter(|n| image(n)).count();
    assert_eq!(makers, 1);
    assert!(!image("api-1"));
    assert_eq!(apis[0].get(&format!("/images/{job}")).await.0, 200);
    assert!(image("api-1"));
    let (status, _) = apis[1].get(&format!("/loras/{}", trainings[0])).await;
    assert_eq!(status, 200);
    // A LoRA trained on one worker, used through the other API node by whichever worker claims it.
    let styled = generate(
        &apis[1],
        json!({"prompt": "a fox", "steps": 2, "lora": trainings[0]}),
    )
    .await;
    assert_eq!(
        styled["loras"][0]["name"],
        trainings[0].as_str(),
        "{styled}"
    );

    // A user's token, made against the shared store, works on every node and sees only that user's
    // jobs (from now on every request needs a token).
    let token = studio(&[
        "token",
        "create",
        "--user",
        "alice",
        "--database",
        &cluster.url(),
    ]);
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

/// The nodes of the workers an API node's `/health` lists.
async fn worker_nodes(api: &Api) -> Vec<String> {
    let (status, health) = api.get("/health").await;
    assert_eq!(status, 200, "{health}");
    let mut nodes: Vec<String> = health["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w["node"]
                .as_str()
                .expect("a cluster's worker names its node")
                .to_owned()
        })
        .collect();
    nodes.dedup();
    nodes
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
    // The killed worker leaves the cluster's list once its lease runs out.
    let mut left = false;
    for _ in 0..100 {
        if !worker_nodes(&api2).await.contains(&trainer) {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left, "{trainer} was killed but is still listed");
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
