//! `studio serve`: the engine's capabilities behind the HTTP server, until Ctrl-C or SIGTERM.

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
