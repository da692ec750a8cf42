//! A bounded load run against a studio on loopback, shared by the load test (`tests/load.rs`, which checks
//! the invariants) and the benchmark (`examples/load.rs`, which prints the figures): concurrent
//! `/classify/` and `/generate/` clients, and generation WebSocket clients of three kinds: ones that read
//! every event, slow ones that lag behind the stream, and ones that vanish mid-job without a close frame.
//! Every loop stops at the deadline and every request has a timeout, so a run always ends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct Plan {
    pub url: String,
    pub duration: Duration,
    pub classify_clients: usize,
    pub generate_clients: usize,
    pub ws_clients: usize,
    pub slow_ws_clients: usize,
    pub vanishing_ws_clients: usize,
    /// The generation request every client sends (small, so the run measures the server, not the model).
    pub request: Value,
    /// Longest wait for one answer; a request that takes longer counts as a hang (status 0).
    pub timeout: Duration,
}

/// Latency figures of one kind of request.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub requests: usize,
    /// HTTP status -> count; 0 counts timeouts and broken connections.
    pub statuses: BTreeMap<u16, usize>,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub classify: Figures,
    pub generate: Figures,
    /// WebSocket generations that ended with a result (fast and slow readers).
    pub ws_results: usize,
    /// WebSocket generations refused with a queue-full error event.
    pub ws_refused: usize,
    /// WebSocket sessions that ended any other way (should be none).
    pub ws_broken: usize,
    pub ws_vanished: usize,
    /// Server memory sampled from `/health` every 100 ms.
    pub rss_start_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_end_mib: f64,
    pub tasks_before: usize,
    /// Alive tasks once the server has settled after the run (jobs finished, sockets closed).
    pub tasks_after: usize,
}

/// (latency, status) of each request of one kind.
type Samples = Vec<(Duration, u16)>;

pub async fn run(plan: &Plan) -> Report {
    // Load goes through one pooled client, as a real client's keep-alive connections would; the checks use
    // their own unpooled one, so that once the load client is dropped the server's connection tasks end.
    let probe = reqwest::Client::builder()
        .timeout(plan.timeout)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let http = reqwest::Client::builder()
        .timeout(plan.timeout)
        .build()
        .unwrap();
    let before = health(&probe, &plan.url).await;
    let started = Instant::now();
    let deadline = started + plan.duration;

    let sampler = tokio::spawn(sample_memory(probe.clone(), plan.url.clone(), deadline));
    let mut classify = Vec::new();
    for i in 0..plan.classify_clients {
        classify.push(tokio::spawn(classify_client(
            http.clone(),
            plan.clone(),
            deadline,
            i,
        )));
    }
    let mut generate = Vec::new();
    for _ in 0..plan.generate_clients {
        generate.push(tokio::spawn(generate_client(
            http.clone(),
            plan.clone(),
            deadline,
        )));
    }
    let mut sockets = Vec::new();
    for (kind, n) in [
        (Reader::Fast, plan.ws_clients),
        (Reader::Slow, plan.slow_ws_clients),
        (Reader::Vanishing, plan.vanishing_ws_clients),
    ] {
        for _ in 0..n {
            sockets.push(tokio::spawn(ws_client(plan.clone(), deadline, kind)));
        }
    }

    let mut report = Report {
        classify: figures(join_samples(classify).await, started.elapsed()),
        generate: figures(join_samples(generate).await, started.elapsed()),
        ..Report::default()
    };
    for socket in sockets {
        let (results, refused, broken, vanished) = socket.await.unwrap();
        report.ws_results += results;
        report.ws_refused += refused;
        report.ws_broken += broken;
        report.ws_vanished += vanished;
    }
    report.seconds = started.elapsed().as_secs_f64();
    let rss = sampler.await.unwrap();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    report.rss_start_mib = mib(before["rss_bytes"].as_u64().unwrap_or(0));
    report.rss_peak_mib = mib(rss.iter().copied().max().unwrap_or(0));
    report.tasks_before = before["tasks"].as_u64().unwrap_or(0) as usize;
    drop(http);
    let after = settle(&probe, &plan.url).await;
    report.rss_end_mib = mib(after["rss_bytes"].as_u64().unwrap_or(0));
    report.tasks_after = after["tasks"].as_u64().unwrap_or(0) as usize;
    report
}

async fn health(http: &reqwest::Client, url: &str) -> Value {
    http.get(format!("{url}/health"))
        .send()
        .await
        .expect("the server answers /health")
        .json()
        .await
        .unwrap()
}

/// Waits (up to 20 s) until no job is queued or running, then reads `/health`.
async fn settle(http: &reqwest::Client, url: &str) -> Value {
    for _ in 0..200 {
        let h = health(http, url).await;
        let busy: Value = http
            .get(format!("{url}/jobs/?status=running"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let idle =
            h["generation_queue"]["waiting"] == 0 && busy.as_array().is_none_or(|a| a.is_empty());
        if idle {
            // Connection tasks of the clients just dropped take a moment to end.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return health(http, url).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the server did not settle within 20 s after the load");
}

async fn sample_memory(http: reqwest::Client, url: String, deadline: Instant) -> Vec<u64> {
    let mut rss = Vec::new();
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{url}/health")).send().await {
            if let Ok(h) = r.json::<Value>().await {
                rss.extend(h["rss_bytes"].as_u64());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rss
}

const PROMPTS: [&str; 4] = [
    "a fox reading under a tree",
    "how are you today?",
    "can I see you in the kitchen?",
    "draw a lighthouse at dawn, watercolor",
];

async fn classify_client(
    http: reqwest::Client,
    plan: Plan,
    deadline: Instant,
    seed: usize,
) -> Samples {
    let mut samples = Vec::new();
    let mut i = seed;
    while Instant::now() < deadline {
        let body = json!({ "prompt": PROMPTS[i % PROMPTS.len()] });
        i += 1;
        let sample = timed(http.post(format!("{}/classify/", plan.url)).json(&body)).await;
        back_off_when_refused(sample.1).await;
        samples.push(sample);
    }
    samples
}

async fn generate_client(http: reqwest::Client, plan: Plan, deadline: Instant) -> Samples {
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        let sample = timed(
            http.post(format!("{}/generate/", plan.url))
                .json(&plan.request),
        )
        .await;
        back_off_when_refused(sample.1).await;
        samples.push(sample);
    }
    samples
}

/// A full queue: wait a little, as a polite client would, instead of spinning.
async fn back_off_when_refused(status: u16) {
    if status == 429 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn timed(request: reqwest::RequestBuilder) -> (Duration, u16) {
    let t = Instant::now();
    let status = match request.send().await {
        // The whole body counts: a response is only done once it has been read.
        Ok(r) => {
            let status = r.status().as_u16();
            match r.bytes().await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    };
    (t.elapsed(), status)
}

async fn join_samples(tasks: Vec<tokio::task::JoinHandle<Samples>>) -> Samples {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn figures(mut samples: Samples, elapsed: Duration) -> Figures {
    let mut f = Figures {
        requests: samples.len(),
        per_second: samples.len() as f64 / elapsed.as_secs_f64(),
        ..Figures::default()
    };
    for (_, status) in &samples {
        *f.statuses.entry(*status).or_default() += 1;
    }
    // Latency of the answered requests only: a 429 is instant and would flatter the figures.
    samples.retain(|(_, s)| *s == 200);
    samples.sort();
    let ms = |i: usize| {
        samples
            .get(i)
            .map_or(0.0, |(d, _)| d.as_secs_f64() * 1000.0)
    };
    if !samples.is_empty() {
        let n = samples.len();
        f.p50_ms = ms(n / 2);
        f.p99_ms = ms((n * 99 / 100).min(n - 1));
        f.max_ms = ms(n - 1);
    }
    f
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Reader {
    Fast,
    /// Reads an event every 200 ms: the stream outpaces it.
    Slow,
    /// Drops the TCP connection (no close frame) after the first event.
    Vanishing,
}

/// (results, refused, broken, vanished)
async fn ws_client(plan: Plan, deadline: Instant, kind: Reader) -> (usize, usize, usize, usize) {
    let url = format!("{}/ws/generate", plan.url.replacen("http", "ws", 1));
    let mut counts = (0, 0, 0, 0);
    while Instant::now() < deadline {
        let session = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.ok()?;
            ws.send(Message::text(plan.request.to_string()))
                .await
                .ok()?;
            let mut result = false;
            while let Some(message) = ws.next().await {
                let Ok(Message::Text(text)) = message else {
                    break;
                };
                if kind == Reader::Vanishing {
                    return Some(Outcome::Vanished);
                }
                let event: Value = serde_json::from_str(&text).ok()?;
                match event["type"].as_str() {
                    Some("result") => result = true,
                    Some("error") if event["error"]["code"] == "queue_full" => {
                        return Some(Outcome::Refused)
                    }
                    _ => {}
                }
                if kind == Reader::Slow {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Some(if result {
                Outcome::Result
            } else {
                Outcome::Broken
            })
        };
        match tokio::time::timeout(plan.timeout, session).await {
            Ok(Some(Outcome::Result)) => counts.0 += 1,
            Ok(Some(Outcome::Refused)) => {
                counts.1 += 1;
                back_off_when_refused(429).await;
            }
            Ok(Some(Outcome::Vanished)) => counts.3 += 1,
            Ok(Some(Outcome::Broken) | None) | Err(_) => counts.2 += 1,
        }
    }
    counts
}

enum Outcome {
    Result,
    Refused,
    Broken,
    Vanished,
}
