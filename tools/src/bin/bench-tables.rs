//! Renders the figures tables of the README and docs from the GPU runs' records in bench/results/.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    /// The workspace's root folder.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rewrites every marked table (`<!-- bench-table NAME -->`) from the records.
    Write,
    /// Fails when a marked table differs from what the records make.
    Check,
    /// Prints one table: generation, generation-history, kernels, lora-training, lora-training-history.
    Show { name: String },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Write => tools::bench_tables::write(&args.root),
        Command::Check => {
            let stale = tools::bench_tables::stale(&args.root)?;
            if !stale.is_empty() {
                anyhow::bail!(
                    "tables differ from bench/results in {}: run `bench-tables write`",
                    stale.join(", ")
                );
            }
            Ok(())
        }
        Command::Show { name } => {
            let records = tools::bench_tables::Records::read(&args.root.join("bench/results"))?;
            print!("{}", records.table(&name)?);
            Ok(())
        }
    }
}
