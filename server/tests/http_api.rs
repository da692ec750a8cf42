//! The real binary on the CPU (generation on the flux-tiny preset, the real prompt classifier, which needs
//! `scripts/fetch-models`; training on flux-tiny): every route's status and error shape, the contract's curl
//! commands, trailing slashes, bad input, body limits, the bearer token (HTTP and WebSocket), the generation
//! WebSocket, and the batch `classify` command.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{curl, error_code, repo_root, require_classifier_encoder, Binary};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn server() -> (tempfile::TempDir, Binary) {
    let dir = tempfile::tempdir().unwrap();
    let binary = Binary::start(dir.path(), &[]);
    (dir, binary)
}

#[test]
fn contract_curl_commands_work_or_answer_503_with_the_reason() {
    require_classifier_encoder();
    let (dir, s) = server();
    let out = dir.path().join("response.json");
    let url = format!("{}/generate/", s.url);
    let (status, _) = curl(&[
        "-X",
        "POST",
        &url,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "a beautiful woman"}"#,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // No GPU here: the default model is the built-in one, and the response says so.
    assert_eq!(body["model"], "builtin-emoji");
    assert_eq!(
        (
            body["width"].as_u64(),
            body["height"].as_u64(),
            body["steps"].as_u64()
        ),
        (Some(64), Some(64), Some(20))
    );
    assert_eq!(body["prompt"], "a beautiful woman");
    assert!(
        body["seed"].is_u64() && body["elapsed_ms"].is_u64(),
        "{body}"
    );
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["image"].as_str().unwrap())
        .unwrap();
    let image = image::load_from_memory(&png).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
    // The original service's answer, field for field (plus the studio's job_id, loras and recipe): a
    // single image is `image` alone.
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "elapsed_ms",
            "height",
            "image",
            "job_id",
            "loras",
            "model",
            "prompt",
            // What its PNG carries too (docs/server.md#recipes).
            "recipe",
            "seed",
            "steps",
            "width"
        ]
    );
    assert_eq!(body["recipe"]["model"], "builtin-emoji");
    assert_eq!(body["recipe"]["seed"], body["seed"]);

    for (prompt, label) in [
        ("can I see you in the kitchen?", "conversation"),
        (
            "show me a woman cooking in a bright kitchen",
            "image_request",
        ),
    ] {
        let (status, body) = curl(&[
            "-X",
            "POST",
            &format!("{}/classify/", s.url),
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!(r#"{{"prompt": "{prompt}"}}"#),
        ]);
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["label"], label, "{prompt:?}: {answer}");
        assert_classify_shape(&answer);
    }

    let zip = dir.path().join("test_dataset.zip");
    let mut png = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([200, 100, 0]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(&zip, common::zip_of(&[("a.png", &png)])).unwrap();
    let dataset = format!("dataset=@{}", zip.display());
    let (status, body) = curl(&[
        "-X",
        "POST",
        &format!("{}/train/", s.url),
        "-F",
        &dataset,
        "-F",
        r#"keywords=["realistic", "detailed", "high quality"]"#,
    ]);
    assert_eq!(status, 202, "{body}");
    let accepted: Value = serde_json::from_str(&body).unwrap();
    let id = accepted["model_id"].as_str().unwrap();
    let (status, body) = curl(&["-X", "GET", &format!("{}/train/status/{id}", s.url)]);
    assert_eq!(status, 200, "{body}");
    assert!(dir
        .path()
        .join("jobs")
        .join(id)
        .join("dataset.zip")
        .is_file());

    let (status, body) = curl(&[
        "-X",
        "GET",
        &format!(
            "{}/train/status/3f2a0d7e-8c1b-4d7a-9c55-0123456789ab",
            s.url
        ),
    ]);
    assert_eq!((status, error_code(&body)), (404, "not_found".into()));
}

#[test]
fn every_route_answers_with_and_without_trailing_slash() {
    require_classifier_encoder();
    let (_dir, s) = server();
    let unknown = "3f2a0d7e-8c1b-4d7a-9c55-0123456789ab";
    let cases: Vec<(&str, String, u16)> = vec![
        ("GET", "/health".into(), 200),
        ("GET", "/models".into(), 200),
        ("GET", "/jobs".into(), 200),
        ("GET", "/loras".into(), 200),
        ("GET", "/settings".into(), 200),
        ("GET", "/openapi.json".into(), 200),
        ("GET", "/docs".into(), 200),
        ("POST", "/generate".into(), 200),
        ("POST", "/classify".into(), 200),
        ("POST", "/train".into(), 415),
        ("GET", format!("/train/status/{unknown}"), 404),
        ("POST", format!("/train/{unknown}/resume"), 404),
        ("GET", format!("/train/{unknown}/samples/step_1.png"), 404),
        ("GET", format!("/jobs/{unknown}"), 404),
        ("POST", format!("/jobs/{unknown}/cancel"), 404),
        ("GET", format!("/images/{unknown}"), 404),
        ("GET", format!("/loras/{unknown}"), 404),
        ("GET", format!("/ws/train/{unknown}"), 404),
        ("GET", "/ws/generate".into(), 400),
        ("GET", "/no/such/route".into(), 404),
        ("DELETE", "/health".into(), 405),
    ];
    for (method, path, expected) in cases {
        for path in [path.clone(), format!("{path}/")] {
            let url = format!("{}{path}", s.url);
            let (status, body) = if method == "POST" {
                curl(&[
                    "-X",
                    method,
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    r#"{"prompt": "x"}"#,
                    &url,
                ])
            } else {
                curl(&["-X", method, &url])
            };
            assert_eq!(status, expected, "{method} {path}: {body}");
            if status != 200 {
                error_code(&body);
            } else if path.starts_with("/docs") {
                assert!(
                    body.contains("/generate/") && body.contains("GenerateRequest"),
                    "docs page lists routes and schemas"
                );
            } else {
                serde_json::from_str::<Value>(&body).unwrap_or_else(|_| panic!("{path}: not JSON"));
            }
        }
    }
}

#[test]
fn health_and_openapi_describe_the_api() {
    require_classifier_encoder();
    let (_dir, s) = server();
    let (_, body) = curl(&[&format!("{}/health", s.url)]);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["capabilities"].as_array().unwrap().len(), 4);
    let available: Vec<(String, bool)> = health["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["available"] == true,
            )
        })
        .collect();
    assert_eq!(
        available,
        [
            ("generation".into(), true),
            ("classification".into(), true),
            ("training".into(), true),
            ("chat".into(), true)
        ]
    );
    let (_, body) = curl(&[&format!("{}/openapi.json", s.url)]);
    let doc: Value = serde_json::from_str(&body).unwrap();
    for path in [
        "/generate/",
        "/classify/",
        "/train/",
        "/train/status/{model_id}",
        "/jobs/{job_id}/cancel",
        "/loras/{model_id}",
        "/health",
        "/chat/",
        "/chat/conversations/{id}",
        "/chat/prompt",
        "/ws/chat",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    let request = &doc["components"]["schemas"]["GenerateRequest"];
    assert_eq!(request["required"], serde_json::json!(["prompt"]));
}

#[test]
fn bad_input_gets_json_errors_not_panics() {
    let (_dir, s) = server();
    let generate = format!("{}/generate/", s.url);
    let json = ["-X", "POST", "-H", "Content-Type: application/json"];
    let send = |body: &[&str]| curl(&[&json[..], body, &[generate.as_str()]].concat());
    // Malformed JSON, wrong types, missing field, invalid UTF-8, wrong content type: refused before the 503.
    assert_eq!(send(&["-d", "{bad"]).0, 400);
    assert_eq!(error_code(&send(&["-d", "{bad"]).1), "invalid_json");
    let (status, body) = send(&["-d", r#"{"prompt": 5}"#]);
    assert_eq!((status, error_code(&body)), (422, "validation".into()));
    let (status, body) = send(&["-d", r#"{"prompt": "x", "steps": "many"}"#]);
    assert_eq!((status, error_code(&body)), (422, "validation".into()));
    let (status, body) = send(&["-d", "{}"]);
    assert_eq!((status, error_code(&body)), (422, "validation".into()));
    let invalid_utf8 =
        std::env::temp_dir().join(format!("invalid-utf8-{}.json", std::process::id()));
    std::fs::write(&invalid_utf8, b"{\"prompt\": \"\xff\xfe\"}").unwrap();
    let (status, body) = send(&["--data-binary", &format!("@{}", invalid_utf8.display())]);
    std::fs::remove_file(&invalid_utf8).unwrap();
    assert_eq!((status, error_code(&body)), (400, "invalid_json".into()));
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: text/plain",
        "-d",
        "{}",
        &generate,
    ]);
    assert_eq!(
        (status, error_code(&body)),
        (415, "unsupported_media_type".into())
    );
    let (status, body) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        "[1]",
        &format!("{}/settings", s.url),
    ]);
    assert_eq!((status, error_code(&body)), (422, "validation".into()));
    let (status, body) = curl(&[&format!("{}/jobs?limit=lots", s.url)]);
    assert_eq!((status, error_code(&body)), (400, "invalid_query".into()));
    // Ids are never paths.
    let (status, body) = curl(&[
        "--path-as-is",
        &format!("{}/images/..%2F..%2Fstudio.db", s.url),
    ]);
    assert_eq!((status, error_code(&body)), (404, "not_found".into()));
}

#[test]
fn json_bodies_over_the_limit_are_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let s = Binary::start(dir.path(), &["--json-limit", "1K"]);
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2000));
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        &big,
        &format!("{}/generate/", s.url),
    ]);
    assert_eq!((status, error_code(&body)), (413, "too_large".into()));
    let small = r#"{"prompt": "a"}"#;
    let (status, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        small,
        &format!("{}/generate/", s.url),
    ]);
    assert_eq!(status, 200);
}

#[test]
fn settings_persist_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Binary::start(dir.path(), &[]);
    let (status, _) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"theme": "dark"}"#,
        &format!("{}/settings/", s.url),
    ]);
    assert_eq!(status, 200);
    s.kill();
    let s = Binary::start(dir.path(), &[]);
    let (_, body) = curl(&[&format!("{}/settings", s.url)]);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({"theme": "dark"})
    );
}

#[tokio::test]
async fn the_token_guards_every_route_and_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let s = Binary::start(dir.path(), &["--token", "s3cret"]);
    for path in [
        "/health",
        "/docs",
        "/openapi.json",
        "/jobs/",
        "/no/such/route",
    ] {
        let (status, body) = curl(&[&format!("{}{path}", s.url)]);
        assert_eq!(
            (status, error_code(&body)),
            (401, "unauthorized".into()),
            "{path}"
        );
        let (status, _) = curl(&[
            "-H",
            "Authorization: Bearer wrong",
            &format!("{}{path}", s.url),
        ]);
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = curl(&[
        "-H",
        "Authorization: Bearer s3cret",
        &format!("{}/health", s.url),
    ]);
    assert_eq!(status, 200);
    // A query token counts only on WebSocket upgrades (it would end up in logs and histories elsewhere).
    let (status, _) = curl(&[&format!("{}/health?token=s3cret", s.url)]);
    assert_eq!(status, 401);
    // The UI's cookie, as its token page sets it (URI-encoded).
    for (cookie, expected) in [("studio_token=s3cret", 200), ("studio_token=wrong", 401)] {
        let (status, _) = curl(&[
            "-H",
            &format!("Cookie: a=b; {cookie}"),
            &format!("{}/jobs/", s.url),
        ]);
        assert_eq!(status, expected, "{cookie}");
    }
    // The UI's pages and files hold no data and stay public, so a browser can be asked for the token.
    for path in [
        "/",
        "/studio/train",
        "/studio/token",
        "/favicon.svg",
        "/pkg/studio.css",
    ] {
        let (status, _) = curl(&[&format!("{}{path}", s.url)]);
        assert_ne!(status, 401, "{path}");
    }
    let (status, _) = curl(&["-X", "POST", &format!("{}/studio/train", s.url)]);
    assert_eq!(status, 401, "only reading a page is public");

    let ws = s.url.replace("http://", "ws://");
    let refused = tokio_tungstenite::connect_async(format!("{ws}/ws/generate"))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 401),
        "{refused}"
    );
    tokio_tungstenite::connect_async(format!("{ws}/ws/generate?token=s3cret"))
        .await
        .expect("query token accepted");
    let mut request = format!("{ws}/ws/generate").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", "Bearer s3cret".parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .expect("header token accepted");
}

#[tokio::test]
async fn generation_websocket_streams_steps_with_previews_then_the_result() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (_dir, s) = server();
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{}/ws/generate", s.url.replace("http", "ws")))
            .await
            .unwrap();
    socket
        .send(Message::text(
            r#"{"prompt": "a cat", "steps": 3, "seed": 5}"#,
        ))
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        events.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["status", "status", "step", "step", "step", "result", "status"],
        "{events:?}"
    );
    for (i, e) in events[2..5].iter().enumerate() {
        assert_eq!(
            (e["step"].as_u64(), e["total"].as_u64()),
            (Some(i as u64 + 1), Some(3))
        );
        assert!(
            e["preview"].as_str().is_some_and(|p| !p.is_empty()),
            "step without a preview"
        );
    }
    assert_eq!(events[5]["seed"], 5);
    assert_eq!(events[6]["status"], "completed");
}

fn png_pixels(base64_png: &str) -> image::RgbImage {
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(base64_png)
        .unwrap();
    image::load_from_memory(&png).unwrap().to_rgb8()
}

/// `num_images` on the built-in model: three images in one answer, image i the one a single request at
/// seed + i makes (the batch may round differently by a level), the first also as `image`, each
/// downloadable; out of range, a JSON error before anything is queued.
#[test]
fn three_images_in_one_request_are_the_single_requests_at_consecutive_seeds() {
    require_classifier_encoder();
    let (_dir, s) = server();
    let url = format!("{}/generate/", s.url);
    let post = |body: &str| {
        let (status, text) = curl(&[
            "-X",
            "POST",
            &url,
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ]);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let batch = post(r#"{"prompt": "red heart", "steps": 4, "seed": 70, "num_images": 3}"#);
    let images = batch["images"].as_array().unwrap();
    assert_eq!(images.len(), 3, "{batch}");
    assert_eq!(batch["image"], images[0]["image"]);
    assert_eq!(batch["seed"], 70);
    assert!(batch.get("step_cache").is_none(), "no cache asked for");
    for (i, entry) in images.iter().enumerate() {
        let seed = 70 + i as u64;
        assert_eq!(entry["seed"], seed);
        let single = post(&format!(
            r#"{{"prompt": "red heart", "steps": 4, "seed": {seed}}}"#
        ));
        let (a, b) = (
            png_pixels(entry["image"].as_str().unwrap()),
            png_pixels(single["image"].as_str().unwrap()),
        );
        let diff = a
            .pixels()
            .zip(b.pixels())
            .map(|(p, q)| (0..3).map(|c| p.0[c].abs_diff(q.0[c])).max().unwrap())
            .max()
            .unwrap();
        assert!(
            diff <= 1,
            "image {i} differs from seed {seed} alone by {diff}"
        );
        let (status, _) = curl(&[
            "-o",
            "/dev/null",
            &format!("{}/images/{}/{i}", s.url, batch["job_id"].as_str().unwrap()),
        ]);
        assert_eq!(status, 200, "image {i} is downloadable");
    }
    for n in [0, 5] {
        let (status, body) = curl(&[
            "-X",
            "POST",
            &url,
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!(r#"{{"prompt": "red heart", "num_images": {n}}}"#),
        ]);
        assert_eq!(
            (status, error_code(&body)),
            (422, "validation".into()),
            "{body}"
        );
        assert!(body.contains("num_images"), "{body}");
    }
    let cached = post(r#"{"prompt": "red heart", "steps": 4, "seed": 70, "step_cache": 0.0}"#);
    assert_eq!(
        cached["step_cache"]["skipped_steps"], 0,
        "{}",
        cached["step_cache"]
    );
}

/// Two images stream a preview of each at every step, each event naming its image.
#[tokio::test]
async fn the_generation_websocket_streams_each_images_previews() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    require_classifier_encoder();
    let (_dir, s) = server();
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{}/ws/generate", s.url.replace("http", "ws")))
            .await
            .unwrap();
    socket
        .send(Message::text(
            r#"{"prompt": "a cat", "steps": 2, "seed": 5, "num_images": 2}"#,
        ))
        .await
        .unwrap();
    let mut steps = Vec::new();
    let mut result = None;
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        let e: Value = serde_json::from_str(&text).unwrap();
        match e["type"].as_str().unwrap() {
            "step" => {
                assert!(e["preview"].as_str().is_some_and(|p| !p.is_empty()), "{e}");
                steps.push((e["step"].as_u64().unwrap(), e["image"].as_u64().unwrap()));
            }
            "result" => result = Some(e),
            _ => {}
        }
    }
    assert_eq!(steps, [(1, 0), (1, 1), (2, 0), (2, 1)]);
    let result = result.expect("a result");
    assert_eq!(result["images"].as_array().map(Vec::len), Some(2));
}

/// The contract's `/classify/` body: the label's probability is the confidence, the two scores sum to 1.
fn assert_classify_shape(answer: &Value) {
    let p = answer["scores"]["image_request"].as_f64().unwrap();
    let q = answer["scores"]["conversation"].as_f64().unwrap();
    assert_eq!(answer["scores"].as_object().unwrap().len(), 2, "{answer}");
    assert!((p + q - 1.0).abs() < 1e-6, "{answer}");
    let chosen = if answer["label"] == "image_request" {
        p
    } else {
        q
    };
    assert_eq!(answer["confidence"].as_f64(), Some(chosen), "{answer}");
}

#[test]
fn a_classifier_that_cannot_load_leaves_the_server_up_and_says_why() {
    // Started outside the repository, the default encoder folder is missing; the head is given explicitly so
    // that the encoder is what fails.
    let dir = tempfile::tempdir().unwrap();
    let head = repo_root().join(engine::classifier::DEFAULT_HEAD_PATH);
    let s = Binary::start_in(
        dir.path(),
        &dir.path().join("data"),
        &["--classifier-head", head.to_str().unwrap()],
    );
    let (_, body) = curl(&[&format!("{}/health", s.url)]);
    let health: Value = serde_json::from_str(&body).unwrap();
    let classification = health["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "classification")
        .unwrap();
    assert_eq!(classification["available"], false, "{body}");
    let (status, body) = curl(&[
        "-X",
        "POST",
        &format!("{}/classify/", s.url),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "can I see you in the kitchen?"}"#,
    ]);
    assert_eq!((status, error_code(&body)), (503, "unavailable".into()));
    for reason in [&body, &classification["reason"].to_string()] {
        assert!(
            reason.contains("all-MiniLM-L6-v2") && reason.contains("run scripts/fetch-models"),
            "{reason}"
        );
    }
}

#[test]
fn classify_command_answers_one_json_line_per_prompt() {
    require_classifier_encoder();
    let mut child = Command::new(env!("CARGO_BIN_EXE_studio"))
        .arg("classify")
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting studio classify");
    let prompts = [
        "can I see you in the kitchen?",
        "show me a woman cooking in a bright kitchen",
        "a beautiful woman",
    ];
    // Dropping stdin after writing is the end of input.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", prompts.join("\n")).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "studio classify failed");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let labels = ["conversation", "image_request", "image_request"];
    for ((line, prompt), label) in lines.iter().zip(prompts).zip(labels) {
        let mut keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(keys, ["confidence", "label", "prompt", "scores"], "{line}");
        assert_eq!(line["prompt"], prompt);
        assert_eq!(line["label"], label, "{line}");
        assert_classify_shape(line);
    }
}

#[test]
fn a_model_dir_stands_in_for_the_hub_with_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let hf_home = tempfile::tempdir().unwrap();
    let local = repo_root().join("engine/tests/fixtures/tiny-flux-dev");
    let s = Binary::start_with_env(
        &repo_root(),
        dir.path(),
        &[
            "--preset",
            "flux-dev",
            "--device",
            "cpu",
            "--model-dir",
            local.to_str().unwrap(),
        ],
        &[("HF_HOME", hf_home.path().to_str().unwrap())],
    );
    let (status, body) = curl(&[&format!("{}/models/", s.url)]);
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    let dev = models["presets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "flux-dev")
        .unwrap_or_else(|| panic!("no flux-dev in {body}"));
    assert!(dev.to_string().contains("\"ready\""), "{dev}");
    // The folder's (tiny, random) weights answer a flux-dev request: nothing is downloaded, not even
    // the preset's hub LoRA (not in this empty hub cache, so left off).
    let (status, body) = curl(&[
        "-X",
        "POST",
        &format!("{}/generate/", s.url),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "a fox", "width": 64, "height": 64, "steps": 2}"#,
    ]);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["model"], "flux-dev");
    assert_eq!(body["loras"], serde_json::json!([]), "{body}");
}

#[test]
fn a_model_dir_that_is_not_a_model_folder_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(["serve", "--port", "0", "--device", "cpu", "--data-dir"])
        .arg(dir.path())
        .arg("--model-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no model_index.json"), "{err}");
}
