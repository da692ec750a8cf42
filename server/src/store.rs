//! The SQLite job store: jobs (a row each, kept current, with their owner and worker), their events
//! (append-only, for replay), settings, the chat's conversations with their messages, and users' API
//! tokens (hashed). One connection behind a mutex: every statement is short, and the worker threads and
//! the request handlers (through `Store::call`, off the async runtime) share it.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use app::{
    ChatFinish, ChatMessage, ChatRole, Conversation, ConversationSummary, EventBody, JobEvent,
    JobKind, JobRecord, JobStatus,
};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use serde_json::{Map, Value};

/// Bumped with every change to `SCHEMA`; opening a newer database fails rather than misreading it.
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    params      TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    step        INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss        REAL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    worker      INTEGER,
    owner       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    at     INTEGER NOT NULL,
    body   TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Schema 2: conversations. A message that is an image names its generation job (no foreign key: a
-- conversation outlives nothing of the job, and the job outlives a deleted conversation).
CREATE TABLE IF NOT EXISTS conversations (
    id         TEXT PRIMARY KEY,
    title      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    owner      TEXT
);
CREATE INDEX IF NOT EXISTS conversations_by_updated ON conversations (updated_at);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    image_job       TEXT,
    model           TEXT,
    finish          TEXT,
    at              INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
-- Schema 3: API tokens of users, kept as SHA-256 hashes (a token is random, so no salt or slow hash is
-- needed; a revoked one stays, marked, so that a server whose tokens were all revoked stays closed);
-- jobs' and conversations' `owner` (the user; NULL for the server's own --token) and jobs'
-- `worker`, added to older databases by `migrate`.
CREATE TABLE IF NOT EXISTS tokens (
    id         TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    admin      INTEGER NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
";

/// Columns added after a table's first schema: (table, column, type), added where missing.
const ADDED_COLUMNS: [(&str, &str, &str); 3] = [
    ("jobs", "worker", "INTEGER"),
    ("jobs", "owner", "TEXT"),
    ("conversations", "owner", "TEXT"),
];

/// Brings a database of an older schema up to this one: tables are created by `SCHEMA`, columns added
/// here.
fn migrate(conn: &Connection) -> anyhow::Result<()> {
    for (table, column, kind) in ADDED_COLUMNS {
        let present: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get(0),
        )?;
        if present == 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
         CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated_at);",
    )?;
    Ok(())
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
    conn: Mutex<Connection>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        // WAL: readers never wait on the worker's writes, and a committed write survives kill -9.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "database {} is from a newer studio (schema {version})",
                path.display()
            );
        }
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite itself inconsistent: keep going.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on tokio's blocking pool, so the async runtime never waits on the disk.
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
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ids: Vec<String> = {
            let unfinished: Vec<&str> = JobStatus::ALL
                .iter()
                .filter(|s| !s.is_finished())
                .map(|s| s.as_str())
                .collect();
            let placeholders = vec!["?"; unfinished.len()].join(", ");
            let mut stmt = tx.prepare(&format!(
                "SELECT id FROM jobs WHERE status IN ({placeholders})"
            ))?;
            let rows = stmt.query_map(params_from_iter(unfinished), |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for id in &ids {
            let seq: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?1",
                [id],
                |r| r.get(0),
            )?;
            let event = JobEvent {
                job_id: id.clone(),
                seq: seq as u64 + 1,
                at: now_ms(),
                body: EventBody::Status {
                    status: JobStatus::Interrupted,
                },
            };
            apply_event(&tx, &event)?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Records a new job, `owner` its user (`None`: the server's own).
    pub fn insert_job(
        &self,
        id: &str,
        kind: JobKind,
        params: &Value,
        owner: Option<&str>,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        self.conn().execute(
            "INSERT INTO jobs (id, kind, status, params, created_at, updated_at, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
            params![id, kind.as_str(), JobStatus::Queued.as_str(), params.to_string(), now, owner],
        )?;
        Ok(())
    }

    /// Records which worker took the job.
    pub fn set_worker(&self, id: &str, worker: u32) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET worker = ?2 WHERE id = ?1",
            params![id, worker],
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
        self.conn().execute(
            "INSERT INTO tokens (id, user, admin, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, user, admin, token_hash(&token), now_ms()],
        )?;
        Ok((id, token))
    }

    /// Every token not revoked, oldest first.
    pub fn tokens(&self) -> anyhow::Result<Vec<TokenInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, user, admin, created_at FROM tokens WHERE revoked_at IS NULL ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenInfo {
                id: r.get(0)?,
                user: r.get(1)?,
                admin: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes the token with this id, or every token of the user of this name; how many went.
    pub fn revoke_tokens(&self, id_or_user: &str) -> anyhow::Result<usize> {
        Ok(self.conn().execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE (id = ?1 OR user = ?1) AND revoked_at IS NULL",
            params![id_or_user, now_ms()],
        )?)
    }

    /// Whether a token was ever made: from then on the server needs one on every request (revoking
    /// them all does not open it again).
    pub fn has_tokens(&self) -> anyhow::Result<bool> {
        Ok(self
            .conn()
            .query_row("SELECT EXISTS (SELECT 1 FROM tokens)", [], |r| r.get(0))?)
    }

    /// Who a presented token belongs to, `None` for no (or a revoked) token.
    pub fn viewer_of(&self, token: &str) -> anyhow::Result<Option<Viewer>> {
        let found: Option<(String, bool)> = self
            .conn()
            .query_row(
                "SELECT user, admin FROM tokens WHERE hash = ?1 AND revoked_at IS NULL",
                [token_hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(found.map(|(user, admin)| {
            if admin {
                Viewer::All
            } else {
                Viewer::User(user)
            }
        }))
    }

    /// Removes a job that was never accepted (its queue turned out full).
    pub fn delete_job(&self, id: &str) -> anyhow::Result<()> {
        self.conn()
            .execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn set_result(&self, id: &str, result: &Value) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET result = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, result.to_string(), now_ms()],
        )?;
        Ok(())
    }

    /// Appends the log form of an event and brings the job's row up to date with it, in one transaction.
    pub fn record_event(&self, event: &JobEvent) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        apply_event(&tx, event)?;
        tx.commit()?;
        Ok(())
    }

    pub fn last_seq(&self, job_id: &str) -> anyhow::Result<u64> {
        let seq: i64 = self.conn().query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?1",
            [job_id],
            |r| r.get(0),
        )?;
        Ok(seq as u64)
    }

    pub fn events_after(&self, job_id: &str, after: u64) -> anyhow::Result<Vec<JobEvent>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at, body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![job_id, after as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (seq, at, body) = row?;
            Ok(JobEvent {
                job_id: job_id.to_owned(),
                seq: seq as u64,
                at,
                body: serde_json::from_str(&body)?,
            })
        })
        .collect()
    }

    pub fn job(&self, id: &str) -> anyhow::Result<Option<JobRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{SELECT_JOB} WHERE id = ?1"))?;
        Ok(stmt.query_row([id], job_from_row).optional()?)
    }

    /// Newest first; only `viewer`'s.
    pub fn jobs(
        &self,
        kind: Option<JobKind>,
        status: Option<JobStatus>,
        limit: u32,
        viewer: &Viewer,
    ) -> anyhow::Result<Vec<JobRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT_JOB} WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR status = ?2) \
             AND (?4 IS NULL OR owner = ?4) ORDER BY created_at DESC, id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![
                kind.map(JobKind::as_str),
                status.map(JobStatus::as_str),
                limit,
                viewer.owner()
            ],
            job_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
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
        self.conn().execute(
            "INSERT INTO conversations (id, title, created_at, updated_at, owner) VALUES (?1, ?2, ?3, ?3, ?4)",
            params![id, title, now, owner],
        )?;
        Ok(())
    }

    /// Appends a message; `None` when there is no such conversation (deleted meanwhile, say).
    pub fn add_message(
        &self,
        conversation: &str,
        message: &NewMessage,
    ) -> anyhow::Result<Option<u64>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        let touched = tx.execute(
            "UPDATE conversations SET updated_at = ?2 WHERE id = ?1",
            params![conversation, now],
        )?;
        if touched == 0 {
            return Ok(None);
        }
        let seq: i64 = tx.query_row(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?1",
            [conversation],
            |r| r.get(0),
        )?;
        let role = match message.role {
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        };
        let finish = message
            .finish
            .map(|f| serde_json::to_value(f).map(|v| v.as_str().unwrap_or_default().to_owned()))
            .transpose()?;
        tx.execute(
            "INSERT INTO messages (conversation_id, seq, role, content, image_job, model, finish, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
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
        tx.commit()?;
        Ok(Some(seq as u64))
    }

    /// Newest first; only `viewer`'s.
    pub fn conversations(&self, viewer: &Viewer) -> anyhow::Result<Vec<ConversationSummary>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT c.id, c.title, c.created_at, c.updated_at, \
                    (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) \
             FROM conversations c WHERE (?1 IS NULL OR c.owner = ?1) ORDER BY c.updated_at DESC, c.id",
        )?;
        let rows = stmt.query_map([viewer.owner()], |r| {
            Ok(ConversationSummary {
                id: r.get(0)?,
                title: r.get(1)?,
                created_at: r.get(2)?,
                updated_at: r.get(3)?,
                messages: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The user a conversation belongs to: `None` when there is no such conversation, `Some(None)` for
    /// one of the server's own.
    pub fn conversation_owner(&self, id: &str) -> anyhow::Result<Option<Option<String>>> {
        Ok(self
            .conn()
            .query_row("SELECT owner FROM conversations WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn conversation(&self, id: &str) -> anyhow::Result<Option<Conversation>> {
        let conn = self.conn();
        let head = conn
            .query_row(
                "SELECT title, created_at, updated_at FROM conversations WHERE id = ?1",
                [id],
                |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((title, created_at, updated_at)) = head else {
            return Ok(None);
        };
        let mut stmt = conn.prepare(
            "SELECT seq, role, content, image_job, model, finish, at FROM messages \
             WHERE conversation_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let messages = rows
            .map(|row| {
                let (seq, role, content, image_job, model, finish, at) = row?;
                Ok(ChatMessage {
                    seq: seq as u64,
                    role: serde_json::from_value(Value::String(role))?,
                    content,
                    image_job,
                    model,
                    finish: finish
                        .map(|f| serde_json::from_value(Value::String(f)))
                        .transpose()?,
                    at,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Some(Conversation {
            id: id.to_owned(),
            title,
            created_at,
            updated_at,
            messages,
        }))
    }

    /// Removes a conversation and its messages (not the images' jobs); false when there was none.
    pub fn delete_conversation(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM conversations WHERE id = ?1", [id])?
            > 0)
    }

    pub fn settings(&self) -> anyhow::Result<Map<String, Value>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT key, value FROM settings ORDER BY key")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (key, value) = row?;
            Ok((key, serde_json::from_str(&value)?))
        })
        .collect()
    }

    /// Sets each key; a `null` value removes the key.
    pub fn update_settings(&self, changes: &Map<String, Value>) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (key, value) in changes {
            if value.is_null() {
                tx.execute("DELETE FROM settings WHERE key = ?1", [key])?;
            } else {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
                    params![key, value.to_string()],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

const SELECT_JOB: &str =
    "SELECT id, kind, status, params, result, error, step, total_steps, loss, created_at, updated_at, worker, owner FROM jobs";

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let text = |i: usize| r.get::<_, String>(i);
    let json = |i: usize, s: String| {
        serde_json::from_str(&s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
        })
    };
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown {what}").into(),
        )
    };
    let kind = text(1)?;
    let status = text(2)?;
    Ok(JobRecord {
        id: text(0)?,
        kind: JobKind::parse(&kind).ok_or_else(|| bad(1, format!("job kind {kind:?}")))?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| bad(2, format!("job status {status:?}")))?,
        params: json(3, text(3)?)?,
        result: r
            .get::<_, Option<String>>(4)?
            .map(|s| json(4, s))
            .transpose()?,
        error: r.get(5)?,
        step: r.get(6)?,
        total_steps: r.get(7)?,
        loss: r.get::<_, Option<f64>>(8)?.map(|l| l as f32),
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        worker: r.get(11)?,
        owner: r.get(12)?,
    })
}

/// The job row as a projection of its events: statuses, progress and errors are written by recording
/// the event that announces them, so the two never disagree.
fn apply_event(tx: &rusqlite::Transaction<'_>, event: &JobEvent) -> anyhow::Result<()> {
    let Some(body) = event.body.for_log() else {
        return Ok(());
    };
    tx.execute(
        "INSERT INTO events (job_id, seq, at, body) VALUES (?1, ?2, ?3, ?4)",
        params![
            event.job_id,
            event.seq as i64,
            event.at,
            serde_json::to_string(&body)?
        ],
    )?;
    match &body {
        EventBody::Status { status } => {
            // A job started again (resume) starts with a clean error.
            let clear_error = *status == JobStatus::Queued;
            tx.execute(
                "UPDATE jobs SET status = ?2, updated_at = ?3, error = CASE WHEN ?4 THEN NULL ELSE error END WHERE id = ?1",
                params![event.job_id, status.as_str(), event.at, clear_error],
            )?;
        }
        EventBody::Step {
            step, total, loss, ..
        } => {
            tx.execute(
                "UPDATE jobs SET step = ?2, total_steps = ?3, loss = COALESCE(?4, loss), updated_at = ?5 WHERE id = ?1",
                params![event.job_id, step, total, loss.map(f64::from), event.at],
            )?;
        }
        EventBody::Error { error } => {
            tx.execute(
                "UPDATE jobs SET error = ?2, updated_at = ?3 WHERE id = ?1",
                params![event.job_id, error.message, event.at],
            )?;
        }
        EventBody::Log { .. } | EventBody::Sample { .. } | EventBody::Result(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(job: &str, seq: u64, body: EventBody) -> JobEvent {
        JobEvent {
            job_id: job.into(),
            seq,
            at: now_ms(),
            body,
        }
    }

    #[test]
    fn events_project_onto_the_job_row_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .insert_job(
                "a",
                JobKind::Training,
                &serde_json::json!({"keywords": ["x"]}),
                None,
            )
            .unwrap();
        store
            .record_event(&event(
                "a",
                1,
                EventBody::Status {
                    status: JobStatus::Training,
                },
            ))
            .unwrap();
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
    }

    #[test]
    fn reopening_interrupts_what_was_unfinished_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            store
                .insert_job("running", JobKind::Generation, &Value::Null, None)
                .unwrap();
            store
                .record_event(&event(
                    "running",
                    1,
                    EventBody::Status {
                        status: JobStatus::Running,
                    },
                ))
                .unwrap();
            store
                .insert_job("done", JobKind::Generation, &Value::Null, None)
                .unwrap();
            store
                .record_event(&event(
                    "done",
                    1,
                    EventBody::Status {
                        status: JobStatus::Completed,
                    },
                ))
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
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
    }

    #[test]
    fn settings_set_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut changes = Map::new();
        changes.insert("theme".into(), "dark".into());
        changes.insert("gone".into(), Value::Null);
        store.update_settings(&changes).unwrap();
        assert_eq!(
            store.settings().unwrap().get("theme"),
            Some(&Value::from("dark"))
        );
        changes.insert("theme".into(), Value::Null);
        store.update_settings(&changes).unwrap();
        assert!(store.settings().unwrap().is_empty());
    }

    #[test]
    fn tokens_are_kept_hashed_name_their_user_and_go_when_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
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
        let kept: String = store
            .conn()
            .query_row("SELECT hash FROM tokens WHERE id = ?1", [&id], |r| r.get(0))
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
    }

    #[test]
    fn a_schema_2_database_gains_owners_and_workers_and_keeps_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = Connection::open(&path).unwrap();
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
