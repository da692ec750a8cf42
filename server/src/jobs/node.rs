//! A node of a cluster: processes sharing a PostgreSQL store, each an API node (`studio serve
//! --api-only`), a worker node (`studio worker`), or both (`studio serve`). The queue is the store's
//! (`store::shared_queue`); this module is what a node runs beside its workers and routes:
//!
//! - the dispatcher (worker nodes): claims a queued job whenever a worker of this node could start one,
//!   the job of a model a worker here holds first, and hands it to the node's own queue;
//! - the heartbeat (worker nodes): renews the leases of the jobs this node holds, stops those whose
//!   cancel another node asked for, and puts back in the queue the jobs of nodes that stopped renewing;
//! - the follower (every node): feeds the listeners of jobs other nodes run from the store's log.
//!
//! Each wakes on PostgreSQL's notifications (a job recorded, an event recorded) and polls besides, so a
//! lost notification only delays.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use app::{ErrorCode, ErrorDetail, EventBody, GenerateResponse, JobEvent, JobKind, JobStatus};
use base64::Engine as _;
use serde_json::Value as Json;

use super::capability::GenerationPlan;
use super::queue::{GenerationTicket, TrainingTicket};
use super::{Shared, TrainingParams};
use crate::files::JobId;
use crate::store::shared_queue::Waiting;

/// How this process takes part in a cluster.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's name in the store (`jobs.node`) and the logs; unique among the cluster's nodes.
    pub name: String,
    /// How long a job stays this node's without a heartbeat; the heartbeat renews it every third of it.
    pub lease: Duration,
    /// Whether this node runs jobs (has workers) or only serves the API.
    pub runs_jobs: bool,
}

/// How often the follower looks at the log without being woken.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// How long a follower tries to read a completed generation's result back (its record and images)
/// before its listeners get an error instead.
const RESULT_WAIT: Duration = Duration::from_secs(60);
/// How often the dispatcher looks for work without being woken.
const CLAIM_POLL: Duration = Duration::from_millis(500);

/// Starts the node's threads; they stop once `stopping` is set (and the queues are closed).
pub(super) fn start(
    shared: &Arc<Shared>,
    settings: &NodeSettings,
    stopping: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(format!("studio-{name}"))
            .spawn(f)
            .map(drop)
    };
    let handles = || (Arc::clone(shared), Arc::clone(stopping), settings.clone());
    let (s, stop, _) = handles();
    spawn("follower", Box::new(move || follow(&s, &stop)))?;
    if settings.runs_jobs {
        let (s, stop, node) = handles();
        spawn("dispatcher", Box::new(move || dispatch(&s, &node, &stop)))?;
        let (s, stop, node) = handles();
        spawn("heartbeat", Box::new(move || heartbeat(&s, &node, &stop)))?;
    }
    Ok(())
}

/// Feeds followed jobs' listeners from the log; a followed job that has ended stops being live.
fn follow(shared: &Shared, stopping: &AtomicBool) {
    let mut wakeups = shared
        .store
        .wakeups(crate::store::shared_queue::EVENTS_CHANNEL);
    // Jobs whose result could not be read back yet, with when that first failed.
    let mut unread: HashMap<String, Instant> = HashMap::new();
    while !stopping.load(Ordering::SeqCst) {
        let followed = shared.hub.followed();
        unread.retain(|job, _| followed.iter().any(|(j, _)| j == job));
        for (job, after) in followed {
            if let Err(err) = follow_one(shared, &job, after, &mut unread) {
                tracing::warn!("following job {job}: {err:#}");
            }
        }
        wakeups.wait(FOLLOW_POLL);
    }
}

/// Delivers one followed job's new events.
fn follow_one(
    shared: &Shared,
    job: &str,
    after: u64,
    unread: &mut HashMap<String, Instant>,
) -> anyhow::Result<()> {
    let mut events = shared.store.events_after(job, after)?;
    if events.is_empty() {
        // A job that ended before it was followed ends its stream here. Its status and last event are
        // written together, so the log is read again once the record says it ended: the events
        // written between the two reads are delivered, not lost.
        if !shared
            .store
            .job(job)?
            .is_some_and(|r| r.status.is_finished())
        {
            return Ok(());
        }
        events = shared.store.events_after(job, after)?;
        if events.is_empty() {
            shared.hub.close(job);
            return Ok(());
        }
    }
    let (before, unreadable) = with_results(shared, job, events);
    let events = match unreadable {
        None => {
            unread.remove(job);
            before
        }
        // The events before the completion go out now; the completion waits for its result (the
        // store restarting, the image not yet in the file store), which is read again on the next
        // round. One that stays unreadable ends the job's stream with the reason.
        Some((completed, err)) => {
            let since = *unread.entry(job.to_owned()).or_insert_with(|| {
                // Once, not every round it is tried again.
                tracing::warn!("job {job}: reading its result back (trying again): {err:#}");
                Instant::now()
            });
            if since.elapsed() < RESULT_WAIT {
                before
            } else {
                unread.remove(job);
                tracing::error!("job {job}: its result could not be read back: {err:#}");
                let mut out = before;
                out.push(JobEvent {
                    body: EventBody::Error {
                        error: ErrorDetail::new(
                            ErrorCode::Internal,
                            format!(
                                "the job completed but its result could not be read back: {err:#}"
                            ),
                        ),
                    },
                    ..completed
                });
                out
            }
        }
    };
    shared.hub.deliver(job, events);
    Ok(())
}

/// A finished generation's result is not in the log (its images are files): the running node's
/// listeners got it as the event just before `completed`; a follower's get it there too, read back
/// from the job's record and its image files. When that fails: the events before the completion, and
/// the completion with the reason.
fn with_results(
    shared: &Shared,
    job: &str,
    events: Vec<JobEvent>,
) -> (Vec<JobEvent>, Option<(JobEvent, anyhow::Error)>) {
    let mut out = Vec::with_capacity(events.len() + 1);
    for event in events {
        let completed = matches!(
            event.body,
            EventBody::Status {
                status: JobStatus::Completed
            }
        );
        if completed {
            match generation_result(shared, job) {
                Ok(Some(response)) => out.push(JobEvent {
                    job_id: job.to_owned(),
                    seq: event.seq - 1,
                    at: event.at,
                    body: EventBody::Result(Box::new(response)),
                }),
                Ok(None) => {}
                Err(err) => return (out, Some((event, err))),
            }
        }
        out.push(event);
    }
    (out, None)
}

/// A completed generation's answer as its worker sent it: the record, with each image's PNG.
fn generation_result(shared: &Shared, job: &str) -> anyhow::Result<Option<GenerateResponse>> {
    let Some(record) = shared.store.job(job)? else {
        return Ok(None);
    };
    let Some(mut result) = record.result.filter(|_| record.kind == JobKind::Generation) else {
        return Ok(None);
    };
    let id: JobId = job.parse().map_err(anyhow::Error::msg)?;
    let png = |index: u32| -> anyhow::Result<Json> {
        let path = shared.data.image_at(id, index);
        shared.data.fetch(&path)?;
        let bytes = std::fs::read(path)?;
        Ok(Json::String(
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ))
    };
    result["image"] = png(0)?;
    if let Some(list) = result.get_mut("images").and_then(|l| l.as_array_mut()) {
        for (i, entry) in list.iter_mut().enumerate() {
            entry["image"] = png(i as u32)?;
        }
    }
    Ok(Some(serde_json::from_value(result)?))
}

/// Claims work while a worker of this node could start it.
fn dispatch(shared: &Shared, node: &NodeSettings, stopping: &AtomicBool) {
    let mut wakeups = shared
        .store
        .wakeups(crate::store::shared_queue::JOBS_CHANNEL);
    while !stopping.load(Ordering::SeqCst) {
        match claim_one(shared, node) {
            // Look again at once: there may be more, and room for it.
            Ok(true) => continue,
            Ok(false) => {}
            Err(err) => tracing::warn!("claiming a job: {err:#}"),
        }
        shared.queues.wait_for_room(CLAIM_POLL);
        wakeups.wait(CLAIM_POLL);
    }
    match shared.store.release_waiting(&node.name) {
        Ok(0) => {}
        Ok(n) => tracing::info!("gave {n} claimed job(s) back to the queue"),
        Err(err) => tracing::warn!("giving claimed jobs back: {err:#}"),
    }
}

/// Claims one job if a worker here is free to start it; whether it claimed one.
fn claim_one(shared: &Shared, node: &NodeSettings) -> anyhow::Result<bool> {
    let room = shared.queues.room();
    if !room.generation && !room.training {
        return Ok(false);
    }
    let kinds: Vec<JobKind> = [
        (room.generation, JobKind::Generation),
        (room.training, JobKind::Training),
    ]
    .into_iter()
    .filter_map(|(ok, kind)| ok.then_some(kind))
    .collect();
    let held = room.held_models;
    let claimed = shared
        .store
        .claim(&node.name, node.lease, &kinds, |waiting| {
            // A generation of a model a worker here holds first, else the oldest.
            waiting
                .iter()
                .position(|w| {
                    w.plan
                        .as_ref()
                        .and_then(|p| p.get("model"))
                        .and_then(|m| m.as_str())
                        .is_some_and(|m| held.iter().any(|h| h == m))
                })
                .or((!waiting.is_empty()).then_some(0))
        })?;
    let Some(job) = claimed else {
        return Ok(false);
    };
    if let Err(err) = hand_over(shared, &job) {
        // Not runnable here (a plan this build cannot read, say): it fails rather than bounce between
        // nodes.
        tracing::error!("job {}: {err:#}", job.id);
        shared.fail_unstarted(&job.id, &format!("{err:#}"));
    }
    Ok(true)
}

/// Makes a claimed job live on this node and queues it for its workers.
fn hand_over(shared: &Shared, job: &Waiting) -> anyhow::Result<()> {
    let id: JobId = job.id.parse().map_err(anyhow::Error::msg)?;
    shared.hub.open(&job.id)?;
    let cancel = shared.new_cancel(id);
    let pushed = match job.kind {
        JobKind::Generation => {
            let plan: GenerationPlan = serde_json::from_value(
                job.plan
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("the queued generation has no plan"))?,
            )?;
            shared
                .queues
                .push_generation(GenerationTicket { id, plan, cancel })
        }
        JobKind::Training => {
            let params: TrainingParams = serde_json::from_value(job.params.clone())?;
            let spec = shared.training_spec(id, &params, job.ran_before);
            shared
                .queues
                .push_training(TrainingTicket { id, spec, cancel })
        }
    };
    pushed.map_err(|_| anyhow::anyhow!("this node's queue is full"))
}

/// Renews this node's leases, carries out cancels asked elsewhere, and requeues others' expired jobs.
fn heartbeat(shared: &Shared, node: &NodeSettings, stopping: &AtomicBool) {
    let beat = node.lease / 3;
    while !stopping.load(Ordering::SeqCst) {
        // Every node's `/health` lists this one's workers from here.
        let workers = shared.queues.workers();
        if let Err(err) = shared.store.announce_node(&node.name, &workers, node.lease) {
            tracing::warn!("announcing this node's workers: {err:#}");
        }
        let held: Vec<String> = shared.cancels().keys().map(JobId::to_string).collect();
        match shared.store.renew_leases(&node.name, node.lease, &held) {
            Ok(cancelled) => {
                for job in cancelled {
                    if let Ok(id) = job.parse::<JobId>() {
                        // 409 (finished meanwhile) is nothing to act on.
                        let _ = shared.cancel_local(id);
                    }
                }
            }
            Err(err) => tracing::warn!("renewing this node's leases: {err:#}"),
        }
        match shared.store.requeue_expired() {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(
                    "{} job(s) of a node that stopped are back in the queue",
                    ids.len()
                )
            }
            Ok(_) => {}
            Err(err) => tracing::warn!("requeueing expired jobs: {err:#}"),
        }
        std::thread::sleep(beat);
    }
    // Stopping cleanly: off the list at once rather than when the lease runs out.
    if let Err(err) = shared.store.forget_node(&node.name) {
        tracing::warn!("taking this node off the cluster's list: {err:#}");
    }
}
