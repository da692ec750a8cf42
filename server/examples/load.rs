//! The load benchmark: starts the studio binary (release build: run with `--release`) on a free loopback
//! port with flux-tiny on the CPU (generations take milliseconds, so it measures the server, not a model),
//! runs the load of `tests/common/load.rs` for `LOAD_SECONDS` (default 20), and prints
//! its figures as JSON: per-route throughput and p50/p99 latency, WebSocket outcomes, memory and tasks.
//!
//! cargo build --release -p server --bin studio && cargo run --release -p server --example load
//! Env: `LOAD_SECONDS`, `STUDIO_BIN` (default target/release/studio).

#[path = "../tests/common/load.rs"]
mod load;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::main]
async fn main() {
    let seconds: u64 =
        std::env::var("LOAD_SECONDS").map_or(20, |s| s.parse().expect("LOAD_SECONDS"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // STUDIO_BIN: another build of the studio (e.g. target/debug/studio, whose dependencies the workspace
    // builds optimised too).
    let studio = std::env::var_os("STUDIO_BIN").map_or_else(
        || root.join("target/release/studio"),
        std::path::PathBuf::from,
    );
    let data = std::env::temp_dir().join(format!("studio-load-{}", std::process::id()));
    let mut child = Command::new(&studio)
        .current_dir(&root)
        .args([
            "serve",
            "--port",
            "0",
            "--preset",
            "flux-tiny",
            "--device",
            "cpu",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e} (build it first)", studio.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("studio listening on ")
        .unwrap()
        .to_owned();
    let plan = load::Plan {
        url,
        duration: Duration::from_secs(seconds),
        classify_clients: 32,
        generate_clients: 8,
        ws_clients: 4,
        slow_ws_clients: 4,
        vanishing_ws_clients: 4,
        request: serde_json::json!({"prompt": "a fox reading under a tree", "steps": 4, "width": 64, "height": 64}),
        timeout: Duration::from_secs(60),
    };
    let report = load::run(&plan).await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);
}
