//! Timings of FLUX on the studio's engine, run beside diffusers on the same weights
//! (scripts/gpu/flux-parity-bench.sh). The pass/fail checks of the kernels and of training's gradients
//! are tests: engine/tests/gpu_kernels.rs and engine/tests/gpu_training.rs (docs/performance.md).
//!
//! ```text
//! flux-bench forward  --model DIR --inputs REF.safetensors [--compare-plain]
//! flux-bench generate --model DIR --size 1024 --steps 28 [--batch N] [--step-cache T]
//! flux-bench profile  [--size 1024]
//! flux-bench train    --size 512 --steps 10 [--model DIR] [--rank 16] [--targets attention|all_linear]
//! ```
//! `--weights fp8` (or a GGUF type) makes the transformer's linear weights into that format on load.
//! `--plain` builds the models with candle's ops only (the fused kernels off; CUDA builds: the CPU always
//! takes candle's ops).

mod forward;
mod generate;
mod profile;
mod random;
mod timing;
mod train;

use std::io::IsTerminal;

use anyhow::Result;
use clap::{Parser, Subcommand};
use engine::device::DeviceChoice;
use engine::ops::Kernels;
use engine::weights::WeightFormat;

#[derive(Parser)]
#[command(about = "Timings of FLUX on the studio's engine")]
struct Args {
    /// Candle's ops only: the models are built without the fused CUDA kernels.
    #[arg(long, global = true)]
    plain: bool,
    /// The fused kernels as an Ampere GPU runs them (no Hopper warpgroup MMAs, no FP8 tensor cores):
    /// times the path of older cards on a Hopper GPU.
    #[arg(long, global = true, conflicts_with = "plain")]
    ampere: bool,
    /// The transformer's linear weights made into this format on load (`fp8`, `q8_0`, `q4_k`, ...:
    /// engine::weights::WeightFormat); as stored when absent.
    #[arg(long, global = true, value_parser = WeightFormat::parse)]
    weights: Option<WeightFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One transformer step against diffusers' output on the same inputs.
    Forward(forward::Args),
    /// End-to-end generation, timed per step.
    Generate(generate::Args),
    /// Each op of a single block (and training's attention backward, the VAE's ops), timed alone.
    Profile(profile::Args),
    /// LoRA training steps (forward, backward, clipping, AdamW) as the trainer takes them.
    Train(train::Args),
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The engine's log, timestamped, on stderr (the GPU scripts keep it beside the JSON on stdout):
    // where a long load spends its time.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let device = DeviceChoice::Auto.select()?;
    let kernels = if args.plain {
        Kernels::Plain
    } else if args.ampere {
        Kernels::Ampere
    } else {
        Kernels::Fused
    };
    match args.command {
        Command::Forward(a) => forward::run(&a, &device, kernels, args.weights),
        Command::Generate(a) => generate::run(&a, &device, kernels, args.weights),
        Command::Profile(a) => profile::run(&a, &device, kernels),
        Command::Train(a) => train::run(&a, &device, kernels, args.weights),
    }
}
