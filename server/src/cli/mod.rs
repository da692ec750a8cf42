//! The `studio` command line: one module per command. Serving is the default, so the server's settings
//! are also accepted without the subcommand name.

pub mod classify;
pub mod generate;
pub mod migrate;
pub mod serve;
pub mod token;

use clap::{Parser, Subcommand};

use crate::config::ServeConfig;

#[derive(Debug, Parser)]
#[command(
    name = "studio",
    version,
    about = "Self-hosted FLUX image studio: HTTP API, jobs and WebSockets"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of `serve`, also accepted without the subcommand name (serving is the default).
    #[command(flatten)]
    pub serve: ServeConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(ServeConfig),
    /// Run a cluster's worker node: jobs from the shared PostgreSQL store, no HTTP (docs/deployment.md).
    Worker(ServeConfig),
    /// Generate one image from a prompt and write it as PNG.
    Generate(generate::Args),
    /// Classify prompts read from stdin, one a line: one JSON line each (the `/classify/` answer plus `prompt`).
    Classify(classify::Args),
    /// Users' API tokens: create (printed once), list, revoke.
    Token(token::Args),
    /// Bring the store up to this studio's schema (needed for a PostgreSQL store; see docs/deployment.md).
    Migrate(migrate::Args),
}

impl Cli {
    /// The serve settings, whether or not `serve` was named.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

/// Runs the command the line names.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.into_command() {
        Command::Serve(config) => serve::run(&config),
        Command::Worker(config) => serve::run_worker(&config),
        Command::Generate(args) => generate::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Token(args) => token::run(args),
        Command::Migrate(args) => migrate::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_is_the_default_command_and_flags_work_without_it() {
        let cli = Cli::parse_from(["studio", "--port", "9000"]);
        let Command::Serve(config) = cli.into_command() else {
            panic!("serve expected")
        };
        assert_eq!(config.port, 9000);
        let cli = Cli::parse_from(["studio", "serve", "--port", "9001"]);
        let Command::Serve(config) = cli.into_command() else {
            panic!("serve expected")
        };
        assert_eq!(config.port, 9001);
    }
}
