//! `studio migrate`: brings the store up to this studio's schema. A SQLite store does so by itself when
//! the server opens it; a PostgreSQL store, shared by a cluster's nodes, only through this command, run
//! once from any one node before (re)starting the nodes of a new version.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;

use crate::config::store_location;
use crate::files::DataDir;
use crate::store::schema::SCHEMA_VERSION;
use crate::store::{Location, Store};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The server's data directory (its `studio.db` is the store when --database is not given).
    #[arg(long, env = "STUDIO_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// The store: a SQLite file or a PostgreSQL URL (as `serve --database`).
    #[arg(long, env = "STUDIO_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let location = store_location(&args.data_dir, args.database.as_deref());
    if let Location::File(_) = location {
        DataDir::create(&args.data_dir)
            .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
    }
    let from = Store::migrate(&location)?;
    if from == SCHEMA_VERSION {
        eprintln!("{location} is at schema {SCHEMA_VERSION} already");
    } else {
        eprintln!("{location}: schema {from} -> {SCHEMA_VERSION}");
    }
    Ok(())
}
