//! Each live job has a broadcast channel; every event is numbered, written to the job's log in the store,
//! then sent to whoever listens (WebSockets, a waiting `POST /generate/`). Listeners that fall behind
//! catch up from the log, so the channel stays small.
//!
//! On a cluster's node, a job another node runs is *followed*: its channel is fed from the store's log
//! (`ClusterNode`'s follower reads what the running node recorded), so listeners see the same events
//! wherever the job runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use app::{EventBody, JobEvent};
use tokio::sync::broadcast;

use crate::store::{now_ms, Store};

/// Events a slow listener may lag behind before it has to catch up from the store.
const CHANNEL_CAPACITY: usize = 256;

pub type Listener = broadcast::Receiver<Arc<JobEvent>>;

struct Stream {
    sender: broadcast::Sender<Arc<JobEvent>>,
    next_seq: u64,
    /// Fed from the store's log (another node runs the job), not by `publish`.
    following: bool,
}

impl Stream {
    /// A new live stream of `job_id`, numbered from `next_seq`, and its first listener.
    fn start(
        streams: &mut HashMap<String, Stream>,
        job_id: &str,
        next_seq: u64,
        following: bool,
    ) -> Listener {
        let (sender, listener) = broadcast::channel(CHANNEL_CAPACITY);
        let stream = Stream {
            sender,
            next_seq,
            following,
        };
        streams.insert(job_id.to_owned(), stream);
        listener
    }
}

pub struct EventHub {
    store: Arc<Store>,
    streams: Mutex<HashMap<String, Stream>>,
}

impl EventHub {
    pub fn new(store: Arc<Store>) -> EventHub {
        EventHub {
            store,
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<String, Stream>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes a job live, its numbering continuing after what its log already holds (a resumed job), and
    /// returns a listener that misses nothing published from here on. A followed job's listeners stay:
    /// this node runs it now.
    pub fn open(&self, job_id: &str) -> anyhow::Result<Listener> {
        let next_seq = self.store.last_seq(job_id)? + 1;
        let mut streams = self.streams();
        if let Some(stream) = streams.get_mut(job_id) {
            stream.next_seq = next_seq;
            stream.following = false;
            return Ok(stream.sender.subscribe());
        }
        Ok(Stream::start(&mut streams, job_id, next_seq, false))
    }

    /// Follows a job another node runs (or will): a listener fed from the store's log from here on.
    /// Also for a job this node opened but another will run.
    pub fn follow(&self, job_id: &str) -> anyhow::Result<Listener> {
        let mut streams = self.streams();
        if let Some(stream) = streams.get_mut(job_id) {
            stream.following = true;
            return Ok(stream.sender.subscribe());
        }
        let next_seq = self.store.last_seq(job_id)? + 1;
        Ok(Stream::start(&mut streams, job_id, next_seq, true))
    }

    /// The followed jobs, each with the last event its listeners have.
    pub fn followed(&self) -> Vec<(String, u64)> {
        self.streams()
            .iter()
            .filter(|(_, s)| s.following)
            .map(|(job, s)| (job.clone(), s.next_seq - 1))
            .collect()
    }

    /// Sends a followed job's events read from the log (those its listeners lack); a job that ended
    /// stops being live.
    pub fn deliver(&self, job_id: &str, events: Vec<JobEvent>) {
        let mut streams = self.streams();
        let Some(stream) = streams.get_mut(job_id).filter(|s| s.following) else {
            return;
        };
        let mut ended = false;
        for event in events {
            if event.seq < stream.next_seq {
                continue;
            }
            stream.next_seq = event.seq + 1;
            ended |= matches!(event.body, EventBody::Status { status } if status.is_finished());
            let _ = stream.sender.send(Arc::new(event));
        }
        if ended {
            streams.remove(job_id);
        }
    }

    /// A listener for a live job; `None` when the job is not (or no longer) live.
    pub fn subscribe(&self, job_id: &str) -> Option<Listener> {
        self.streams().get(job_id).map(|s| s.sender.subscribe())
    }

    /// Numbers, records and sends an event. The lock is held across the write so numbering, log order and
    /// delivery order agree.
    pub fn publish(&self, job_id: &str, body: EventBody) -> anyhow::Result<()> {
        let mut streams = self.streams();
        let stream = streams
            .get_mut(job_id)
            .filter(|s| !s.following)
            .ok_or_else(|| anyhow::anyhow!("job {job_id} has no live stream on this node"))?;
        let event = JobEvent {
            job_id: job_id.to_owned(),
            seq: stream.next_seq,
            at: now_ms(),
            body,
        };
        // A shared store that is unreachable for a moment (PostgreSQL restarting) is waited for: a
        // lost status would leave the job unfinished in the log for good. Live listeners hear of the
        // event even when the log cannot keep it (a full disk): a client waiting for its image learns
        // why it failed instead of seeing the stream end.
        let recorded = crate::store::patiently(|| self.store.record_event(&event));
        stream.next_seq += 1;
        // No listener is fine: the log has it.
        let _ = stream.sender.send(Arc::new(event));
        recorded
    }

    /// Ends a job's live stream; listeners receive what was sent, then `Closed`.
    pub fn close(&self, job_id: &str) {
        self.streams().remove(job_id);
    }
}
