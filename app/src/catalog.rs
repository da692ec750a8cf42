use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a model's weights are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ModelState {
    /// Not on disk; fetched on first use.
    Absent,
    Downloading {
        /// 0..1
        progress: f32,
    },
    /// On disk, not in memory.
    Ready,
    /// In memory, answering without a load.
    Loaded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PresetInfo {
    pub id: String,
    pub description: String,
    #[serde(flatten)]
    pub state: ModelState,
}

/// `GET /models/` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelsResponse {
    /// The preset `/generate/` uses when the request names none; null while generation is unavailable.
    pub default_preset: Option<String>,
    pub presets: Vec<PresetInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoraInfo {
    /// The training job's id: pass it as `lora` to `/generate/`.
    pub model_id: String,
    pub keywords: Vec<String>,
    pub size_bytes: u64,
    /// Download at this path.
    pub url: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoraList {
    pub loras: Vec<LoraInfo>,
}

/// Whether one capability (generation, classification, training) works in this server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CapabilityState {
    pub name: String,
    pub available: bool,
    /// Why not, when unavailable.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueState {
    pub waiting: usize,
    pub capacity: usize,
}

/// `GET /health` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    pub status: String,
    pub version: String,
    pub capabilities: Vec<CapabilityState>,
    pub generation_queue: QueueState,
    pub training_queue: QueueState,
    /// Async tasks alive in the server (connections, streams, jobs' waiters): steady when idle, so a leak shows.
    #[serde(default)]
    pub tasks: usize,
    /// The server process's resident memory, where the OS reports it (Linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}
