use app::{ClassifyRequest, ClassifyResponse, ErrorBody, MAX_CONTEXT_TURNS};
use axum::extract::State;
use axum::Json;

use super::{ApiJson, AppState};
use crate::error::ApiError;

/// Whether a prompt asks for an image or is conversation; with `context` (the turns before it), a
/// follow-up such as "another one" is judged by what the last answer was.
#[utoipa::path(post, path = "/classify/", tag = "classify", request_body = ClassifyRequest, responses(
    (status = 200, body = ClassifyResponse),
    (status = 422, description = "Empty or missing prompt, or too long a context", body = ErrorBody),
    (status = 429, description = "Too many classifications in flight", body = ErrorBody),
    (status = 503, description = "Classifier not available", body = ErrorBody),
))]
pub async fn classify(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ClassifyRequest>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let classifier = state
        .jobs
        .capabilities()
        .classifier()
        .map_err(ApiError::unavailable)?;
    if request.prompt.trim().is_empty() {
        return Err(ApiError::validation("prompt must not be empty"));
    }
    if request.context.len() > MAX_CONTEXT_TURNS {
        return Err(ApiError::validation(format!(
            "context has {} turns; send at most the last {MAX_CONTEXT_TURNS}",
            request.context.len()
        )));
    }
    // Classification is small CPU work beside the GPU worker: bounded by slots, run on the blocking pool.
    let slot = state
        .settings
        .classify_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::queue_full("classification"))?;
    let probability = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        classifier.image_request_probability(&request.prompt, &request.context)
    })
    .await
    .map_err(|e| ApiError::internal("the classifier panicked", e))?
    .map_err(|e| ApiError::internal("classification failed", format!("{e:#}")))?;
    Ok(Json(ClassifyResponse::from_image_request_probability(
        probability,
    )))
}
