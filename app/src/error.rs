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

/// Declares [`ErrorCode`] from one list, each code once with its HTTP status, its JSON name and what
/// it means, so the enum, [`ErrorCode::status`], [`ErrorCode::as_str`] and [`ErrorCode::ALL`] cannot
/// drift apart.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $code:ident = $status:literal, $name:literal;)*) => {
        /// The error codes of the API, each with the one HTTP status it is answered with. A
        /// generation's or training's `error` event carries the same codes.
        // utoipa does not see a `serde(rename)` whose name comes from the macro, so the JSON names
        // come from `rename_all`; a test holds them equal to the list's.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $(
                #[doc = concat!($status, ":", $($doc),*)]
                $code,
            )*
        }

        impl ErrorCode {
            /// Every code, in the order declared.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$code),*];

            /// The HTTP status this code is answered with.
            pub const fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$code => $status,)*
                }
            }

            /// The code as it appears in JSON.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$code => $name,)*
                }
            }
        }
    };
}

error_codes! {
    /// the body is not JSON, or not the expected shape of JSON on a WebSocket.
    InvalidJson = 400, "invalid_json";
    /// the multipart body is malformed (or a form field has no name, or comes twice).
    InvalidMultipart = 400, "invalid_multipart";
    /// a form field is not UTF-8 text.
    InvalidUtf8 = 400, "invalid_utf8";
    /// a form field that may come once came twice.
    DuplicateField = 400, "duplicate_field";
    /// a path parameter that cannot be read.
    InvalidPath = 400, "invalid_path";
    /// a query string that cannot be read.
    InvalidQuery = 400, "invalid_query";
    /// a plain HTTP request to a WebSocket route.
    WebsocketRequired = 400, "websocket_required";
    /// any other malformed request.
    BadRequest = 400, "bad_request";
    /// this server needs its token.
    Unauthorized = 401, "unauthorized";
    /// the route, or the job, image, LoRA or conversation it names, does not exist.
    NotFound = 404, "not_found";
    /// the route does not take this method.
    MethodNotAllowed = 405, "method_not_allowed";
    /// the job is not in a state that allows this.
    Conflict = 409, "conflict";
    /// the job was cancelled before it answered.
    Cancelled = 409, "cancelled";
    /// the body is over the server's limit for this route.
    TooLarge = 413, "too_large";
    /// the body's content type is not one this route takes.
    UnsupportedMediaType = 415, "unsupported_media_type";
    /// a field's value is out of its range, missing, or unknown.
    Validation = 422, "validation";
    /// the training ZIP holds nothing to train on; `files` names each file and why.
    InvalidDataset = 422, "invalid_dataset";
    /// a hub LoRA whose repository or file does not exist.
    LoraNotFound = 422, "lora_not_found";
    /// the queue is full; retry after a job finishes.
    QueueFull = 429, "queue_full";
    /// a failure of ours; details in the server log.
    Internal = 500, "internal";
    /// a generation failed inside its job.
    GenerationFailed = 500, "generation_failed";
    /// a training run failed inside its job.
    TrainingFailed = 500, "training_failed";
    /// the capability is not available on this server (the message says why).
    Unavailable = 503, "unavailable";
    /// a hub LoRA could not be fetched (network, hub, token): retry later.
    LoraUnavailable = 503, "lora_unavailable";
    /// the GPU ran out of memory for this job: smaller sizes or fewer LoRAs may fit.
    OutOfMemory = 503, "out_of_memory";
    /// the server's disk is full: nothing of the request was kept.
    InsufficientStorage = 507, "insufficient_storage";
    /// the language model failed while answering (the conversation keeps the user's message).
    ChatFailed = 500, "chat_failed";
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
        for &code in ErrorCode::ALL {
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
