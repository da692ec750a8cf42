//! LoRA fine-tuning of FLUX (and full fine-tuning of small ones) on candle's autograd: the dataset from a ZIP, encodings cached once, FLUX's
//! flow-matching objective, f32 adapters on the frozen base's adapter-aware layers, AdamW, samples,
//! checkpoints and resume, and the LoRA in diffusers' PEFT format. docs/training.md describes it all.

pub mod checkpoint;
pub mod dataset;
pub mod flux_backward;
pub mod full;
pub mod lora;
pub mod objective;
pub mod optim;
pub mod settings;
mod trainable;
mod trainer;

pub use settings::{Schedule, SigmaSampling, Targets, TrainSettings};
pub use trainable::Trainable;
pub use trainer::{Report, Sample, StepStats, TrainJob, Trainer};
