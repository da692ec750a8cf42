use app::{ErrorBody, ErrorCode, EventBody, GenerateRequest, GenerateResponse, JobKind, JobStatus};
use axum::extract::State;
use axum::Json;
use tokio::sync::broadcast::error::RecvError;

use super::auth::Caller;
use super::{ApiJson, AppState};
use crate::error::ApiError;
use crate::files::JobId;
use crate::jobs::capability::{LoraChoice, GENERATION_UNAVAILABLE};
use crate::jobs::event_hub::Listener;
use crate::jobs::Jobs;
use crate::store::Viewer;

/// Text to image, or image to image, inpainting and edits with `image` (or `image_job`), `strength` and
/// `mask`; answers when the image is done. Closing the connection cancels the job.
#[utoipa::path(post, path = "/generate/", tag = "generate", request_body = GenerateRequest, responses(
    (status = 200, body = GenerateResponse),
    (status = 400, description = "Malformed JSON", body = ErrorBody),
    (status = 409, description = "Cancelled before it finished", body = ErrorBody),
    (status = 422, description = "A field out of range, an unknown model or LoRA, an input image or mask that cannot be read, or an image_job that is not a completed generation of this studio", body = ErrorBody),
    (status = 429, description = "Generation queue full", body = ErrorBody),
    (status = 503, description = "Generation not available", body = ErrorBody),
))]
pub async fn generate(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiJson(request): ApiJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let (id, mut listener) = submit(&state, request, &viewer).await?;
    let guard = CancelOnDrop::new(state.jobs.clone(), id);
    let outcome = wait_for_result(&mut listener).await;
    guard.disarm();
    outcome.map(Json)
}

/// Checks, plans and queues a generation of `viewer`'s: shared by `POST /generate/` and the generation
/// WebSocket.
pub async fn submit(
    state: &AppState,
    mut request: GenerateRequest,
    viewer: &Viewer,
) -> Result<(JobId, Listener), ApiError> {
    let generation = state
        .jobs
        .capabilities()
        .generation
        .clone()
        .ok_or_else(|| ApiError::unavailable(GENERATION_UNAVAILABLE))?;
    request.validate().map_err(ApiError::validation)?;
    let input = crate::input::read(&state.jobs, &request, viewer).await?;
    if let Some(input) = &input {
        // The record and the plan say the size the input is fitted to.
        let (width, height) = input.size(request.width, request.height);
        (request.width, request.height) = (Some(width), Some(height));
    }
    // The seed is fixed here so the job's record always says which one was used.
    request
        .seed
        .get_or_insert_with(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let lora = resolve_lora(&state.jobs, request.lora.as_deref(), viewer).await?;
    let mut plan = generation
        .plan(&request, lora)
        .map_err(ApiError::validation)?;
    if let Some(input) = input {
        let strength = *request
            .strength
            .get_or_insert(app::limits::DEFAULT_STRENGTH);
        let (width, height) = (plan.width, plan.height);
        plan.input = Some(
            tokio::task::spawn_blocking(move || input.fit(width, height, strength))
                .await
                .map_err(|err| ApiError::internal("fitting the input image", err))?,
        );
    }
    // The job's record keeps the settings, not the pixels: an `image_job` names its source, an uploaded
    // image and a mask are only in the result's recipe (`input`, `masked`).
    request.image = None;
    request.mask = None;
    state.jobs.submit_generation(request, plan, viewer).await
}

/// A trained `model_id` (one `viewer` may see) becomes its LoRA file and keywords; other names are the
/// engine's to resolve.
async fn resolve_lora(
    jobs: &Jobs,
    lora: Option<&str>,
    viewer: &Viewer,
) -> Result<LoraChoice, ApiError> {
    let Some(name) = lora else {
        return Ok(LoraChoice::PresetDefault);
    };
    if name == "none" {
        return Ok(LoraChoice::Disabled);
    }
    let Ok(id) = name.parse::<JobId>() else {
        return Ok(LoraChoice::Named(name.to_owned()));
    };
    let unusable = || {
        ApiError::validation(format!(
            "lora {name:?} is not a completed training job of this server"
        ))
    };
    let record = jobs.record_for(id, viewer).await.map_err(|_| unusable())?;
    let file = jobs.data().lora(id);
    let completed = record.kind == JobKind::Training && record.status == JobStatus::Completed;
    let present = || async {
        let data = jobs.data().clone();
        let file = file.clone();
        tokio::task::spawn_blocking(move || data.size(&file))
            .await
            .map_err(|e| ApiError::internal("finding the LoRA", e))?
            .map_err(|e| ApiError::internal("finding the LoRA", e))
    };
    if !completed || present().await?.is_none() {
        return Err(unusable());
    }
    let keywords = record.params["keywords"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(LoraChoice::Trained {
        model_id: name.to_owned(),
        file,
        keywords,
    })
}

async fn wait_for_result(listener: &mut Listener) -> Result<GenerateResponse, ApiError> {
    loop {
        let event = match listener.recv().await {
            Ok(event) => event,
            // Only the result matters here, and it is the last event: skipping older ones is harmless.
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => {
                return Err(ApiError::internal(
                    "waiting for the image",
                    "the job ended without a result",
                ))
            }
        };
        match &event.body {
            EventBody::Result(response) => return Ok((**response).clone()),
            // The job's code answers with its own status (`ErrorCode::status`).
            EventBody::Error { error } => {
                return Err(ApiError::new(error.code, error.message.clone()));
            }
            EventBody::Status {
                status: JobStatus::Cancelled,
            } => return Err(ApiError::new(ErrorCode::Cancelled, "the job was cancelled")),
            _ => {}
        }
    }
}

/// Cancels a job when its requester goes away (the HTTP connection or WebSocket closes) before the end.
pub struct CancelOnDrop {
    jobs: Option<Jobs>,
    id: JobId,
}

impl CancelOnDrop {
    pub fn new(jobs: Jobs, id: JobId) -> CancelOnDrop {
        CancelOnDrop {
            jobs: Some(jobs),
            id,
        }
    }

    pub fn disarm(mut self) {
        self.jobs = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(jobs) = self.jobs.take() {
            let id = self.id;
            tracing::info!("job {id}: requester left, cancelling");
            tokio::spawn(async move {
                // A job that finished meanwhile answers 409: nothing to do then.
                let _ = jobs.cancel(id).await;
            });
        }
    }
}
