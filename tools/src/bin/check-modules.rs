//! Fails when the modules of any crate of the workspace import each other in a cycle (see
//! `tools::module_graph`), naming each cycle's references.

use std::path::PathBuf;

use clap::Parser;

/// Lists the import cycles between the modules of every crate of a cargo workspace.
#[derive(Parser)]
struct Args {
    /// The workspace's root folder.
    #[arg(default_value = ".")]
    root: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cycles = tools::module_graph::workspace_cycles(&args.root)?;
    if cycles.is_empty() {
        println!("no import cycle between the modules of any crate");
        return Ok(());
    }
    for cycle in &cycles {
        eprint!("{cycle}");
    }
    eprintln!("{} import cycle(s) between modules", cycles.len());
    std::process::exit(1);
}
