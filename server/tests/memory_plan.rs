//! The memory plan through the API: shown by `/models/` and `/health`, a size (or a training run) that
//! cannot fit refused before it is queued, and an out-of-memory inside a job failing that job alone.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use app::{GenerateRequest, PresetInfo};
use common::{error_code, FakeGeneration};
use serde_json::{json, Value};
use server::jobs::capability::*;

/// The stand-in generator, whose first job runs out of GPU memory as candle reports it on CUDA.
struct OutOfMemoryOnce {
    inner: FakeGeneration,
    failed: AtomicBool,
}

impl Generation for OutOfMemoryOnce {
    fn presets(&self) -> Vec<PresetInfo> {
        self.inner.presets()
    }

    fn default_preset(&self) -> String {
        self.inner.default_preset()
    }

    fn plan(&self, request: &GenerateRequest, lora: LoraChoice) -> Result<GenerationPlan, String> {
        self.inner.plan(request, lora)
    }

    fn generate(
        &self,
        plan: &GenerationPlan,
        on_step: &mut dyn FnMut(&StepUpdate) -> Control,
    ) -> anyhow::Result<Generated> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(anyhow::anyhow!(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
            )
            .context("single block 12"));
        }
        self.inner.generate(plan, on_step)
    }
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let answer = http.post(url).json(&body).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

async fn get(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_memory_job_fails_alone_with_503_and_the_next_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Capabilities {
        generation: Some(Arc::new(OutOfMemoryOnce {
            inner: FakeGeneration::new(Duration::from_millis(1)),
            failed: AtomicBool::new(false),
        })),
        ..Capabilities::default()
    };
    let running = server::start(&common::config(dir.path()), caps)
        .await
        .unwrap();
    let url = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let request = json!({"prompt": "a fox", "seed": 3});

    let (status, failed) = post(&http, &format!("{url}/generate/"), request.clone()).await;
    assert_eq!(
        (status, error_code(&failed.to_string())),
        (503, "out_of_memory".into()),
        "{failed}"
    );
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("ran out of memory"), "{message}");
    assert!(!message.contains('\n'), "{message}");

    let health = get(&http, &format!("{url}/health")).await;
    assert_eq!(health["status"], "ok");
    let (status, image) = post(&http, &format!("{url}/generate/"), request).await;
    assert_eq!(status, 200, "{image}");
    running.jobs.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plan_shows_in_models_and_health_and_a_size_beyond_it_is_refused_before_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.preset = Some("flux-tiny".into());
    config.device = engine::device::DeviceChoice::Cpu;
    // A cap on the CPU plans as on a GPU of that size.
    config.gpu_memory = Some(1400 << 20);
    let caps = server::capabilities::from_config(&config).unwrap();
    let running = server::start(&config, caps).await.unwrap();
    let url = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    let health = get(&http, &format!("{url}/health")).await;
    assert!(health.get("memory_plan").is_none(), "no model loaded yet");
    let (status, image) = post(
        &http,
        &format!("{url}/generate/"),
        json!({"prompt": "a fox", "seed": 3, "steps": 1}),
    )
    .await;
    assert_eq!(status, 200, "{image}");

    let models: app::ModelsResponse =
        serde_json::from_value(get(&http, &format!("{url}/models/")).await).unwrap();
    let tiny = models.presets.iter().find(|p| p.id == "flux-tiny").unwrap();
    let plan = tiny.memory_plan.clone().expect("the loaded model's plan");
    assert_eq!(plan.budget_bytes, Some(1400 << 20));
    let parts: Vec<&str> = plan.parts.iter().map(|p| p.part.as_str()).collect();
    assert_eq!(parts, ["transformer", "T5", "CLIP", "autoencoder"]);
    assert!(plan.parts.iter().all(|p| p.params > 0 && p.bytes > 0));
    assert!(
        plan.max_side >= 64 && plan.max_side < 2048,
        "{}",
        plan.max_side
    );
    assert!(models
        .presets
        .iter()
        .filter(|p| p.id != "flux-tiny")
        .all(|p| p.memory_plan.is_none()));
    let doc = get(&http, &format!("{url}/openapi.json")).await;
    let schemas = &doc["components"]["schemas"];
    for name in ["MemoryPlanInfo", "MemoryPart", "PartPlacement"] {
        assert!(schemas.get(name).is_some(), "/openapi.json lacks {name}");
    }
    let health: app::HealthResponse =
        serde_json::from_value(get(&http, &format!("{url}/health")).await).unwrap();
    assert_eq!(health.memory_plan, Some(plan.clone()));

    let jobs_before = get(&http, &format!("{url}/jobs/")).await["jobs"]
        .as_array()
        .unwrap()
        .len();
    let (status, refused) = post(
        &http,
        &format!("{url}/generate/"),
        json!({"prompt": "a fox", "width": 2048, "height": 2048}),
    )
    .await;
    assert_eq!(
        (status, error_code(&refused.to_string())),
        (422, "validation".into()),
        "{refused}"
    );
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("--gpu-memory"), "{message}");
    assert!(
        message.contains(&format!("up to {0}x{0}", plan.max_side)),
        "{message}"
    );
    let jobs_after = get(&http, &format!("{url}/jobs/")).await["jobs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(jobs_before, jobs_after, "nothing was queued");

    // A training run whose steps need more than the cap leaves, even with the tiny transformer
    // streamed (a step takes about 1.5 GiB beside it), is refused the same way.
    let api = common::Api::new(&url);
    let png = common::tiny_png(32, 32);
    let zip = common::zip_of(&[("a.png", &png), ("b.png", &png)]);
    let (status, refused) = api.upload(zip, "zqx", &[]).await;
    assert_eq!(
        (status, error_code(&refused.to_string())),
        (422, "validation".into()),
        "{refused}"
    );
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("lower resolution"), "{message}");
    assert_eq!(api.job_count().await, jobs_after, "nothing was queued");
    running.jobs.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_fits_in_no_arrangement_fails_its_job_with_503_and_the_setting_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.preset = Some("flux-tiny".into());
    config.device = engine::device::DeviceChoice::Cpu;
    config.gpu_memory = Some(1 << 20);
    let caps = server::capabilities::from_config(&config).unwrap();
    let running = server::start(&config, caps).await.unwrap();
    let url = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let (status, failed) = post(
        &http,
        &format!("{url}/generate/"),
        json!({"prompt": "a fox", "seed": 3, "steps": 1}),
    )
    .await;
    assert_eq!(
        (status, error_code(&failed.to_string())),
        (503, "unavailable".into()),
        "{failed}"
    );
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("STUDIO_GPU_MEMORY"), "{message}");
    let health = get(&http, &format!("{url}/health")).await;
    assert_eq!(health["status"], "ok");
    running.jobs.shutdown();
}
