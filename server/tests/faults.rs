//! Faults, with the real binary: a kill -9 in the middle of an upload, a full disk under the data directory,
//! and damaged model files; and, through the library, a model load that panics. Each ends in a clear error or
//! a clean state, and the server keeps serving.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{curl, error_code, zip_of, Binary};
use image::{Rgb, RgbImage};

fn png(colour: [u8; 3]) -> Vec<u8> {
    let mut png = Vec::new();
    RgbImage::from_pixel(32, 32, Rgb(colour))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn studio(data: &Path) -> Binary {
    Binary::start(data, &["--preset", "flux-tiny", "--device", "cpu"])
}

#[test]
fn a_kill_during_an_upload_leaves_no_job_and_the_next_start_removes_the_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = studio(dir.path());
    // Half of a 4 MB multipart upload, written by hand so it can stop mid-body.
    let boundary = "studio-fault-boundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"d.zip\"\r\n\
         Content-Type: application/zip\r\n\r\n"
    );
    let total = head.len() + (4 << 20);
    let host = server.url.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "POST /train/ HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {total}\r\n\r\n{head}"
    )
    .unwrap();
    stream.write_all(&vec![7u8; 2 << 20]).unwrap();
    stream.flush().unwrap();
    // The partial ZIP is on disk under its job folder before the kill.
    let jobs = dir.path().join("jobs");
    for _ in 0..200 {
        if entries(&jobs).len() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        entries(&jobs).len(),
        1,
        "the upload's folder was not created"
    );
    server.kill();
    drop(stream);

    let server = studio(dir.path());
    assert!(
        entries(&jobs).is_empty(),
        "partial upload left: {:?}",
        entries(&jobs)
    );
    let (status, body) = curl(&[&format!("{}/jobs/", server.url)]);
    let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, &jobs["jobs"]),
        (200, &serde_json::json!([])),
        "{body}"
    );
}

/// A tmpfs of a few MB as the data directory (the tests run as root, as CI does), unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (CI runs as root)"
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_refuses_the_upload_with_507_keeps_nothing_and_the_server_goes_on() {
    let disk = SmallDisk::mount("3m");
    let data = disk.0.path().join("data");
    let server = studio(&data);
    // 6 MB of stored (incompressible) bytes cannot fit in 3 MB.
    let noise: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let outside = tempfile::tempdir().unwrap();
    let big_zip = outside.path().join("big.zip");
    std::fs::write(
        &big_zip,
        zip_of(&[("a.png", &png([200, 10, 10])), ("noise.png", &noise)]),
    )
    .unwrap();
    let url = format!("{}/train/", server.url);
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-F",
        &format!("dataset=@{}", big_zip.display()),
        "-F",
        "keywords=full disk",
        &url,
    ]);
    assert_eq!(
        (status, error_code(&body)),
        (507, "insufficient_storage".into()),
        "{body}"
    );
    assert!(
        entries(&data.join("jobs")).is_empty(),
        "the refused upload left files"
    );
    let (status, _) = curl(&[&format!("{}/health", server.url)]);
    assert_eq!(status, 200);
    // The space is free again: a small upload is taken.
    let small = outside.path().join("small.zip");
    std::fs::write(&small, zip_of(&[("a.png", &png([10, 200, 10]))])).unwrap();
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-F",
        &format!("dataset=@{}", small.display()),
        "-F",
        "keywords=green",
        "-F",
        "steps=1",
        &url,
    ]);
    assert_eq!(status, 202, "{body}");
    drop(server);
}

#[test]
fn a_truncated_model_file_is_an_error_naming_the_file() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/tiny-flux-dev");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let copy = Command::new("cp")
        .arg("-r")
        .arg(&fixture)
        .arg(&model)
        .status()
        .unwrap();
    assert!(copy.success());
    let vae = model.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    std::fs::write(&vae, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(["generate", "a fox", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("-o")
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(!dir.path().join("x.png").exists());
}

/// Writes into `dir` until its disk refuses more; returns the filler's path.
fn fill_disk(dir: &Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![7u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    filler
}

#[test]
fn a_full_disk_fails_a_generation_with_507_and_keeps_no_image() {
    let disk = SmallDisk::mount("8m");
    let data = disk.0.path().join("data");
    let server = studio(&data);
    let request = r#"{"prompt": "a fox", "steps": 1, "width": 64, "height": 64, "seed": 3}"#;
    let url = format!("{}/generate/", server.url);
    let generate = || {
        curl(&[
            "-X",
            "POST",
            &url,
            "-H",
            "Content-Type: application/json",
            "-d",
            request,
        ])
    };
    let filler = fill_disk(disk.0.path());
    // The job cannot be recorded, or its image cannot be written: either way the same answer.
    let (status, body) = generate();
    assert_eq!(
        (status, error_code(&body)),
        (507, "insufficient_storage".into()),
        "{body}"
    );
    let images = data.join("images");
    if images.exists() {
        assert!(entries(&images).is_empty(), "a failed job kept an image");
    }
    let (status, _) = curl(&[&format!("{}/health", server.url)]);
    assert_eq!(status, 200);
    std::fs::remove_file(filler).unwrap();
    let (status, body) = generate();
    assert_eq!(status, 200, "{body}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_model_load_leaves_the_next_job_working() {
    use engine::pipeline::FluxPipeline;
    use server::capabilities::generation::FluxGeneration;
    use server::capabilities::resident_model::PipelineLoader;
    use server::jobs::capability::Capabilities;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.preset = Some("flux-tiny".into());
    config.device = engine::device::DeviceChoice::Cpu;
    // The engine's own load, after a first attempt that panics part-way through its download.
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    let loader: Arc<PipelineLoader> = Arc::new(move |options, device, progress| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            progress(&engine::hub::DownloadProgress {
                file: "transformer/diffusion_pytorch_model.safetensors".into(),
                file_bytes: 1,
                file_total: 2,
                files_done: 0,
                files_total: 1,
            });
            panic!("the weights could not be read");
        }
        FluxPipeline::load(options, device, progress)
    });
    let generation = FluxGeneration::with_loader(&config, loader).unwrap();
    let caps = Capabilities {
        generation: Some(Arc::new(generation)),
        ..Capabilities::default()
    };
    let running = server::start(&config, caps).await.unwrap();
    let url = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let generate = || async {
        let answer = http
            .post(format!("{url}/generate/"))
            .json(&serde_json::json!({"prompt": "a fox", "seed": 3}))
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        (status, answer.json::<serde_json::Value>().await.unwrap())
    };
    let tiny_state = || async {
        let models: app::ModelsResponse = http
            .get(format!("{url}/models/"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let tiny = models.presets.into_iter().find(|p| p.id == "flux-tiny");
        tiny.unwrap().state
    };

    let (status, failed) = generate().await;
    assert_eq!(
        (status, error_code(&failed.to_string())),
        (500, "generation_failed".into()),
        "{failed}"
    );
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("loading Tiny FLUX") && message.contains("the weights could not be read"),
        "{message}"
    );
    // Nothing of the broken load stays: not loaded, not shown as downloading.
    assert_eq!(tiny_state().await, app::ModelState::Ready);

    let (status, image) = generate().await;
    assert_eq!(status, 200, "{image}");
    assert_eq!(image["model"], "flux-tiny");
    assert_eq!(tiny_state().await, app::ModelState::Loaded);
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    running.jobs.shutdown();
}
