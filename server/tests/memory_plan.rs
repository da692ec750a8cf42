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

/// The same small generation at `precision` (the weights as loaded when `None`).
async fn at_precision(http: &reqwest::Client, url: &str, precision: Option<&str>) -> (u16, Value) {
    let mut body = json!({"prompt": "a fox", "seed": 3, "steps": 2});
    if let Some(p) = precision {
        body["precision"] = p.into();
    }
    post(http, &format!("{url}/generate/"), body).await
}

/// The real server with the tiny model on the CPU, its transformer held in `weights` (as stored
/// when `None`), `precision` its `--precision`.
async fn tiny_studio(
    dir: &std::path::Path,
    weights: Option<engine::weights::WeightFormat>,
    precision: Option<&str>,
) -> server::Running {
    let mut config = common::config(dir);
    config.preset = Some("flux-tiny".into());
    config.device = engine::device::DeviceChoice::Cpu;
    config.weights = weights;
    config.precision = precision.map(|spec| spec.parse().unwrap());
    let caps = server::capabilities::from_config(&config).unwrap();
    server::start(&config, caps).await.unwrap()
}

/// `"precision"` through the API on the tiny model: fp8 on a bf16 load answers an image other than
/// exact's at the same seed, the next request without it is exact again; on a studio loaded with
/// `--weights fp8` exact is refused before anything is queued with what to change, and a precision
/// the API does not know is refused with the ones it takes.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_chooses_its_precision_and_one_the_loaded_model_cannot_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = tiny_studio(dir.path(), None, None).await;
    let url = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let image = |body: &Value| body["image"].as_str().unwrap().to_owned();
    let generate = |precision| at_precision(&http, &url, precision);
    let (status, exact) = generate(None).await;
    assert_eq!(status, 200, "{exact}");
    let (status, fast) = generate(Some("fp8")).await;
    assert_eq!(status, 200, "{fast}");
    assert_ne!(image(&fast), image(&exact), "fp8 changed nothing");
    let (_, again) = generate(Some("exact")).await;
    assert_eq!(image(&again), image(&exact));

    let (status, unknown) = generate(Some("fp16")).await;
    assert_eq!(status, 422, "{unknown}");
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("exact") && message.contains("fp8"),
        "{message}"
    );
    let doc = get(&http, &format!("{url}/openapi.json")).await;
    assert!(doc["components"]["schemas"]["Precision"].is_object());
    assert!(doc["components"]["schemas"]["GenerateRequest"]["properties"]["precision"].is_object());
    running.jobs.shutdown();

    let dir = tempfile::tempdir().unwrap();
    let running = tiny_studio(
        dir.path(),
        Some(engine::weights::WeightFormat::Fp8),
        Some("exact"),
    )
    .await;
    let url = format!("http://{}", running.addr);
    let generate = |precision| at_precision(&http, &url, Some(precision));
    let (status, loaded_fp8) = generate("fp8").await;
    assert_eq!(status, 200, "{loaded_fp8}");
    assert_eq!(
        image(&loaded_fp8),
        image(&fast),
        "the copy is what an fp8 load holds"
    );
    let api = common::Api::new(&url);
    let jobs = api.job_count().await;
    let (status, refused) = generate("exact").await;
    assert_eq!(
        (status, error_code(&refused.to_string())),
        (422, "validation".into()),
        "{refused}"
    );
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("--weights bf16"), "{message}");
    // Without a precision of its own a request takes the server's, and is told so.
    let (status, refused) = at_precision(&http, &url, None).await;
    assert_eq!(status, 422, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the server's --precision / STUDIO_PRECISION for flux-tiny"),
        "{message}"
    );
    assert_eq!(api.job_count().await, jobs, "nothing was queued");
    running.jobs.shutdown();
}

/// `--precision exact,flux-tiny=fp8`: the tiny model's requests that name no precision run in fp8 (the
/// image of `"precision": "fp8"`, not exact's), and /models/ says each preset's.
#[tokio::test(flavor = "multi_thread")]
async fn a_preset_given_a_precision_runs_its_requests_at_it_unless_they_choose() {
    let http = reqwest::Client::new();
    let image = |body: &Value| body["image"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let running = tiny_studio(dir.path(), None, Some("exact,flux-tiny=fp8")).await;
    let url = format!("http://{}", running.addr);
    let (status, unnamed) = at_precision(&http, &url, None).await;
    assert_eq!(status, 200, "{unnamed}");
    let (_, fast) = at_precision(&http, &url, Some("fp8")).await;
    let (_, exact) = at_precision(&http, &url, Some("exact")).await;
    assert_eq!(image(&unnamed), image(&fast), "the preset's fp8");
    assert_ne!(
        image(&unnamed),
        image(&exact),
        "a request's own precision wins"
    );
    let models = get(&http, &format!("{url}/models/")).await;
    let precision_of = |id: &str| {
        models["presets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap()["precision"]
            .clone()
    };
    assert_eq!(precision_of("flux-tiny"), "fp8");
    assert_eq!(precision_of("flux-dev"), "exact");
    running.jobs.shutdown();
}
