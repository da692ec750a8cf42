use clap::Parser;
use server::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    // `.env` first, so HF_TOKEN and STUDIO_* there act like the environment (which still wins).
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().into_command() {
        Command::Serve(config) => {
            let caps = server::capabilities(&config)?;
            tokio::runtime::Runtime::new()?.block_on(server::serve(&config, caps))
        }
        Command::Generate(args) => server::generate::run(args),
        Command::Classify(args) => server::classifier::run(args),
    }
}
