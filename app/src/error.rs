use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error answer of the API: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_json`, `validation`, `queue_full`, `unavailable`, `not_found`, ...
    pub code: String,
    /// For people: what went wrong and what to do about it.
    pub message: String,
}
