use app::{CapabilityState, HealthResponse, ModelsResponse};
use axum::extract::State;
use axum::Json;
use serde_json::{Map, Value};

use super::{ApiJson, AppState};
use crate::error::ApiError;

/// Liveness, what this build can do, how full the queues are, and every worker with what it holds.
#[utoipa::path(get, path = "/health", tag = "info", responses(
    (status = 200, body = HealthResponse),
    (status = 500, description = "The store cannot be read", body = app::ErrorBody),
))]
pub async fn health(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    let capabilities = state
        .jobs
        .capabilities()
        .states()
        .into_iter()
        .map(|(name, reason)| CapabilityState {
            name: name.to_owned(),
            available: reason.is_none(),
            reason: reason.map(str::to_owned),
        })
        .collect();
    let (generation_queue, training_queue) = state.jobs.queue_states().await?;
    let memory_plan = state
        .jobs
        .capabilities()
        .generation
        .as_ref()
        .and_then(|g| g.memory_plan());
    Ok(Json(HealthResponse {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        capabilities,
        generation_queue,
        training_queue,
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        rss_bytes: resident_memory(),
        memory_plan,
        workers: state.jobs.workers().await?,
    }))
}

/// VmRSS from /proc (Linux); None elsewhere.
fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The model presets and whether their weights are absent, downloading or loaded (on any worker).
#[utoipa::path(get, path = "/models/", tag = "info", responses((status = 200, body = ModelsResponse)))]
pub async fn models(State(state): State<AppState>) -> Json<ModelsResponse> {
    let generation = state.jobs.capabilities().generation.clone();
    let mut presets = generation.as_ref().map(|g| g.presets()).unwrap_or_default();
    // The request path's view is the first worker's; a preset another worker holds is loaded too.
    for engine in state.jobs.engines().iter().skip(1) {
        let Some(other) = &engine.generation else {
            continue;
        };
        for theirs in other.presets() {
            let ours = presets.iter_mut().find(|p| p.id == theirs.id);
            if let Some(ours) = ours.filter(|_| theirs.state == app::ModelState::Loaded) {
                if ours.state != app::ModelState::Loaded {
                    *ours = theirs;
                }
            }
        }
    }
    Json(ModelsResponse {
        default_preset: generation.as_ref().map(|g| g.default_preset()),
        presets,
    })
}

/// The studio's stored settings (the UI's preferences): a JSON object.
#[utoipa::path(get, path = "/settings/", tag = "info", responses((status = 200, body = Object)))]
pub async fn settings(State(state): State<AppState>) -> Result<Json<Map<String, Value>>, ApiError> {
    let settings = state
        .jobs
        .store()
        .call(|store| store.settings())
        .await
        .map_err(|e| ApiError::internal("reading settings", format!("{e:#}")))?;
    Ok(Json(settings))
}

/// Sets the given keys (a `null` value removes one) and answers with all settings.
#[utoipa::path(put, path = "/settings/", tag = "info", request_body = Object, responses(
    (status = 200, body = Object),
    (status = 422, description = "Not a JSON object", body = app::ErrorBody),
))]
pub async fn update_settings(
    State(state): State<AppState>,
    ApiJson(changes): ApiJson<Map<String, Value>>,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let settings = state
        .jobs
        .store()
        .call(move |store| {
            store.update_settings(&changes)?;
            store.settings()
        })
        .await
        .map_err(|e| ApiError::store("writing settings", e))?;
    Ok(Json(settings))
}
