//! The store's one schema, for SQLite and PostgreSQL alike, and how a database of an older schema is
//! brought up to it. Types are those both read the same way: `TEXT`, `BIGINT`, `DOUBLE PRECISION`
//! (SQLite takes them as its INTEGER and REAL); `"user"` is quoted, a reserved word in PostgreSQL.

use super::sql::{Database, Dialect};

/// Bumped with every change to `SCHEMA`; opening a newer database fails rather than misreading it.
pub const SCHEMA_VERSION: i64 = 5;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    params      TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    step        BIGINT NOT NULL DEFAULT 0,
    total_steps BIGINT NOT NULL DEFAULT 0,
    loss        DOUBLE PRECISION,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    worker      BIGINT,
    owner       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    BIGINT NOT NULL,
    at     BIGINT NOT NULL,
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
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    owner      TEXT
);
CREATE INDEX IF NOT EXISTS conversations_by_updated ON conversations (updated_at);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    image_job       TEXT,
    model           TEXT,
    finish          TEXT,
    at              BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
-- Schema 3: API tokens of users, kept as SHA-256 hashes (a token is random, so no salt or slow hash is
-- needed; a revoked one stays, marked, so that a server whose tokens were all revoked stays closed);
-- jobs' and conversations' `owner` (the user; NULL for the server's own --token) and jobs'
-- `worker`, added to older databases by `migrate`.
CREATE TABLE IF NOT EXISTS tokens (
    id         TEXT PRIMARY KEY,
    "user"     TEXT NOT NULL,
    admin      BIGINT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
-- Schema 5: a cluster's nodes that run jobs, each with its workers as `/health` shows them (JSON),
-- announced by its heartbeat; one unseen past `seen_until` has stopped.
CREATE TABLE IF NOT EXISTS nodes (
    name       TEXT PRIMARY KEY,
    workers    TEXT NOT NULL,
    seen_until BIGINT NOT NULL
);
"#;

/// Columns added after a table's first schema: (table, column, type), added where missing.
/// Schema 4, the cluster's shared queue: a generation's `plan` (what any worker node needs to run it),
/// the `node` that took the job and its `lease_until` (renewed by that node's heartbeat; past it, the
/// job goes back to the queue), and `cancel_requested` (for the node that runs it).
const ADDED_COLUMNS: [(&str, &str, &str); 7] = [
    ("jobs", "worker", "BIGINT"),
    ("jobs", "owner", "TEXT"),
    ("conversations", "owner", "TEXT"),
    ("jobs", "plan", "TEXT"),
    ("jobs", "node", "TEXT"),
    ("jobs", "lease_until", "BIGINT"),
    ("jobs", "cancel_requested", "BIGINT NOT NULL DEFAULT 0"),
];

/// The schema the database is at; 0 for an empty one.
pub fn version(db: &mut dyn Database) -> anyhow::Result<i64> {
    match db.dialect() {
        Dialect::Sqlite => db
            .query_one("PRAGMA user_version", &[])?
            .map_or(Ok(0), |row| row.int(0)),
        Dialect::Postgres => {
            let exists = db
                .query_one("SELECT to_regclass('studio_schema') IS NOT NULL", &[])?
                .map_or(Ok(0), |row| row.int(0))?;
            if exists == 0 {
                return Ok(0);
            }
            db.query_one("SELECT MAX(version) FROM studio_schema", &[])?
                .map_or(Ok(None), |row| row.opt_int(0))
                .map(Option::unwrap_or_default)
        }
    }
}

fn set_version(db: &mut dyn Database, version: i64) -> anyhow::Result<()> {
    match db.dialect() {
        Dialect::Sqlite => db.batch(&format!("PRAGMA user_version = {version}")),
        Dialect::Postgres => {
            db.batch("CREATE TABLE IF NOT EXISTS studio_schema (version BIGINT NOT NULL)")?;
            db.execute("DELETE FROM studio_schema", &[])?;
            db.execute(
                "INSERT INTO studio_schema (version) VALUES ($1)",
                &[version.into()],
            )?;
            Ok(())
        }
    }
}

fn has_column(db: &mut dyn Database, table: &str, column: &str) -> anyhow::Result<bool> {
    let sql = match db.dialect() {
        Dialect::Sqlite => "SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2",
        Dialect::Postgres => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
        }
    };
    let count = db
        .query_one(sql, &[table.into(), column.into()])?
        .map_or(Ok(0), |row| row.int(0))?;
    Ok(count > 0)
}

/// Brings the database up to [`SCHEMA_VERSION`], in one transaction (several nodes running it at once
/// on PostgreSQL take turns); returns the version it was at. Fails on a database of a newer studio.
pub fn migrate(db: &mut dyn Database) -> anyhow::Result<i64> {
    db.transaction(|db| {
        if db.dialect() == Dialect::Postgres {
            // Any constant: the studio's lock among the database's advisory locks.
            db.query("SELECT pg_advisory_xact_lock(42023)", &[])?;
        }
        let from = version(db)?;
        anyhow::ensure!(
            from <= SCHEMA_VERSION,
            "the database is from a newer studio (schema {from}; this one knows up to {SCHEMA_VERSION})"
        );
        db.batch(SCHEMA)?;
        for (table, column, kind) in ADDED_COLUMNS {
            if !has_column(db, table, column)? {
                db.batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            }
        }
        db.batch(
            "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
             CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated_at);
             CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, node, created_at);",
        )?;
        set_version(db, SCHEMA_VERSION)?;
        Ok(from)
    })
}
