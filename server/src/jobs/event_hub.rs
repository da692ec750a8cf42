//! Each live job has a broadcast channel; every event is numbered, written to the job's log in the store,
//! then sent to whoever listens (WebSockets, a waiting `POST /generate/`). Listeners that fall behind
//! catch up from the log, so the channel stays small.

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
    /// returns a listener that misses nothing published from here on.
    pub fn open(&self, job_id: &str) -> anyhow::Result<Listener> {
        let next_seq = self.store.last_seq(job_id)? + 1;
        let (sender, listener) = broadcast::channel(CHANNEL_CAPACITY);
        self.streams()
            .insert(job_id.to_owned(), Stream { sender, next_seq });
        Ok(listener)
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
            .ok_or_else(|| anyhow::anyhow!("job {job_id} has no live stream"))?;
        let event = JobEvent {
            job_id: job_id.to_owned(),
            seq: stream.next_seq,
            at: now_ms(),
            body,
        };
        // Live listeners hear of the event even when the log cannot keep it (a full disk): a client
        // waiting for its image learns why it failed instead of seeing the stream end.
        let recorded = self.store.record_event(&event);
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
