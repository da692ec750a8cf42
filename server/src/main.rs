//! `studio`: the FLUX studio's one binary (server and command-line tools).

mod generate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "studio", version, about = "A self-hosted FLUX image studio")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one image from a prompt and write it as PNG.
    Generate(generate::Args),
}

fn main() -> anyhow::Result<()> {
    // A .env beside the studio may hold HF_TOKEN; real environment variables win.
    dotenvy::dotenv().ok();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
    }
}
