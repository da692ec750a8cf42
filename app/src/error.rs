use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::SkippedFile;

/// Every error answer of the API: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable; it decides the HTTP status ([`ErrorCode::status`]).
    pub code: ErrorCode,
    /// For people: what went wrong and what to do about it.
    pub message: String,
    /// `invalid_dataset`: the files of the upload that cannot be trained on, each with its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<SkippedFile>,
}

impl ErrorDetail {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorDetail {
        ErrorDetail {
            code,
            message: message.into(),
            files: Vec::new(),
        }
    }
}

/// The error codes of the API, each with the one HTTP status it is answered with. A generation's or
/// training's `error` event carries the same codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON, or not the expected shape of JSON on a WebSocket.
    InvalidJson,
    /// 400: the multipart body is malformed (or a form field has no name, or comes twice).
    InvalidMultipart,
    /// 400: a form field is not UTF-8 text.
    InvalidUtf8,
    /// 400: a form field that may come once came twice.
    DuplicateField,
    /// 400: a path parameter that cannot be read.
    InvalidPath,
    /// 400: a query string that cannot be read.
    InvalidQuery,
    /// 400: a plain HTTP request to a WebSocket route.
    WebsocketRequired,
    /// 400: any other malformed request.
    BadRequest,
    /// 401: this server needs its token.
    Unauthorized,
    /// 404
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 409: the job is not in a state that allows this.
    Conflict,
    /// 409: the job was cancelled before it answered.
    Cancelled,
    /// 413
    TooLarge,
    /// 415
    UnsupportedMediaType,
    /// 422: a field's value is out of its range, missing, or unknown.
    Validation,
    /// 422: the training ZIP holds nothing to train on; `files` names each file and why.
    InvalidDataset,
    /// 422: a hub LoRA whose repository or file does not exist.
    LoraNotFound,
    /// 429: the queue is full; retry after a job finishes.
    QueueFull,
    /// 500: a failure of ours; details in the server log.
    Internal,
    /// 500: a generation failed inside its job.
    GenerationFailed,
    /// 500: a training run failed inside its job.
    TrainingFailed,
    /// 503: the capability is not available on this server (the message says why).
    Unavailable,
    /// 503: a hub LoRA could not be fetched (network, hub, token): retry later.
    LoraUnavailable,
    /// 503: the GPU ran out of memory for this job: smaller sizes or fewer LoRAs may fit.
    OutOfMemory,
    /// 507: the server's disk is full: nothing of the request was kept.
    InsufficientStorage,
    /// 500: the language model failed while answering (the conversation keeps the user's message).
    ChatFailed,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub const fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            InvalidJson | InvalidMultipart | InvalidUtf8 | DuplicateField | InvalidPath
            | InvalidQuery | WebsocketRequired | BadRequest => 400,
            Unauthorized => 401,
            NotFound => 404,
            MethodNotAllowed => 405,
            Conflict | Cancelled => 409,
            TooLarge => 413,
            UnsupportedMediaType => 415,
            Validation | InvalidDataset | LoraNotFound => 422,
            QueueFull => 429,
            Internal | GenerationFailed | TrainingFailed | ChatFailed => 500,
            Unavailable | LoraUnavailable | OutOfMemory => 503,
            InsufficientStorage => 507,
        }
    }

    /// The code as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidJson => "invalid_json",
            InvalidMultipart => "invalid_multipart",
            InvalidUtf8 => "invalid_utf8",
            DuplicateField => "duplicate_field",
            InvalidPath => "invalid_path",
            InvalidQuery => "invalid_query",
            WebsocketRequired => "websocket_required",
            BadRequest => "bad_request",
            Unauthorized => "unauthorized",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Conflict => "conflict",
            Cancelled => "cancelled",
            TooLarge => "too_large",
            UnsupportedMediaType => "unsupported_media_type",
            Validation => "validation",
            InvalidDataset => "invalid_dataset",
            LoraNotFound => "lora_not_found",
            QueueFull => "queue_full",
            Internal => "internal",
            GenerationFailed => "generation_failed",
            TrainingFailed => "training_failed",
            Unavailable => "unavailable",
            LoraUnavailable => "lora_unavailable",
            OutOfMemory => "out_of_memory",
            InsufficientStorage => "insufficient_storage",
            ChatFailed => "chat_failed",
        }
    }

    pub const ALL: [ErrorCode; 27] = {
        use ErrorCode::*;
        [
            InvalidJson,
            InvalidMultipart,
            InvalidUtf8,
            DuplicateField,
            InvalidPath,
            InvalidQuery,
            WebsocketRequired,
            BadRequest,
            Unauthorized,
            NotFound,
            MethodNotAllowed,
            Conflict,
            Cancelled,
            TooLarge,
            UnsupportedMediaType,
            Validation,
            InvalidDataset,
            LoraNotFound,
            QueueFull,
            Internal,
            GenerationFailed,
            TrainingFailed,
            Unavailable,
            LoraUnavailable,
            OutOfMemory,
            InsufficientStorage,
            ChatFailed,
        ]
    };
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_as_its_json_name_and_back() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str());
            assert_eq!(serde_json::from_value::<ErrorCode>(json).unwrap(), code);
            assert!((400..600).contains(&code.status()), "{code}");
        }
    }

    #[test]
    fn the_error_shape_stays_code_and_message() {
        let body = ErrorBody {
            error: ErrorDetail::new(ErrorCode::QueueFull, "the queue is full"),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"error": {"code": "queue_full", "message": "the queue is full"}})
        );
    }
}
