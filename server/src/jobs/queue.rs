//! The bounded queues in front of the workers, and which worker takes which job in which order.
//!
//! Each worker's own order: a waiting generation always goes first; a training run advances one optimizer
//! step at a time, and the queues are checked again between steps. So a generation waits at most one
//! training step (plus the generations before it), and a training run is never starved either: it takes
//! every moment no generation is waiting. A worker holds one training run at a time.
//!
//! Across workers: a generation goes to the free worker (one not generating) that is least busy (idle
//! before one holding a training run, which takes only generations of its model), among those to the
//! one that already holds its model, then its
//! LoRAs, then one that holds nothing (rather than evicting another model), then the one that has taken
//! the fewest jobs. A training run goes to an idle worker, the one holding its model first. Each worker
//! takes only what it is the choice for, so a job waits for the worker that holds its model while that
//! worker is free, and never while it is busy and another is free.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use app::{WorkerInfo, WorkerState};

use crate::files::JobId;
use crate::jobs::capability::{GenerationPlan, Held, TrainingSpec};

pub struct GenerationTicket {
    pub id: JobId,
    pub plan: GenerationPlan,
    pub cancel: Arc<AtomicBool>,
}

pub struct TrainingTicket {
    pub id: JobId,
    pub spec: TrainingSpec,
    pub cancel: Arc<AtomicBool>,
}

pub enum Work {
    Generate(GenerationTicket),
    StartTraining(TrainingTicket),
    /// Advance the active training run by one step.
    TrainingStep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// What `Queues::room` says.
pub struct Room {
    pub generation: bool,
    pub training: bool,
    pub held_models: Vec<String>,
}

/// What the scheduler knows of a worker.
#[derive(Default)]
struct Slot {
    device: String,
    held: Held,
    /// The generation it runs.
    current: Option<JobId>,
    /// The training run it holds.
    training: Option<JobId>,
    taken: u64,
}

/// What a job needs resident: its model and LoRAs.
struct Needs<'a> {
    model: Option<&'a str>,
    loras: Vec<&'a str>,
}

impl Needs<'_> {
    fn of_generation(plan: &GenerationPlan) -> Needs<'_> {
        Needs {
            model: Some(&plan.model),
            loras: plan.lora.affinity_name().into_iter().collect(),
        }
    }

    fn of_training(spec: &TrainingSpec) -> Needs<'_> {
        Needs {
            model: spec.settings.model.as_deref(),
            loras: Vec::new(),
        }
    }

    /// Lower is a better worker for it, least busy first (see the module's text).
    fn rank(&self, id: usize, slot: &Slot) -> (bool, bool, bool, usize, u64, usize) {
        let has_model = self
            .model
            .is_some_and(|m| slot.held.models.iter().any(|h| h == m));
        let missing_loras = self
            .loras
            .iter()
            .filter(|l| !slot.held.loras.iter().any(|h| h == *l))
            .count();
        let evicts = !has_model && !slot.held.models.is_empty();
        (
            slot.training.is_some(),
            self.model.is_some() && !has_model,
            evicts,
            missing_loras,
            slot.taken,
            id,
        )
    }
}

#[derive(Default)]
struct Pending {
    generation: VecDeque<GenerationTicket>,
    training: VecDeque<TrainingTicket>,
    workers: Vec<Slot>,
    closed: bool,
}

impl Pending {
    /// Fewer generations wait than there are workers not generating.
    fn room_for_generation(&self) -> bool {
        let free = self.workers.iter().filter(|s| s.current.is_none()).count();
        self.generation.len() < free
    }

    /// The worker a generation should go to now: the best of those not generating. A worker holding a
    /// training run cannot load another model meanwhile: among several workers it takes only generations
    /// of the model it holds (or any, when it keeps none resident); alone, it takes every one, and one it
    /// cannot run fails with the reason.
    fn choice_for_generation(&self, needs: &Needs) -> Option<usize> {
        let alone = self.workers.len() == 1;
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.current.is_none())
            .filter(|(_, slot)| {
                alone
                    || slot.training.is_none()
                    || slot.held.models.is_empty()
                    || needs
                        .model
                        .is_some_and(|m| slot.held.models.iter().any(|h| h == m))
            })
            .min_by_key(|(id, slot)| needs.rank(*id, slot))
            .map(|(id, _)| id)
    }

    /// The worker a training run should go to now: the best idle one.
    fn choice_for_training(&self, needs: &Needs) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.current.is_none() && slot.training.is_none())
            .min_by_key(|(id, slot)| needs.rank(*id, slot))
            .map(|(id, _)| id)
    }
}

pub struct Queues {
    pending: Mutex<Pending>,
    wake: Condvar,
    generation_capacity: usize,
    training_capacity: usize,
}

impl Queues {
    /// `devices`: one worker each, as users read the device's name.
    pub fn new(generation_capacity: usize, training_capacity: usize, devices: &[String]) -> Queues {
        Queues {
            pending: Mutex::new(Pending {
                workers: devices
                    .iter()
                    .map(|device| Slot {
                        device: device.clone(),
                        ..Slot::default()
                    })
                    .collect(),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            generation_capacity,
            training_capacity,
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn push_generation(&self, ticket: GenerationTicket) -> Result<(), QueueFull> {
        let mut pending = self.pending();
        if pending.generation.len() >= self.generation_capacity {
            return Err(QueueFull);
        }
        pending.generation.push_back(ticket);
        // Every worker looks: only the chosen one takes it.
        self.wake.notify_all();
        Ok(())
    }

    pub fn push_training(&self, ticket: TrainingTicket) -> Result<(), QueueFull> {
        let mut pending = self.pending();
        if pending.training.len() >= self.training_capacity {
            return Err(QueueFull);
        }
        pending.training.push_back(ticket);
        self.wake.notify_all();
        Ok(())
    }

    /// Takes a job out of its queue before it started; false when it is not waiting.
    pub fn remove(&self, id: JobId) -> bool {
        let mut pending = self.pending();
        let before = pending.generation.len() + pending.training.len();
        pending.generation.retain(|t| t.id != id);
        pending.training.retain(|t| t.id != id);
        pending.generation.len() + pending.training.len() < before
    }

    /// (generation waiting, capacity), (training waiting, capacity).
    pub fn lengths(&self) -> ((usize, usize), (usize, usize)) {
        let pending = self.pending();
        (
            (pending.generation.len(), self.generation_capacity),
            (pending.training.len(), self.training_capacity),
        )
    }

    /// Whether a worker here could start another job now (a cluster's node claims one then), and the
    /// models its workers hold.
    pub fn room(&self) -> Room {
        let pending = self.pending();
        Room {
            generation: pending.room_for_generation(),
            training: pending.training.is_empty()
                && pending
                    .workers
                    .iter()
                    .any(|slot| slot.current.is_none() && slot.training.is_none()),
            held_models: pending
                .workers
                .iter()
                .flat_map(|slot| slot.held.models.iter().cloned())
                .collect(),
        }
    }

    /// Waits until a worker could start another job, at most `timeout`.
    pub fn wait_for_room(&self, timeout: std::time::Duration) {
        let pending = self.pending();
        let full = |p: &mut Pending| !p.closed && !p.room_for_generation();
        let _ = self
            .wake
            .wait_timeout_while(pending, timeout, full)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }

    /// Every worker as the API shows it.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let pending = self.pending();
        pending
            .workers
            .iter()
            .enumerate()
            .map(|(id, slot)| WorkerInfo {
                node: None,
                id: id as u32,
                device: slot.device.clone(),
                state: if slot.current.is_some() {
                    WorkerState::Generating
                } else if slot.training.is_some() {
                    WorkerState::Training
                } else {
                    WorkerState::Idle
                },
                models: slot.held.models.clone(),
                loras: slot.held.loras.clone(),
                current_job: slot.current.map(|id| id.to_string()),
                training_job: slot.training.map(|id| id.to_string()),
                jobs_taken: slot.taken,
            })
            .collect()
    }

    /// Worker `worker` has finished its generation and holds `held`: free for the next choice, before
    /// it asks for its next work.
    pub fn release(&self, worker: usize, held: Held) {
        let mut pending = self.pending();
        let slot = &mut pending.workers[worker];
        slot.held = held;
        slot.current = None;
        drop(pending);
        self.wake.notify_all();
    }

    /// Worker `worker`'s next piece of work, by the policy above; blocks while there is none. `held` is
    /// what it holds now and `training_active` whether it holds a training run. `None` once closed.
    pub fn next(&self, worker: usize, training_active: bool, held: Held) -> Option<Work> {
        let mut pending = self.pending();
        {
            let slot = &mut pending.workers[worker];
            slot.held = held;
            slot.current = None;
            if !training_active {
                slot.training = None;
            }
        }
        // This worker just became free: jobs that were waiting for a busy choice may now be its.
        self.wake.notify_all();
        loop {
            if pending.closed {
                return None;
            }
            let generation = pending.generation.iter().position(|ticket| {
                pending.choice_for_generation(&Needs::of_generation(&ticket.plan)) == Some(worker)
            });
            if let Some(i) = generation {
                let ticket = pending.generation.remove(i).expect("position in range");
                let slot = &mut pending.workers[worker];
                slot.current = Some(ticket.id);
                slot.taken += 1;
                return Some(Work::Generate(ticket));
            }
            if training_active {
                return Some(Work::TrainingStep);
            }
            let training = pending.training.front().is_some_and(|ticket| {
                pending.choice_for_training(&Needs::of_training(&ticket.spec)) == Some(worker)
            });
            if training {
                let ticket = pending.training.pop_front().expect("front exists");
                let slot = &mut pending.workers[worker];
                slot.training = Some(ticket.id);
                slot.taken += 1;
                return Some(Work::StartTraining(ticket));
            }
            pending = self
                .wake
                .wait(pending)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Stops every worker at its next `next`.
    pub fn close(&self) {
        self.pending().closed = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::capability::LoraChoice;

    fn one() -> Vec<String> {
        vec!["cpu".into()]
    }

    fn generation() -> GenerationTicket {
        generation_of("m")
    }

    fn generation_of(model: &str) -> GenerationTicket {
        GenerationTicket {
            id: JobId::random(),
            plan: GenerationPlan {
                model: model.into(),
                prompt: "p".into(),
                width: 64,
                height: 64,
                steps: 1,
                guidance: 1.0,
                seed: 0,
                num_images: 1,
                step_cache: None,
                precision: None,
                lora: LoraChoice::Disabled,
                lora_scale: 1.0,
                input: None,
            },
            cancel: Arc::default(),
        }
    }

    fn training() -> TrainingTicket {
        TrainingTicket {
            id: JobId::random(),
            spec: TrainingSpec {
                model_id: "m".into(),
                dataset: "d".into(),
                job_dir: "j".into(),
                samples_dir: "s".into(),
                lora_file: "l".into(),
                keywords: vec![],
                settings: Default::default(),
                resume: false,
            },
            cancel: Arc::default(),
        }
    }

    #[test]
    fn generation_goes_between_training_steps() {
        let queues = Queues::new(2, 1, &one());
        queues.push_training(training()).unwrap();
        assert!(matches!(
            queues.next(0, false, Held::default()),
            Some(Work::StartTraining(_))
        ));
        assert!(matches!(
            queues.next(0, true, Held::default()),
            Some(Work::TrainingStep)
        ));
        queues.push_generation(generation()).unwrap();
        assert!(matches!(
            queues.next(0, true, Held::default()),
            Some(Work::Generate(_))
        ));
        assert!(matches!(
            queues.next(0, true, Held::default()),
            Some(Work::TrainingStep)
        ));
    }

    #[test]
    fn full_queues_refuse_and_removal_frees_a_place() {
        let queues = Queues::new(1, 1, &one());
        let first = generation();
        let id = first.id;
        queues.push_generation(first).unwrap();
        assert_eq!(queues.push_generation(generation()), Err(QueueFull));
        assert!(queues.remove(id));
        assert!(!queues.remove(id));
        queues.push_generation(generation()).unwrap();
        queues.push_training(training()).unwrap();
        assert_eq!(queues.push_training(training()), Err(QueueFull));
        queues.close();
        assert!(queues.next(0, false, Held::default()).is_none());
    }

    fn holding(model: &str) -> Held {
        Held {
            models: vec![model.into()],
            loras: Vec::new(),
        }
    }

    #[test]
    fn a_job_goes_to_the_free_worker_holding_its_model_and_else_to_the_least_busy() {
        let queues = Queues::new(8, 2, &["cpu".into(), "cpu".into()]);
        queues.push_generation(generation_of("a")).unwrap();
        queues.push_generation(generation_of("b")).unwrap();
        // Worker 1 holds b: it leaves a, first in line, to worker 0, which holds nothing yet.
        let Some(Work::Generate(second)) = queues.next(1, false, holding("b")) else {
            panic!("worker 1 takes work")
        };
        assert_eq!(second.plan.model, "b");
        let Some(Work::Generate(first)) = queues.next(0, false, holding("a")) else {
            panic!("worker 0 takes work")
        };
        assert_eq!(first.plan.model, "a");
        // Worker 1 is busy with b: the next b goes to worker 0, free, rather than wait.
        queues.push_generation(generation_of("b")).unwrap();
        let Some(Work::Generate(third)) = queues.next(0, false, holding("a")) else {
            panic!("worker 0 takes work")
        };
        assert_eq!(third.plan.model, "b");
        let workers = queues.workers();
        assert_eq!(workers[1].state, WorkerState::Generating);
        assert_eq!(workers[1].models, ["b"]);
        assert_eq!(workers[1].current_job, Some(second.id.to_string()));
    }

    #[test]
    fn a_worker_holding_a_training_run_leaves_generations_to_an_idle_one() {
        let queues = Queues::new(8, 2, &["cpu".into(), "cpu".into()]);
        queues.push_training(training()).unwrap();
        assert!(matches!(
            queues.next(0, false, Held::default()),
            Some(Work::StartTraining(_))
        ));
        queues.push_generation(generation()).unwrap();
        // Worker 1 is idle: the training worker goes on training.
        assert!(matches!(
            queues.next(0, true, Held::default()),
            Some(Work::TrainingStep)
        ));
        assert!(matches!(
            queues.next(1, false, Held::default()),
            Some(Work::Generate(_))
        ));
        assert_eq!(queues.workers()[0].state, WorkerState::Training);
    }

    #[test]
    fn among_workers_holding_the_model_the_one_holding_its_lora_is_chosen() {
        let queues = Queues::new(8, 2, &["cpu".into(), "cpu".into()]);
        let mut ticket = generation_of("a");
        ticket.plan.lora = LoraChoice::Named("style".into());
        queues.push_generation(ticket).unwrap();
        let plain = Held {
            models: vec!["a".into()],
            loras: Vec::new(),
        };
        let styled = Held {
            models: vec!["a".into()],
            loras: vec!["style".into()],
        };
        // Worker 0 asks first but leaves it; worker 1 holds the LoRA.
        queues.pending().workers[1].held = styled.clone();
        queues.pending().workers[0].held = plain.clone();
        assert_eq!(
            queues.pending().choice_for_generation(&Needs {
                model: Some("a"),
                loras: vec!["style"],
            }),
            Some(1)
        );
        assert!(matches!(
            queues.next(1, false, styled),
            Some(Work::Generate(_))
        ));
    }
}
