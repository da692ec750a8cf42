//! `studio serve`: the engine's capabilities behind the HTTP server, until Ctrl-C or SIGTERM; and
//! `studio worker`, the same capabilities running a cluster's jobs without HTTP.

use anyhow::Context;

use crate::capabilities;
use crate::config::ServeConfig;

pub fn run(config: &ServeConfig) -> anyhow::Result<()> {
    let caps = capabilities::from_config(config)?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let running = crate::start(config, caps).await?;
        // The one line scripts and tests read to find the server (the port may have been 0).
        println!("studio listening on http://{}", running.addr);
        tracing::info!("data in {}", config.data_dir.display());
        let result = running.server.await.context("server task")?;
        running.jobs.shutdown();
        result.context("serving HTTP")
    })
}

/// `studio worker`: the engine's capabilities running a cluster's jobs, until Ctrl-C or SIGTERM.
pub fn run_worker(config: &ServeConfig) -> anyhow::Result<()> {
    // Chat answers are the API nodes' (a worker runs generation and training jobs): no docs to index.
    let config = &ServeConfig {
        chat: crate::config::ChatConfig {
            chat_docs: false,
            ..config.chat.clone()
        },
        ..config.clone()
    };
    let caps = capabilities::from_config(config)?;
    tokio::runtime::Runtime::new()?.block_on(crate::run_worker(config, caps))
}
