//! Training uploads are judged before they are accepted: a ZIP with nothing to train on (only corrupt
//! images, a pixel bomb, an inflation bomb, only system files) is answered 422 `invalid_dataset` with
//! each file and its reason, keeps nothing on disk and takes no slot of the training queue, so hostile
//! uploads cannot lock real users out with 429s.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::{config, tiny_png, zip_of, Api, FakeGeneration, FakeTraining};
use serde_json::{json, Value};
use server::jobs::capability::Capabilities;

struct Studio {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    api: Api,
}

/// A studio with stand-in models whose training queue holds `training_queue` jobs.
async fn studio(training_queue: usize) -> Studio {
    let dir = tempfile::tempdir().unwrap();
    let caps = Capabilities {
        generation: Some(Arc::new(FakeGeneration::new(Duration::ZERO))),
        classification: None,
        classification_error: None,
        // Slow steps: an accepted job keeps the worker busy while the test looks at the queue.
        training: Some(Arc::new(FakeTraining {
            steps: 1000,
            step_time: Duration::from_millis(50),
        })),
        chat: None,
        chat_error: None,
        workers: Vec::new(),
    };
    let mut cfg = config(dir.path());
    cfg.training_queue = training_queue;
    let running = server::start(&cfg, caps).await.unwrap();
    Studio {
        data: dir.path().to_path_buf(),
        _dir: dir,
        api: Api::new(format!("http://{}", running.addr)),
    }
}

impl Studio {
    async fn upload(&self, zip: Vec<u8>) -> (u16, Value) {
        self.api.upload(zip, "zqx style", &[]).await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.api.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// Every file under the data directory but the database.
    fn kept_files(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    let name = path.strip_prefix(root).unwrap().display().to_string();
                    if !name.starts_with("studio.db") {
                        out.push(name);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data, &self.data, &mut out);
        out
    }

    /// Uploads `zip` more times than the queue holds and checks every answer: 422 `invalid_dataset`, a
    /// message saying what to do, each of `files` named with a reason containing its `reason` word,
    /// nothing kept and no job made. Returns the last answer.
    async fn refuses(&self, zip: Vec<u8>, files: &[(&str, &str)]) -> Value {
        let mut answer = Value::Null;
        for _ in 0..5 {
            let (status, body) = self.upload(zip.clone()).await;
            assert_eq!(status, 422, "{body}");
            assert_eq!(body["error"]["code"], "invalid_dataset", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("re-export"), "no instruction: {message}");
            let listed = body["error"]["files"].as_array().unwrap();
            for (file, reason) in files {
                let entry = listed
                    .iter()
                    .find(|f| f["file"] == *file)
                    .unwrap_or_else(|| panic!("{file} not named in {body}"));
                let why = entry["reason"].as_str().unwrap();
                assert!(why.contains(reason), "{file}: {why}");
                assert!(
                    message.contains(file),
                    "{file} not in the message: {message}"
                );
            }
            assert!(
                self.kept_files().is_empty(),
                "a refused upload left {:?}",
                self.kept_files()
            );
            answer = body;
        }
        let health = self.get("/health").await;
        assert_eq!(health["training_queue"]["waiting"], 0, "{health}");
        assert_eq!(self.get("/jobs/").await["jobs"], json!([]));
        answer
    }

    /// After the refusals a real dataset is still accepted: the queue was never touched.
    async fn still_accepts_a_real_dataset(&self) {
        let (status, body) = self.upload(zip_of(&[("ok.png", &tiny_png(16, 16))])).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["dataset_images"], 1);
        assert_eq!(
            self.get("/jobs/").await["jobs"].as_array().unwrap().len(),
            1
        );
    }
}

/// A small valid PNG whose header claims `side`x`side` pixels (its checksum fixed, so only the size is wrong).
fn pixel_bomb(side: u32) -> Vec<u8> {
    let mut png = tiny_png(16, 16);
    png[16..20].copy_from_slice(&side.to_be_bytes());
    png[20..24].copy_from_slice(&side.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A ZIP whose one entry, `name`, inflates to `bytes` zeros (deflated to a small fraction of that).
fn inflation_bomb(name: &str, bytes: u64) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    let mut writer = zip::ZipWriter::new(&mut buffer);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    writer.start_file(name, options).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..bytes / chunk.len() as u64 {
        writer.write_all(&chunk).unwrap();
    }
    writer.finish().unwrap();
    buffer.into_inner()
}

#[tokio::test]
async fn a_corrupt_only_zip_is_refused_with_422_and_nothing_kept() {
    let s = studio(4).await;
    let png = tiny_png(16, 16);
    let zip = zip_of(&[
        ("set/truncated.png", &png[..40]),
        ("set/garbage.jpg", b"this is not a jpeg"),
        ("set/empty.webp", b""),
        ("set/truncated.txt", b"a caption of a broken image"),
    ]);
    s.refuses(
        zip,
        &[
            ("set/truncated.png", "image"),
            ("set/garbage.jpg", "not a readable"),
            ("set/empty.webp", "not a readable"),
        ],
    )
    .await;
    s.still_accepts_a_real_dataset().await;
}

#[tokio::test]
async fn a_pixel_bomb_is_refused_with_422_before_it_is_decoded() {
    let s = studio(4).await;
    let zip = zip_of(&[("huge.png", &pixel_bomb(60_000))]);
    let body = s.refuses(zip, &[("huge.png", "megapixel")]).await;
    assert!(body["error"]["files"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("60000x60000"));
    s.still_accepts_a_real_dataset().await;
}

#[tokio::test]
async fn an_inflation_bomb_is_refused_with_422_without_trusting_its_header() {
    let s = studio(4).await;
    // Two GiB of zeros that deflate to a few MiB: read only up to the per-image cap.
    let zip = inflation_bomb("bomb.png", 2 << 30);
    assert!(zip.len() < 8 << 20, "{} bytes", zip.len());
    s.refuses(zip, &[("bomb.png", "inflates to more than")])
        .await;
    s.still_accepts_a_real_dataset().await;
}

#[tokio::test]
async fn a_zip_of_only_hidden_and_macos_files_is_refused_with_422() {
    let s = studio(4).await;
    let png = tiny_png(16, 16);
    let zip = zip_of(&[
        ("__MACOSX/._a.png", &png),
        ("__MACOSX/set/._b.png", &png),
        ("set/.hidden.png", &png),
        (".DS_Store", b"x"),
    ]);
    s.refuses(
        zip,
        &[
            ("__MACOSX/._a.png", "system file"),
            ("set/.hidden.png", "system file"),
            (".DS_Store", "system file"),
        ],
    )
    .await;
    s.still_accepts_a_real_dataset().await;
}

#[tokio::test]
async fn a_dataset_with_some_bad_files_is_accepted_with_the_usable_images_counted() {
    let s = studio(4).await;
    let png = tiny_png(16, 16);
    let zip = zip_of(&[
        ("a.png", &png),
        ("__MACOSX/._a.png", &png),
        ("broken.png", &png[..40]),
    ]);
    let (status, body) = s.upload(zip).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["dataset_images"], 1, "{body}");
}
