//! The one error type of the HTTP layer: every failure answers `{"error": {"code", "message"}}` with a
//! fitting status, including the extractors' own rejections.

use app::{ErrorBody, ErrorCode, ErrorDetail, SkippedFile};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answer: its [`ErrorCode`] decides the HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// For `invalid_dataset`: each file of the upload that cannot be trained on, and why.
    pub files: Vec<SkippedFile>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            files: Vec::new(),
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Validation, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unavailable, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Conflict, message)
    }

    pub fn queue_full(what: &str) -> ApiError {
        ApiError::new(
            ErrorCode::QueueFull,
            format!("the {what} queue is full; retry after a job finishes"),
        )
    }

    /// A training ZIP with nothing to train on: the message says what to do, `files` names each file.
    pub fn invalid_dataset(message: impl Into<String>, files: Vec<SkippedFile>) -> ApiError {
        ApiError {
            files,
            ..ApiError::new(ErrorCode::InvalidDataset, message)
        }
    }

    /// For failures of ours (database, disk): the detail goes to the log, the client gets the gist.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!("{context}: {err}");
        ApiError::new(
            ErrorCode::Internal,
            format!("{context}; see the server log"),
        )
    }

    /// A failed write to the data directory: a full disk is the operator's to fix and says so (507);
    /// anything else is ours.
    pub fn storage(context: &str, err: std::io::Error) -> ApiError {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        if !matches!(err.kind(), StorageFull | QuotaExceeded) {
            return ApiError::internal(context, err);
        }
        ApiError::disk_full(context, err)
    }

    /// A failed database or file operation of the job store: a full disk (the database's own
    /// disk-full error, or an I/O error saying so anywhere in the chain) answers 507 as
    /// [`ApiError::storage`] does.
    pub fn store(context: &str, err: anyhow::Error) -> ApiError {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        let full = crate::store::is_disk_full(&err)
            || err.chain().any(|cause| {
                matches!(
                    cause
                        .downcast_ref::<std::io::Error>()
                        .map(std::io::Error::kind),
                    Some(StorageFull | QuotaExceeded)
                )
            });
        if full {
            ApiError::disk_full(context, format!("{err:#}"))
        } else {
            ApiError::internal(context, format!("{err:#}"))
        }
    }

    fn disk_full(context: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!("{context}: {err}");
        ApiError::new(
            ErrorCode::InsufficientStorage,
            format!(
                "{context}: the server's disk is full; free space in its data directory and retry"
            ),
        )
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code,
            message: self.message.clone(),
            files: self.files.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(ErrorBody {
                error: self.detail(),
            }),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let code = match &rejection {
            JsonRejection::JsonDataError(_) => ErrorCode::Validation,
            JsonRejection::JsonSyntaxError(_) => ErrorCode::InvalidJson,
            JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ErrorCode::TooLarge
            }
            _ => ErrorCode::BadRequest,
        };
        ApiError::new(code, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::new(ErrorCode::InvalidPath, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::new(ErrorCode::InvalidQuery, rejection.body_text())
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> ApiError {
        ApiError::new(
            ErrorCode::WebsocketRequired,
            format!("this route is a WebSocket: {}", rejection.body_text()),
        )
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> ApiError {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "expected a multipart/form-data body: {}",
                rejection.body_text()
            ),
        )
    }
}

impl From<MultipartError> for ApiError {
    fn from(err: MultipartError) -> ApiError {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::TooLarge,
                "the upload is larger than the server accepts",
            )
        } else {
            ApiError::new(ErrorCode::InvalidMultipart, err.body_text())
        }
    }
}
