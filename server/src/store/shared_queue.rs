//! The queue a cluster's nodes share, in the store: an API node records a job unclaimed (`node` NULL);
//! a worker node claims it (PostgreSQL's `FOR UPDATE SKIP LOCKED`: nodes claiming at once never wait on
//! each other nor take the same job) and holds it by a lease its heartbeat renews. A job whose lease runs
//! out (its node was killed, or lost the database) goes back to the queue for another node, with its
//! events saying so; a training run then resumes from its last checkpoint. Cancelling a job another node
//! runs is a request that node's heartbeat reads.

use std::time::Duration;

use app::{EventBody, JobEvent, JobKind, JobStatus};
use serde_json::Value as Json;

use super::sql::{values, Database, Dialect, Value};
use super::{apply_event, insert_job, last_seq, notify, now_ms, Store};

/// PostgreSQL's NOTIFY channel for a job recorded (the payload: its kind).
pub const JOBS_CHANNEL: &str = "studio_jobs";
/// PostgreSQL's NOTIFY channel for an event recorded (the payload: its job's id).
pub const EVENTS_CHANNEL: &str = "studio_events";

/// Queued jobs a node claims among at once: the oldest, of which its scheduler picks one.
const CANDIDATES: i64 = 16;

/// A queued job as a node choosing what to claim sees it, and what it runs once claimed.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub id: String,
    pub kind: JobKind,
    pub params: Json,
    pub plan: Option<Json>,
    /// Whether it ran before (on a node that stopped): a training run then resumes.
    pub ran_before: bool,
}

/// What came of a request to cancel a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRequest {
    /// It was waiting, unclaimed: now cancelled.
    CancelledWaiting,
    /// A node holds it: that node stops it at its next heartbeat.
    Requested,
    /// It had ended already, with this status.
    Finished(JobStatus),
    Missing,
}

/// `'queued', 'running', …`: the statuses of unfinished jobs, for a statement (constants, not input).
fn unfinished() -> String {
    JobStatus::ALL
        .iter()
        .filter(|s| !s.is_finished())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `FOR UPDATE SKIP LOCKED` where the database has it; SQLite's write transaction already keeps
/// everyone else out.
fn skip_locked(db: &dyn Database) -> &'static str {
    match db.dialect() {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    }
}

/// `FOR UPDATE` where the database has it (SQLite's write transaction is the lock there).
fn for_update(db: &dyn Database) -> &'static str {
    match db.dialect() {
        Dialect::Postgres => " FOR UPDATE",
        Dialect::Sqlite => "",
    }
}

/// Appends an event numbered after the job's log (for a job no node streams live).
fn append(db: &mut dyn Database, job: &str, body: EventBody) -> anyhow::Result<()> {
    let event = JobEvent {
        job_id: job.to_owned(),
        seq: last_seq(db, job)? + 1,
        at: now_ms(),
        body,
    };
    apply_event(db, &event)
}

fn lease_end(lease: Duration) -> i64 {
    now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2)
}

impl Store {
    /// Records a job in the shared queue, unclaimed, with its `queued` event, in one transaction.
    pub fn queue_job(
        &self,
        id: &str,
        kind: JobKind,
        params: &Json,
        plan: Option<&Json>,
        owner: Option<&str>,
    ) -> anyhow::Result<()> {
        self.transaction(|db| {
            insert_job(db, id, kind, params, plan, owner)?;
            let queued = EventBody::Status {
                status: JobStatus::Queued,
            };
            append(db, id, queued)?;
            notify(db, JOBS_CHANNEL, kind.as_str())
        })
    }

    /// Claims for `node`, under a lease of `lease`, the queued job `choose` picks among the oldest
    /// unclaimed ones of `kinds`; `None` when there is none (or `choose` takes none).
    pub fn claim(
        &self,
        node: &str,
        lease: Duration,
        kinds: &[JobKind],
        choose: impl FnOnce(&[Waiting]) -> Option<usize>,
    ) -> anyhow::Result<Option<Waiting>> {
        if kinds.is_empty() {
            return Ok(None);
        }
        self.transaction(|db| {
            let kinds: Vec<String> = kinds.iter().map(|k| format!("'{}'", k.as_str())).collect();
            let sql = format!(
                "SELECT id, kind, params, plan, \
                        (SELECT COUNT(*) FROM events e WHERE e.job_id = jobs.id) \
                 FROM jobs WHERE status = 'queued' AND node IS NULL AND kind IN ({}) \
                 ORDER BY created_at, id LIMIT $1{}",
                kinds.join(", "),
                skip_locked(db)
            );
            let waiting = db
                .query(&sql, values![CANDIDATES])?
                .iter()
                .map(|r| {
                    let kind = r.text(1)?;
                    Ok(Waiting {
                        id: r.text(0)?,
                        kind: JobKind::parse(&kind)
                            .ok_or_else(|| anyhow::anyhow!("unknown job kind {kind:?}"))?,
                        params: serde_json::from_str(&r.text(2)?)?,
                        plan: r
                            .opt_text(3)?
                            .map(|p| serde_json::from_str(&p))
                            .transpose()?,
                        // `queued` is its first event; more means it was taken before.
                        ran_before: r.int(4)? > 1,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let Some(chosen) = choose(&waiting).and_then(|i| waiting.into_iter().nth(i)) else {
                return Ok(None);
            };
            db.execute(
                "UPDATE jobs SET node = $2, lease_until = $3, cancel_requested = 0 WHERE id = $1",
                values![chosen.id.as_str(), node, lease_end(lease)],
            )?;
            Ok(Some(chosen))
        })
    }

    /// Renews `node`'s leases on `jobs`, those it holds (waiting in its queue or running); returns
    /// those of them whose cancel was requested. A job the node no longer holds, whatever its row says,
    /// keeps its lease no longer.
    pub fn renew_leases(
        &self,
        node: &str,
        lease: Duration,
        jobs: &[String],
    ) -> anyhow::Result<Vec<String>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let unfinished = unfinished();
        let mut db = self.db();
        let mut params: Vec<Value> = vec![node.into(), lease_end(lease).into()];
        params.extend(jobs.iter().map(Value::from));
        let ids: Vec<String> = (3..3 + jobs.len()).map(|i| format!("${i}")).collect();
        db.execute(
            &format!(
                "UPDATE jobs SET lease_until = $2 WHERE node = $1 AND status IN ({unfinished}) \
                 AND id IN ({})",
                ids.join(", ")
            ),
            &params,
        )?;
        db.query(
            &format!(
                "SELECT id FROM jobs WHERE node = $1 AND cancel_requested = 1 \
                 AND status IN ({unfinished})"
            ),
            values![node],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect()
    }

    /// Puts back in the queue every unfinished job whose lease ran out (its node stopped renewing it),
    /// each with a log line and a `queued` event; returns their ids.
    pub fn requeue_expired(&self) -> anyhow::Result<Vec<String>> {
        self.transaction(|db| {
            let sql = format!(
                "SELECT id, node FROM jobs WHERE node IS NOT NULL AND lease_until < $1 \
                 AND status IN ({}){}",
                unfinished(),
                skip_locked(db)
            );
            let expired = db
                .query(&sql, values![now_ms()])?
                .iter()
                .map(|r| Ok((r.text(0)?, r.text(1)?)))
                .collect::<anyhow::Result<Vec<(String, String)>>>()?;
            for (id, node) in &expired {
                db.execute(
                    "UPDATE jobs SET node = NULL, lease_until = NULL, worker = NULL WHERE id = $1",
                    values![id.as_str()],
                )?;
                let message = format!(
                    "node {node} stopped renewing its lease on this job: it is back in the queue"
                );
                append(db, id, EventBody::Log { message })?;
                let queued = EventBody::Status {
                    status: JobStatus::Queued,
                };
                append(db, id, queued)?;
            }
            Ok(expired.into_iter().map(|(id, _)| id).collect())
        })
    }

    /// Gives back the jobs `node` claimed but has not started (it is stopping).
    /// Says which workers node `name` has and what they hold, until `lease` from now.
    pub fn announce_node(
        &self,
        name: &str,
        workers: &[app::WorkerInfo],
        lease: Duration,
    ) -> anyhow::Result<()> {
        let workers = serde_json::to_string(workers)?;
        self.db().execute(
            "INSERT INTO nodes (name, workers, seen_until) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET workers = $2, seen_until = $3",
            values![name, workers, lease_end(lease)],
        )?;
        Ok(())
    }

    /// A node stopping cleanly leaves the list at once.
    pub fn forget_node(&self, name: &str) -> anyhow::Result<()> {
        self.db()
            .execute("DELETE FROM nodes WHERE name = $1", values![name])?;
        Ok(())
    }

    /// Every worker of the nodes alive now, by node name and worker id; stopped nodes' rows are removed.
    pub fn cluster_workers(&self) -> anyhow::Result<Vec<app::WorkerInfo>> {
        let mut db = self.db();
        db.execute("DELETE FROM nodes WHERE seen_until < $1", values![now_ms()])?;
        let mut all = Vec::new();
        for row in db.query("SELECT name, workers FROM nodes ORDER BY name", &[])? {
            let node = row.text(0)?;
            let workers: Vec<app::WorkerInfo> = serde_json::from_str(&row.text(1)?)?;
            all.extend(workers.into_iter().map(|w| app::WorkerInfo {
                node: Some(node.clone()),
                ..w
            }));
        }
        Ok(all)
    }

    pub fn release_waiting(&self, node: &str) -> anyhow::Result<u64> {
        self.db().execute(
            "UPDATE jobs SET node = NULL, lease_until = NULL WHERE node = $1 AND status = 'queued'",
            values![node],
        )
    }

    /// Cancels a waiting job at once, or asks the node that holds it to.
    pub fn request_cancel(&self, id: &str) -> anyhow::Result<CancelRequest> {
        self.transaction(|db| {
            let sql = format!(
                "SELECT status, node FROM jobs WHERE id = $1{}",
                for_update(db)
            );
            let Some(row) = db.query_one(&sql, values![id])? else {
                return Ok(CancelRequest::Missing);
            };
            let status = row.text(0)?;
            let status = JobStatus::parse(&status)
                .ok_or_else(|| anyhow::anyhow!("unknown job status {status:?}"))?;
            if status.is_finished() {
                return Ok(CancelRequest::Finished(status));
            }
            if row.opt_text(1)?.is_none() {
                let cancelled = EventBody::Status {
                    status: JobStatus::Cancelled,
                };
                append(db, id, cancelled)?;
                return Ok(CancelRequest::CancelledWaiting);
            }
            db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = $1",
                values![id],
            )?;
            Ok(CancelRequest::Requested)
        })
    }

    /// Puts a finished job (a training run to resume) back in the queue, unclaimed, with a `queued`
    /// event; false when it is not finished.
    pub fn requeue(&self, id: &str) -> anyhow::Result<bool> {
        self.transaction(|db| {
            let unfinished = db.query_one(
                &format!(
                    "SELECT 1 FROM jobs WHERE id = $1 AND status IN ({})",
                    unfinished()
                ),
                values![id],
            )?;
            if unfinished.is_some() {
                return Ok(false);
            }
            db.execute(
                "UPDATE jobs SET node = NULL, lease_until = NULL, worker = NULL, \
                 cancel_requested = 0 WHERE id = $1",
                values![id],
            )?;
            let queued = EventBody::Status {
                status: JobStatus::Queued,
            };
            append(db, id, queued)?;
            Ok(true)
        })
    }

    /// Jobs of `kind` waiting unclaimed: the shared queue's length, which its capacity bounds.
    pub fn waiting(&self, kind: JobKind) -> anyhow::Result<usize> {
        let count = self
            .db()
            .query_one(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND node IS NULL AND kind = $1",
                values![kind.as_str()],
            )?
            .map_or(Ok(0), |r| r.int(0))?;
        Ok(count as usize)
    }
}
