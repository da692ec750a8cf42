//! Load on loopback, bounded in time, against the real binary (flux-tiny on the CPU, the real classifier):
//! many concurrent `/classify/` and `/generate/` requests and generation WebSockets (fast, slow and
//! vanishing readers) with small queues. Everything is answered (200, or 429 when a queue is full), nothing
//! hangs, the server settles back to its idle task count (no leaked task), and memory stays bounded.
//! `cargo run --release -p server --example load` prints the same run's figures.

mod common;

use std::time::Duration;

use common::{load, require_classifier_encoder, Binary};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_get_answers_or_429_and_nothing_leaks() {
    require_classifier_encoder();
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(
        dir.path(),
        // flux-tiny: generations take milliseconds, so the run measures the server, not the model.
        &[
            "--preset",
            "flux-tiny",
            "--device",
            "cpu",
            "--generation-queue",
            "4",
            "--classify-queue",
            "8",
        ],
    );
    let plan = load::Plan {
        url: server.url.clone(),
        duration: Duration::from_secs(6),
        classify_clients: 16,
        generate_clients: 6,
        ws_clients: 3,
        slow_ws_clients: 2,
        vanishing_ws_clients: 2,
        request: json!({"prompt": "a fox reading under a tree", "steps": 2, "width": 64, "height": 64}),
        timeout: Duration::from_secs(30),
    };
    let report = load::run(&plan).await;
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());

    for (route, f) in [
        ("classify", &report.classify),
        ("generate", &report.generate),
    ] {
        assert!(
            f.statuses.get(&200).copied().unwrap_or(0) > 0,
            "{route}: nothing answered"
        );
        let other: Vec<_> = f
            .statuses
            .keys()
            .filter(|s| ![200, 429].contains(*s))
            .collect();
        assert!(
            other.is_empty(),
            "{route}: statuses other than 200/429 (0 = hang): {other:?}"
        );
    }
    assert!(
        report.classify.statuses.contains_key(&429),
        "16 classify clients against 8 slots should have met a full queue"
    );
    assert!(report.ws_results > 0, "no WebSocket generation finished");
    assert_eq!(
        report.ws_broken, 0,
        "WebSocket sessions that ended without a result"
    );
    assert!(report.ws_vanished > 0);
    // Idle again: every connection, stream and job waiter of the run has ended.
    assert!(
        report.tasks_after <= report.tasks_before + 2,
        "tasks before {} after {}",
        report.tasks_before,
        report.tasks_after
    );
    assert!(
        report.rss_peak_mib < report.rss_start_mib + 512.0,
        "memory grew from {:.0} MiB to {:.0} MiB",
        report.rss_start_mib,
        report.rss_peak_mib
    );
}
