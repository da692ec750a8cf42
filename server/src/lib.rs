//! The studio server: its settings, the engine behind the capability traits, the job system and its store,
//! the HTTP routes, and the command line. The binary (`main.rs`) runs `cli`, whose `serve` command calls
//! `start` with the engine's capabilities; tests call `start` with their own.

pub mod capabilities;
pub mod cli;
pub mod config;
pub mod error;
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
    let data = DataDir::create(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let location = config::store_location(&config.data_dir, config.database.as_deref());
    tracing::info!("store: {location}");
    let (generation_queue, training_queue) = (config.generation_queue, config.training_queue);
    // Both block on the database (PostgreSQL's client runs its own small runtime): off this one.
    let jobs = tokio::task::spawn_blocking(move || {
        let store = Arc::new(Store::connect(&location)?);
        Jobs::start(store, data, caps, generation_queue, training_queue)
    })
    .await
    .context("starting the job system")??;
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
