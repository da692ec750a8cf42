//! LoRAs through the real binary on the CPU (flux-tiny): `/generate/` with a file of the LoRA folder,
//! with `"none"`, with bad names; `studio generate --lora`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{curl, error_code, repo_root, Binary};
use serde_json::{json, Value};

fn fixture_loras() -> PathBuf {
    repo_root().join("engine/tests/fixtures/lora")
}

fn server() -> (tempfile::TempDir, Binary) {
    let dir = tempfile::tempdir().unwrap();
    let loras = fixture_loras();
    let binary = Binary::start(
        dir.path(),
        &[
            "--preset",
            "flux-tiny",
            "--lora-dir",
            loras.to_str().unwrap(),
        ],
    );
    (dir, binary)
}

fn generate(s: &Binary, body: Value) -> (u16, Value) {
    let (status, text) = curl(&[
        "-X",
        "POST",
        &format!("{}/generate/", s.url),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body.to_string(),
    ]);
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

#[test]
fn a_lora_of_the_folder_is_applied_and_named() {
    let (_dir, s) = server();
    let (status, plain) = generate(&s, json!({"prompt": "a fox", "seed": 5, "lora": "none"}));
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["loras"], json!([]));
    // flux-tiny has no LoRA of its own.
    let (_, default) = generate(&s, json!({"prompt": "a fox", "seed": 5}));
    assert_eq!(default["loras"], json!([]));
    assert_eq!(default["image"], plain["image"]);

    let (status, with) = generate(
        &s,
        json!({"prompt": "a fox", "seed": 5, "lora": "kohya_full", "lora_scale": 0.5}),
    );
    assert_eq!(status, 200, "{with}");
    assert_eq!(with["loras"], json!([{"name": "kohya_full", "scale": 0.5}]));
    assert_ne!(with["image"], plain["image"], "the LoRA changed nothing");

    // The extension may be given; text-encoder modules are reported, not dropped in silence.
    let (status, kohya) = generate(
        &s,
        json!({"prompt": "a fox", "seed": 5, "lora": "kohya.safetensors"}),
    );
    assert_eq!(status, 200, "{kohya}");
    assert_eq!(kohya["loras"][0]["name"], "kohya.safetensors");
    assert_eq!(kohya["loras"][0]["skipped"].as_array().unwrap().len(), 2);

    // The adapters belong to one request: the next one without a LoRA is the plain model again.
    let (_, again) = generate(&s, json!({"prompt": "a fox", "seed": 5, "lora": "none"}));
    assert_eq!(again["image"], plain["image"]);
}

#[test]
fn bad_lora_names_are_refused_with_the_reason() {
    let (_dir, s) = server();
    let (status, body) = generate(&s, json!({"prompt": "a fox", "lora": "no-such-lora"}));
    assert_eq!(status, 422, "{body}");
    let text = body.to_string();
    assert_eq!(error_code(&text), "validation");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no-such-lora"), "{message}");
    assert!(
        message.contains("kohya.safetensors"),
        "lists the folder: {message}"
    );
    // Server paths are not LoRA names.
    for path in [
        "../../etc/passwd",
        "/etc/passwd",
        "owner/repo:../x.safetensors",
    ] {
        let (status, body) = generate(&s, json!({"prompt": "a fox", "lora": path}));
        assert_eq!(status, 422, "{path}: {body}");
    }
}

/// A hub that answers every request with `status` and counts them.
fn hub_answering(status: u16) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = r#"{"error":"stand-in hub"}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn a_hub_lora_that_cannot_be_had_fails_its_request_clearly_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let hf_home = dir.path().join("hf");
    // A port nobody listens on: the hub is unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (missing, seen) = hub_answering(404);
    for (endpoint, status, code) in [
        (unreachable.as_str(), 503, "lora_unavailable"),
        (missing.as_str(), 422, "lora_not_found"),
    ] {
        let data = dir.path().join(code);
        let s = Binary::start_with_env(
            &repo_root(),
            &data,
            &["--preset", "flux-tiny"],
            &[
                ("HF_ENDPOINT", endpoint),
                ("HF_HOME", hf_home.to_str().unwrap()),
            ],
        );
        let request = json!({"prompt": "a fox", "lora": "someone/style:style.safetensors"});
        let (got, body) = generate(&s, request);
        assert_eq!(
            (got, error_code(&body.to_string())),
            (status, code.into()),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("someone/style"), "{message}");
        // The server goes on serving.
        let (got, ok) = generate(&s, json!({"prompt": "a fox", "lora": "none", "seed": 1}));
        assert_eq!(got, 200, "{ok}");
    }
    assert!(
        seen.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the stand-in hub was asked"
    );
}

#[test]
fn the_command_line_stacks_local_files_with_scales() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let loras = fixture_loras();
    let output = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args([
            "generate",
            "a fox",
            "--preset",
            "flux-tiny",
            "--device",
            "cpu",
        ])
        .arg("--lora")
        .arg(format!(
            "{}:0.75",
            loras.join("diffusers.safetensors").display()
        ))
        .arg("--lora")
        .arg(loras.join("xlabs.safetensors"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("diffusers layout") && stderr.contains("at scale 0.75"),
        "{stderr}"
    );
    assert!(stderr.contains("xlabs layout"), "{stderr}");
    assert!(image::open(&out).is_ok());

    let output = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args([
            "generate",
            "a fox",
            "--preset",
            "flux-tiny",
            "--device",
            "cpu",
        ])
        .args(["--lora", "no/such-file.safetensors"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no/such-file.safetensors"), "{stderr}");
}
