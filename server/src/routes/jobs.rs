use app::{ErrorBody, JobKind, JobList, JobRecord, JobStatus};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::auth::Caller;
use super::{job_id, ApiPath, AppState};
use crate::error::ApiError;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    kind: Option<JobKind>,
    status: Option<JobStatus>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<u32>,
}

/// Every job the caller may see (a user's token: that user's; the server's or an admin's: all), newest
/// first, and every worker with what it holds.
#[utoipa::path(get, path = "/jobs/", tag = "jobs", params(ListQuery), responses((status = 200, body = JobList)))]
pub async fn list(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100).min(1000);
    let jobs = state
        .jobs
        .store()
        .call(move |store| store.jobs(query.kind, query.status, limit, &viewer))
        .await
        .map_err(|e| ApiError::internal("listing jobs", format!("{e:#}")))?;
    Ok(Json(JobList {
        jobs,
        workers: state.jobs.workers().await?,
    }))
}

#[utoipa::path(get, path = "/jobs/{job_id}", tag = "jobs", responses(
    (status = 200, body = JobRecord),
    (status = 404, body = ErrorBody),
))]
pub async fn show(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobRecord>, ApiError> {
    Ok(Json(state.jobs.record_for(job_id(&id)?, &viewer).await?))
}

/// Cancels a generation or training job: a queued one at once (200), a running one at its next step (202).
#[utoipa::path(post, path = "/jobs/{job_id}/cancel", tag = "jobs", responses(
    (status = 200, description = "Cancelled", body = JobRecord),
    (status = 202, description = "Cancelling: the job stops at its next step", body = JobRecord),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Already finished", body = ErrorBody),
))]
pub async fn cancel(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    let record = state.jobs.cancel_for(job_id(&id)?, &viewer).await?;
    let status = if record.status == JobStatus::Cancelled {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(record)))
}
