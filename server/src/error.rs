//! The one error type of the HTTP layer: every failure answers `{"error": {"code", "message"}}` with a
//! fitting status, including the extractors' own rejections.

use app::{ErrorBody, ErrorDetail};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn queue_full(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the {what} queue is full; retry after a job finishes"),
        )
    }

    /// For failures of ours (database, disk): the detail goes to the log, the client gets the gist.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!("{context}: {err}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
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

    /// A failed database or file operation of the job store: a full disk (SQLite's `SQLITE_FULL`, or
    /// an I/O error saying so anywhere in the chain) answers 507 as [`ApiError::storage`] does.
    pub fn store(context: &str, err: anyhow::Error) -> ApiError {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        let full = err.chain().any(|cause| {
            let sqlite_full = matches!(
                cause.downcast_ref::<rusqlite::Error>(),
                Some(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DiskFull
            );
            let io_full = matches!(
                cause.downcast_ref::<std::io::Error>().map(std::io::Error::kind),
                Some(StorageFull | QuotaExceeded)
            );
            sqlite_full || io_full
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
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            format!(
                "{context}: the server's disk is full; free space in its data directory and retry"
            ),
        )
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_owned(),
            message: self.message.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.detail(),
            }),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let (status, code) = match &rejection {
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            }
            _ => (rejection.status(), "bad_request"),
        };
        ApiError::new(status, code, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::bad_request("invalid_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> ApiError {
        ApiError::bad_request(
            "websocket_required",
            format!("this route is a WebSocket: {}", rejection.body_text()),
        )
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
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
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the upload is larger than the server accepts",
            )
        } else {
            ApiError::bad_request("invalid_multipart", err.body_text())
        }
    }
}
