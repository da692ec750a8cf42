//! Files served by id: generated images, trained LoRAs, training samples. Paths come only from `DataDir`.

use std::path::PathBuf;

use app::{ErrorBody, JobKind, JobStatus, LoraInfo, LoraList};
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio_util::io::ReaderStream;

use super::auth::Caller;
use super::train::training_record;
use super::{job_id, ApiPath, AppState};
use crate::error::ApiError;
use crate::files::DataDir;
use crate::jobs::TrainingParams;
use crate::store::Viewer;

/// Streams a file (fetched from the file store when another node wrote it); a missing one is 404 with
/// `what` in the message.
async fn send_file(
    data: &DataDir,
    path: PathBuf,
    content_type: &'static str,
    download_name: Option<String>,
    what: &str,
) -> Result<Response, ApiError> {
    data.fetch_async(&path)
        .await
        .map_err(|e| ApiError::internal("fetching a stored file", e))?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!("no {what}")))
        }
        Err(e) => return Err(ApiError::internal("opening a stored file", e)),
    };
    let length = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal("reading a stored file", e))?
        .len();
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(ReaderStream::new(file)),
    )
        .into_response();
    if let Some(name) = download_name {
        let value = format!("attachment; filename=\"{name}\"");
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::CONTENT_DISPOSITION, value);
        }
    }
    Ok(response)
}

/// A job's files are found only by whoever may see the job: another user's are 404, as missing ones.
async fn visible(
    state: &AppState,
    id: crate::files::JobId,
    viewer: &Viewer,
    what: &str,
) -> Result<(), ApiError> {
    if *viewer == Viewer::All {
        return Ok(());
    }
    state
        .jobs
        .record_for(id, viewer)
        .await
        .map(|_| ())
        .map_err(|_| ApiError::not_found(format!("no {what} of {id}")))
}

/// A generated image (PNG), by its generation job's id.
#[utoipa::path(get, path = "/images/{job_id}", tag = "files", responses(
    (status = 200, content_type = "image/png", body = Vec<u8>),
    (status = 404, body = ErrorBody),
))]
pub async fn image(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    visible(&state, id, &viewer, "image").await?;
    let path = state.jobs.data().image(id);
    send_file(
        state.jobs.data(),
        path,
        "image/png",
        None,
        &format!("image {id}"),
    )
    .await
}

/// Image `index` (from 0) of a generation that made several (`num_images`).
#[utoipa::path(get, path = "/images/{job_id}/{index}", tag = "files", responses(
    (status = 200, content_type = "image/png", body = Vec<u8>),
    (status = 404, body = ErrorBody),
))]
pub async fn image_at(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath((id, index)): ApiPath<(String, u32)>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    visible(&state, id, &viewer, "image").await?;
    let path = state.jobs.data().image_at(id, index);
    send_file(
        state.jobs.data(),
        path,
        "image/png",
        None,
        &format!("image {index} of {id}"),
    )
    .await
}

/// A sample image made during a training run.
#[utoipa::path(get, path = "/train/{model_id}/samples/{file}", tag = "files", responses(
    (status = 200, content_type = "image/png", body = Vec<u8>),
    (status = 404, body = ErrorBody),
))]
pub async fn sample(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath((model_id, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("no sample {file:?}"));
    visible(&state, job_id(&model_id)?, &viewer, "sample").await?;
    let path = state
        .jobs
        .data()
        .sample(job_id(&model_id)?, &file)
        .ok_or_else(not_found)?;
    send_file(
        state.jobs.data(),
        path,
        "image/png",
        None,
        &format!("sample {file:?}"),
    )
    .await
}

/// The LoRAs trained here that the caller may see, newest first: each usable as `lora` in `/generate/`.
#[utoipa::path(get, path = "/loras/", tag = "files", responses((status = 200, body = LoraList)))]
pub async fn list_loras(
    State(state): State<AppState>,
    Caller(viewer): Caller,
) -> Result<Json<LoraList>, ApiError> {
    let data = state.jobs.data().clone();
    let loras = state
        .jobs
        .store()
        .call(move |store| {
            let jobs = store.jobs(
                Some(JobKind::Training),
                Some(JobStatus::Completed),
                u32::MAX,
                &viewer,
            )?;
            Ok(jobs
                .into_iter()
                .filter_map(|job| {
                    let id = job.id.parse().ok()?;
                    let size_bytes = data.size(&data.lora(id)).ok()??;
                    let keywords = serde_json::from_value::<TrainingParams>(job.params)
                        .map(|p| p.keywords)
                        .unwrap_or_default();
                    Some(LoraInfo {
                        url: format!("/loras/{}", job.id),
                        model_id: job.id,
                        keywords,
                        size_bytes,
                        created_at: job.created_at,
                    })
                })
                .collect())
        })
        .await
        .map_err(|e| ApiError::internal("listing LoRAs", format!("{e:#}")))?;
    Ok(Json(LoraList { loras }))
}

/// A trained LoRA (safetensors), by its `model_id`.
#[utoipa::path(get, path = "/loras/{model_id}", tag = "files", responses(
    (status = 200, content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, body = ErrorBody),
))]
pub async fn lora(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(model_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let record = training_record(&state, &model_id, &viewer).await?;
    if record.status != JobStatus::Completed {
        return Err(ApiError::not_found(format!(
            "training job {model_id} is {}, not completed",
            record.status.as_str()
        )));
    }
    let path = state.jobs.data().lora(job_id(&model_id)?);
    send_file(
        state.jobs.data(),
        path,
        "application/octet-stream",
        Some(format!("{model_id}.safetensors")),
        &format!("LoRA {model_id}"),
    )
    .await
}
