//! A training run on a resident pipeline: prepare (dataset, cached encodings, adapters, optimizer, resume),
//! then one optimizer step per call, with samples and checkpoints when due, and the LoRA file at the end.

use super::checkpoint;
use super::dataset::{self, DatasetReport};
use super::flux_backward;
use super::full::FullWeights;
use super::lora::LoraSet;
use super::objective::{self, StepDraws};
use super::optim::{self, AdamW};
use super::settings::TrainSettings;
use super::trainable::Trainable;
use crate::models::flux::{self, FluxInputs};
use crate::pipeline::{self, Control, FluxPipeline};
use crate::sampling::latents;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use image::RgbImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything a run needs besides the model.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub dataset: PathBuf,
    pub keywords: Vec<String>,
    /// Checkpoints and the dataset report go here.
    pub job_dir: PathBuf,
    /// The trained file: the LoRA, or the transformer's weights for a full fine-tune.
    pub lora_file: PathBuf,
    pub settings: TrainSettings,
    /// The base model's name, recorded in the LoRA's metadata.
    pub base_model: String,
    /// Denoising steps and guidance of the samples (the model's generation defaults).
    pub sample_steps: usize,
    pub sample_guidance: f64,
    /// Continue from the latest checkpoint in `job_dir`, if there is one.
    pub resume: bool,
}

pub enum Report {
    Log(String),
    /// A sample image, drawn with the adapters as they are at `step`. The caller keeps it (the server
    /// writes it into the job's samples folder with its recipe), so the trainer writes no image itself.
    Sample(Sample),
}

/// A sample and what drew it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub step: u32,
    pub image: RgbImage,
    pub prompt: String,
    pub seed: u64,
    /// Denoising steps and guidance it was drawn with.
    pub steps: usize,
    pub guidance: f64,
}

impl Sample {
    /// The file name samples go under: `step_000100.png`.
    pub fn file_name(&self) -> String {
        format!("step_{:06}.png", self.step)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub step: u32,
    pub total: u32,
    pub loss: f32,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// The LoRA file is written: the run is over.
    pub finished: bool,
}

/// An image's latent distribution, encoded once.
struct CachedImage {
    mean: Tensor,
    std: Tensor,
    text: usize,
}

/// A caption's encodings, encoded once.
struct CachedText {
    txt: Tensor,
    pooled: Tensor,
}

pub struct Trainer {
    pipe: Arc<FluxPipeline>,
    job: TrainJob,
    images: Vec<CachedImage>,
    texts: Vec<CachedText>,
    sample_text: CachedText,
    /// The empty caption's encodings: trained on with `caption_dropout`, and the unconditional half of
    /// classifier-free guidance in the samples.
    empty_text: Option<CachedText>,
    sample_prompt: String,
    trainable: Box<dyn Trainable>,
    optimizer: AdamW,
    train_sigmas: Vec<f64>,
    step: u32,
    losses: Vec<f32>,
    /// Set while the run streams more of the transformer than the memory plan does.
    _streaming: Option<TrainingStreaming>,
}

/// More of the transformer's blocks streamed from host memory for a training run whose steps need
/// more GPU memory than generation leaves ([`crate::memory::MemoryPlan::training_streamed`]); the
/// plan's own arrangement comes back when the run ends, however it ends.
struct TrainingStreaming {
    pipe: Arc<FluxPipeline>,
}

impl TrainingStreaming {
    fn start(pipe: &Arc<FluxPipeline>, streamed: u64) -> Result<Self> {
        pipe.transformer.stream(streamed)?;
        Ok(Self { pipe: pipe.clone() })
    }
}

impl Drop for TrainingStreaming {
    fn drop(&mut self) {
        let plan = self.pipe.memory_plan().streamed_bytes();
        if let Err(e) = self.pipe.transformer.stream(plan) {
            tracing::error!(
                "the transformer could not return to its memory plan after training: {e}"
            );
        }
    }
}

impl Trainer {
    /// The preparing phase: reads the dataset, encodes every image and caption once, frees the text
    /// encoders, creates the adapters and the optimizer, and restores the latest checkpoint on resume.
    pub fn prepare(
        pipe: Arc<FluxPipeline>,
        job: TrainJob,
        report: &mut dyn FnMut(Report),
    ) -> Result<Self> {
        let s = job.settings.clone();
        // Whether a step at this resolution fits, before any work: a LoRA run may stream more of the
        // frozen transformer than generation does; a full fine-tune trains the weights themselves.
        let side = s.resolution as usize;
        let streamed = pipe
            .memory_plan()
            .training_streamed(side, side)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        let more_streamed = streamed > pipe.memory_plan().streamed_bytes();
        if more_streamed && !pipe.weights().is_empty() {
            bail!(
                "a full fine-tune at {side}x{side} does not fit this GPU's memory plan: train a LoRA, at a lower resolution, or raise --gpu-memory (STUDIO_GPU_MEMORY)"
            );
        }
        let multiple = pipe.size_multiple() as u32;
        let (samples, dataset_report) =
            dataset::load(&job.dataset, &job.keywords, s.resolution, multiple)?;
        std::fs::create_dir_all(&job.job_dir)?;
        write_report(&job.job_dir, &dataset_report)?;
        for line in dataset_report.lines() {
            report(Report::Log(line));
        }

        let device = pipe.device().clone();
        let dtype = pipe.transformer.dtype();
        let mut texts = Vec::new();
        let mut text_index: HashMap<String, usize> = HashMap::new();
        let mut images = Vec::new();
        for sample in &samples {
            let (w, h) = sample.image.dimensions();
            let pixels = Tensor::from_vec(
                sample.image.as_raw().clone(),
                (h as usize, w as usize, 3),
                &device,
            )?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?;
            let pixels = ((pixels / 127.5)? - 1.0)?.to_dtype(dtype)?;
            let dist = pipe.codec.encode(&pixels)?;
            let text = match text_index.get(&sample.caption) {
                Some(&i) => i,
                None => {
                    let (txt, pooled) = pipe.encode_prompt(&sample.caption)?;
                    texts.push(CachedText { txt, pooled });
                    text_index.insert(sample.caption.clone(), texts.len() - 1);
                    texts.len() - 1
                }
            };
            images.push(CachedImage {
                mean: dist.mean.to_dtype(DType::F32)?,
                std: dist.std.to_dtype(DType::F32)?,
                text,
            });
        }
        let sample_prompt = s
            .sample_prompt
            .clone()
            .unwrap_or_else(|| dataset::caption_with_keywords(&job.keywords, None));
        let (txt, pooled) = pipe.encode_prompt(&sample_prompt)?;
        let sample_text = CachedText { txt, pooled };
        let empty_text = if s.caption_dropout > 0.0 || pipe.uses_cfg() {
            let (txt, pooled) = pipe.encode_prompt("")?;
            Some(CachedText { txt, pooled })
        } else {
            None
        };
        pipe.release_text_encoders();
        report(Report::Log(format!(
            "cached {} image latents and {} caption encodings; text encoders released",
            images.len(),
            texts.len()
        )));
        let streaming = if more_streamed {
            report(Report::Log(format!(
                "a {side}x{side} step needs more GPU memory than generation: {} of the transformer streamed from host memory while training (generation streams {})",
                crate::memory::gib(streamed),
                crate::memory::gib(pipe.memory_plan().streamed_bytes())
            )));
            Some(TrainingStreaming::start(&pipe, streamed)?)
        } else {
            None
        };

        let trainable: Box<dyn Trainable> = if pipe.weights().is_empty() {
            Box::new(LoraSet::new(
                &pipe.transformer,
                s.targets,
                s.rank,
                s.alpha,
                s.seed,
                &device,
            )?)
        } else {
            Box::new(FullWeights::new(pipe.weights(), DType::F16))
        };
        report(Report::Log(format!("training {}", trainable.describe())));
        let mut optimizer =
            AdamW::new(trainable.vars(), s.weight_decay, pipe.transformer.kernels())?;
        let mut step = 0;
        let mut losses = Vec::new();
        if job.resume {
            match checkpoint::latest(&job.job_dir)? {
                Some(manifest) => {
                    if manifest.settings != s {
                        bail!("the checkpoint was made with other settings; start a new run");
                    }
                    checkpoint::restore(&job.job_dir, &manifest, &mut optimizer)?;
                    step = manifest.step;
                    losses = manifest.losses;
                    report(Report::Log(format!(
                        "resumed from the checkpoint at step {step}"
                    )));
                }
                None => report(Report::Log(
                    "no checkpoint yet: starting from step 0".into(),
                )),
            }
        }
        let trainer = Self {
            train_sigmas: objective::training_sigmas(&pipe.schedule),
            pipe,
            job,
            images,
            texts,
            sample_text,
            empty_text,
            sample_prompt,
            trainable,
            optimizer,
            step,
            losses,
            _streaming: streaming,
        };
        if trainer.step == 0 && trainer.job.settings.sample_every > 0 {
            // What the base model draws, to compare the samples against.
            trainer.sample(report)?;
        }
        Ok(trainer)
    }

    pub fn step_count(&self) -> u32 {
        self.step
    }

    pub fn total_steps(&self) -> u32 {
        self.job.settings.steps
    }

    /// The loss of every step so far.
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// One optimizer step; samples, checkpoints and, after the last step, the LoRA file.
    pub fn step(&mut self, report: &mut dyn FnMut(Report)) -> Result<StepStats> {
        let s = self.job.settings.clone();
        if self.step >= s.steps {
            // Resumed from a checkpoint taken at the last step.
            self.finish(report)?;
            return Ok(StepStats {
                step: self.step,
                total: s.steps,
                loss: self.losses.last().copied().unwrap_or(f32::NAN),
                learning_rate: 0.0,
                grad_norm: 0.0,
                finished: true,
            });
        }
        let step = self.step + 1;
        let batch = s.batch_size.max(1);
        // Each image's draws on its own thread: a large batch draws millions of normals a step.
        let items = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..batch)
                .map(|j| {
                    let index =
                        objective::image_for(s.seed, self.step * batch + j, self.images.len());
                    let n = self.images[index].mean.elem_count();
                    let (seed, sampling, dropout) = (s.seed, s.sigma_sampling, s.caption_dropout);
                    scope.spawn(move || {
                        let draws = StepDraws::item(seed, step, j, sampling, n);
                        let dropped = objective::caption_dropped(seed, step, j, dropout);
                        (index, draws, dropped)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a draw thread panicked"))
                .collect()
        });
        let (loss, grads) = self.loss(items, true)?;
        let grads = grads.context("a training pass returns gradients")?;
        let loss = loss.to_scalar::<f32>()?;
        if !loss.is_finite() {
            bail!("the loss is {loss} at step {step}: lower the learning rate");
        }
        let clipped = optim::clip_grads(
            &self.optimizer.vars,
            &grads,
            s.max_grad_norm,
            self.optimizer.kernels,
        )?;
        let grad_norm = clipped.norm;
        drop(grads);
        let lr = optim::learning_rate(
            s.learning_rate,
            s.lr_schedule,
            s.warmup_steps,
            step,
            s.steps,
        );
        self.optimizer.step(&clipped.grads, clipped.scale, lr)?;
        self.step = step;
        self.losses.push(loss);

        let finished = step == s.steps;
        if s.sample_every > 0 && step.is_multiple_of(s.sample_every) && !finished {
            self.sample(report)?;
        }
        if s.checkpoint_every > 0 && step.is_multiple_of(s.checkpoint_every) {
            checkpoint::save(&self.job.job_dir, step, &self.optimizer, &s, &self.losses)?;
            report(Report::Log(format!("checkpoint saved at step {step}")));
        }
        if finished {
            self.finish(report)?;
        }
        Ok(StepStats {
            step,
            total: s.steps,
            loss,
            learning_rate: lr,
            grad_norm,
            finished,
        })
    }

    /// The flow-matching loss on a batch of (image index, draws, caption dropped): noisy = (1-σ)·x +
    /// σ·noise, target = noise - x, mean squared error in f32 over the batch. `train`: through the
    /// trained variables, with their gradients (checkpointed per block when the settings say so and
    /// what is trained allows it).
    fn loss(
        &self,
        items: Vec<(usize, StepDraws, bool)>,
        train: bool,
    ) -> Result<(Tensor, Option<GradStore>)> {
        let s = &self.job.settings;
        let model = &self.pipe.transformer;
        let (mut noisy, mut targets, mut txts, mut pooleds, mut sigmas) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (index, draws, dropped) in items {
            let image = &self.images[index];
            let text = match (&self.empty_text, dropped) {
                (Some(empty), true) => empty,
                _ => &self.texts[image.text],
            };
            let sigma = self.train_sigmas[draws.sigma_index];
            let device = image.mean.device();
            let shape = image.mean.shape().clone();
            let eps = Tensor::from_vec(draws.latent_eps, shape.clone(), device)?;
            let noise = Tensor::from_vec(draws.noise, shape, device)?;
            // A fresh sample of the cached latent distribution, as diffusers does with cached latents.
            let z = (&image.mean + (&image.std * eps)?)?;
            let x0 = self.pipe.codec.to_model_space(&z)?;
            noisy.push(((&x0 * (1.0 - sigma))? + (&noise * sigma)?)?);
            targets.push(latents::pack(&(noise - &x0)?)?);
            txts.push(text.txt.clone());
            pooleds.push(text.pooled.clone());
            sigmas.push(sigma as f32);
        }
        if noisy.windows(2).any(|p| p[0].dims() != p[1].dims()) {
            bail!("a batch needs images of one size: train with batch_size 1 on mixed buckets");
        }
        let noisy = Tensor::cat(&noisy, 0)?;
        let target = Tensor::cat(&targets, 0)?;
        let txt = Tensor::cat(&txts, 0)?;
        let pooled = Tensor::cat(&pooleds, 0)?;
        let device = noisy.device();
        let batch = sigmas.len();
        let (_, _, h, w) = noisy.dims4()?;
        let img_ids = flux::image_ids(h / 2, w / 2, device)?;
        let txt_ids = flux::text_ids(txt.dim(1)?, device)?;
        let t = Tensor::new(sigmas, device)?;
        let g = Tensor::new(vec![s.guidance as f32; batch], device)?;
        let inputs = FluxInputs {
            img: &latents::pack(&noisy)?.to_dtype(model.dtype())?,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            timesteps: &t,
            y: &pooled,
            guidance: model.config().guidance_embed.then_some(&g),
        };
        let mse = |pred: &Tensor| -> Result<Tensor> {
            Ok((pred.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?)
        };
        self.trainable.attach(model, train);
        let out = if train {
            let checkpointing = self.trainable.checkpointable()
                && s.gradient_checkpointing.unwrap_or_else(|| device.is_cuda());
            flux_backward::loss_and_grads(model, &inputs, &mse, checkpointing)
                .map(|(loss, grads)| (loss, Some(grads)))
        } else {
            model
                .forward(&inputs)
                .and_then(|pred| Ok((mse(&pred)?, None)))
        };
        self.trainable.detach(model);
        out
    }

    /// The mean loss over every image at `levels` fixed noise levels spread over (0, 1) with fixed
    /// noise: a steadier measure of progress than the loss of single steps.
    pub fn validation_loss(&self, levels: usize) -> Result<f32> {
        let mut total = 0f64;
        let mut count = 0;
        for index in 0..self.images.len() {
            for k in 0..levels {
                let sigma_index = (1000 * (2 * k + 1) / (2 * levels)).min(999);
                let n = self.images[index].mean.elem_count();
                let key = (index * levels + k) as u64;
                let draws = StepDraws::validation(self.job.settings.seed, key, sigma_index, n);
                let (loss, _) = self.loss(vec![(index, draws, false)], false)?;
                total += f64::from(loss.to_scalar::<f32>()?);
                count += 1;
            }
        }
        Ok((total / f64::from(count.max(1))) as f32)
    }

    /// Ends the run at the current step: the last sample and the trained file.
    pub fn finish(&mut self, report: &mut dyn FnMut(Report)) -> Result<()> {
        self.sample(report)?;
        let s = &self.job.settings;
        let metadata = HashMap::from([
            ("studio.base_model".to_string(), self.job.base_model.clone()),
            ("studio.rank".to_string(), s.rank.to_string()),
            ("studio.alpha".to_string(), s.alpha.to_string()),
            (
                "studio.keywords".to_string(),
                serde_json::to_string(&self.job.keywords)?,
            ),
            ("studio.steps".to_string(), self.step.to_string()),
            ("studio.resolution".to_string(), s.resolution.to_string()),
            ("studio.settings".to_string(), serde_json::to_string(s)?),
            (
                "studio.format".to_string(),
                "diffusers PEFT keys; alpha/rank is folded into lora_B, so load at scale 1"
                    .to_string(),
            ),
        ]);
        self.trainable.save(&self.job.lora_file, &metadata)?;
        let what = if self.pipe.weights().is_empty() {
            "LoRA"
        } else {
            "model weights"
        };
        report(Report::Log(format!(
            "{what} written after {} steps ({})",
            self.step,
            self.job
                .lora_file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("lora")
        )));
        Ok(())
    }

    /// Generates the fixed sample (prompt, seed, size) with the current adapters.
    fn sample(&self, report: &mut dyn FnMut(Report)) -> Result<()> {
        let s = &self.job.settings;
        let size = s.resolution as usize;
        let pipe = &self.pipe;
        let noise = pipe.initial_noise(s.seed, size, size)?;
        let sigmas = pipe.schedule.sigmas(self.job.sample_steps, noise.dim(1)?);
        let grid = pipe.latent_grid(size, size);
        let uncond = self
            .empty_text
            .as_ref()
            .filter(|_| pipe.uses_cfg() && self.job.sample_guidance != 1.0)
            .map(|e| (&e.txt, &e.pooled));
        self.trainable.attach(&pipe.transformer, false);
        let out = pipe.denoise_guided(
            noise,
            grid,
            (&self.sample_text.txt, &self.sample_text.pooled),
            uncond,
            &sigmas,
            self.job.sample_guidance,
            &mut |_| Control::Continue,
        );
        self.trainable.detach(&pipe.transformer);
        let image = pipeline::to_rgb(&pipe.decode(&out?, grid)?)?;
        report(Report::Sample(Sample {
            step: self.step,
            image,
            prompt: self.sample_prompt.clone(),
            seed: s.seed,
            steps: self.job.sample_steps,
            guidance: self.job.sample_guidance,
        }));
        Ok(())
    }

    /// The sample prompt, as the samples are drawn with it.
    pub fn sample_prompt(&self) -> &str {
        &self.sample_prompt
    }
}

fn write_report(dir: &Path, report: &DatasetReport) -> Result<()> {
    std::fs::write(
        dir.join("dataset-report.json"),
        serde_json::to_vec_pretty(report)?,
    )?;
    Ok(())
}
