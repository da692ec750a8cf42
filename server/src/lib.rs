//! The studio server: its settings, the engine behind the capability traits, the job system and its store,
//! the HTTP routes, and the command line. The binary (`main.rs`) runs `cli`, whose `serve` command calls
//! `start` with the engine's capabilities; tests call `start` with their own.

pub mod capabilities;
pub mod cli;
pub mod config;
pub mod error;
pub mod file_store;
pub mod files;
pub mod input;
pub mod jobs;
pub mod recipe;
pub mod routes;
pub mod store;
pub mod studio_docs;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::Request;

use config::ServeConfig;
use files::DataDir;
use jobs::capability::Capabilities;
use jobs::Jobs;
use routes::{AppState, HttpSettings};
use store::Store;

/// A server accepting connections.
pub struct Running {
    pub addr: SocketAddr,
    pub jobs: Jobs,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens the data directory and database, starts the worker and binds the listener; the server stops at
/// Ctrl-C or SIGTERM.
pub async fn start(config: &ServeConfig, caps: Capabilities) -> anyhow::Result<Running> {
    let data = open_data(config).await?;
    let jobs = start_jobs(config, data, caps, !config.api_only).await?;
    let settings = HttpSettings {
        token: config.token.clone(),
        json_limit: usize::try_from(config.json_limit).unwrap_or(usize::MAX),
        upload_limit: usize::try_from(config.upload_limit).unwrap_or(usize::MAX),
        classify_slots: Arc::new(tokio::sync::Semaphore::new(config.classify_queue)),
        chat_slots: Arc::new(tokio::sync::Semaphore::new(config.chat.chat_queue)),
        chat_max_tokens: config.chat.chat_max_tokens.max(1),
        cors_origins: config.cors_origins.clone(),
    };
    let state = AppState {
        jobs: jobs.clone(),
        settings: Arc::new(settings),
        leptos: routes::ui_options(&config.site_dir),
    };
    let listener = tokio::net::TcpListener::bind((config.bind, config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.bind, config.port))?;
    let addr = listener.local_addr()?;
    let service =
        axum::ServiceExt::<Request<axum::body::Body>>::into_make_service(routes::app(state));
    let server = tokio::spawn(async move {
        axum::serve(listener, service)
            .with_graceful_shutdown(shutdown_signal())
            .await
    });
    Ok(Running { addr, jobs, server })
}

/// The data directory, with the file store when there is one (opened off the runtime: it checks that
/// the store answers).
async fn open_data(config: &ServeConfig) -> anyhow::Result<DataDir> {
    let data = DataDir::create(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let Some(url) = config.file_store.clone() else {
        return Ok(data);
    };
    let files = tokio::task::spawn_blocking(move || file_store::FileStore::open(&url)).await??;
    tracing::info!(
        "files: {files}, with {} as this node's copy",
        config.data_dir.display()
    );
    Ok(data.with_file_store(files))
}

/// Opens the store and starts the job system: alone on a SQLite store; as a cluster's node, running
/// jobs or not, on a PostgreSQL one.
async fn start_jobs(
    config: &ServeConfig,
    data: DataDir,
    caps: Capabilities,
    runs_jobs: bool,
) -> anyhow::Result<Jobs> {
    let location = config::store_location(&config.data_dir, config.database.as_deref());
    tracing::info!("store: {location}");
    let node = match &location {
        store::Location::Postgres(_) => Some(jobs::NodeSettings {
            name: config.node_name.clone().unwrap_or_else(default_node_name),
            lease: std::time::Duration::from_secs(config.lease_seconds),
            runs_jobs,
        }),
        store::Location::File(_) if runs_jobs => None,
        store::Location::File(_) => anyhow::bail!(
            "a node that runs no jobs needs a store other nodes share: PostgreSQL (--database \
             postgres://...), with `studio worker` nodes on it"
        ),
    };
    let (generation_queue, training_queue) = (config.generation_queue, config.training_queue);
    // Both block on the database (PostgreSQL's client runs its own small runtime): off this one.
    tokio::task::spawn_blocking(move || {
        let store = Arc::new(Store::connect(&location)?);
        Jobs::start(store, data, caps, generation_queue, training_queue, node)
    })
    .await
    .context("starting the job system")?
}

/// `<host>-<pid>`: unique among the processes of a cluster.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
}

/// A cluster's worker node: runs jobs from the shared store, serves no HTTP; until Ctrl-C or SIGTERM.
pub async fn run_worker(config: &ServeConfig, caps: Capabilities) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(
            config::store_location(&config.data_dir, config.database.as_deref()),
            store::Location::Postgres(_)
        ),
        "`studio worker` runs the jobs of a cluster's shared store: give it --database postgres://... \
         (the one the API nodes use) and the same --data-dir; one box alone needs only `studio serve`"
    );
    let data = open_data(config).await?;
    let jobs = start_jobs(config, data, caps, true).await?;
    // The one line scripts and tests read to know the worker is taking jobs.
    println!("studio worker ready");
    shutdown_signal().await;
    jobs.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
