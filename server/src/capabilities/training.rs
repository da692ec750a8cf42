//! The engine's LoRA trainer behind the server's `Training` seam, on the pipeline generation also uses
//! (one FLUX in memory). Generation and training set their own adapters on the shared layers before each
//! use, so neither finds the other's.

use super::resident_model::ResidentModel;
use crate::jobs::capability::{StepOutcome, Training, TrainingReport, TrainingRun, TrainingSpec};
use crate::recipe;
use anyhow::Context as _;
use app::{Recipe, RecipeLora, TrainSettingsForm};
use engine::presets::{self, Preset, PresetSource};
use engine::training::{Report, Sample, TrainJob, TrainSettings, Trainer};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub struct FluxTraining {
    resident: Arc<ResidentModel>,
    default_preset: &'static Preset,
}

/// Steps the pace is averaged over.
const PACE_WINDOW: usize = 20;

impl FluxTraining {
    pub fn new(resident: Arc<ResidentModel>, default_preset: &'static Preset) -> Self {
        Self {
            resident,
            default_preset,
        }
    }

    /// The base model (the `model` field, else the server's default) and the settings over its defaults.
    fn resolve(
        &self,
        form: &TrainSettingsForm,
    ) -> Result<(&'static Preset, TrainSettings), String> {
        let preset = match &form.model {
            None => self.default_preset,
            Some(name) => presets::find(name).ok_or_else(|| {
                let names: Vec<&str> = presets::PRESETS.iter().map(|p| p.name).collect();
                format!("model must be one of {} (got {name:?})", names.join(", "))
            })?,
        };
        let settings = TrainSettings::resolve(form, preset.width as u32)?;
        Ok((preset, settings))
    }
}

/// Where a run's samples go, and what their recipes say besides the sample's own settings.
#[derive(Debug, Clone)]
struct SampleSink {
    dir: PathBuf,
    /// The base model's preset.
    model: &'static str,
    /// The LoRA being trained: the run's model id.
    lora: String,
    size: u32,
}

impl SampleSink {
    /// Writes the sample as a PNG with its recipe (a sample is a generation: the chat restores it when
    /// dropped, other tools read its `parameters` line).
    fn write(&self, sample: &Sample) -> anyhow::Result<(String, Recipe)> {
        let recipe = Recipe {
            prompt: sample.prompt.clone(),
            seed: sample.seed,
            model: self.model.to_string(),
            loras: vec![RecipeLora {
                name: self.lora.clone(),
                scale: 1.0,
            }],
            steps: sample.steps as u32,
            guidance: sample.guidance as f32,
            width: self.size,
            height: self.size,
            input: None,
            studio: Some(recipe::studio_version()),
        };
        let file = sample.file_name();
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(
            self.dir.join(&file),
            recipe::encode_png(&sample.image, &recipe)?,
        )
        .with_context(|| format!("writing the sample {file}"))?;
        Ok((file, recipe))
    }
}

/// The engine's reports as the job system's; samples are written here, with their recipes.
fn forward<'a>(
    samples: &'a SampleSink,
    report: &'a mut dyn FnMut(TrainingReport),
) -> impl FnMut(Report) + 'a {
    move |r| match r {
        Report::Log(line) => report(TrainingReport::Log(line)),
        Report::Sample(sample) => match samples.write(&sample) {
            Ok((file, recipe)) => report(TrainingReport::Sample {
                step: sample.step,
                file,
                recipe: Box::new(recipe),
            }),
            // A lost sample does not end the run: the log says why it is missing.
            Err(err) => report(TrainingReport::Log(format!(
                "the sample of step {} could not be written: {err:#}",
                sample.step
            ))),
        },
    }
}

impl Training for FluxTraining {
    fn check_settings(&self, settings: &TrainSettingsForm) -> Result<(), String> {
        let (preset, settings) = self.resolve(settings)?;
        // A loaded model's plan refuses a resolution whose steps cannot fit even with the transformer
        // streamed, before the run is queued; a model not yet loaded refuses it when the run starts.
        if let Some(plan) = self.resident.memory_plan(preset) {
            let side = settings.resolution as usize;
            plan.training_streamed(side, side)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn start(
        &self,
        spec: &TrainingSpec,
        report: &mut dyn FnMut(TrainingReport),
    ) -> anyhow::Result<Box<dyn TrainingRun>> {
        let (preset, settings) = self.resolve(&spec.settings).map_err(anyhow::Error::msg)?;
        report(TrainingReport::Log(format!(
            "base model {} ({}); {} steps at {}px, rank {}, alpha {}, learning rate {}",
            preset.name,
            preset.title,
            settings.steps,
            settings.resolution,
            settings.rank,
            settings.alpha,
            settings.learning_rate
        )));
        let pipe = self.resident.pipeline(preset)?;
        let job = TrainJob {
            dataset: spec.dataset.clone(),
            keywords: spec.keywords.clone(),
            job_dir: spec.job_dir.clone(),
            lora_file: spec.lora_file.clone(),
            settings,
            base_model: match &preset.source {
                PresetSource::Hub(repo) => repo.to_string(),
                PresetSource::Bundled(_) => preset.name.to_string(),
            },
            sample_steps: preset.steps,
            sample_guidance: preset.guidance,
            resume: spec.resume,
        };
        let samples = SampleSink {
            dir: spec.samples_dir.clone(),
            model: preset.name,
            lora: spec.model_id.clone(),
            size: job.settings.resolution,
        };
        let trainer = Trainer::prepare(pipe, job, &mut forward(&samples, report))?;
        Ok(Box::new(FluxRun {
            trainer,
            samples,
            recent: VecDeque::new(),
        }))
    }
}

struct FluxRun {
    trainer: Trainer,
    samples: SampleSink,
    /// Durations of the last steps, in seconds.
    recent: VecDeque<f64>,
}

impl TrainingRun for FluxRun {
    fn step(&mut self, report: &mut dyn FnMut(TrainingReport)) -> anyhow::Result<StepOutcome> {
        let started = Instant::now();
        let stats = self.trainer.step(&mut forward(&self.samples, report))?;
        if self.recent.len() == PACE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(started.elapsed().as_secs_f64());
        let pace = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        report(TrainingReport::Step {
            step: stats.step,
            total: stats.total,
            loss: stats.loss,
            learning_rate: stats.learning_rate,
            seconds_per_step: Some(pace),
            eta_seconds: Some(pace * f64::from(stats.total - stats.step)),
        });
        Ok(if stats.finished {
            StepOutcome::Finished
        } else {
            StepOutcome::Continue
        })
    }
}
