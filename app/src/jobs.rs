use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Generation,
    Training,
}

/// One status vocabulary for every job. Generation jobs go queued -> running -> end; training jobs go
/// queued -> preparing -> training -> end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Preparing,
    Running,
    Training,
    Completed,
    Failed,
    Cancelled,
    /// The server stopped (or was killed) while the job was queued or running.
    Interrupted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Queued,
        JobStatus::Preparing,
        JobStatus::Running,
        JobStatus::Training,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Interrupted,
    ];

    /// The name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Preparing => "preparing",
            JobStatus::Running => "running",
            JobStatus::Training => "training",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
    }

    /// No more work will happen on a job in this state unless a user resumes it.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Completed
                | JobStatus::Failed
                | JobStatus::Cancelled
                | JobStatus::Interrupted
        )
    }
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Generation => "generation",
            JobKind::Training => "training",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        [JobKind::Generation, JobKind::Training]
            .into_iter()
            .find(|kind| kind.as_str() == s)
    }
}

/// A job as `GET /jobs/` and `GET /jobs/{job_id}` list it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub status: JobStatus,
    /// What the job was asked to do (the request, without uploaded files).
    pub params: serde_json::Value,
    /// What it produced, once completed.
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub step: u32,
    pub total_steps: u32,
    /// Latest training loss.
    pub loss: Option<f32>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
    /// The worker that ran (or runs) it; absent while it waits.
    #[serde(default)]
    pub worker: Option<u32>,
    /// The user whose token submitted it; absent for jobs of the server's own `--token` (or of a server
    /// with no tokens).
    #[serde(default)]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobRecord>,
    /// Every worker of the server and what it holds.
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    /// Running a generation (it may also hold a training run, advanced between generations).
    Generating,
    /// Holding a training run, advanced one step at a time.
    Training,
}

/// One worker: a device with its own resident models under its own memory plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerInfo {
    /// 0-based, as jobs' `worker` names it (within its node, in a cluster).
    pub id: u32,
    /// The cluster node it belongs to (`--node-name`); absent on a studio of one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `cpu`, or `cuda:<ordinal>`.
    pub device: String,
    pub state: WorkerState,
    /// The model presets it holds in memory.
    pub models: Vec<String>,
    /// The LoRAs it holds loaded (trained `model_id`s and the names requests gave).
    pub loras: Vec<String>,
    /// The generation it runs now.
    pub current_job: Option<String>,
    /// The training run it holds.
    pub training_job: Option<String>,
    /// Jobs it has taken since the server started.
    pub jobs_taken: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_match_serde() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert_eq!(JobStatus::parse("done"), None);
    }
}
