//! The shared store of a cluster: a PostgreSQL database named by its URL
//! (`postgres://user:password@host:5432/studio`, or `host=/run/postgresql dbname=studio`).
//!
//! The client is rust-postgres' blocking one, like the SQLite connection beside it: the store's callers
//! run on worker threads and tokio's blocking pool, never on the async runtime itself. A connection the
//! server lost (PostgreSQL restarted, say) is made again: a statement outside a transaction that found
//! it closed runs again on the new one; inside a transaction the transaction fails (its `BEGIN` went with
//! the old connection) and the next one connects again.

use std::error::Error;

use anyhow::Context;
use bytes::BytesMut;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use postgres::{Client, Config, NoTls};

use super::sql::{Database, Dialect, Row, Value};

pub struct Postgres {
    config: Config,
    client: Client,
    in_transaction: bool,
}

type BoxError = Box<dyn Error + Sync + Send>;

impl Postgres {
    pub fn connect(url: &str) -> anyhow::Result<Postgres> {
        let config: Config = url
            .parse()
            .context("reading the PostgreSQL URL (postgres://user:password@host:port/database)")?;
        let client = connect(&config)?;
        Ok(Postgres {
            config,
            client,
            in_transaction: false,
        })
    }

    /// Runs `f` on the connection, connecting again first when it was lost, and once more after that
    /// when `f` found it lost and no transaction was open on it.
    fn with_client<T>(
        &mut self,
        f: impl Fn(&mut Client) -> Result<T, postgres::Error>,
    ) -> anyhow::Result<T> {
        if self.client.is_closed() {
            self.reconnect()?;
        }
        match f(&mut self.client) {
            Err(err) if err.is_closed() && !self.in_transaction => {
                self.reconnect()?;
                Ok(f(&mut self.client)?)
            }
            result => Ok(result?),
        }
    }

    fn reconnect(&mut self) -> anyhow::Result<()> {
        tracing::warn!("the connection to PostgreSQL was lost; connecting again");
        self.in_transaction = false;
        self.client = connect(&self.config)?;
        Ok(())
    }
}

fn connect(config: &Config) -> anyhow::Result<Client> {
    let where_ = match (config.get_hosts().first(), config.get_dbname()) {
        (Some(host), Some(db)) => format!(" {host:?}, database {db}"),
        _ => String::new(),
    };
    config
        .connect(NoTls)
        .with_context(|| format!("connecting to PostgreSQL{where_}"))
}

fn params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// A value as the parameter's type in the statement wants it (the store's integers are `BIGINT`, but a
/// parameter compared with a literal may be inferred as `INTEGER`).
impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => Err(format!("an integer given for a parameter of type {ty}").into()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(format!("a number given for a parameter of type {ty}").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Value, BoxError> {
        Ok(match *ty {
            Type::BOOL => Value::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::INT2 => Value::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::INT4 => Value::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f64::from(f32::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            _ => Value::Text(<&str>::from_sql(ty, raw)?.to_owned()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Value, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl Database for Postgres {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn batch(&mut self, sql: &str) -> anyhow::Result<()> {
        let result = self.with_client(|client| client.batch_execute(sql));
        match sql {
            "BEGIN" => self.in_transaction = result.is_ok(),
            "COMMIT" | "ROLLBACK" => self.in_transaction = false,
            _ => {}
        }
        result
    }

    fn execute(&mut self, sql: &str, values: &[Value]) -> anyhow::Result<u64> {
        self.with_client(|client| client.execute(sql, &params(values)))
    }

    fn query(&mut self, sql: &str, values: &[Value]) -> anyhow::Result<Vec<Row>> {
        let rows = self.with_client(|client| client.query(sql, &params(values)))?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| Ok(row.try_get::<_, Value>(i)?))
                    .collect::<anyhow::Result<_>>()
                    .map(Row)
            })
            .collect()
    }
}

/// Whether this error (anywhere in its chain) says the database's disk is full.
pub fn is_disk_full(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<postgres::Error>()
            .and_then(postgres::Error::code)
            == Some(&SqlState::DISK_FULL)
    })
}

/// Whether this error (anywhere in its chain) is PostgreSQL being unreachable for now (a connection
/// lost or refused, the server shutting down or starting up), as opposed to a statement's own failure.
pub fn is_unreachable(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<postgres::Error>().is_some_and(|e| {
            e.is_closed()
                || e.code().is_none_or(|code| {
                    // Class 08: connection exception; 57: operator intervention (shutdown, starting up).
                    code.code().starts_with("08") || code.code().starts_with("57")
                })
        })
    })
}

/// A connection of its own that LISTENs on a channel: what wakes a node's threads when another node
/// records a job or an event. Connects (again) when it must; a failure only makes `wait` a sleep.
pub struct Listener {
    config: Config,
    channel: &'static str,
    client: Option<Client>,
}

impl Listener {
    pub fn new(url: &str, channel: &'static str) -> anyhow::Result<Listener> {
        Ok(Listener {
            config: url.parse()?,
            channel,
            client: None,
        })
    }

    /// Returns at the first notification, or after `timeout`.
    pub fn wait(&mut self, timeout: std::time::Duration) {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let listening = connect(&self.config).and_then(|mut client| {
                client.batch_execute(&format!("LISTEN {}", self.channel))?;
                Ok(client)
            });
            match listening {
                Ok(client) => self.client = Some(client),
                Err(err) => {
                    tracing::debug!("listening on {}: {err:#}", self.channel);
                    self.client = None;
                    return std::thread::sleep(timeout);
                }
            }
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let lost = {
            let mut notifications = client.notifications();
            let lost = notifications.timeout_iter(timeout).next().is_err();
            // Drop whatever else has arrived: one wake-up covers them.
            let _ = notifications.iter().count();
            lost
        };
        if lost {
            self.client = None;
        }
    }
}
