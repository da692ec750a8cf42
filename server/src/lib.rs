//! The studio server: configuration, the job system and its store, and the HTTP routes. The binary
//! (`main.rs`) parses the command line and calls `serve`; tests call `start` with their own capabilities.

pub mod classifier;
pub mod config;
pub mod error;
pub mod files;
pub mod flux;
pub mod generate;
pub mod jobs;
pub mod routes;
pub mod store;
pub mod training;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::Request;

use config::ServeConfig;
use files::DataDir;
use jobs::capability::{Capabilities, Classification};
use jobs::Jobs;
use routes::{AppState, HttpSettings};
use store::Store;

/// A server accepting connections.
pub struct Running {
    pub addr: SocketAddr,
    pub jobs: Jobs,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The capabilities of this build, from its configuration. A classifier that fails to load leaves the server
/// running without it, the error shown by `/health` and in `/classify/`'s 503, so that generation is not held
/// hostage by a missing encoder; generation loads its models on first use, so only a bad setting stops it here.
pub fn capabilities(config: &ServeConfig) -> anyhow::Result<Capabilities> {
    let generation = flux::FluxGeneration::new(config)?;
    // Training shares generation's resident model: one FLUX in memory.
    let trainer = training::FluxTraining::new(
        generation.resident().clone(),
        generation.default_preset_info(),
    );
    let (classification, classification_error) = match config.classifier.load() {
        Ok(classifier) => (Some(Arc::new(classifier) as Arc<dyn Classification>), None),
        Err(e) => {
            tracing::warn!("prompt classification is unavailable: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    Ok(Capabilities {
        generation: Some(Arc::new(generation)),
        classification,
        classification_error,
        training: Some(Arc::new(trainer)),
    })
}

/// Opens the data directory and database, starts the worker and binds the listener.
pub async fn start(config: &ServeConfig, caps: Capabilities) -> anyhow::Result<Running> {
    let data = DataDir::create(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let store = Arc::new(Store::open(&data.database())?);
    let jobs = Jobs::start(
        store,
        data,
        caps,
        config.generation_queue,
        config.training_queue,
    )?;
    let settings = HttpSettings {
        token: config.token.clone(),
        json_limit: usize::try_from(config.json_limit).unwrap_or(usize::MAX),
        upload_limit: usize::try_from(config.upload_limit).unwrap_or(usize::MAX),
        classify_slots: Arc::new(tokio::sync::Semaphore::new(config.classify_queue)),
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

/// Serves until Ctrl-C or SIGTERM.
pub async fn serve(config: &ServeConfig, caps: Capabilities) -> anyhow::Result<()> {
    let running = start(config, caps).await?;
    // The one line scripts and tests read to find the server (the port may have been 0).
    println!("studio listening on http://{}", running.addr);
    tracing::info!("data in {}", config.data_dir.display());
    let result = running.server.await.context("server task")?;
    running.jobs.shutdown();
    result.context("serving HTTP")
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
