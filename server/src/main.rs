use clap::Parser;
use server::cli::{self, Cli};

fn main() -> anyhow::Result<()> {
    // `.env` first, so HF_TOKEN and STUDIO_* there act like the environment (which still wins).
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    cli::run(Cli::parse())
}
