use clap::Parser;
use server::config::{Cli, Command};
use server::jobs::capability::Capabilities;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `.env` first, so HF_TOKEN and STUDIO_* there act like the environment (which still wins).
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().into_command() {
        // No model is wired into this build yet: every capability answers 503 with its reason.
        Command::Serve(config) => server::serve(&config, Capabilities::default()).await,
    }
}
