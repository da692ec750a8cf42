//! Shared by the integration tests: servers on free ports (the real binary, or the library with stand-in
//! capabilities), and small clients.
#![allow(dead_code)] // Each test binary uses its own subset.

pub mod load;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use app::{GenerateRequest, PresetInfo};
use image::RgbImage;
use server::config::ServeConfig;
use server::jobs::capability::*;

/// The real `studio` binary on a free port, killed (SIGKILL) on drop.
pub struct Binary {
    pub child: Child,
    pub url: String,
}

/// The repository root: the working directory `scripts/run` gives the binary, where the default model paths
/// (`models/`, the committed classifier head) resolve.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Fails, saying how to fix it, when `scripts/fetch-models` has not installed the classifier's encoder.
pub fn require_classifier_encoder() {
    let encoder = repo_root().join(engine::classifier::DEFAULT_ENCODER_DIR);
    assert!(
        encoder.join("model.safetensors").is_file(),
        "the MiniLM encoder is missing at {}: run scripts/fetch-models first",
        encoder.display()
    );
}

impl Binary {
    /// Started in the repository root, as `scripts/run` does.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Binary {
        Binary::start_in(&repo_root(), data_dir, extra)
    }

    pub fn start_in(working_dir: &Path, data_dir: &Path, extra: &[&str]) -> Binary {
        Binary::start_with_env(working_dir, data_dir, extra, &[])
    }

    /// With extra environment variables (e.g. `HF_ENDPOINT` pointing at a local stand-in hub).
    pub fn start_with_env(
        working_dir: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_studio"))
            .current_dir(working_dir)
            // As `config`: no docs indexed at start (a test's own environment can say otherwise).
            .env("STUDIO_CHAT_DOCS", "false")
            .envs(env.iter().copied())
            .args(["serve", "--port", "0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env_remove("STUDIO_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting studio");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("studio listening on ")
            .unwrap_or_else(|| panic!("startup line: {line:?}"))
            .to_owned();
        Binary { child, url }
    }

    /// kill -9: nothing gets a chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs curl with the given arguments; returns (HTTP status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

/// Asserts the API's error shape and returns its code.
pub fn error_code(body: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    json["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code: {body}"))
        .to_owned()
}

pub fn config(data_dir: &Path) -> ServeConfig {
    let mut config = ServeConfig {
        data_dir: data_dir.to_path_buf(),
        port: 0,
        token: None,
        ..ServeConfig::defaults()
    };
    // Indexing the studio's docs takes minutes of a 2-core machine's CPU at every start; only the
    // docs' own test turns it on.
    config.chat.chat_docs = false;
    config
}

/// A stand-in generator: `steps` steps of `step_time` each, a preview per step, a flat image whose colour
/// comes from the seed. It stops when told to cancel, and can be held at its first step by `gate`.
pub struct FakeGeneration {
    pub step_time: Duration,
    pub gate: Arc<AtomicBool>,
}

impl FakeGeneration {
    pub fn new(step_time: Duration) -> FakeGeneration {
        FakeGeneration {
            step_time,
            gate: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Generation for FakeGeneration {
    fn presets(&self) -> Vec<PresetInfo> {
        vec![PresetInfo {
            id: "tiny".into(),
            description: "test".into(),
            state: app::ModelState::Loaded,
            memory_plan: None,
            precision: None,
        }]
    }

    fn default_preset(&self) -> String {
        "tiny".into()
    }

    fn plan(&self, request: &GenerateRequest, lora: LoraChoice) -> Result<GenerationPlan, String> {
        let model = request
            .model
            .clone()
            .unwrap_or_else(|| self.default_preset());
        if model != "tiny" {
            return Err(format!("unknown model {model:?}"));
        }
        let prompt = match &lora {
            LoraChoice::Trained { keywords, .. } => {
                format!("{}, {}", keywords.join(", "), request.prompt)
            }
            _ => request.prompt.clone(),
        };
        Ok(GenerationPlan {
            model,
            prompt,
            width: request.width.unwrap_or(64),
            height: request.height.unwrap_or(48),
            steps: request.steps.unwrap_or(3),
            guidance: request.guidance.unwrap_or(3.5),
            seed: request.seed.expect("the server fills the seed"),
            num_images: request.num_images.unwrap_or(1),
            step_cache: request.step_cache,
            precision: request.precision,
            lora,
            lora_scale: request.lora_scale.unwrap_or(1.0),
            input: None,
        })
    }

    fn generate(
        &self,
        plan: &GenerationPlan,
        on_step: &mut dyn FnMut(&StepUpdate) -> Control,
    ) -> anyhow::Result<Generated> {
        for step in 1..=plan.steps {
            while !self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(self.step_time);
            let update = StepUpdate {
                step,
                total: plan.steps,
                previews: vec![RgbImage::new(8, 8); plan.num_images as usize],
            };
            if on_step(&update) == Control::Cancel {
                anyhow::bail!("cancelled");
            }
        }
        // Each seed's own shade, as each seed draws its own picture; with an input image, that image as
        // it reached the capability (fitted to the plan's size).
        let image = |seed: u64| {
            if let Some(input) = &plan.input {
                return input.image.clone();
            }
            RgbImage::from_pixel(
                plan.width,
                plan.height,
                image::Rgb([(seed % 256) as u8, 0, 0]),
            )
        };
        Ok(Generated {
            images: (0..u64::from(plan.num_images))
                .map(|i| image(plan.seed.wrapping_add(i)))
                .collect(),
            seed: plan.seed,
            loras: Vec::new(),
            skipped_steps: plan.step_cache.map(|_| 0),
        })
    }
}

/// A stand-in trainer: `steps` steps, a log line at start, a sample at step 2, a LoRA file at the end.
pub struct FakeTraining {
    pub steps: u32,
    pub step_time: Duration,
}

struct FakeRun {
    spec: TrainingSpec,
    step: u32,
    steps: u32,
    step_time: Duration,
}

impl Training for FakeTraining {
    /// As the real trainer: a model it does not have is refused.
    fn check_settings(&self, settings: &app::TrainSettingsForm) -> Result<(), String> {
        match settings.model.as_deref() {
            Some(model) if model != "tiny" => Err(format!("model must be tiny (got {model:?})")),
            _ => Ok(()),
        }
    }

    fn start(
        &self,
        spec: &TrainingSpec,
        report: &mut dyn FnMut(TrainingReport),
    ) -> anyhow::Result<Box<dyn TrainingRun>> {
        report(TrainingReport::Log(format!(
            "dataset {} bytes, resume {}",
            std::fs::metadata(&spec.dataset)?.len(),
            spec.resume
        )));
        Ok(Box::new(FakeRun {
            spec: spec.clone(),
            step: 0,
            steps: self.steps,
            step_time: self.step_time,
        }))
    }
}

impl TrainingRun for FakeRun {
    fn step(&mut self, report: &mut dyn FnMut(TrainingReport)) -> anyhow::Result<StepOutcome> {
        std::thread::sleep(self.step_time);
        self.step += 1;
        report(TrainingReport::Step {
            step: self.step,
            total: self.steps,
            loss: 1.0 / self.step as f32,
            learning_rate: 1e-4,
            seconds_per_step: None,
            eta_seconds: None,
        });
        if self.step == 2 {
            std::fs::create_dir_all(&self.spec.samples_dir)?;
            RgbImage::new(4, 4).save(self.spec.samples_dir.join("step_2.png"))?;
            report(TrainingReport::Sample {
                step: 2,
                file: "step_2.png".into(),
                recipe: Box::new(app::Recipe {
                    prompt: self.spec.keywords.join(", "),
                    seed: 0,
                    model: "stand-in".into(),
                    loras: vec![app::RecipeLora {
                        name: self.spec.model_id.clone(),
                        scale: 1.0,
                    }],
                    steps: 1,
                    guidance: 1.0,
                    width: 4,
                    height: 4,
                    input: None,
                    studio: None,
                }),
            });
        }
        if self.step < self.steps {
            return Ok(StepOutcome::Continue);
        }
        std::fs::write(&self.spec.lora_file, b"fake safetensors")?;
        Ok(StepOutcome::Finished)
    }
}

/// A small flat PNG: an image the upload check and the trainer accept.
pub fn tiny_png(w: u32, h: u32) -> Vec<u8> {
    let mut png = Vec::new();
    RgbImage::from_pixel(w, h, image::Rgb([200, 120, 20]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// A ZIP (stored, uncompressed) with the given (name, bytes) entries.
pub fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    let mut writer = zip::ZipWriter::new(&mut buffer);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        writer.start_file(*name, options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap();
    buffer.into_inner()
}

/// Polls `f` until it returns Some, for at most 10 s.
pub async fn eventually<T>(mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 10 s");
}

/// An HTTP client of a studio under test: JSON in, (status, JSON) out, with a bearer token when it
/// has one. Test studios deref to theirs.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Api {
    /// A client of the studio at `url` (`http://host:port`), without a token.
    pub fn new(url: impl Into<String>) -> Api {
        Api {
            url: url.into(),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The same studio, asked with `token` (or none).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// The status and the JSON answer (`Null` when the answer is not JSON).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        answer(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: impl serde::Serialize) -> (u16, serde_json::Value) {
        answer(self.request(reqwest::Method::POST, path).json(&body)).await
    }

    /// The body of a 200 answer.
    pub async fn bytes(&self, path: &str) -> Vec<u8> {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.bytes().await.unwrap().to_vec()
    }

    /// `POST /train/` with `zip` as the dataset, `keywords` and the other form fields.
    pub async fn upload(
        &self,
        zip: Vec<u8>,
        keywords: &str,
        extra: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let mut form = reqwest::multipart::Form::new()
            .part(
                "dataset",
                reqwest::multipart::Part::bytes(zip).file_name("d.zip"),
            )
            .text("keywords", keywords.to_owned());
        for (k, v) in extra {
            form = form.text(k.to_string(), v.to_string());
        }
        answer(
            self.request(reqwest::Method::POST, "/train/")
                .multipart(form),
        )
        .await
    }

    /// How many jobs `GET /jobs/` lists.
    pub async fn job_count(&self) -> usize {
        let (_, list) = self.get("/jobs/").await;
        list["jobs"]
            .as_array()
            .unwrap_or_else(|| panic!("no jobs list: {list}"))
            .len()
    }

    /// The WebSocket address of `path`.
    pub fn ws(&self, path: &str) -> String {
        format!("{}{path}", self.url.replace("http://", "ws://"))
    }
}

async fn answer(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}
