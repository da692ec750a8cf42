use std::path::Path;

use app::dataset::archive;
use app::{
    DatasetCheck, ErrorBody, ErrorCode, JobKind, JobRecord, JobStatus, TrainAccepted, TrainForm,
    TrainRequest, TrainStatus, MAX_SETTINGS_FIELDS,
};
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::Json;
use tokio::io::AsyncWriteExt;

use super::auth::Caller;
use super::{job_id, ApiPath, AppState};
use crate::error::ApiError;
use crate::files::JobId;
use crate::jobs::capability::TRAINING_UNAVAILABLE;
use crate::jobs::TrainingParams;
use crate::store::Viewer;

/// Starts LoRA training on a ZIP of images. The ZIP is streamed to the job's folder, never held in memory.
#[utoipa::path(post, path = "/train/", tag = "train",
    request_body(content = TrainForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, body = TrainAccepted),
        (status = 400, description = "Malformed multipart body", body = ErrorBody),
        (status = 413, description = "Upload over the server's cap", body = ErrorBody),
        (status = 415, description = "Not multipart/form-data", body = ErrorBody),
        (status = 422, description = "Missing field, bad keywords or settings (`validation`); a ZIP with nothing to train on (`invalid_dataset`, with `files`: each file and why)", body = ErrorBody),
        (status = 429, description = "Training queue full", body = ErrorBody),
        (status = 503, description = "Training not available", body = ErrorBody),
        (status = 507, description = "The server's disk is full", body = ErrorBody),
    ))]
pub async fn train(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<TrainAccepted>), ApiError> {
    let training = state
        .jobs
        .capabilities()
        .training
        .clone()
        .ok_or_else(|| ApiError::unavailable(TRAINING_UNAVAILABLE))?;
    let mut multipart = multipart?;
    let id = JobId::random();
    let dir = state.jobs.data().job_dir(id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::storage("creating the job folder", e))?;
    let accepted = async {
        let (request, dataset_bytes) = receive(&state, id, &mut multipart).await?;
        training
            .check_settings(&request.settings)
            .map_err(ApiError::validation)?;
        // The costly check last, once the cheap ones passed.
        let check = check_dataset(state.jobs.data().dataset(id)).await?;
        // Where the worker that runs it can read it, before it can be claimed.
        let data = state.jobs.data();
        data.publish_async(&data.dataset(id))
            .await
            .map_err(|e| ApiError::internal("storing the dataset", e))?;
        let params = TrainingParams {
            keywords: request.keywords,
            settings: request.settings,
            dataset_bytes,
            dataset_images: check.images.len() as u32,
        };
        state
            .jobs
            .submit_training(id, params.clone(), &viewer)
            .await?;
        Ok(TrainAccepted {
            model_id: id.to_string(),
            status: JobStatus::Queued,
            keywords: params.keywords,
            settings: params.settings,
            dataset_bytes: params.dataset_bytes,
            dataset_images: params.dataset_images,
        })
    }
    .await;
    if accepted.is_err() {
        // Nothing of a refused upload stays behind.
        if let Err(err) = tokio::fs::remove_dir_all(&dir).await {
            tracing::error!("removing {}: {err}", dir.display());
        }
    }
    accepted.map(|body| (StatusCode::ACCEPTED, Json(body)))
}

/// Streams the dataset to the job's folder and reads the text fields into a typed request; the dataset's
/// size in bytes beside it.
async fn receive(
    state: &AppState,
    id: JobId,
    multipart: &mut Multipart,
) -> Result<(TrainRequest, u64), ApiError> {
    let settings_limit = state.settings.json_limit;
    let upload_limit = state.settings.upload_limit;
    let too_large = |err: MultipartError| {
        let err = ApiError::from(err);
        if err.code == ErrorCode::TooLarge {
            ApiError::new(
                ErrorCode::TooLarge,
                format!("the upload is larger than this server's cap of {upload_limit} bytes"),
            )
        } else {
            err
        }
    };
    let field_error = |e: FieldError| e.map(too_large);
    let mut dataset_bytes = None;
    let mut keywords = None;
    let mut settings: Vec<(String, String)> = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(too_large)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "dataset" if dataset_bytes.is_some() => {
                return Err(ApiError::new(
                    ErrorCode::DuplicateField,
                    "more than one dataset",
                ))
            }
            "dataset" => {
                dataset_bytes = Some(
                    save(field, &state.jobs.data().dataset(id))
                        .await
                        .map_err(field_error)?,
                )
            }
            "keywords" => {
                keywords = Some(
                    read_text(field, settings_limit)
                        .await
                        .map_err(field_error)?,
                )
            }
            "" => {
                return Err(ApiError::new(
                    ErrorCode::InvalidMultipart,
                    "a form field without a name",
                ))
            }
            // Refused as they come: more fields than a settings form has is no settings form.
            _ if settings.len() >= MAX_SETTINGS_FIELDS => {
                return Err(ApiError::validation(format!(
                    "more than {MAX_SETTINGS_FIELDS} settings fields"
                )))
            }
            _ => {
                let text = read_text(field, settings_limit)
                    .await
                    .map_err(field_error)?;
                settings.push((name, text));
            }
        }
    }
    let dataset_bytes = dataset_bytes
        .ok_or_else(|| ApiError::validation("missing form field `dataset` (a ZIP of images)"))?;
    let keywords = keywords.ok_or_else(|| ApiError::validation("missing form field `keywords`"))?;
    let request = TrainRequest::from_form(&keywords, &settings).map_err(ApiError::validation)?;
    Ok((request, dataset_bytes))
}

/// Reading a form field failed: in the body (mapped by the caller, which knows the cap) or on our side.
enum FieldError {
    Multipart(MultipartError),
    Api(ApiError),
}

impl FieldError {
    fn map(self, f: impl FnOnce(MultipartError) -> ApiError) -> ApiError {
        match self {
            FieldError::Multipart(err) => f(err),
            FieldError::Api(err) => err,
        }
    }
}

/// Streams a field to `path`, synced before returning: a 202 means the upload survives a crash.
async fn save(mut field: Field<'_>, path: &Path) -> Result<u64, FieldError> {
    let disk = |e: std::io::Error| FieldError::Api(ApiError::storage("storing the upload", e));
    let mut file = tokio::fs::File::create(path).await.map_err(disk)?;
    let mut written = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(FieldError::Multipart)? {
        file.write_all(&chunk).await.map_err(disk)?;
        written += chunk.len() as u64;
    }
    file.sync_all().await.map_err(disk)?;
    Ok(written)
}

/// A text field, refused past `limit` bytes so a huge field cannot fill memory.
async fn read_text(mut field: Field<'_>, limit: usize) -> Result<String, FieldError> {
    let name = field.name().unwrap_or_default().to_owned();
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(FieldError::Multipart)? {
        if bytes.len() + chunk.len() > limit {
            let message = format!("form field `{name}` is longer than {limit} bytes");
            return Err(FieldError::Api(ApiError::new(ErrorCode::TooLarge, message)));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| {
        FieldError::Api(ApiError::new(
            ErrorCode::InvalidUtf8,
            format!("form field `{name}` is not UTF-8"),
        ))
    })
}

/// Judges the stored ZIP as the trainer will read it (`app::dataset::archive::check`: bounded reads,
/// headers checked before bounded decodes), off the async runtime: a ZIP with nothing to train on is
/// refused here, before it takes a queue slot, with each file and its reason.
async fn check_dataset(path: std::path::PathBuf) -> Result<DatasetCheck, ApiError> {
    let check = tokio::task::spawn_blocking(move || -> Result<DatasetCheck, String> {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        archive::check(std::io::BufReader::new(file))
    })
    .await
    .map_err(|e| ApiError::internal("checking the ZIP", e))?
    .map_err(|message| ApiError::invalid_dataset(message, Vec::new()))?;
    match check.refusal() {
        Some(message) => Err(ApiError::invalid_dataset(message, check.skipped)),
        None => Ok(check),
    }
}

/// A training job's progress, as the original service reported it.
#[utoipa::path(get, path = "/train/status/{model_id}", tag = "train", responses(
    (status = 200, body = TrainStatus),
    (status = 404, description = "Unknown model_id", body = ErrorBody),
))]
pub async fn status(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(model_id): ApiPath<String>,
) -> Result<Json<TrainStatus>, ApiError> {
    let record = training_record(&state, &model_id, &viewer).await?;
    Ok(Json(train_status(record)))
}

/// Queues an interrupted, cancelled or failed run again; the trainer continues from its last checkpoint.
#[utoipa::path(post, path = "/train/{model_id}/resume", tag = "train", responses(
    (status = 202, body = TrainStatus),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Not in a resumable state, or its dataset is gone", body = ErrorBody),
    (status = 429, description = "Training queue full", body = ErrorBody),
    (status = 503, description = "Training not available", body = ErrorBody),
))]
pub async fn resume(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(model_id): ApiPath<String>,
) -> Result<(StatusCode, Json<TrainStatus>), ApiError> {
    if state.jobs.capabilities().training.is_none() {
        return Err(ApiError::unavailable(TRAINING_UNAVAILABLE));
    }
    let record = state
        .jobs
        .resume_training(job_id(&model_id)?, &viewer)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(train_status(record))))
}

/// A training job `viewer` may see; 404 otherwise.
pub async fn training_record(
    state: &AppState,
    model_id: &str,
    viewer: &Viewer,
) -> Result<JobRecord, ApiError> {
    let record = state.jobs.record_for(job_id(model_id)?, viewer).await?;
    if record.kind != JobKind::Training {
        return Err(ApiError::not_found(format!("no training job {model_id}")));
    }
    Ok(record)
}

fn train_status(record: JobRecord) -> TrainStatus {
    let keywords = serde_json::from_value::<TrainingParams>(record.params)
        .map(|p| p.keywords)
        .unwrap_or_default();
    TrainStatus {
        model_id: record.id,
        status: record.status,
        step: record.step,
        total_steps: record.total_steps,
        loss: record.loss,
        error: record.error,
        keywords,
        updated_at: record.updated_at,
    }
}
