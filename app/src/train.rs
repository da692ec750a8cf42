use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::JobStatus;

/// The image files a training ZIP may hold (lower-case extensions; matched without regard to case).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// `POST /train/` multipart form. Documented for the OpenAPI page; the server reads the parts as a stream.
#[derive(Debug, ToSchema)]
pub struct TrainForm {
    /// ZIP of png/jpg/jpeg/webp images at any folder depth, each with an optional same-stem `.txt` caption.
    #[schema(value_type = String, format = Binary)]
    pub dataset: Vec<u8>,
    /// A JSON list of strings (`["realistic", "detailed"]`) or a comma-separated string.
    pub keywords: String,
}

/// `POST /train/` answer (202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainAccepted {
    pub model_id: String,
    pub status: JobStatus,
    pub keywords: Vec<String>,
    /// Further form fields, handed to the trainer (its settings).
    pub settings: serde_json::Map<String, serde_json::Value>,
    pub dataset_bytes: u64,
    /// Image files found in the ZIP.
    pub dataset_images: u32,
}

/// `GET /train/status/{model_id}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainStatus {
    pub model_id: String,
    pub status: JobStatus,
    pub step: u32,
    pub total_steps: u32,
    /// Latest loss; null before the first step.
    pub loss: Option<f32>,
    /// Null unless failed.
    pub error: Option<String>,
    pub keywords: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
}
