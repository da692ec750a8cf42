//! What the store needs of a database, so that its statements are written once for both: SQLite (the
//! embedded default) and PostgreSQL (a cluster). Statements use PostgreSQL's `$1` placeholders and the
//! types both understand (`TEXT`, `BIGINT`, `DOUBLE PRECISION`); values travel as [`Value`].

/// A parameter or a column's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Value {
        Value::Text(s.clone())
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Value {
        Value::Int(i64::from(i))
    }
}

impl From<u64> for Value {
    fn from(i: u64) -> Value {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Int(i64::from(b))
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Real(f)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// A statement's parameters: `values![id, now, owner]`, each converted to a [`Value`].
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        &[$($crate::store::sql::Value::from($value)),*]
    };
}
pub(crate) use values;

/// A result row, its columns in the statement's order.
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> anyhow::Result<&Value> {
        self.0
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("the row has no column {i}"))
    }

    pub fn text(&self, i: usize) -> anyhow::Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| anyhow::anyhow!("column {i} is NULL, text expected"))
    }

    pub fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            other => anyhow::bail!("column {i} is {other:?}, text expected"),
        }
    }

    pub fn int(&self, i: usize) -> anyhow::Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| anyhow::anyhow!("column {i} is NULL, an integer expected"))
    }

    pub fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            other => anyhow::bail!("column {i} is {other:?}, an integer expected"),
        }
    }

    pub fn opt_real(&self, i: usize) -> anyhow::Result<Option<f64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Real(v) => Ok(Some(*v)),
            Value::Int(v) => Ok(Some(*v as f64)),
            other => anyhow::bail!("column {i} is {other:?}, a number expected"),
        }
    }
}

/// Which database it is, for the few things the two spell differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A connection to the store's database.
pub trait Database: Send {
    fn dialect(&self) -> Dialect;
    /// Runs statements with no parameters and no results (schema, `BEGIN`, `COMMIT`).
    fn batch(&mut self, sql: &str) -> anyhow::Result<()>;
    /// Runs one statement; how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64>;
    /// Runs one query; its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>>;
}

impl dyn Database + '_ {
    /// The first row, `None` when there is none.
    pub fn query_one(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs `f` in a transaction: committed when it returns `Ok`, rolled back otherwise.
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Database) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        // SQLite: take the write lock at once, so two writers never deadlock upgrading their read locks.
        self.batch(match self.dialect() {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        })?;
        match f(self) {
            Ok(value) => {
                self.batch("COMMIT")?;
                Ok(value)
            }
            Err(err) => {
                if let Err(rollback) = self.batch("ROLLBACK") {
                    tracing::error!("rolling back a failed transaction: {rollback:#}");
                }
                Err(err)
            }
        }
    }
}
