//! The bounded queues in front of the worker, and the order it takes work in.
//!
//! Policy: a waiting generation always goes first; a training run advances one optimizer step at a time,
//! and the queues are checked again between steps. So a generation waits at most one training step (plus
//! the generations before it), and a training run is never starved either: it takes every moment no
//! generation is waiting. One training run is active at a time; the others wait in order.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::files::JobId;
use crate::jobs::capability::{GenerationPlan, TrainingSpec};

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

#[derive(Default)]
struct Pending {
    generation: VecDeque<GenerationTicket>,
    training: VecDeque<TrainingTicket>,
    closed: bool,
}

pub struct Queues {
    pending: Mutex<Pending>,
    wake: Condvar,
    generation_capacity: usize,
    training_capacity: usize,
}

impl Queues {
    pub fn new(generation_capacity: usize, training_capacity: usize) -> Queues {
        Queues {
            pending: Mutex::default(),
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
        self.wake.notify_one();
        Ok(())
    }

    pub fn push_training(&self, ticket: TrainingTicket) -> Result<(), QueueFull> {
        let mut pending = self.pending();
        if pending.training.len() >= self.training_capacity {
            return Err(QueueFull);
        }
        pending.training.push_back(ticket);
        self.wake.notify_one();
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

    /// The worker's next piece of work, by the policy above; blocks while there is none. `None` once closed.
    pub fn next(&self, training_active: bool) -> Option<Work> {
        let mut pending = self.pending();
        loop {
            if pending.closed {
                return None;
            }
            if let Some(ticket) = pending.generation.pop_front() {
                return Some(Work::Generate(ticket));
            }
            if training_active {
                return Some(Work::TrainingStep);
            }
            if let Some(ticket) = pending.training.pop_front() {
                return Some(Work::StartTraining(ticket));
            }
            pending = self
                .wake
                .wait(pending)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Stops the worker at its next `next`.
    pub fn close(&self) {
        self.pending().closed = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::capability::LoraChoice;

    fn generation() -> GenerationTicket {
        GenerationTicket {
            id: JobId::random(),
            plan: GenerationPlan {
                model: "m".into(),
                prompt: "p".into(),
                width: 64,
                height: 64,
                steps: 1,
                guidance: 1.0,
                seed: 0,
                num_images: 1,
                step_cache: None,
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
        let queues = Queues::new(2, 1);
        queues.push_training(training()).unwrap();
        assert!(matches!(queues.next(false), Some(Work::StartTraining(_))));
        assert!(matches!(queues.next(true), Some(Work::TrainingStep)));
        queues.push_generation(generation()).unwrap();
        assert!(matches!(queues.next(true), Some(Work::Generate(_))));
        assert!(matches!(queues.next(true), Some(Work::TrainingStep)));
    }

    #[test]
    fn full_queues_refuse_and_removal_frees_a_place() {
        let queues = Queues::new(1, 1);
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
        assert!(queues.next(false).is_none());
    }
}
