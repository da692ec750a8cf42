//! Jobs: submitted by the routes, queued with bounded lengths, run by a worker thread per device (each
//! with its own engine), announced on per-job event streams, and kept in the store. See `queue` for which
//! worker takes which job, and in which order.

pub mod capability;
pub mod event_hub;
mod node;
pub mod queue;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use app::{EventBody, GenerateRequest, JobKind, JobRecord, JobStatus, QueueState};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::files::{DataDir, JobId};
use crate::store::shared_queue::CancelRequest;
use crate::store::{Store, Viewer};
use capability::{Capabilities, GenerationPlan, TrainingSpec, WorkerEngine};
use event_hub::{EventHub, Listener};
pub use node::NodeSettings;
use queue::{GenerationTicket, QueueFull, Queues, TrainingTicket};
pub use worker::panic_message;

/// What a training job keeps in its `params`: enough to start it again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingParams {
    pub keywords: Vec<String>,
    pub settings: app::TrainSettingsForm,
    pub dataset_bytes: u64,
    pub dataset_images: u32,
}

pub(crate) struct Shared {
    store: Arc<Store>,
    hub: EventHub,
    queues: Queues,
    data: DataDir,
    caps: Capabilities,
    /// Each worker's engine, by worker id.
    engines: Vec<WorkerEngine>,
    /// The cancel flag of every job that is queued or running here.
    cancels: Mutex<HashMap<JobId, Arc<AtomicBool>>>,
    /// Set when this process is a node of a cluster: the queue is then the shared store's.
    node: Option<NodeSettings>,
    /// Tells the node's threads to stop.
    stopping: Arc<AtomicBool>,
    generation_capacity: usize,
    training_capacity: usize,
}

impl Shared {
    fn cancels(&self) -> MutexGuard<'_, HashMap<JobId, Arc<AtomicBool>>> {
        self.cancels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn new_cancel(&self, id: JobId) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.cancels().insert(id, Arc::clone(&flag));
        flag
    }

    fn forget_cancel(&self, id: JobId) {
        self.cancels().remove(&id);
    }

    fn store_error(context: &str) -> impl FnOnce(anyhow::Error) -> ApiError + '_ {
        move |err| ApiError::store(context, err)
    }

    fn submit_generation(
        &self,
        request: &GenerateRequest,
        plan: GenerationPlan,
        owner: Option<&str>,
    ) -> Result<(JobId, Listener), ApiError> {
        let id = JobId::random();
        let job = id.to_string();
        if self.node.is_some() {
            let plan = serde_json::to_value(&plan)
                .map_err(|err| ApiError::internal("recording the job's plan", err))?;
            let listener =
                self.queue_shared(&job, JobKind::Generation, request, Some(&plan), owner)?;
            return Ok((id, listener));
        }
        let listener = self.record_new(&job, JobKind::Generation, request, owner)?;
        let cancel = self.new_cancel(id);
        self.enqueue(id, JobKind::Generation, |queues| {
            queues.push_generation(GenerationTicket { id, plan, cancel })
        })?;
        Ok((id, listener))
    }

    fn submit_training(
        &self,
        id: JobId,
        params: &TrainingParams,
        owner: Option<&str>,
    ) -> Result<(), ApiError> {
        let job = id.to_string();
        if self.node.is_some() {
            return self
                .queue_shared(&job, JobKind::Training, params, None, owner)
                .map(drop);
        }
        self.record_new(&job, JobKind::Training, params, owner)?;
        let spec = self.training_spec(id, params, false);
        let cancel = self.new_cancel(id);
        self.enqueue(id, JobKind::Training, |queues| {
            queues.push_training(TrainingTicket { id, spec, cancel })
        })
    }

    /// A cluster's node: records the job, unclaimed, in the shared queue (bounded by its capacity) with its
    /// `queued` event; the listener follows it wherever it runs.
    fn queue_shared(
        &self,
        job: &str,
        kind: JobKind,
        params: &impl Serialize,
        plan: Option<&serde_json::Value>,
        owner: Option<&str>,
    ) -> Result<Listener, ApiError> {
        let capacity = match kind {
            JobKind::Generation => self.generation_capacity,
            JobKind::Training => self.training_capacity,
        };
        let waiting = self
            .store
            .waiting(kind)
            .map_err(Shared::store_error("reading the queue"))?;
        if waiting >= capacity {
            return Err(ApiError::queue_full(kind.as_str()));
        }
        let listener = self
            .hub
            .follow(job)
            .map_err(Shared::store_error("opening the job's stream"))?;
        let queued = serde_json::to_value(params)
            .map_err(anyhow::Error::from)
            .and_then(|params| self.store.queue_job(job, kind, &params, plan, owner));
        if let Err(err) = queued {
            self.hub.close(job);
            return Err(ApiError::store("recording the job", err));
        }
        Ok(listener)
    }

    /// Opens a new job's stream (the listener sees everything from here on), records the job and its
    /// `queued` event.
    fn record_new(
        &self,
        job: &str,
        kind: JobKind,
        params: &impl Serialize,
        owner: Option<&str>,
    ) -> Result<Listener, ApiError> {
        let listener = self
            .hub
            .open(job)
            .map_err(Shared::store_error("opening the job's stream"))?;
        let recorded = serde_json::to_value(params)
            .map_err(anyhow::Error::from)
            .and_then(|params| self.store.insert_job(job, kind, &params, None, owner))
            .and_then(|()| {
                self.hub.publish(
                    job,
                    EventBody::Status {
                        status: JobStatus::Queued,
                    },
                )
            });
        if let Err(err) = recorded {
            self.hub.close(job);
            return Err(ApiError::store("recording the job", err));
        }
        Ok(listener)
    }

    /// Pushes a recorded job; when its queue is full the job is removed again, as if never submitted.
    fn enqueue(
        &self,
        id: JobId,
        kind: JobKind,
        push: impl FnOnce(&Queues) -> Result<(), QueueFull>,
    ) -> Result<(), ApiError> {
        if push(&self.queues).is_ok() {
            return Ok(());
        }
        let job = id.to_string();
        self.hub.close(&job);
        self.forget_cancel(id);
        if let Err(err) = self.store.delete_job(&job) {
            tracing::error!("job {job}: removing a refused job failed: {err:#}");
        }
        Err(ApiError::queue_full(kind.as_str()))
    }

    fn resume_training(&self, id: JobId) -> Result<JobRecord, ApiError> {
        let job = id.to_string();
        let record = self.record(id)?;
        if record.kind != JobKind::Training {
            return Err(ApiError::not_found(format!("no training job {job}")));
        }
        if !matches!(
            record.status,
            JobStatus::Interrupted | JobStatus::Cancelled | JobStatus::Failed
        ) {
            return Err(ApiError::conflict(format!(
                "training job {job} is {}; only interrupted, cancelled or failed runs can be resumed",
                record.status.as_str()
            )));
        }
        let params: TrainingParams = serde_json::from_value(record.params.clone())
            .map_err(|e| ApiError::internal("reading the job's parameters", e))?;
        let spec = self.training_spec(id, &params, true);
        if !spec.dataset.is_file() {
            return Err(ApiError::conflict(format!(
                "the dataset of training job {job} is gone; upload it again"
            )));
        }
        if self.node.is_some() {
            self.hub
                .follow(&job)
                .map_err(Shared::store_error("opening the job's stream"))?;
            let requeued = self
                .store
                .requeue(&job)
                .map_err(Shared::store_error("recording the job"))?;
            if !requeued {
                return Err(ApiError::conflict(format!(
                    "training job {job} was started again meanwhile"
                )));
            }
            return self.record(id);
        }
        // Announce first, then queue: the worker's `preparing` must come after `queued` in the log. A full
        // queue puts the job back to the status it had.
        self.hub
            .open(&job)
            .map_err(Shared::store_error("opening the job's stream"))?;
        let queued = self.hub.publish(
            &job,
            EventBody::Status {
                status: JobStatus::Queued,
            },
        );
        if let Err(err) = queued {
            self.hub.close(&job);
            return Err(ApiError::store("recording the job", err));
        }
        let cancel = self.new_cancel(id);
        if self
            .queues
            .push_training(TrainingTicket { id, spec, cancel })
            .is_err()
        {
            self.forget_cancel(id);
            let restored = self.hub.publish(
                &job,
                EventBody::Status {
                    status: record.status,
                },
            );
            self.hub.close(&job);
            restored.map_err(Shared::store_error("restoring the job's status"))?;
            return Err(ApiError::queue_full("training"));
        }
        self.record(id)
    }

    fn training_spec(&self, id: JobId, params: &TrainingParams, resume: bool) -> TrainingSpec {
        TrainingSpec {
            model_id: id.to_string(),
            dataset: self.data.dataset(id),
            job_dir: self.data.job_dir(id),
            samples_dir: self.data.samples_dir(id),
            lora_file: self.data.lora(id),
            keywords: params.keywords.clone(),
            settings: Box::new(params.settings.clone()),
            resume,
        }
    }

    fn cancel(&self, id: JobId) -> Result<JobRecord, ApiError> {
        if let Some(done) = self.cancel_local(id) {
            return done;
        }
        if self.node.is_some() {
            let request = self
                .store
                .request_cancel(&id.to_string())
                .map_err(Shared::store_error("recording the cancellation"))?;
            return match request {
                CancelRequest::CancelledWaiting | CancelRequest::Requested => self.record(id),
                CancelRequest::Finished(_) => Err(already(&self.record(id)?)),
                CancelRequest::Missing => Err(ApiError::not_found(format!("no job {id}"))),
            };
        }
        Err(already(&self.record(id)?))
    }

    /// Cancels a job this process holds (waiting in its queue, or running); `None` when it holds none.
    fn cancel_local(&self, id: JobId) -> Option<Result<JobRecord, ApiError>> {
        let job = id.to_string();
        if self.queues.remove(id) {
            self.forget_cancel(id);
            let published = self.hub.publish(
                &job,
                EventBody::Status {
                    status: JobStatus::Cancelled,
                },
            );
            self.hub.close(&job);
            return Some(
                published
                    .map_err(Shared::store_error("recording the cancellation"))
                    .and_then(|()| self.record(id)),
            );
        }
        let flag = self.cancels().get(&id).cloned()?;
        // Running: the worker stops at its next step and records the cancellation itself. A job that
        // has just ended still holds its flag for a moment (the worker records its last status, then
        // lets go of the flag): that one is finished.
        flag.store(true, Ordering::SeqCst);
        Some(self.record(id).and_then(|record| {
            if record.status.is_finished() {
                Err(already(&record))
            } else {
                Ok(record)
            }
        }))
    }

    fn record(&self, id: JobId) -> Result<JobRecord, ApiError> {
        self.record_for(id, &Viewer::All)
    }

    /// The job as `viewer` may see it: another user's is not found, as one that does not exist.
    fn record_for(&self, id: JobId, viewer: &Viewer) -> Result<JobRecord, ApiError> {
        self.store
            .job(&id.to_string())
            .map_err(Shared::store_error("reading the job"))?
            .filter(|record| viewer.sees(record.owner.as_deref()))
            .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
    }
}

/// The 409 for cancelling a job that has finished.
fn already(record: &JobRecord) -> ApiError {
    ApiError::conflict(format!(
        "job {} is already {}",
        record.id,
        record.status.as_str()
    ))
}

/// A job folder with no job row is an upload the last process never acknowledged (killed mid-upload):
/// its client got no `model_id`, so nothing can reach it; remove it rather than let partial ZIPs pile up.
fn remove_orphan_uploads(store: &Store, data: &DataDir) -> anyhow::Result<()> {
    for id in data.job_dirs()? {
        if store.job(&id.to_string())?.is_none() {
            let dir = data.job_dir(id);
            tracing::warn!(
                "removing {}: an upload that was never acknowledged",
                dir.display()
            );
            std::fs::remove_dir_all(&dir)?;
        }
    }
    Ok(())
}

/// The routes' handle on the job system.
#[derive(Clone)]
pub struct Jobs {
    shared: Arc<Shared>,
}

impl Jobs {
    /// Alone (`node` is `None`): marks what the last process left unfinished as interrupted. Then starts
    /// a thread per worker, and a cluster's node its own threads (`node`).
    pub fn start(
        store: Arc<Store>,
        data: DataDir,
        caps: Capabilities,
        generation_queue: usize,
        training_queue: usize,
        node: Option<NodeSettings>,
    ) -> anyhow::Result<Jobs> {
        if node.is_none() {
            let interrupted = store.interrupt_unfinished()?;
            if !interrupted.is_empty() {
                tracing::warn!(
                    "{} job(s) were unfinished at the last stop and are now interrupted",
                    interrupted.len()
                );
            }
            // On a cluster another node may be receiving an upload into the shared folder right now.
            remove_orphan_uploads(&store, &data)?;
        }
        let engines = match &node {
            Some(node) if !node.runs_jobs => Vec::new(),
            _ => caps.worker_engines(),
        };
        let devices: Vec<String> = engines.iter().map(|e| e.device.clone()).collect();
        let shared = Arc::new(Shared {
            hub: EventHub::new(Arc::clone(&store)),
            store,
            queues: Queues::new(generation_queue, training_queue, &devices),
            data,
            caps,
            engines,
            cancels: Mutex::default(),
            node: node.clone(),
            stopping: Arc::default(),
            generation_capacity: generation_queue,
            training_capacity: training_queue,
        });
        for (id, device) in devices.iter().enumerate() {
            let worker = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("studio-worker-{id}"))
                .spawn(move || worker::run(worker, id))?;
            tracing::info!("worker {id} on {device}");
        }
        if let Some(node) = &node {
            node::start(&shared, node, &shared.stopping)?;
            tracing::info!(
                "cluster node {} ({})",
                node.name,
                if node.runs_jobs {
                    "runs jobs"
                } else {
                    "API only"
                }
            );
        }
        Ok(Jobs { shared })
    }

    /// Runs job-system work that touches the disk on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .unwrap_or_else(|err| Err(ApiError::internal("job system task", err)))
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    pub fn data(&self) -> &DataDir {
        &self.shared.data
    }

    /// Queues a generation of `viewer`'s; the listener sees every event of it from `queued` on.
    pub async fn submit_generation(
        &self,
        request: GenerateRequest,
        plan: GenerationPlan,
        viewer: &Viewer,
    ) -> Result<(JobId, Listener), ApiError> {
        let owner = viewer.owner().map(str::to_owned);
        self.blocking(move |shared| shared.submit_generation(&request, plan, owner.as_deref()))
            .await
    }

    /// Queues a training run of `viewer`'s whose dataset is already at `DataDir::dataset(id)`.
    pub async fn submit_training(
        &self,
        id: JobId,
        params: TrainingParams,
        viewer: &Viewer,
    ) -> Result<(), ApiError> {
        let owner = viewer.owner().map(str::to_owned);
        self.blocking(move |shared| shared.submit_training(id, &params, owner.as_deref()))
            .await
    }

    /// Resumes a training run `viewer` may see.
    pub async fn resume_training(&self, id: JobId, viewer: &Viewer) -> Result<JobRecord, ApiError> {
        let viewer = viewer.clone();
        self.blocking(move |shared| {
            shared.record_for(id, &viewer)?;
            shared.resume_training(id)
        })
        .await
    }

    /// Cancels a queued job at once, a running one at its next step; 409 for a finished one.
    pub async fn cancel(&self, id: JobId) -> Result<JobRecord, ApiError> {
        self.blocking(move |shared| shared.cancel(id)).await
    }

    /// Cancels a job `viewer` may see, as [`Jobs::cancel`].
    pub async fn cancel_for(&self, id: JobId, viewer: &Viewer) -> Result<JobRecord, ApiError> {
        let viewer = viewer.clone();
        self.blocking(move |shared| {
            shared.record_for(id, &viewer)?;
            shared.cancel(id)
        })
        .await
    }

    pub async fn record(&self, id: JobId) -> Result<JobRecord, ApiError> {
        self.blocking(move |shared| shared.record(id)).await
    }

    /// The job if `viewer` may see it; 404 otherwise, as for a job that does not exist.
    pub async fn record_for(&self, id: JobId, viewer: &Viewer) -> Result<JobRecord, ApiError> {
        let viewer = viewer.clone();
        self.blocking(move |shared| shared.record_for(id, &viewer))
            .await
    }

    /// A listener for a live job, `None` for one that is not live. On a cluster's node, a job another
    /// node runs is followed (and one that has ended ends its stream at once).
    pub async fn subscribe(&self, id: JobId) -> Option<Listener> {
        let job = id.to_string();
        if let Some(listener) = self.shared.hub.subscribe(&job) {
            return Some(listener);
        }
        self.shared.node.as_ref()?;
        self.blocking(move |shared| Ok(shared.hub.follow(&job).ok()))
            .await
            .ok()
            .flatten()
    }

    /// The queues' lengths: this process's, or on a cluster's node the shared queue's.
    pub async fn queue_states(&self) -> Result<(QueueState, QueueState), ApiError> {
        self.blocking(|shared| {
            let ((generation, _), (training, _)) = shared.queues.lengths();
            let (generation, training) = if shared.node.is_some() {
                let waiting = |kind| {
                    shared
                        .store
                        .waiting(kind)
                        .map_err(Shared::store_error("reading the queue"))
                };
                (waiting(JobKind::Generation)?, waiting(JobKind::Training)?)
            } else {
                (generation, training)
            };
            Ok((
                QueueState {
                    waiting: generation,
                    capacity: shared.generation_capacity,
                },
                QueueState {
                    waiting: training,
                    capacity: shared.training_capacity,
                },
            ))
        })
        .await
    }

    /// Every worker, what it holds and what it runs: this process's, or on a cluster's node every live
    /// node's, as their heartbeats last announced them.
    pub async fn workers(&self) -> Result<Vec<app::WorkerInfo>, ApiError> {
        if self.shared.node.is_none() {
            return Ok(self.shared.queues.workers());
        }
        self.blocking(|shared| {
            shared
                .store
                .cluster_workers()
                .map_err(Shared::store_error("reading the cluster's workers"))
        })
        .await
    }

    /// Every worker's engine, by worker id.
    pub fn engines(&self) -> &[WorkerEngine] {
        &self.shared.engines
    }

    /// Stops the workers after their current step; what it leaves unfinished is interrupted at the next
    /// start (on a cluster: its jobs go back to the queue when their leases run out).
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.queues.close();
    }
}
