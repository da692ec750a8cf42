//! The job store: jobs (a row each, kept current, with their owner and worker), their events
//! (append-only, for replay), settings, the chat's conversations with their messages, and users' API
//! tokens (hashed). In SQLite (the embedded default, a file in the data directory) or in PostgreSQL (a
//! cluster's shared store), with one schema and the same statements for both (`sql`, `schema`). One
//! connection behind a mutex: every statement is short, and the worker threads and the request handlers
//! (through `Store::call`, off the async runtime) share it.

mod postgres;
pub mod schema;
pub mod shared_queue;
pub mod sql;
mod sqlite;
#[doc(hidden)]
pub mod throwaway;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use app::{
    ChatFinish, ChatMessage, ChatRole, Conversation, ConversationSummary, EventBody, JobEvent,
    JobKind, JobRecord, JobStatus,
};
use serde_json::{Map, Value as Json};

use schema::SCHEMA_VERSION;
use sql::{values, Database, Row, Value};

/// Where the store is: a SQLite file, or a PostgreSQL database named by its URL.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Postgres(String),
}

impl Location {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; anything else is a SQLite file's path.
    pub fn parse(text: &str) -> Location {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Location::Postgres(text.to_owned())
        } else {
            Location::File(PathBuf::from(text))
        }
    }
}

/// Shown in logs and errors without the URL's password.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::Postgres(url) => match (url.find("://"), url.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    let credentials = &url[scheme + 3..at];
                    let user = credentials.split(':').next().unwrap_or_default();
                    write!(f, "{}{user}:***{}", &url[..scheme + 3], &url[at..])
                }
                _ => f.write_str(url),
            },
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// An API token as `studio token list` shows it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub admin: bool,
    pub created_at: i64,
}

/// Whose request it is, as the token says: which jobs and conversations it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// The server's own `--token`, an admin's token, or a server with no tokens: everything.
    All,
    /// A user's token: that user's own.
    User(String),
}

impl Viewer {
    /// The owner recorded on what this viewer creates.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Viewer::All => None,
            Viewer::User(user) => Some(user),
        }
    }

    /// Whether it may see something of `owner`.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self {
            Viewer::All => true,
            Viewer::User(user) => owner == Some(user.as_str()),
        }
    }
}

/// SHA-256 of a token, in hex: what the store keeps.
fn token_hash(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Characters of the first message a conversation's title keeps.
const TITLE_CHARS: usize = 60;

/// A message to append to a conversation.
pub struct NewMessage<'a> {
    pub role: ChatRole,
    pub content: &'a str,
    pub image_job: Option<&'a str>,
    pub model: Option<&'a str>,
    pub finish: Option<ChatFinish>,
}

pub struct Store {
    db: Mutex<Box<dyn Database>>,
    location: Location,
}

/// What a node's thread waits on between looks at the store: PostgreSQL's notifications on a channel
/// (another node recorded something), or simply time on SQLite, which one process owns.
pub struct Wakeups(Option<postgres::Listener>);

impl Wakeups {
    /// Returns when woken, or after `timeout`.
    pub fn wait(&mut self, timeout: Duration) {
        match &mut self.0 {
            Some(listener) => listener.wait(timeout),
            None => std::thread::sleep(timeout),
        }
    }
}

/// Whether this error of the store's says the database's disk is full (the operator's to fix).
pub fn is_disk_full(err: &anyhow::Error) -> bool {
    sqlite::is_disk_full(err) || postgres::is_disk_full(err)
}

/// Whether this error of the store's is its database being unreachable for now (PostgreSQL
/// restarting, say): worth trying again in a moment.
pub fn is_unreachable(err: &anyhow::Error) -> bool {
    postgres::is_unreachable(err)
}

/// How long a write that must not be lost waits for an unreachable shared store to come back.
const UNREACHABLE_WAIT: Duration = Duration::from_secs(60);

/// Runs a write that must not be lost (an event, a job's result), trying again while the store is
/// unreachable for a moment (PostgreSQL restarting) rather than losing it; other errors come back at once.
pub fn patiently<T>(mut write: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + UNREACHABLE_WAIT;
    loop {
        match write() {
            Err(err) if is_unreachable(&err) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(250));
            }
            done => return done,
        }
    }
}

/// A queued job's row: [`Store::insert_job`]'s, and the shared queue's with its first event.
fn insert_job(
    db: &mut dyn Database,
    id: &str,
    kind: JobKind,
    params: &Json,
    plan: Option<&Json>,
    owner: Option<&str>,
) -> anyhow::Result<()> {
    let now = now_ms();
    db.execute(
        "INSERT INTO jobs (id, kind, status, params, plan, created_at, updated_at, owner) \
         VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
        values![
            id,
            kind.as_str(),
            JobStatus::Queued.as_str(),
            params.to_string(),
            plan.map(Json::to_string),
            now,
            owner
        ],
    )?;
    Ok(())
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens (or creates) a SQLite store, bringing it up to this studio's schema.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let mut db: Box<dyn Database> = Box::new(sqlite::Sqlite::open(path)?);
        schema::migrate(db.as_mut()).with_context(|| format!("database {}", path.display()))?;
        Ok(Store {
            db: Mutex::new(db),
            location: Location::File(path.to_owned()),
        })
    }

    /// Opens the store at `location`. A SQLite file is brought up to this studio's schema as it opens
    /// (one process owns it); a PostgreSQL database must already be (`studio migrate`), as several
    /// nodes share it. Blocks: call it off the async runtime.
    pub fn connect(location: &Location) -> anyhow::Result<Store> {
        let path = match location {
            Location::File(path) => return Store::open(path),
            Location::Postgres(url) => url,
        };
        let mut db: Box<dyn Database> = Box::new(postgres::Postgres::connect(path)?);
        let version = schema::version(db.as_mut())?;
        anyhow::ensure!(
            version == SCHEMA_VERSION,
            "the PostgreSQL store {location} is at schema {version} and this studio needs schema \
             {SCHEMA_VERSION}: {}",
            if version < SCHEMA_VERSION {
                format!("run `studio migrate --database '{location}'` once (from any one node)")
            } else {
                "it was made by a newer studio; run that version".to_owned()
            }
        );
        Ok(Store {
            db: Mutex::new(db),
            location: location.clone(),
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether several processes share this store (PostgreSQL): a cluster's nodes.
    pub fn is_shared(&self) -> bool {
        matches!(self.location, Location::Postgres(_))
    }

    /// Wake-ups for a thread that waits on `channel` (`shared_queue::JOBS_CHANNEL`, `EVENTS_CHANNEL`).
    pub fn wakeups(&self, channel: &'static str) -> Wakeups {
        match &self.location {
            Location::Postgres(url) => Wakeups(
                postgres::Listener::new(url, channel)
                    .inspect_err(|err| tracing::warn!("listening on {channel}: {err:#}"))
                    .ok(),
            ),
            Location::File(_) => Wakeups(None),
        }
    }

    /// Brings the store at `location` up to this studio's schema; the version it was at.
    pub fn migrate(location: &Location) -> anyhow::Result<i64> {
        let mut db: Box<dyn Database> = match location {
            Location::File(path) => Box::new(sqlite::Sqlite::open(path)?),
            Location::Postgres(url) => Box::new(postgres::Postgres::connect(url)?),
        };
        schema::migrate(db.as_mut()).with_context(|| format!("migrating {location}"))
    }

    fn db(&self) -> MutexGuard<'_, Box<dyn Database>> {
        // A panic while holding the lock cannot leave the database itself inconsistent: an open
        // transaction was rolled back by `transaction`, so keep going.
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn transaction<T>(
        &self,
        f: impl FnOnce(&mut dyn Database) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.db().as_mut().transaction(f)
    }

    /// Runs `f` on tokio's blocking pool, so the async runtime never waits on the database.
    pub async fn call<T, F>(self: &Arc<Self>, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> anyhow::Result<T> + Send + 'static,
    {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .context("store task panicked")?
    }

    /// At startup: a job left queued or running by the previous process (stopped or killed) becomes
    /// `interrupted`, with a status event saying so. Returns those jobs' ids.
    pub fn interrupt_unfinished(&self) -> anyhow::Result<Vec<String>> {
        self.transaction(|db| {
            let unfinished: Vec<Value> = JobStatus::ALL
                .iter()
                .filter(|s| !s.is_finished())
                .map(|s| s.as_str().into())
                .collect();
            let placeholders: Vec<String> =
                (1..=unfinished.len()).map(|i| format!("${i}")).collect();
            let ids = db
                .query(
                    &format!(
                        "SELECT id FROM jobs WHERE status IN ({})",
                        placeholders.join(", ")
                    ),
                    &unfinished,
                )?
                .iter()
                .map(|row| row.text(0))
                .collect::<anyhow::Result<Vec<String>>>()?;
            for id in &ids {
                let event = JobEvent {
                    job_id: id.clone(),
                    seq: last_seq(db, id)? + 1,
                    at: now_ms(),
                    body: EventBody::Status {
                        status: JobStatus::Interrupted,
                    },
                };
                apply_event(db, &event)?;
            }
            Ok(ids)
        })
    }

    /// Records a new job, `owner` its user (`None`: the server's own); `plan`, what a worker node runs
    /// (a generation's, for the shared queue).
    pub fn insert_job(
        &self,
        id: &str,
        kind: JobKind,
        params: &Json,
        plan: Option<&Json>,
        owner: Option<&str>,
    ) -> anyhow::Result<()> {
        insert_job(&mut **self.db(), id, kind, params, plan, owner)
    }

    /// Records which worker took the job.
    pub fn set_worker(&self, id: &str, worker: u32) -> anyhow::Result<()> {
        self.db().execute(
            "UPDATE jobs SET worker = $2 WHERE id = $1",
            values![id, worker],
        )?;
        Ok(())
    }

    /// Creates a token for `user`; returns its id and the token, which is shown once and kept only as
    /// its hash.
    pub fn create_token(&self, user: &str, admin: bool) -> anyhow::Result<(String, String)> {
        let user = user.trim();
        anyhow::ensure!(
            !user.is_empty()
                && user.len() <= 64
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)),
            "a user name is 1 to 64 letters, digits, `-`, `_`, `.` or `@` (got {user:?})"
        );
        // 244 random bits from the OS's generator (v4 UUIDs), as two simple-form UUIDs.
        let token = format!(
            "studio_{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        self.db().execute(
            r#"INSERT INTO tokens (id, "user", admin, hash, created_at) VALUES ($1, $2, $3, $4, $5)"#,
            values![id.as_str(), user, admin, token_hash(&token), now_ms()],
        )?;
        Ok((id, token))
    }

    /// Every token not revoked, oldest first.
    pub fn tokens(&self) -> anyhow::Result<Vec<TokenInfo>> {
        self.db()
            .query(
                r#"SELECT id, "user", admin, created_at FROM tokens WHERE revoked_at IS NULL ORDER BY created_at, id"#,
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(TokenInfo {
                    id: r.text(0)?,
                    user: r.text(1)?,
                    admin: r.int(2)? != 0,
                    created_at: r.int(3)?,
                })
            })
            .collect()
    }

    /// Revokes the token with this id, or every token of the user of this name; how many went.
    pub fn revoke_tokens(&self, id_or_user: &str) -> anyhow::Result<usize> {
        let revoked = self.db().execute(
            r#"UPDATE tokens SET revoked_at = $2 WHERE (id = $1 OR "user" = $1) AND revoked_at IS NULL"#,
            values![id_or_user, now_ms()],
        )?;
        Ok(revoked as usize)
    }

    /// Whether a token was ever made: from then on the server needs one on every request (revoking
    /// them all does not open it again).
    pub fn has_tokens(&self) -> anyhow::Result<bool> {
        let count = self
            .db()
            .query_one("SELECT COUNT(*) FROM tokens", &[])?
            .map_or(Ok(0), |r| r.int(0))?;
        Ok(count > 0)
    }

    /// Who a presented token belongs to, `None` for no (or a revoked) token.
    pub fn viewer_of(&self, token: &str) -> anyhow::Result<Option<Viewer>> {
        let found = self.db().query_one(
            r#"SELECT "user", admin FROM tokens WHERE hash = $1 AND revoked_at IS NULL"#,
            values![token_hash(token)],
        )?;
        found
            .map(|r| {
                Ok(if r.int(1)? != 0 {
                    Viewer::All
                } else {
                    Viewer::User(r.text(0)?)
                })
            })
            .transpose()
    }

    /// Removes a job that was never accepted (its queue turned out full).
    pub fn delete_job(&self, id: &str) -> anyhow::Result<()> {
        self.db()
            .execute("DELETE FROM jobs WHERE id = $1", values![id])?;
        Ok(())
    }

    pub fn set_result(&self, id: &str, result: &Json) -> anyhow::Result<()> {
        self.db().execute(
            "UPDATE jobs SET result = $2, updated_at = $3 WHERE id = $1",
            values![id, result.to_string(), now_ms()],
        )?;
        Ok(())
    }

    /// Appends the log form of an event and brings the job's row up to date with it, in one transaction.
    pub fn record_event(&self, event: &JobEvent) -> anyhow::Result<()> {
        self.transaction(|db| apply_event(db, event))
    }

    pub fn last_seq(&self, job_id: &str) -> anyhow::Result<u64> {
        last_seq(self.db().as_mut(), job_id)
    }

    pub fn events_after(&self, job_id: &str, after: u64) -> anyhow::Result<Vec<JobEvent>> {
        self.db()
            .query(
                "SELECT seq, at, body FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq",
                values![job_id, after],
            )?
            .iter()
            .map(|r| {
                Ok(JobEvent {
                    job_id: job_id.to_owned(),
                    seq: r.int(0)? as u64,
                    at: r.int(1)?,
                    body: serde_json::from_str(&r.text(2)?)?,
                })
            })
            .collect()
    }

    pub fn job(&self, id: &str) -> anyhow::Result<Option<JobRecord>> {
        self.db()
            .query_one(&format!("{SELECT_JOB} WHERE id = $1"), values![id])?
            .map(|r| job_from_row(&r))
            .transpose()
    }

    /// Newest first; only `viewer`'s.
    pub fn jobs(
        &self,
        kind: Option<JobKind>,
        status: Option<JobStatus>,
        limit: u32,
        viewer: &Viewer,
    ) -> anyhow::Result<Vec<JobRecord>> {
        self.db()
            .query(
                &format!(
                    "{SELECT_JOB} WHERE (CAST($1 AS TEXT) IS NULL OR kind = $1) AND (CAST($2 AS TEXT) IS NULL OR status = $2) \
                     AND (CAST($4 AS TEXT) IS NULL OR owner = $4) ORDER BY created_at DESC, id LIMIT $3"
                ),
                values![
                    kind.map(JobKind::as_str),
                    status.map(JobStatus::as_str),
                    limit,
                    viewer.owner()
                ],
            )?
            .iter()
            .map(job_from_row)
            .collect()
    }

    /// Starts a conversation titled after its first message, `owner` its user.
    pub fn create_conversation(
        &self,
        id: &str,
        first_message: &str,
        owner: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut title: String = first_message.trim().chars().take(TITLE_CHARS).collect();
        if first_message.trim().chars().count() > TITLE_CHARS {
            title.push('…');
        }
        let now = now_ms();
        self.db().execute(
            "INSERT INTO conversations (id, title, created_at, updated_at, owner) VALUES ($1, $2, $3, $3, $4)",
            values![id, title, now, owner],
        )?;
        Ok(())
    }

    /// Appends a message; `None` when there is no such conversation (deleted meanwhile, say).
    pub fn add_message(
        &self,
        conversation: &str,
        message: &NewMessage,
    ) -> anyhow::Result<Option<u64>> {
        let role = match message.role {
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        };
        let finish = message
            .finish
            .map(|f| serde_json::to_value(f).map(|v| v.as_str().unwrap_or_default().to_owned()))
            .transpose()?;
        self.transaction(|db| {
            let now = now_ms();
            let touched = db.execute(
                "UPDATE conversations SET updated_at = $2 WHERE id = $1",
                values![conversation, now],
            )?;
            if touched == 0 {
                return Ok(None);
            }
            let seq = db
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = $1",
                    values![conversation],
                )?
                .map_or(Ok(1), |r| r.int(0))?;
            db.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, image_job, model, finish, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                values![
                    conversation,
                    seq,
                    role,
                    message.content,
                    message.image_job,
                    message.model,
                    finish,
                    now
                ],
            )?;
            Ok(Some(seq as u64))
        })
    }

    /// Newest first; only `viewer`'s.
    pub fn conversations(&self, viewer: &Viewer) -> anyhow::Result<Vec<ConversationSummary>> {
        self.db()
            .query(
                "SELECT c.id, c.title, c.created_at, c.updated_at, \
                        (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) \
                 FROM conversations c WHERE (CAST($1 AS TEXT) IS NULL OR c.owner = $1) ORDER BY c.updated_at DESC, c.id",
                values![viewer.owner()],
            )?
            .iter()
            .map(|r| {
                Ok(ConversationSummary {
                    id: r.text(0)?,
                    title: r.text(1)?,
                    created_at: r.int(2)?,
                    updated_at: r.int(3)?,
                    messages: r.int(4)? as u64,
                })
            })
            .collect()
    }

    /// The user a conversation belongs to: `None` when there is no such conversation, `Some(None)` for
    /// one of the server's own.
    pub fn conversation_owner(&self, id: &str) -> anyhow::Result<Option<Option<String>>> {
        self.db()
            .query_one("SELECT owner FROM conversations WHERE id = $1", values![id])?
            .map(|r| r.opt_text(0))
            .transpose()
    }

    pub fn conversation(&self, id: &str) -> anyhow::Result<Option<Conversation>> {
        let mut db = self.db();
        let Some(head) = db.query_one(
            "SELECT title, created_at, updated_at FROM conversations WHERE id = $1",
            values![id],
        )?
        else {
            return Ok(None);
        };
        let messages = db
            .query(
                "SELECT seq, role, content, image_job, model, finish, at FROM messages \
                 WHERE conversation_id = $1 ORDER BY seq",
                values![id],
            )?
            .iter()
            .map(|r| {
                Ok(ChatMessage {
                    seq: r.int(0)? as u64,
                    role: serde_json::from_value(Json::String(r.text(1)?))?,
                    content: r.text(2)?,
                    image_job: r.opt_text(3)?,
                    model: r.opt_text(4)?,
                    finish: r
                        .opt_text(5)?
                        .map(|f| serde_json::from_value(Json::String(f)))
                        .transpose()?,
                    at: r.int(6)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Some(Conversation {
            id: id.to_owned(),
            title: head.text(0)?,
            created_at: head.int(1)?,
            updated_at: head.int(2)?,
            messages,
        }))
    }

    /// Removes a conversation and its messages (not the images' jobs); false when there was none.
    pub fn delete_conversation(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .db()
            .execute("DELETE FROM conversations WHERE id = $1", values![id])?
            > 0)
    }

    pub fn settings(&self) -> anyhow::Result<Map<String, Json>> {
        self.db()
            .query("SELECT key, value FROM settings ORDER BY key", &[])?
            .iter()
            .map(|r| Ok((r.text(0)?, serde_json::from_str(&r.text(1)?)?)))
            .collect()
    }

    /// Sets each key; a `null` value removes the key.
    pub fn update_settings(&self, changes: &Map<String, Json>) -> anyhow::Result<()> {
        self.transaction(|db| {
            for (key, value) in changes {
                if value.is_null() {
                    db.execute("DELETE FROM settings WHERE key = $1", values![key])?;
                } else {
                    db.execute(
                        "INSERT INTO settings (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        values![key, value.to_string()],
                    )?;
                }
            }
            Ok(())
        })
    }
}

const SELECT_JOB: &str =
    "SELECT id, kind, status, params, result, error, step, total_steps, loss, created_at, updated_at, worker, owner FROM jobs";

fn job_from_row(r: &Row) -> anyhow::Result<JobRecord> {
    let kind = r.text(1)?;
    let status = r.text(2)?;
    Ok(JobRecord {
        id: r.text(0)?,
        kind: JobKind::parse(&kind).with_context(|| format!("unknown job kind {kind:?}"))?,
        status: JobStatus::parse(&status)
            .with_context(|| format!("unknown job status {status:?}"))?,
        params: serde_json::from_str(&r.text(3)?)?,
        result: r
            .opt_text(4)?
            .map(|s| serde_json::from_str(&s))
            .transpose()?,
        error: r.opt_text(5)?,
        step: u32::try_from(r.int(6)?)?,
        total_steps: u32::try_from(r.int(7)?)?,
        loss: r.opt_real(8)?.map(|l| l as f32),
        created_at: r.int(9)?,
        updated_at: r.int(10)?,
        worker: r.opt_int(11)?.map(u32::try_from).transpose()?,
        owner: r.opt_text(12)?,
    })
}

/// Wakes the nodes listening on `channel` (PostgreSQL's NOTIFY, sent when the transaction commits);
/// nothing to do on SQLite, which one process owns.
fn notify(db: &mut dyn Database, channel: &str, payload: &str) -> anyhow::Result<()> {
    if db.dialect() == sql::Dialect::Postgres {
        db.query("SELECT pg_notify($1, $2)", values![channel, payload])?;
    }
    Ok(())
}

fn last_seq(db: &mut dyn Database, job_id: &str) -> anyhow::Result<u64> {
    let seq = db
        .query_one(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = $1",
            values![job_id],
        )?
        .map_or(Ok(0), |r| r.int(0))?;
    Ok(seq as u64)
}

/// The job row as a projection of its events: statuses, progress and errors are written by recording
/// the event that announces them, so the two never disagree.
fn apply_event(db: &mut dyn Database, event: &JobEvent) -> anyhow::Result<()> {
    let Some(body) = event.body.for_log() else {
        return Ok(());
    };
    notify(db, shared_queue::EVENTS_CHANNEL, &event.job_id)?;
    db.execute(
        "INSERT INTO events (job_id, seq, at, body) VALUES ($1, $2, $3, $4)",
        values![
            event.job_id.as_str(),
            event.seq,
            event.at,
            serde_json::to_string(&body)?
        ],
    )?;
    match &body {
        EventBody::Status { status } => {
            // A job started again (resume) starts with a clean error.
            let clear_error = *status == JobStatus::Queued;
            db.execute(
                "UPDATE jobs SET status = $2, updated_at = $3, \
                 error = CASE WHEN $4 = 1 THEN NULL ELSE error END WHERE id = $1",
                values![
                    event.job_id.as_str(),
                    status.as_str(),
                    event.at,
                    clear_error
                ],
            )?;
        }
        EventBody::Step {
            step, total, loss, ..
        } => {
            db.execute(
                "UPDATE jobs SET step = $2, total_steps = $3, loss = COALESCE($4, loss), updated_at = $5 WHERE id = $1",
                values![
                    event.job_id.as_str(),
                    *step,
                    *total,
                    loss.map(f64::from),
                    event.at
                ],
            )?;
        }
        EventBody::Error { error } => {
            db.execute(
                "UPDATE jobs SET error = $2, updated_at = $3 WHERE id = $1",
                values![event.job_id.as_str(), error.message.as_str(), event.at],
            )?;
        }
        EventBody::Log { .. } | EventBody::Sample { .. } | EventBody::Result(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use throwaway::ThrowawayPostgres;

    fn event(job: &str, seq: u64, body: EventBody) -> JobEvent {
        JobEvent {
            job_id: job.into(),
            seq,
            at: now_ms(),
            body,
        }
    }

    /// Runs `test` on both stores, a SQLite file and a database of a throwaway PostgreSQL cluster;
    /// `test` gets a way to open the store (again).
    fn on_both_stores(test: impl Fn(&dyn Fn() -> Store)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        test(&|| Store::open(&path).unwrap());
        let postgres = ThrowawayPostgres::start().expect(
            "the PostgreSQL store's tests need Debian's postgresql: `bash scripts/postgres`",
        );
        let location = Location::Postgres(postgres.url());
        assert_eq!(Store::migrate(&location).unwrap(), 0);
        test(&|| Store::connect(&location).unwrap());
    }

    #[test]
    fn events_project_onto_the_job_row_and_replay_in_order() {
        on_both_stores(|open| {
            let store = open();
            store
                .insert_job(
                    "a",
                    JobKind::Training,
                    &serde_json::json!({"keywords": ["x"]}),
                    None,
                    None,
                )
                .unwrap();
            let training = EventBody::Status {
                status: JobStatus::Training,
            };
            store.record_event(&event("a", 1, training)).unwrap();
            let step = EventBody::Step {
                step: 3,
                total: 10,
                loss: Some(0.5),
                learning_rate: Some(1e-4),
                seconds_per_step: Some(0.5),
                eta_seconds: Some(3.5),
                preview: None,
                image: None,
            };
            store.record_event(&event("a", 2, step)).unwrap();
            let job = store.job("a").unwrap().unwrap();
            assert_eq!(
                (job.status, job.step, job.total_steps, job.loss),
                (JobStatus::Training, 3, 10, Some(0.5))
            );
            let replay = store.events_after("a", 1).unwrap();
            assert_eq!(replay.len(), 1);
            assert_eq!(replay[0].seq, 2);
            assert_eq!(store.last_seq("a").unwrap(), 2);
            assert_eq!(
                store
                    .jobs(Some(JobKind::Training), None, 10, &Viewer::All)
                    .unwrap()
                    .len(),
                1
            );
            assert!(store
                .jobs(Some(JobKind::Generation), None, 10, &Viewer::All)
                .unwrap()
                .is_empty());
        });
    }

    #[test]
    fn reopening_interrupts_what_was_unfinished_and_keeps_the_rest() {
        on_both_stores(|open| {
            {
                let store = open();
                store
                    .insert_job("running", JobKind::Generation, &Json::Null, None, None)
                    .unwrap();
                let running = EventBody::Status {
                    status: JobStatus::Running,
                };
                store.record_event(&event("running", 1, running)).unwrap();
                store
                    .insert_job("done", JobKind::Generation, &Json::Null, None, None)
                    .unwrap();
                let completed = EventBody::Status {
                    status: JobStatus::Completed,
                };
                store.record_event(&event("done", 1, completed)).unwrap();
            }
            let store = open();
            assert_eq!(
                store.interrupt_unfinished().unwrap(),
                vec!["running".to_string()]
            );
            assert_eq!(
                store.job("running").unwrap().unwrap().status,
                JobStatus::Interrupted
            );
            assert_eq!(
                store.job("done").unwrap().unwrap().status,
                JobStatus::Completed
            );
            assert_eq!(
                store.events_after("running", 1).unwrap()[0].body,
                EventBody::Status {
                    status: JobStatus::Interrupted
                }
            );
        });
    }

    #[test]
    fn settings_set_and_remove() {
        on_both_stores(|open| {
            let store = open();
            let mut changes = Map::new();
            changes.insert("theme".into(), "dark".into());
            changes.insert("gone".into(), Json::Null);
            store.update_settings(&changes).unwrap();
            changes.insert("theme".into(), "light".into());
            store.update_settings(&changes).unwrap();
            assert_eq!(
                store.settings().unwrap().get("theme"),
                Some(&Json::from("light"))
            );
            changes.insert("theme".into(), Json::Null);
            store.update_settings(&changes).unwrap();
            assert!(store.settings().unwrap().is_empty());
        });
    }

    #[test]
    fn conversations_keep_their_messages_in_order_and_their_owner() {
        on_both_stores(|open| {
            let store = open();
            store
                .create_conversation("c", "draw a fox", Some("alice"))
                .unwrap();
            let user = NewMessage {
                role: ChatRole::User,
                content: "draw a fox",
                image_job: None,
                model: None,
                finish: None,
            };
            let image = NewMessage {
                role: ChatRole::Assistant,
                content: "",
                image_job: Some("job"),
                model: Some("m"),
                finish: None,
            };
            assert_eq!(store.add_message("c", &user).unwrap(), Some(1));
            assert_eq!(store.add_message("c", &image).unwrap(), Some(2));
            assert_eq!(store.add_message("gone", &user).unwrap(), None);
            let conversation = store.conversation("c").unwrap().unwrap();
            assert_eq!(conversation.title, "draw a fox");
            assert_eq!(conversation.messages[1].image_job.as_deref(), Some("job"));
            assert_eq!(
                store.conversation_owner("c").unwrap(),
                Some(Some("alice".into()))
            );
            assert_eq!(
                store.conversations(&Viewer::User("alice".into())).unwrap()[0].messages,
                2
            );
            assert!(store
                .conversations(&Viewer::User("bob".into()))
                .unwrap()
                .is_empty());
            assert!(store.delete_conversation("c").unwrap());
            assert_eq!(store.conversation("c").unwrap(), None);
        });
    }

    #[test]
    fn tokens_are_kept_hashed_name_their_user_and_go_when_revoked() {
        on_both_stores(|open| {
            let store = open();
            assert!(!store.has_tokens().unwrap());
            let (id, token) = store.create_token("alice", false).unwrap();
            let (_, admin) = store.create_token("root", true).unwrap();
            assert!(store.create_token("no spaces", false).is_err());
            assert_eq!(
                store.viewer_of(&token).unwrap(),
                Some(Viewer::User("alice".into()))
            );
            assert_eq!(store.viewer_of(&admin).unwrap(), Some(Viewer::All));
            assert_eq!(store.viewer_of("studio_guess").unwrap(), None);
            let kept = store
                .db()
                .query_one("SELECT hash FROM tokens WHERE id = $1", values![id])
                .unwrap()
                .unwrap()
                .text(0)
                .unwrap();
            assert_ne!(kept, token, "the token itself is never stored");
            assert_eq!(store.revoke_tokens("alice").unwrap(), 1);
            assert_eq!(store.viewer_of(&token).unwrap(), None);
            assert_eq!(store.tokens().unwrap().len(), 1);
            assert_eq!(store.revoke_tokens("root").unwrap(), 1);
            assert!(store.tokens().unwrap().is_empty());
            assert!(
                store.has_tokens().unwrap(),
                "revoking every token opened the server"
            );
        });
    }

    fn statuses(store: &Store, job: &str) -> Vec<EventBody> {
        store
            .events_after(job, 0)
            .unwrap()
            .into_iter()
            .map(|e| e.body)
            .collect()
    }

    #[test]
    fn a_claimed_job_is_no_other_nodes_and_goes_back_to_the_queue_when_its_lease_runs_out() {
        use std::time::Duration;
        on_both_stores(|open| {
            let store = open();
            let params = serde_json::json!({"prompt": "p"});
            let plan = serde_json::json!({"model": "m"});
            for job in ["a", "b"] {
                store
                    .queue_job(job, JobKind::Generation, &params, Some(&plan), None)
                    .unwrap();
            }
            assert_eq!(store.waiting(JobKind::Generation).unwrap(), 2);
            let kinds = [JobKind::Generation, JobKind::Training];
            let long = Duration::from_secs(60);
            let first = store
                .claim("n1", long, &kinds, |w| Some(w.len() - 1))
                .unwrap();
            assert_eq!(
                first.map(|w| (w.id, w.plan)),
                Some(("b".into(), Some(plan.clone())))
            );
            let second = store
                .claim("n2", Duration::ZERO, &kinds, |_| Some(0))
                .unwrap();
            assert_eq!(second.map(|w| w.id).as_deref(), Some("a"));
            assert_eq!(store.claim("n3", long, &kinds, |_| Some(0)).unwrap(), None);
            assert_eq!(store.waiting(JobKind::Generation).unwrap(), 0);
            // n2 never renews: its job comes back, with its log saying so; n1's stays n1's.
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(
                store.renew_leases("n1", long, &["b".into()]).unwrap(),
                Vec::<String>::new()
            );
            assert_eq!(store.requeue_expired().unwrap(), ["a"]);
            let log = statuses(&store, "a");
            assert!(
                matches!(&log[1], EventBody::Log { message } if message.contains("node n2")),
                "{log:?}"
            );
            assert_eq!(
                log[2],
                EventBody::Status {
                    status: JobStatus::Queued
                }
            );
            let again = store
                .claim("n3", long, &kinds, |_| Some(0))
                .unwrap()
                .unwrap();
            assert_eq!((again.id.as_str(), again.ran_before), ("a", true));
            assert_eq!(store.requeue_expired().unwrap(), Vec::<String>::new());
            // A node that stops gives back what it claimed but has not started.
            assert_eq!(store.release_waiting("n3").unwrap(), 1);
            assert_eq!(store.waiting(JobKind::Generation).unwrap(), 1);
        });
    }

    #[test]
    fn cancelling_a_waiting_job_ends_it_and_a_claimed_one_is_asked_of_its_node() {
        use shared_queue::CancelRequest;
        use std::time::Duration;
        on_both_stores(|open| {
            let store = open();
            let params = serde_json::json!({"keywords": ["k"]});
            for job in ["waiting", "held"] {
                store
                    .queue_job(job, JobKind::Training, &params, None, None)
                    .unwrap();
            }
            let kinds = [JobKind::Training];
            let lease = Duration::from_secs(60);
            let held = store.claim("n1", lease, &kinds, |w| {
                w.iter().position(|w| w.id == "held")
            });
            assert_eq!(held.unwrap().map(|w| w.id).as_deref(), Some("held"));
            assert_eq!(
                store.request_cancel("waiting").unwrap(),
                CancelRequest::CancelledWaiting
            );
            assert_eq!(
                store.job("waiting").unwrap().unwrap().status,
                JobStatus::Cancelled
            );
            assert_eq!(
                store.request_cancel("held").unwrap(),
                CancelRequest::Requested
            );
            assert_eq!(
                store.renew_leases("n1", lease, &["held".into()]).unwrap(),
                ["held"]
            );
            assert_eq!(
                store.request_cancel("waiting").unwrap(),
                CancelRequest::Finished(JobStatus::Cancelled)
            );
            assert_eq!(
                store.request_cancel("nothing").unwrap(),
                CancelRequest::Missing
            );
            // A cancelled run goes back to the queue to resume; an unfinished one does not.
            assert!(store.requeue("waiting").unwrap());
            assert!(!store.requeue("held").unwrap());
            assert_eq!(store.waiting(JobKind::Training).unwrap(), 1);
        });
    }

    #[test]
    fn a_postgres_store_is_used_only_once_migrated_and_says_how() {
        let postgres = ThrowawayPostgres::start().expect(
            "the PostgreSQL store's tests need Debian's postgresql: `bash scripts/postgres`",
        );
        let location = Location::Postgres(postgres.url());
        let refused = Store::connect(&location)
            .err()
            .expect("an empty database was used");
        assert!(
            format!("{refused:#}").contains("run `studio migrate --database"),
            "{refused:#}"
        );
        assert_eq!(Store::migrate(&location).unwrap(), 0);
        assert_eq!(Store::migrate(&location).unwrap(), SCHEMA_VERSION);
        Store::connect(&location).unwrap();
    }

    #[test]
    fn a_postgres_url_is_shown_without_its_password() {
        let location = Location::parse("postgres://studio:s3cret@db:5432/studio");
        assert_eq!(location.to_string(), "postgres://studio:***@db:5432/studio");
        assert_eq!(
            Location::parse("data/studio.db"),
            Location::File("data/studio.db".into())
        );
    }

    #[test]
    fn a_schema_2_database_gains_owners_and_workers_and_keeps_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, \
                 params TEXT NOT NULL, result TEXT, error TEXT, step INTEGER NOT NULL DEFAULT 0, \
                 total_steps INTEGER NOT NULL DEFAULT 0, loss REAL, created_at INTEGER NOT NULL, \
                 updated_at INTEGER NOT NULL);
                 CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, \
                 created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
                 INSERT INTO jobs (id, kind, status, params, created_at, updated_at) \
                 VALUES ('old', 'generation', 'completed', 'null', 1, 1);
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.job("old").unwrap().unwrap();
        assert_eq!((old.worker, old.owner), (None, None));
        store.set_worker("old", 1).unwrap();
        assert_eq!(store.job("old").unwrap().unwrap().worker, Some(1));
        assert!(store
            .jobs(None, None, 10, &Viewer::User("alice".into()))
            .unwrap()
            .is_empty());
        assert_eq!(store.jobs(None, None, 10, &Viewer::All).unwrap().len(), 1);
    }
}
