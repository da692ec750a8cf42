//! `builtin-model train`: the model trained with the studio's trainer in full fine-tune mode.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use engine::builtin::{model_config, write_model_folder, TEXT_TOKENS};
use engine::ops::Kernels;
use engine::pipeline::{FluxPipeline, LoadOptions};
use engine::training::{full, Report, TrainJob, TrainSettings, Trainer};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub struct TrainArgs {
    pub data: PathBuf,
    pub out: PathBuf,
    pub settings: TrainSettings,
    pub max_images: Option<usize>,
    pub time_limit_s: Option<f64>,
    pub text_encoder: PathBuf,
    pub device: Device,
    pub init: Option<PathBuf>,
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

pub fn train(a: TrainArgs) -> Result<()> {
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
        kernels: Kernels::default(),
        weights: None,
        memory: Default::default(),
    };
    let pipe = Arc::new(FluxPipeline::load_dir_trainable(
        &model_dir, &opts, &a.device,
    )?);
    let weights_file = model_dir.join(WEIGHTS_FILE);
    let job = TrainJob {
        dataset: dataset.clone(),
        keywords: vec![],
        job_dir: a.out.join("run"),
        lora_file: weights_file.clone(),
        settings: s.clone(),
        base_model: base_model.clone(),
        sample_steps: 20,
        sample_guidance: 4.0,
        resume: false,
    };
    let samples_dir = a.out.join("samples");
    std::fs::create_dir_all(&samples_dir)?;
    let mut log = |r: Report| match r {
        Report::Log(l) => println!("{l}"),
        Report::Sample(sample) => {
            let file = samples_dir.join(sample.file_name());
            match sample.image.save(&file) {
                Ok(()) => println!("sample at step {}: {}", sample.step, file.display()),
                Err(err) => eprintln!("sample at step {} not written: {err}", sample.step),
            }
        }
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
