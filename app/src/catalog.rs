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
    /// The memory plan it was loaded with: present while it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_plan: Option<MemoryPlanInfo>,
    /// The precision of its requests that set none (the server's `--precision`); absent: the model
    /// as it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<crate::Precision>,
}

/// Where a part of a model lives under its memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartPlacement {
    /// On the GPU all the time.
    Resident,
    /// On the GPU only while it runs (text encoders, for a prompt not in the prompt cache).
    WhileRunning,
    /// In host memory, computed by the CPU.
    Cpu,
    /// `streamed_bytes` of its blocks stay in host memory and are copied to the GPU layer by layer as
    /// they run: the transformer's when even its smallest format does not fit (every step), T5's when
    /// it cannot sit beside the transformer (once per new prompt).
    Streamed,
}

/// One part of a model in its memory plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemoryPart {
    /// `transformer`, `T5`, `CLIP`, `MiniLM` or `autoencoder`.
    pub part: String,
    pub placement: PartPlacement,
    /// The weights' format: `bf16` (the compute dtype), `fp8`, `q8_0`, `q6_k`, `q5_k`, `q4_k`, `q4_0`.
    pub format: String,
    pub params: u64,
    /// Its weights' bytes, on the GPU (in host memory when placed on the CPU).
    pub bytes: u64,
    /// Of those, the bytes kept in host memory and copied to the GPU as they run (`streamed`
    /// placement): what a step (the transformer) or a new prompt (T5) moves over the PCIe link.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streamed_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A loaded model's memory plan: chosen at load from the GPU memory it may use (docs/memory.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemoryPlanInfo {
    /// The GPU memory the plan may use, in bytes (`--gpu-memory`, else the GPU's free memory at load);
    /// null when there is no limit (a CPU with no cap).
    pub budget_bytes: Option<u64>,
    pub parts: Vec<MemoryPart>,
    /// The size the plan was chosen for (the preset's default).
    pub width: u32,
    pub height: u32,
    /// The estimated GPU peak at that size, in bytes.
    pub peak_bytes: u64,
    /// Whether that size decodes in tiles (a whole decode does not fit).
    pub tiled_decode: bool,
    /// The largest square side that fits; larger requests are refused with 422.
    pub max_side: u32,
    /// The plan in one line, as the server log shows it.
    pub summary: String,
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
    /// The loaded model's memory plan; absent while no model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_plan: Option<MemoryPlanInfo>,
    /// Every worker (one per GPU, or `--workers` on the CPU) and what it holds.
    #[serde(default)]
    pub workers: Vec<crate::WorkerInfo>,
}
