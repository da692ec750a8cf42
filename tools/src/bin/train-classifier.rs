//! Trains the prompt classifier's head, evaluates it on the held-out sets (the generated test split
//! and the hand-written one) and, with `--bench`, measures single-prompt latency. Run from the
//! repository root:
//!
//! ```text
//! cargo run --release -p tools --bin train-classifier            # train, evaluate, write the head
//! cargo run --release -p tools --bin train-classifier -- --eval-only --bench 300
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use engine::classifier::{
    context_tensor, EncoderSource, Example, Head, Metrics, PromptClassifier, SentenceEncoder,
    Split, DEFAULT_DATA_DIR, DEFAULT_ENCODER_DIR, DEFAULT_HEAD_PATH, HELD_OUT_SPLITS,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tools::classifier_training::{
    finetune, fit_temperature, train_head, EpochReport, Rows, Texts, TrainConfig, TuneConfig,
};

#[derive(Parser)]
#[command(about = "Train and evaluate the prompt classifier's head")]
struct Args {
    /// Encoder folder, or a hub id (owner/name[@revision]) of a BERT-family checkpoint.
    #[arg(long, default_value = DEFAULT_ENCODER_DIR)]
    encoder: String,
    /// Folder with train.jsonl and the held-out test.jsonl and written-test.jsonl.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// The head to write (or, with --eval-only, to read); its metadata goes next to it as .json.
    #[arg(long, default_value = DEFAULT_HEAD_PATH)]
    head: PathBuf,
    /// Evaluate the existing head instead of training a new one.
    #[arg(long)]
    eval_only: bool,
    /// Hidden units of the head; 0 for logistic regression.
    #[arg(long, default_value_t = TrainConfig::default().hidden)]
    hidden: usize,
    /// Default: 3 when tuning encoder layers, 40 for the head alone.
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    weight_decay: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Share of train carved out (seeded) for model selection and temperature fitting.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// After evaluating, time this many single-prompt classifications and print percentiles.
    #[arg(long)]
    bench: Option<usize>,
    /// Keep embeddings here between runs (keyed by encoder and data hash): the encoder is
    /// frozen, so only the head changes from one training run to the next.
    #[arg(long, default_value = "target/classifier-embeddings")]
    cache: PathBuf,
    /// Also fine-tune this many of the encoder's last layers (0: train the head only).
    #[arg(long, default_value_t = 3)]
    tune_layers: usize,
    /// Learning rate of the tuned encoder layers.
    #[arg(long, default_value_t = 1e-4)]
    encoder_lr: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::Cpu;
    let source = EncoderSource::parse(&args.encoder)?;
    let held_out = Split::load_held_out(&args.data)?;

    let trained = if args.eval_only {
        None
    } else {
        let train = Split::load(&args.data.join("train.jsonl"))?;
        let (head, val, cfg) = if args.tune_layers > 0 {
            tune(&args, &source, &train)?
        } else {
            let encoder = SentenceEncoder::load(&source, &device)?;
            train_only_head(&args, &source, &encoder, &train)?
        };
        head.save(&args.head)?;
        Some((train, val, cfg))
    };
    // Evaluate what was written, so the figures describe the file a fresh install uses.
    let head = Head::load(&args.head, &device)?;

    let started = Instant::now();
    let encoder = SentenceEncoder::load_with_top(&source, &device, head.top.clone())?;
    println!(
        "\nencoder {} loaded in {:.2?}",
        source.id(),
        started.elapsed()
    );
    let mut figures = Vec::new();
    let mut all_p = Vec::new();
    for (name, split) in &held_out {
        let x = embed(&args, &source, &encoder, split, name)?;
        let context = context_tensor(&split.last_answers(), &device)?;
        let p = head.image_probabilities(&x, &context)?;
        let metrics = Metrics::compute(&p, &split.targets());
        println!("\n== held out: {}", args.data.join(name).display());
        print!("{metrics}");
        print_mistakes(split, &p);
        all_p.extend(p);
        figures.push((*name, metrics));
    }
    let all = Split::join(held_out.iter().map(|(_, s)| s));
    let metrics = Metrics::compute(&all_p, &all.targets());
    println!(
        "\n== all held-out prompts ({})",
        HELD_OUT_SPLITS.join(" + ")
    );
    print!("{metrics}");

    if let Some((train, val, cfg)) = trained {
        write_metadata(
            &args, &source, &train, &held_out, cfg, &head, &val, &figures, &metrics,
        )?;
        println!("\nwrote {}", args.head.display());
    }
    if let Some(n) = args.bench {
        bench(PromptClassifier::from_parts(encoder, head)?, &all, n)?;
    }
    Ok(())
}

/// Embeddings of a split. Those of the pretrained encoder are cached: they do not change
/// between head-only training runs. Tuned encoders are never cached.
fn embed(
    args: &Args,
    source: &EncoderSource,
    encoder: &SentenceEncoder,
    split: &Split,
    name: &str,
) -> Result<Tensor> {
    let id = source.id().replace(['/', '@'], "_");
    let cached = args
        .cache
        .join(format!("{id}-{}.safetensors", &split.sha256[..16]));
    let cacheable = !encoder.is_tuned();
    if cacheable {
        if let Ok(mut t) = candle_core::safetensors::load(&cached, encoder.device()) {
            if let Some(x) = t.remove("embeddings") {
                println!("{name} embeddings from {}", cached.display());
                return Ok(x);
            }
        }
    }
    let started = Instant::now();
    let x = encoder.embed_all(&split.texts(), 32)?;
    println!(
        "embedded {} {name} prompts in {:.1?}",
        split.examples.len(),
        started.elapsed()
    );
    if cacheable {
        std::fs::create_dir_all(&args.cache)?;
        x.save_safetensors("embeddings", &cached)?;
    }
    Ok(x)
}

/// Indices of the validation rows and of the rows to fit on. The validation rows are carved
/// from train with their own seed, so the held-out sets stay untouched.
fn carve(args: &Args, n: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(args.seed ^ 0x5eed));
    let n_val = ((n as f64 * args.val_fraction).round() as usize).max(1);
    let fit = order.split_off(n_val);
    (order, fit)
}

fn print_log(log: &[EpochReport], every: usize) {
    for e in log.iter().filter(|e| e.epoch % every == 0 || e.epoch == 1) {
        println!(
            "  epoch {:>3}  train loss {:.4}  val loss {:.4}  val accuracy {:.2}%",
            e.epoch,
            e.train_loss,
            e.val_loss,
            e.val_accuracy * 100.0
        );
    }
}

/// Fits the temperature on the validation logits and reports validation metrics.
fn calibrate(
    head: &mut Head,
    val_x: &Tensor,
    val_context: &Tensor,
    val_y: &[f32],
) -> Result<Metrics> {
    let logits = head.logits(val_x, val_context)?.to_vec1::<f32>()?;
    head.temperature = fit_temperature(&logits, val_y);
    println!("temperature fitted on validation: {:.3}", head.temperature);
    let val = Metrics::compute(&head.image_probabilities(val_x, val_context)?, val_y);
    println!(
        "\n== validation split ({} rows carved from train)",
        val_y.len()
    );
    print!("{val}");
    Ok(val)
}

fn train_only_head(
    args: &Args,
    source: &EncoderSource,
    encoder: &SentenceEncoder,
    train: &Split,
) -> Result<(Head, Metrics, serde_json::Value)> {
    let x = embed(args, source, encoder, train, "train")?;
    let context = context_tensor(&train.last_answers(), x.device())?;
    let targets = train.targets();
    let (val_idx, fit_idx) = carve(args, targets.len());
    let pick = |idx: &[usize]| -> Result<(Tensor, Tensor, Vec<f32>)> {
        let rows: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let rows = Tensor::new(rows.as_slice(), x.device())?;
        Ok((
            x.index_select(&rows, 0)?,
            context.index_select(&rows, 0)?,
            idx.iter().map(|&i| targets[i]).collect(),
        ))
    };
    let (fit_x, fit_context, fit_y) = pick(&fit_idx)?;
    let (val_x, val_context, val_y) = pick(&val_idx)?;
    let cfg = TrainConfig {
        hidden: args.hidden,
        epochs: args.epochs.unwrap_or(TrainConfig::default().epochs),
        batch_size: args.batch_size,
        learning_rate: args.lr,
        weight_decay: args.weight_decay,
        seed: args.seed,
    };
    let started = Instant::now();
    let (mut head, log) = train_head(
        Rows {
            x: &fit_x,
            context: &fit_context,
            targets: &fit_y,
        },
        Rows {
            x: &val_x,
            context: &val_context,
            targets: &val_y,
        },
        &cfg,
    )?;
    println!(
        "trained the head {} epochs in {:.1?}",
        cfg.epochs,
        started.elapsed()
    );
    print_log(&log, 5);
    let val = calibrate(&mut head, &val_x, &val_context, &val_y)?;
    Ok((head, val, serde_json::to_value(&cfg)?))
}

fn tune(
    args: &Args,
    source: &EncoderSource,
    train: &Split,
) -> Result<(Head, Metrics, serde_json::Value)> {
    let texts = train.texts();
    let answers = train.last_answers();
    let targets = train.targets();
    let (val_idx, fit_idx) = carve(args, texts.len());
    let fit_texts: Vec<&str> = fit_idx.iter().map(|&i| texts[i]).collect();
    let fit_answers: Vec<_> = fit_idx.iter().map(|&i| answers[i]).collect();
    let fit_y: Vec<f32> = fit_idx.iter().map(|&i| targets[i]).collect();
    let val_texts: Vec<&str> = val_idx.iter().map(|&i| texts[i]).collect();
    let val_answers: Vec<_> = val_idx.iter().map(|&i| answers[i]).collect();
    let val_y: Vec<f32> = val_idx.iter().map(|&i| targets[i]).collect();
    let cfg = TuneConfig {
        layers: args.tune_layers,
        hidden: args.hidden,
        epochs: args.epochs.unwrap_or(3),
        batch_size: args.batch_size,
        encoder_learning_rate: args.encoder_lr,
        head_learning_rate: args.lr,
        weight_decay: args.weight_decay,
        seed: args.seed,
    };
    let started = Instant::now();
    let (mut head, log) = finetune(
        source,
        Texts {
            texts: &fit_texts,
            last_answers: &fit_answers,
            targets: &fit_y,
        },
        Texts {
            texts: &val_texts,
            last_answers: &val_answers,
            targets: &val_y,
        },
        &cfg,
    )?;
    println!(
        "fine-tuned {} encoder layers and the head, {} epochs, in {:.1?}",
        cfg.layers,
        cfg.epochs,
        started.elapsed()
    );
    print_log(&log, 1);
    let encoder = SentenceEncoder::load_with_top(source, &Device::Cpu, head.top.clone())?;
    let val_x = encoder.embed_all(&val_texts, 32)?;
    let val_context = context_tensor(&val_answers, &Device::Cpu)?;
    let val = calibrate(&mut head, &val_x, &val_context, &val_y)?;
    Ok((head, val, serde_json::to_value(&cfg)?))
}

#[allow(clippy::too_many_arguments)]
fn write_metadata(
    args: &Args,
    source: &EncoderSource,
    train: &Split,
    held_out: &[(&str, Split)],
    cfg: serde_json::Value,
    head: &Head,
    val: &Metrics,
    figures: &[(&str, Metrics)],
    all: &Metrics,
) -> Result<()> {
    let width = head.input_size()?;
    let mut meta = serde_json::json!({
        "encoder": source.id(),
        "tuned_encoder_layers": args.tune_layers,
        "embedding": "mean pooling over attention-masked tokens, L2-normalised",
        "context": "two 0/1 features beside the embedding: the last answer was an image, was text",
        "head": match &head.hidden {
            Some((w, _)) => format!("linear {width}x{0}, GELU, linear {0}x1", w.dim(0)?),
            None => format!("linear {width}x1"),
        },
        "temperature": head.temperature,
        "train": { "rows": train.examples.len(), "sha256": train.sha256 },
        "config": cfg,
        "validation": val,
        "held_out_metrics": all,
    });
    for ((name, split), (_, metrics)) in held_out.iter().zip(figures) {
        let key = name.trim_end_matches(".jsonl");
        meta[key] = serde_json::json!({ "rows": split.examples.len(), "sha256": split.sha256 });
        meta[format!("{key}_metrics")] = serde_json::to_value(metrics)?;
    }
    let path = args.head.with_extension("json");
    std::fs::write(&path, serde_json::to_string_pretty(&meta)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Accuracy per data source and the most confident errors say more about the data than the
/// overall accuracy does.
fn print_mistakes(test: &Split, p_image: &[f32]) {
    let mut by_source: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (e, (&p, y)) in test.examples.iter().zip(p_image.iter().zip(test.targets())) {
        let entry = by_source.entry(e.source.as_str()).or_default();
        entry.0 += usize::from((p > 0.5) == (y > 0.5));
        entry.1 += 1;
    }
    println!("accuracy by source:");
    for (source, (correct, count)) in by_source {
        println!(
            "  {source:<18} {:>6.2}%  ({correct}/{count})",
            correct as f64 * 100.0 / count as f64
        );
    }
    let mut wrong: Vec<(f32, &Example, f32)> = test
        .examples
        .iter()
        .zip(p_image)
        .zip(test.targets())
        .filter(|((_, &p), y)| (p > 0.5) != (*y > 0.5))
        .map(|((e, &p), y)| ((p - y).abs(), e, p))
        .collect();
    wrong.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("most confident mistakes ({} in all):", wrong.len());
    for (_, e, p) in wrong.iter().take(15) {
        let after = match app::last_answer(&e.context) {
            Some(kind) => format!(" (after {kind:?})"),
            None => String::new(),
        };
        println!("  p(image)={p:.3}  {:?}{after}", e.text);
    }
}

fn bench(classifier: PromptClassifier, test: &Split, n: usize) -> Result<()> {
    let n = n.max(1);
    let prompts = test.texts();
    // Spread over the whole set, so that both held-out files (short chat lines and long prompts)
    // are timed, each with its context as the chat sends it.
    let step = (test.examples.len() / n).max(1);
    let sample: Vec<_> = test.examples.iter().step_by(step).cycle().take(n).collect();
    for e in sample.iter().take(10) {
        // Warm-up: first calls allocate and spin up threads.
        classifier.image_request_probability(&e.text, &e.context)?;
    }
    let mut times: Vec<Duration> = Vec::with_capacity(n);
    for e in &sample {
        let started = Instant::now();
        classifier.image_request_probability(&e.text, &e.context)?;
        times.push(started.elapsed());
    }
    times.sort();
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    println!(
        "\n== latency, one prompt per call, {n} calls over held-out prompts ({} threads)",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    println!(
        "p50 {:.2?}  p90 {:.2?}  p99 {:.2?}  max {:.2?}  mean {:.2?}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        times[times.len() - 1],
        mean
    );
    let started = Instant::now();
    classifier.image_request_probabilities(&prompts, &test.last_answers())?;
    let elapsed = started.elapsed();
    println!(
        "batch: {} prompts in {:.2?} ({:.0} prompts/s)",
        prompts.len(),
        elapsed,
        prompts.len() as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
