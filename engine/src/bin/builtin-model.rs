//! The built-in CPU model (docs/builtin-model.md): prepares its data, trains it with the studio's
//! trainer in full fine-tune mode, and scores it. Run from the repository root:
//!
//! ```text
//! scripts/builtin/prepare-data                                   # npm's emoji -> data/builtin-emoji
//! cargo run --release -p engine --bin builtin-model -- train --out target/builtin-run
//! cargo run --release -p engine --bin builtin-model -- score    # the committed model, on the CPU
//! ```

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use engine::builtin::{model_config, write_model_folder, SIZE, TEXT_TOKENS};
use engine::pipeline::{FluxPipeline, GenerateParams, LoadOptions};
use engine::training::{
    full, Report, Schedule, SigmaSampling, Targets, TrainJob, TrainSettings, Trainer,
};
use image::{imageops::FilterType, RgbImage, RgbaImage};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The committed model, relative to the repository root.
const MODEL_DIR: &str = "engine/assets/builtin-emoji";
const DATA_DIR: &str = "data/builtin-emoji";
/// One caption in this many (by the emoji's sort order) is held out of training.
const HOLD_OUT_EVERY: usize = 20;

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
struct Entry {
    /// The PNG under `images/`.
    file: String,
    caption: String,
    category: String,
    subcategory: String,
    held_out: bool,
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

fn caption_of(e: &serde_json::Value) -> Option<String> {
    let name = e["name"]
        .as_str()
        .map(str::to_string)
        .or_else(|| e["short_name"].as_str().map(|s| s.replace(['_', '-'], " ")))?;
    let caption = name.to_lowercase().trim().to_string();
    (!caption.is_empty()).then_some(caption)
}

fn prepare(package: &Path, out: &Path) -> Result<()> {
    let emoji: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(package.join("emoji.json")).context("emoji.json in the npm package")?,
    )?;
    let mut emoji: Vec<&serde_json::Value> = emoji
        .iter()
        .filter(|e| e["has_img_google"].as_bool() == Some(true))
        .collect();
    emoji.sort_by_key(|e| e["sort_order"].as_u64().unwrap_or(u64::MAX));
    std::fs::create_dir_all(out.join("images"))?;
    let zip_file = std::fs::File::create(out.join("train.zip"))?;
    let mut zip = zip::ZipWriter::new(zip_file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut entries = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in emoji {
        let (Some(caption), Some(file)) = (caption_of(e), e["image"].as_str()) else {
            continue;
        };
        if !seen.insert(caption.clone()) {
            continue;
        }
        let src = package.join("img/google/64").join(file);
        let rgba: RgbaImage = image::open(&src)
            .with_context(|| format!("reading {}", src.display()))?
            .to_rgba8();
        let rgb = on_white(&rgba);
        if rgb.dimensions() != (SIZE, SIZE) {
            bail!("{} is not {SIZE}x{SIZE}", src.display());
        }
        rgb.save(out.join("images").join(file))?;
        let held_out = entries.len() % HOLD_OUT_EVERY == HOLD_OUT_EVERY / 2;
        if !held_out {
            let stem = file.trim_end_matches(".png");
            let mut png = Vec::new();
            rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            zip.start_file(format!("{stem}.png"), opts)?;
            zip.write_all(&png)?;
            zip.start_file(format!("{stem}.txt"), opts)?;
            zip.write_all(caption.as_bytes())?;
        }
        entries.push(Entry {
            file: file.to_string(),
            caption,
            category: e["category"].as_str().unwrap_or("").to_string(),
            subcategory: e["subcategory"].as_str().unwrap_or("").to_string(),
            held_out,
        });
    }
    zip.finish()?;
    std::fs::write(out.join("index.json"), serde_json::to_vec_pretty(&entries)?)?;
    let held = entries.iter().filter(|e| e.held_out).count();
    println!(
        "prepare: {} emoji, {} for training (train.zip), {held} held out; index.json and images/ in {}",
        entries.len(),
        entries.len() - held,
        out.display()
    );
    Ok(())
}

/// Composites RGBA over white.
fn on_white(rgba: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = f32::from(p[3]) / 255.0;
        let mix = |c: u8| (f32::from(c) * a + 255.0 * (1.0 - a)).round() as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}

struct TrainArgs {
    data: PathBuf,
    out: PathBuf,
    settings: TrainSettings,
    max_images: Option<usize>,
    time_limit_s: Option<f64>,
    text_encoder: PathBuf,
    device: Device,
    init: Option<PathBuf>,
}

const WEIGHTS_FILE: &str = "transformer/diffusion_pytorch_model.safetensors";

/// The transformer weights of a model folder, in f32 (the trainer's precision), sorted by name.
fn folder_weights(dir: &Path) -> Result<Vec<(String, candle_core::Tensor)>> {
    let file = dir.join(WEIGHTS_FILE);
    let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("reading {}", file.display()))?;
    let mut weights = loaded
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<Vec<_>>>()?;
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(weights)
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// Copies the first `n` image/caption pairs of a training ZIP into a new one.
fn first_images(zip_path: &Path, n: usize, out: &Path) -> Result<()> {
    use std::io::Read;
    let mut src = zip::ZipArchive::new(std::fs::File::open(zip_path)?)?;
    let mut dst = zip::ZipWriter::new(std::fs::File::create(out)?);
    let opts = zip::write::SimpleFileOptions::default();
    let mut names = src
        .file_names()
        .map(|n| n.map(|n| n.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    names.sort();
    let stems: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".png").map(str::to_string))
        .take(n)
        .collect();
    for stem in stems {
        for ext in ["png", "txt"] {
            let mut bytes = Vec::new();
            src.by_name(&format!("{stem}.{ext}"))?
                .read_to_end(&mut bytes)?;
            dst.start_file(format!("{stem}.{ext}"), opts)?;
            dst.write_all(&bytes)?;
        }
    }
    dst.finish()?;
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    let started = Instant::now();
    let s = a.settings.clone();
    std::fs::create_dir_all(&a.out)?;
    let mut dataset = a.data.join("train.zip");
    if !dataset.is_file() {
        bail!(
            "{} is missing: run scripts/builtin/prepare-data first",
            dataset.display()
        );
    }
    if let Some(n) = a.max_images {
        let subset = a.out.join("train-subset.zip");
        first_images(&dataset, n, &subset)?;
        dataset = subset;
    }
    let data_sha256 = sha256_file(&dataset)?;
    // TF32 tensor cores for the f32 matmuls of training (candle's default is full f32).
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);

    let model_dir = a.out.join("model");
    let (weights, base_model) = match &a.init {
        Some(dir) => (
            folder_weights(dir)?,
            format!(
                "{} (weights sha256 {})",
                dir.display(),
                sha256_file(&dir.join(WEIGHTS_FILE))?
            ),
        ),
        None => (
            full::initial_weights(&model_config(), s.seed)?,
            "none (trained from seeded weights)".to_string(),
        ),
    };
    write_model_folder(&model_dir, &model_config(), &weights)?;
    let opts = LoadOptions {
        source: engine::hub::Source::Local(model_dir.clone()),
        transformer_file: None,
        t5_max_len: TEXT_TOKENS,
        text_encoder_dir: a.text_encoder.clone(),
    };
    let pipe = Arc::new(FluxPipeline::load_dir_trainable(
        &model_dir, &opts, &a.device,
    )?);
    let weights_file = model_dir.join(WEIGHTS_FILE);
    let job = TrainJob {
        dataset: dataset.clone(),
        keywords: vec![],
        job_dir: a.out.join("run"),
        samples_dir: a.out.join("samples"),
        lora_file: weights_file.clone(),
        settings: s.clone(),
        base_model: base_model.clone(),
        sample_steps: 20,
        sample_guidance: 4.0,
        resume: false,
    };
    let mut log = |r: Report| match r {
        Report::Log(l) => println!("{l}"),
        Report::Sample { step, file } => println!("sample at step {step}: {file}"),
    };
    let mut trainer = Trainer::prepare(pipe, job, &mut log)?;
    let prepared_s = started.elapsed().as_secs_f64();
    println!("prepared in {prepared_s:.1} s");
    let train_start = Instant::now();
    let mut curve = Vec::new();
    let mut window = Vec::new();
    let mut stopped_early = false;
    loop {
        let stats = trainer.step(&mut log)?;
        window.push(stats.loss);
        if stats.step % 50 == 0 || stats.finished {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            let elapsed = train_start.elapsed().as_secs_f64();
            println!(
                "step {}/{}: loss {mean:.4} (mean of {}), lr {:.2e}, grad norm {:.3}, {:.3} s/step",
                stats.step,
                stats.total,
                window.len(),
                stats.learning_rate,
                stats.grad_norm,
                elapsed / f64::from(stats.step)
            );
            curve.push(json!({"step": stats.step, "loss": mean, "seconds": elapsed}));
            window.clear();
        }
        if stats.finished {
            break;
        }
        if a.time_limit_s
            .is_some_and(|limit| started.elapsed().as_secs_f64() > limit)
        {
            println!("time limit reached at step {}: saving", stats.step);
            trainer.finish(&mut log)?;
            stopped_early = true;
            break;
        }
    }
    let train_s = train_start.elapsed().as_secs_f64();
    let steps_done = trainer.step_count();
    let record = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "device": format!("{:?}", a.device),
        "model_config": model_config(),
        "settings": s,
        "init": base_model,
        "data": {
            "file": dataset.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": data_sha256,
            "source": "npm emoji-datasource-google@16.0.0 (images Apache-2.0), names from its emoji.json",
        },
        "steps_done": steps_done,
        "stopped_by_time_limit": stopped_early,
        "seconds": {"prepare": prepared_s, "train": train_s, "per_step": train_s / f64::from(steps_done.max(1))},
        "loss_curve": curve,
        "weights_sha256": sha256_file(&weights_file)?,
    });
    std::fs::write(a.out.join("run.json"), serde_json::to_vec_pretty(&record)?)?;
    println!(
        "trained {steps_done} steps in {train_s:.0} s; model in {}",
        model_dir.display()
    );
    Ok(())
}

struct ScoreArgs {
    model: PathBuf,
    data: PathBuf,
    steps: usize,
    guidance: f64,
    train_captions: usize,
    out: PathBuf,
    text_encoder: PathBuf,
}

/// An image as a comparison vector: 16x16, RGB in [0, 1]. Coarse on purpose: a generated emoji
/// that is the right thing a few pixels off should still be nearest to it.
fn features(img: &RgbImage) -> Vec<f32> {
    image::imageops::resize(img, 16, 16, FilterType::Triangle)
        .into_raw()
        .into_iter()
        .map(|v| f32::from(v) / 255.0)
        .collect()
}

fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[derive(Default, Serialize)]
struct Tally {
    captions: usize,
    /// The nearest dataset image is the requested emoji.
    exact_top1: usize,
    /// The requested emoji is among the 10 nearest.
    exact_top10: usize,
    /// The nearest dataset image is of the requested emoji's subcategory (e.g. "animal-bird").
    subcategory_top1: usize,
    /// What a random pick of the dataset would score, summed over captions.
    subcategory_chance: f64,
}

fn score(a: ScoreArgs) -> Result<()> {
    let entries: Vec<Entry> = serde_json::from_slice(
        &std::fs::read(a.data.join("index.json"))
            .context("index.json: run scripts/builtin/prepare-data first")?,
    )?;
    let images: Vec<RgbImage> = entries
        .iter()
        .map(|e| Ok(image::open(a.data.join("images").join(&e.file))?.to_rgb8()))
        .collect::<Result<_>>()?;
    let feats: Vec<Vec<f32>> = images.iter().map(features).collect();
    let n = entries.len();
    let opts = LoadOptions {
        source: engine::hub::Source::Local(a.model.clone()),
        transformer_file: None,
        t5_max_len: TEXT_TOKENS,
        text_encoder_dir: a.text_encoder.clone(),
    };
    let pipe = FluxPipeline::load_dir(&a.model, &opts, &Device::Cpu)?;
    let held: Vec<usize> = (0..n).filter(|&i| entries[i].held_out).collect();
    let train_all: Vec<usize> = (0..n).filter(|&i| !entries[i].held_out).collect();
    let stride = (train_all.len() / a.train_captions.max(1)).max(1);
    let train: Vec<usize> = train_all
        .iter()
        .step_by(stride)
        .take(a.train_captions)
        .copied()
        .collect();
    std::fs::create_dir_all(&a.out)?;
    let mut seconds = Vec::new();
    let mut examples: Vec<(usize, RgbImage, usize)> = Vec::new();
    let mut run = |set: &[usize], keep_examples: bool| -> Result<Tally> {
        let mut t = Tally::default();
        for &i in set {
            let e = &entries[i];
            let start = Instant::now();
            let out = pipe.generate(
                &GenerateParams {
                    prompt: e.caption.clone(),
                    width: SIZE as usize,
                    height: SIZE as usize,
                    steps: a.steps,
                    guidance: a.guidance,
                    seed: 0,
                },
                &mut |_| engine::pipeline::Control::Continue,
            )?;
            seconds.push(start.elapsed().as_secs_f64());
            let f = features(&out.image);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&x, &y| distance(&f, &feats[x]).total_cmp(&distance(&f, &feats[y])));
            t.captions += 1;
            t.exact_top1 += usize::from(order[0] == i);
            t.exact_top10 += usize::from(order[..10].contains(&i));
            let same = |j: usize| entries[j].subcategory == e.subcategory;
            t.subcategory_top1 += usize::from(same(order[0]));
            t.subcategory_chance += (0..n).filter(|&j| same(j)).count() as f64 / n as f64;
            if keep_examples {
                examples.push((i, out.image, order[0]));
            }
        }
        Ok(t)
    };
    let held_tally = run(&held, true)?;
    let train_tally = run(&train, false)?;
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    let summary = |t: &Tally| {
        json!({
            "captions": t.captions,
            "exact_top1": t.exact_top1 as f64 / t.captions as f64,
            "exact_top10": t.exact_top10 as f64 / t.captions as f64,
            "exact_top1_chance": 1.0 / n as f64,
            "exact_top10_chance": 10.0 / n as f64,
            "subcategory_top1": t.subcategory_top1 as f64 / t.captions as f64,
            "subcategory_top1_chance": t.subcategory_chance / t.captions as f64,
        })
    };
    let result = json!({
        "model": a.model.display().to_string(),
        "dataset_images": n,
        "steps": a.steps,
        "guidance": a.guidance,
        "seed": 0,
        "held_out": summary(&held_tally),
        "training_captions": summary(&train_tally),
        "cpu_seconds_per_image_median": median,
        "cpu_threads": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1),
    });
    std::fs::write(
        a.out.join("score.json"),
        serde_json::to_vec_pretty(&result)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    // A strip per held-out example: what was asked (the dataset's image), what was drawn.
    let shown: Vec<&(usize, RgbImage, usize)> = examples.iter().take(12).collect();
    let mut grid = RgbImage::from_pixel(SIZE * shown.len() as u32, 2 * SIZE, image::Rgb([255; 3]));
    for (k, (i, img, _)) in shown.iter().enumerate() {
        image::imageops::overlay(&mut grid, &images[*i], i64::from(SIZE) * k as i64, 0);
        image::imageops::overlay(&mut grid, img, i64::from(SIZE) * k as i64, i64::from(SIZE));
    }
    grid.save(a.out.join("held-out.png"))?;
    let captions: Vec<&str> = shown
        .iter()
        .map(|(i, _, _)| entries[*i].caption.as_str())
        .collect();
    std::fs::write(
        a.out.join("held-out.txt"),
        format!(
            "top row: the dataset's image; bottom row: generated from its caption\n{}\n",
            captions.join("\n")
        ),
    )?;
    Ok(())
}
