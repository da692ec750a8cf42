//! The real trainer in the real `studio` binary, on the tiny model on the CPU: the contract's curl upload,
//! status to completion, the training WebSocket (live and replayed), samples, the LoRA download, and a
//! cancelled run resumed from its checkpoint.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{curl, Binary};
use futures_util::StreamExt;
use image::{Rgb, RgbImage};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Three orange pictures with a dark square, one captioned, in a folder, and a stray file.
fn write_dataset(path: &Path) {
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..3u32 {
        let mut img = RgbImage::from_pixel(64, 64, Rgb([230, 120, 20]));
        for y in 10..30 {
            for x in 5 + 10 * i..25 + 10 * i {
                img.put_pixel(x, y, Rgb([40, 20, 60]));
            }
        }
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        entries.push((format!("photos/{i}.png"), png));
    }
    entries.push(("photos/0.txt".into(), b"an orange card".to_vec()));
    entries.push(("Thumbs.db".into(), b"x".to_vec()));
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    std::fs::write(path, common::zip_of(&refs)).unwrap();
}

fn studio(data: &Path) -> Binary {
    Binary::start(data, &["--preset", "flux-tiny", "--device", "cpu"])
}

/// POST /train/ the way the contract's curl command does, plus settings fields.
fn upload(url: &str, zip: &Path, settings: &[&str]) -> String {
    let dataset = format!("dataset=@{}", zip.display());
    let mut args = vec![
        "-X",
        "POST",
        "-F",
        &dataset,
        "-F",
        r#"keywords=["zqx style", "orange"]"#,
    ];
    for s in settings {
        args.extend(["-F", s]);
    }
    let target = format!("{url}/train/");
    args.push(&target);
    let (code, body) = curl(&args);
    assert_eq!(code, 202, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    json["model_id"].as_str().unwrap().to_owned()
}

fn status(url: &str, id: &str) -> Value {
    let (code, body) = curl(&["-X", "GET", &format!("{url}/train/status/{id}")]);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn wait_for(url: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1200 {
        let s = status(url, id);
        assert_ne!(s["status"], "failed", "{s}");
        if done(&s) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("training did not get there in 60 s: {}", status(url, id));
}

/// Every event of the job's stream until the server closes it.
async fn events(url: &str, id: &str) -> Vec<Value> {
    let ws = format!("{}/ws/train/{id}", url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let mut out = Vec::new();
    while let Some(Ok(Message::Text(text))) = socket.next().await {
        out.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    out
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zip_trains_to_a_lora_with_live_steps_samples_with_their_recipes_and_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("test_dataset.zip");
    write_dataset(&zip);
    let studio = studio(&dir.path().join("data"));
    let url = studio.url.clone();
    let id = upload(
        &url,
        &zip,
        &["steps=6", "sample_every=3", "checkpoint_every=2", "rank=4"],
    );

    // Live: connected right after the upload, the socket follows the job to its end.
    let live = events(&url, &id).await;
    let seqs: Vec<u64> = live.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let statuses: Vec<&str> = of_type(&live, "status")
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "preparing", "training", "completed"]);
    let steps = of_type(&live, "step");
    assert_eq!(
        steps
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    for s in &steps {
        assert_eq!(s["total"], 6);
        assert!(s["loss"].as_f64().unwrap() > 0.0, "{s}");
        assert_eq!(s["learning_rate"], 1e-4);
        assert!(s["seconds_per_step"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["eta_seconds"].as_f64().unwrap() >= 0.0, "{s}");
    }
    assert_eq!(steps[5]["eta_seconds"], 0.0);
    let logs: Vec<&str> = of_type(&live, "log")
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l
                .starts_with("dataset: 3 images used (1 with a caption file), 1 files skipped")),
        "{logs:?}"
    );
    assert!(
        logs.iter().any(|l| l.contains("skipped Thumbs.db")),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.starts_with("LoRA written after 6 steps")),
        "{logs:?}"
    );
    let samples = of_type(&live, "sample");
    assert_eq!(
        samples
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 3, 6]
    );

    let done = status(&url, &id);
    assert_eq!(done["status"], "completed");
    assert_eq!(
        (done["step"].as_u64(), done["total_steps"].as_u64()),
        (Some(6), Some(6))
    );
    assert_eq!(done["loss"].as_f64(), steps[5]["loss"].as_f64());

    // Replayed after the end: the same log, steps included.
    let replay = events(&url, &id).await;
    assert_eq!(of_type(&replay, "step").len(), 6);
    assert_eq!(replay.len(), live.len());

    // A sample and the LoRA download.
    let sample = format!("{url}{}", samples[1]["url"].as_str().unwrap());
    let png = dir.path().join("sample.png");
    let (code, _) = curl(&["-o", png.to_str().unwrap(), &sample]);
    assert_eq!(code, 200);
    let image = image::open(&png).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
    // The sample carries its recipe, as every PNG of the studio does, and its event says the same: the
    // sample prompt (the keywords), the run's seed, the base model, and the run's LoRA.
    let (recipe, found) = server::recipe::read_png(&std::fs::read(&png).unwrap())
        .unwrap()
        .expect("a sample's PNG carries its recipe");
    assert_eq!(found, server::recipe::Found::Studio);
    let event_recipe: app::Recipe = serde_json::from_value(samples[1]["recipe"].clone()).unwrap();
    assert_eq!(recipe, event_recipe);
    assert_eq!(recipe.prompt, "zqx style, orange");
    assert_eq!(recipe.model, "flux-tiny");
    assert_eq!((recipe.width, recipe.height), (64, 64));
    assert_eq!(recipe.loras.len(), 1);
    assert_eq!(recipe.loras[0].name, id);
    let lora = dir.path().join("lora.safetensors");
    let (code, _) = curl(&["-o", lora.to_str().unwrap(), &format!("{url}/loras/{id}")]);
    assert_eq!(code, 200);
    let tensors = candle_core::safetensors::load(&lora, &candle_core::Device::Cpu).unwrap();
    let a = &tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"];
    assert_eq!(a.dims(), [4, 64]);
    assert!(tensors.contains_key("transformer.single_transformer_blocks.1.attn.to_v.lora_B.weight"));
    assert!(tensors.keys().all(|k| k.starts_with("transformer.")));
    let report: Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("data/jobs")
                .join(&id)
                .join("dataset-report.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // "orange" is already in the caption: not repeated.
    assert_eq!(report["used"][0]["caption"], "zqx style, an orange card");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_resumes_from_its_checkpoint_and_repeats_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("set.zip");
    write_dataset(&zip);
    let studio = studio(&dir.path().join("data"));
    let url = studio.url.clone();
    let id = upload(
        &url,
        &zip,
        &["steps=40", "sample_every=0", "checkpoint_every=4"],
    );
    let at_cancel = wait_for(&url, &id, |s| s["step"].as_u64().unwrap_or(0) >= 9);
    let (code, body) = curl(&["-X", "POST", &format!("{url}/jobs/{id}/cancel")]);
    assert!(code == 200 || code == 202, "{code} {body}");
    wait_for(&url, &id, |s| s["status"] == "cancelled");
    let stopped_at = status(&url, &id)["step"].as_u64().unwrap();
    assert!(stopped_at >= at_cancel["step"].as_u64().unwrap());

    let (code, body) = curl(&["-X", "POST", &format!("{url}/train/{id}/resume")]);
    assert_eq!(code, 202, "{body}");
    let done = wait_for(&url, &id, |s| s["status"] == "completed");
    assert_eq!(done["step"], 40);

    let all = events(&url, &id).await;
    let checkpoint = 4 * (stopped_at / 4);
    let resumed = format!("resumed from the checkpoint at step {checkpoint}");
    assert!(
        of_type(&all, "log")
            .iter()
            .any(|e| e["message"] == resumed.as_str()),
        "no `{resumed}` in the log"
    );
    // The steps after the checkpoint were taken twice, with the same loss both times.
    let mut seen = std::collections::HashMap::new();
    let mut repeats = 0;
    for e in of_type(&all, "step") {
        let (step, loss) = (e["step"].as_u64().unwrap(), e["loss"].as_f64().unwrap());
        if let Some(before) = seen.insert(step, loss) {
            assert_eq!(before, loss, "step {step} gave another loss after resuming");
            repeats += 1;
        }
    }
    assert_eq!(repeats, stopped_at - checkpoint);
    assert!(dir
        .path()
        .join("data/jobs")
        .join(&id)
        .join("lora.safetensors")
        .is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_training_leaves_a_run_that_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("set.zip");
    write_dataset(&zip);
    let data = dir.path().join("data");
    let first = studio(&data);
    let id = upload(
        &first.url,
        &zip,
        &["steps=40", "sample_every=0", "checkpoint_every=4"],
    );
    let before = wait_for(&first.url, &id, |s| s["step"].as_u64().unwrap_or(0) >= 9);
    // kill -9 in the middle of the run: no chance to clean up or to save.
    first.kill();

    let second = studio(&data);
    let url = second.url.clone();
    let interrupted = status(&url, &id);
    assert_eq!(interrupted["status"], "interrupted", "{interrupted}");
    assert!(interrupted["step"].as_u64().unwrap() >= before["step"].as_u64().unwrap());
    let (code, body) = curl(&["-X", "POST", &format!("{url}/train/{id}/resume")]);
    assert_eq!(code, 202, "{body}");
    let done = wait_for(&url, &id, |s| s["status"] == "completed");
    assert_eq!(done["step"], 40);
    let all = events(&url, &id).await;
    assert!(
        of_type(&all, "log").iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("resumed from the checkpoint at step "))),
        "the run started over instead of resuming"
    );
    let (code, _) = curl(&["-o", "/dev/null", &format!("{url}/loras/{id}")]);
    assert_eq!(code, 200, "the finished LoRA is downloadable");
}
