//! A worker thread per device: each owns its device's work through its own engine, taking the jobs the
//! queues' policy gives it and turning what its capabilities report into job events.

use std::any::Any;
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use app::{
    BatchImage, ErrorCode, ErrorDetail, EventBody, GenerateResponse, JobStatus, Recipe,
    RecipeInput, RecipeLora, StepCacheReport,
};
use base64::Engine as _;
use image::RgbImage;

use super::capability::{
    Control, Generated, GenerationPlan, Held, JobFailure, LoraChoice, StepOutcome, TrainingReport,
    TrainingRun, WorkerEngine,
};
use super::queue::{GenerationTicket, TrainingTicket, Work};
use super::Shared;
use crate::files::JobId;

struct ActiveTraining {
    id: JobId,
    run: Box<dyn TrainingRun>,
    cancel: Arc<AtomicBool>,
}

/// One worker and its engine.
struct Worker<'a> {
    shared: &'a Shared,
    id: usize,
    engine: &'a WorkerEngine,
}

pub(super) fn run(shared: Arc<Shared>, id: usize) {
    let engine = shared.engines[id].clone();
    let worker = Worker {
        shared: &shared,
        id,
        engine: &engine,
    };
    let mut active: Option<ActiveTraining> = None;
    while let Some(work) = shared.queues.next(id, active.is_some(), worker.held()) {
        match work {
            Work::Generate(ticket) => worker.generate(ticket),
            Work::StartTraining(ticket) => active = worker.start_training(ticket),
            Work::TrainingStep => {
                if let Some(training) = active.take() {
                    active = training_step(&shared, training);
                }
            }
        }
    }
    tracing::info!("worker {id} ({}) stopped", engine.device);
}

/// Runs a capability call, turning a panic into an error so one bad job cannot take the worker down.
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(anyhow::anyhow!(
            "internal error: {}",
            panic_message(&*panic)
        ))
    })
}

/// What a panic said, from its payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker<'_> {
    /// What its engine holds now; a panic there must not take the worker down.
    fn held(&self) -> Held {
        let generation = self.engine.generation.clone();
        catch_unwind(AssertUnwindSafe(|| {
            generation.map(|g| g.held()).unwrap_or_default()
        }))
        .unwrap_or_default()
    }

    /// Records that this worker took the job.
    fn claim(&self, job: &str) {
        if let Err(err) = self.shared.store.set_worker(job, self.id as u32) {
            tracing::error!("job {job}: recording its worker failed: {err:#}");
        }
    }

    fn generate(&self, ticket: GenerationTicket) {
        self.claim(&ticket.id.to_string());
        // Free, with what it holds now, before the answer goes out: a client's next request, which may
        // come at once, then goes to this worker that holds its model rather than to another.
        let done = || self.shared.queues.release(self.id, self.held());
        generate(self.shared, self.engine, ticket, &done)
    }

    fn start_training(&self, ticket: TrainingTicket) -> Option<ActiveTraining> {
        self.claim(&ticket.id.to_string());
        start_training(self.shared, self.engine, ticket)
    }
}

/// `done` runs once the images are saved, just before the answer is sent.
fn generate(shared: &Shared, engine: &WorkerEngine, ticket: GenerationTicket, done: &dyn Fn()) {
    let GenerationTicket { id, plan, cancel } = ticket;
    let job = id.to_string();
    let Some(generation) = engine.generation.clone() else {
        // Only reachable if the capability was removed while jobs waited; fail the job rather than hang.
        shared.fail(
            &job,
            ErrorCode::Unavailable,
            crate::jobs::capability::GENERATION_UNAVAILABLE,
        );
        return shared.finish(id);
    };
    if cancel.load(Ordering::SeqCst) {
        shared.set_status(&job, JobStatus::Cancelled);
        return shared.finish(id);
    }
    shared.set_status(&job, JobStatus::Running);
    let plan = match with_local_lora(shared, plan) {
        Ok(plan) => plan,
        Err(err) => {
            let message = format!("fetching the trained LoRA: {err:#}");
            shared.fail(&job, ErrorCode::GenerationFailed, &message);
            return shared.finish(id);
        }
    };
    let started = Instant::now();
    let outcome = guarded(|| {
        generation.generate(&plan, &mut |update| {
            let step = |preview: Option<&RgbImage>, image| EventBody::Step {
                step: update.step,
                total: update.total,
                loss: None,
                learning_rate: None,
                seconds_per_step: None,
                eta_seconds: None,
                preview: preview.and_then(|p| png_base64(p).ok()),
                image,
            };
            if plan.num_images > 1 && !update.previews.is_empty() {
                for (i, preview) in update.previews.iter().enumerate() {
                    shared.emit(&job, step(Some(preview), Some(i as u32)));
                }
            } else {
                shared.emit(&job, step(update.previews.first(), None));
            }
            if cancel.load(Ordering::SeqCst) {
                Control::Cancel
            } else {
                Control::Continue
            }
        })
    });
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if cancel.load(Ordering::SeqCst) {
        shared.set_status(&job, JobStatus::Cancelled);
        return shared.finish(id);
    }
    let saved = outcome.and_then(|generated| {
        let first = generated
            .images
            .first()
            .ok_or_else(|| anyhow::anyhow!("the generation returned no image"))?;
        let (width, height) = first.dimensions();
        let recipe = recipe_of(&plan, &generated, (width, height));
        let mut images = Vec::new();
        for (i, image) in generated.images.iter().enumerate() {
            let seed = generated.seed.wrapping_add(i as u64);
            let png = crate::recipe::encode_png(
                image,
                &Recipe {
                    seed,
                    ..recipe.clone()
                },
            )?;
            let path = shared.data.image_at(id, i as u32);
            std::fs::write(&path, &png)?;
            shared.data.publish(&path)?;
            images.push(BatchImage {
                image: base64::engine::general_purpose::STANDARD.encode(&png),
                seed,
            });
        }
        let response = GenerateResponse {
            image: images[0].image.clone(),
            seed: generated.seed,
            width,
            height,
            steps: plan.steps,
            model: plan.model.clone(),
            prompt: plan.prompt.clone(),
            elapsed_ms,
            job_id: job.clone(),
            loras: generated.loras,
            // One image is `image` alone, as the original service answered.
            images: if images.len() > 1 { images } else { Vec::new() },
            step_cache: plan.step_cache.map(|threshold| StepCacheReport {
                threshold,
                skipped_steps: generated.skipped_steps.unwrap_or(0),
            }),
            recipe: Some(recipe),
        };
        // The job's record keeps everything but the pixels, which stay in the PNG files.
        let mut record = serde_json::to_value(&response)?;
        record["image"] = serde_json::Value::String(format!("/images/{job}"));
        // `get_mut`: indexing a missing key would insert a null, which no `GenerateResponse` reads.
        if let Some(list) = record.get_mut("images").and_then(|l| l.as_array_mut()) {
            for (i, entry) in list.iter_mut().enumerate() {
                entry["image"] = serde_json::Value::String(format!("/images/{job}/{i}"));
            }
        }
        crate::store::patiently(|| shared.store.set_result(&job, &record))?;
        Ok(response)
    });
    match saved {
        Ok(response) => {
            done();
            shared.emit(&job, EventBody::Result(Box::new(response)));
            shared.set_status(&job, JobStatus::Completed);
        }
        Err(err) => {
            // A failed job keeps no image (a full disk may have left part of one).
            for i in 0..plan.num_images {
                let _ = std::fs::remove_file(shared.data.image_at(id, i));
            }
            let (code, message) = JobFailure::describe(&err, ErrorCode::GenerationFailed);
            shared.fail(&job, code, &message)
        }
    }
    shared.finish(id);
}

/// The plan with its trained LoRA's file in this node's data folder, fetched from the file store when
/// another node trained it (the node that planned the job may keep its folder elsewhere).
fn with_local_lora(shared: &Shared, mut plan: GenerationPlan) -> anyhow::Result<GenerationPlan> {
    if let LoraChoice::Trained { model_id, file, .. } = &mut plan.lora {
        let id: JobId = model_id.parse().map_err(anyhow::Error::msg)?;
        *file = shared.data.lora(id);
        anyhow::ensure!(
            shared.data.fetch(file)?,
            "the LoRA of {model_id} is neither here nor in the file store"
        );
    }
    Ok(plan)
}

/// What the first image's PNG carries (each other image: the same with its own seed).
fn recipe_of(plan: &GenerationPlan, generated: &Generated, (width, height): (u32, u32)) -> Recipe {
    Recipe {
        prompt: plan.prompt.clone(),
        seed: generated.seed,
        model: plan.model.clone(),
        loras: generated
            .loras
            .iter()
            .map(|l| RecipeLora {
                name: l.name.clone(),
                scale: l.scale,
            })
            .collect(),
        steps: plan.steps,
        guidance: plan.guidance,
        width,
        height,
        input: plan.input.as_ref().map(|input| RecipeInput {
            job_id: input.job.as_ref().map(|(job, _)| job.clone()),
            index: input.job.as_ref().map(|(_, i)| *i),
            strength: input.strength,
            masked: input.mask.is_some(),
        }),
        studio: Some(crate::recipe::studio_version()),
    }
}

fn start_training(
    shared: &Shared,
    engine: &WorkerEngine,
    ticket: TrainingTicket,
) -> Option<ActiveTraining> {
    let TrainingTicket { id, spec, cancel } = ticket;
    let job = id.to_string();
    let Some(training) = engine.training.clone() else {
        shared.fail(
            &job,
            ErrorCode::Unavailable,
            crate::jobs::capability::TRAINING_UNAVAILABLE,
        );
        shared.finish(id);
        return None;
    };
    if cancel.load(Ordering::SeqCst) {
        shared.set_status(&job, JobStatus::Cancelled);
        shared.finish(id);
        return None;
    }
    shared.set_status(&job, JobStatus::Preparing);
    // The dataset, and the checkpoints of an earlier try on another node.
    if let Err(err) = shared.data.pull_job(id) {
        let message = format!("fetching the job's files: {err:#}");
        shared.fail(&job, ErrorCode::TrainingFailed, &message);
        shared.finish(id);
        return None;
    }
    let started = guarded(|| training.start(&spec, &mut |report| shared.report(id, report)));
    match started {
        Ok(run) => {
            shared.set_status(&job, JobStatus::Training);
            Some(ActiveTraining { id, run, cancel })
        }
        Err(err) => {
            shared.fail(&job, ErrorCode::TrainingFailed, &format!("{err:#}"));
            shared.finish(id);
            None
        }
    }
}

fn training_step(shared: &Shared, mut training: ActiveTraining) -> Option<ActiveTraining> {
    let id = training.id;
    let job = id.to_string();
    if training.cancel.load(Ordering::SeqCst) {
        // Dropping the run keeps its last checkpoint: a cancelled run can be resumed.
        drop(training);
        shared.set_status(&job, JobStatus::Cancelled);
        shared.finish(id);
        return None;
    }
    let outcome = guarded(|| training.run.step(&mut |report| shared.report(id, report)));
    // New samples and checkpoints, for every node to serve and for another to resume from.
    let outcome = outcome.and_then(|outcome| {
        shared
            .data
            .push_job(id)
            .map_err(|err| err.context("publishing the run's files"))?;
        Ok(outcome)
    });
    match outcome {
        Ok(StepOutcome::Continue) => return Some(training),
        Ok(StepOutcome::Finished) => {
            let result = serde_json::json!({ "lora": format!("/loras/{job}") });
            match crate::store::patiently(|| shared.store.set_result(&job, &result)) {
                Ok(()) => shared.set_status(&job, JobStatus::Completed),
                Err(err) => shared.fail(
                    &job,
                    ErrorCode::TrainingFailed,
                    &format!("recording the result: {err:#}"),
                ),
            }
        }
        Err(err) => shared.fail(&job, ErrorCode::TrainingFailed, &format!("{err:#}")),
    }
    shared.finish(id);
    None
}

impl Shared {
    /// Publishes an event; a failure to record it is logged, not fatal: the job goes on.
    fn emit(&self, job: &str, body: EventBody) {
        if let Err(err) = self.hub.publish(job, body) {
            tracing::error!("job {job}: recording an event failed: {err:#}");
        }
    }

    fn set_status(&self, job: &str, status: JobStatus) {
        self.emit(job, EventBody::Status { status });
    }

    fn fail(&self, job: &str, code: ErrorCode, message: &str) {
        tracing::warn!("job {job} failed: {message}");
        self.emit(
            job,
            EventBody::Error {
                error: ErrorDetail::new(code, message),
            },
        );
        self.set_status(job, JobStatus::Failed);
    }

    fn report(&self, id: JobId, report: TrainingReport) {
        let job = id.to_string();
        let body = match report {
            TrainingReport::Log(message) => EventBody::Log { message },
            TrainingReport::Step {
                step,
                total,
                loss,
                learning_rate,
                seconds_per_step,
                eta_seconds,
            } => EventBody::Step {
                step,
                total,
                loss: Some(loss),
                learning_rate: Some(learning_rate),
                seconds_per_step,
                eta_seconds,
                preview: None,
                image: None,
            },
            TrainingReport::Sample { step, file, recipe } => {
                if self.data.sample(id, &file).is_none() {
                    tracing::warn!("job {job}: sample name {file:?} is not servable; skipped");
                    return;
                }
                EventBody::Sample {
                    step,
                    url: format!("/train/{job}/samples/{file}"),
                    recipe: Some(recipe),
                }
            }
        };
        self.emit(&job, body);
    }

    /// Fails a job this node claimed but cannot run (its stream is open here).
    pub(super) fn fail_unstarted(&self, job: &str, message: &str) {
        self.fail(job, ErrorCode::Internal, message);
        if let Ok(id) = job.parse() {
            self.finish(id);
        }
    }

    /// The job left the worker: no more events, no more cancelling.
    fn finish(&self, id: JobId) {
        self.hub.close(&id.to_string());
        self.forget_cancel(id);
    }
}

fn encode_png(image: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut png = Vec::new();
    image.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

fn png_base64(image: &RgbImage) -> anyhow::Result<String> {
    Ok(base64::engine::general_purpose::STANDARD.encode(encode_png(image)?))
}
