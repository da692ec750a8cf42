//! The built-in CPU model (docs/builtin-model.md): prepares its data, trains it with the studio's
//! trainer in full fine-tune mode, and scores it. Run from the repository root:
//!
//! ```text
//! scripts/builtin/prepare-data                                   # npm's emoji -> data/builtin-emoji
//! cargo run --release -p tools --bin builtin-model -- train --out target/builtin-run
//! cargo run --release -p tools --bin builtin-model -- score    # the committed model, on the CPU
//! ```

mod prepare;
mod score;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use engine::builtin::SIZE;
use engine::training::{Schedule, SigmaSampling, Targets, TrainSettings};
use prepare::prepare;
use score::{score, ScoreArgs};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use train::{train, TrainArgs};

/// The committed model, relative to the repository root.
const MODEL_DIR: &str = "engine/assets/builtin-emoji";
const DATA_DIR: &str = "data/builtin-emoji";
/// One caption in this many (by the emoji's sort order) is held out of training.
pub(crate) const HOLD_OUT_EVERY: usize = 20;

#[derive(Parser)]
#[command(about = "Prepare, train and score the built-in emoji model")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pairs the 64x64 Google emoji of npm's emoji-datasource-google with their names.
    Prepare {
        /// The unpacked npm package (the folder holding emoji.json and img/).
        #[arg(long)]
        package: PathBuf,
        #[arg(long, default_value = DATA_DIR)]
        out: PathBuf,
    },
    /// Trains the model from seeded weights (or goes on from a model's, --init): a model folder,
    /// samples and run.json under --out.
    Train {
        #[arg(long, default_value = DATA_DIR)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 4000)]
        steps: u32,
        #[arg(long, default_value_t = 128)]
        batch: u32,
        #[arg(long, default_value_t = 3e-4)]
        lr: f64,
        #[arg(long, default_value_t = 200)]
        warmup: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        sample_every: u32,
        /// Train on the first N training images only (a quick check of the command).
        #[arg(long)]
        max_images: Option<usize>,
        /// Stop at this wall time and save the model as it is (the record says so).
        #[arg(long)]
        time_limit_s: Option<f64>,
        #[arg(long, default_value = engine::classifier::DEFAULT_ENCODER_DIR)]
        text_encoder: PathBuf,
        /// auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Start from this model folder's weights (e.g. engine/assets/builtin-emoji) instead of seeded
        /// ones: a further run with its own warm-up and schedule.
        #[arg(long)]
        init: Option<PathBuf>,
    },
    /// Generates every held-out caption (and some training captions) on the CPU and reports how often
    /// the nearest dataset image is the one asked for, or one of its subcategory, against chance.
    Score {
        #[arg(long, default_value = MODEL_DIR)]
        model: PathBuf,
        #[arg(long, default_value = DATA_DIR)]
        data: PathBuf,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 4.0)]
        guidance: f64,
        /// Training captions scored too (every k-th, evenly spread).
        #[arg(long, default_value_t = 100)]
        train_captions: usize,
        /// Where the results (score.json) and example images go.
        #[arg(long, default_value = "docs/builtin-model")]
        out: PathBuf,
        #[arg(long, default_value = engine::classifier::DEFAULT_ENCODER_DIR)]
        text_encoder: PathBuf,
    },
}

/// One emoji of the prepared data (`index.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The PNG under `images/`.
    pub(crate) file: String,
    pub(crate) caption: String,
    pub(crate) category: String,
    pub(crate) subcategory: String,
    pub(crate) held_out: bool,
}

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Prepare { package, out } => prepare(&package, &out),
        Command::Train {
            data,
            out,
            steps,
            batch,
            lr,
            warmup,
            seed,
            sample_every,
            max_images,
            time_limit_s,
            text_encoder,
            device,
            init,
        } => {
            let settings = TrainSettings {
                steps,
                learning_rate: lr,
                targets: Targets::AllLinear,
                resolution: SIZE,
                batch_size: batch,
                warmup_steps: warmup.min(steps),
                lr_schedule: Schedule::Cosine,
                max_grad_norm: 1.0,
                weight_decay: 0.0,
                sigma_sampling: SigmaSampling::LogitNormal,
                sample_every,
                checkpoint_every: 0,
                sample_prompt: Some("grinning face".into()),
                seed,
                caption_dropout: 0.1,
                ..TrainSettings::defaults(SIZE)
            };
            train(TrainArgs {
                data,
                out,
                settings,
                max_images,
                time_limit_s,
                text_encoder,
                device: device.parse::<engine::device::DeviceChoice>()?.select()?,
                init,
            })
        }
        Command::Score {
            model,
            data,
            steps,
            guidance,
            train_captions,
            out,
            text_encoder,
        } => score(ScoreArgs {
            model,
            data,
            steps,
            guidance,
            train_captions,
            out,
            text_encoder,
        }),
    }
}
