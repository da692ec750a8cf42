//! What a training run trains, behind one trait: LoRA adapters or every weight of a small model.

use super::lora::LoraSet;
use crate::models::flux::FluxTransformer;
use anyhow::Result;
use candle_core::Var;
use std::collections::HashMap;
use std::path::Path;

/// What a run trains: LoRA adapters ([`LoraSet`]), or every weight of a pipeline loaded trainable
/// ([`FullWeights`](super::full::FullWeights): its `vars` are the weights themselves, `attach` has nothing to do, and `save`
/// writes the model).
pub trait Trainable {
    fn vars(&self) -> Vec<Var>;
    /// Makes the model compute with the trained parameters: the variables themselves when `trainable`,
    /// detached copies otherwise (sampling).
    fn attach(&self, model: &FluxTransformer, trainable: bool);
    /// Leaves the model as generation expects it.
    fn detach(&self, model: &FluxTransformer);
    fn save(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()>;
    /// A line for the log: what is trained.
    fn describe(&self) -> String;
    /// Whether gradient checkpointing may be used: its pass keeps the adapters' gradients only.
    fn checkpointable(&self) -> bool {
        true
    }
}

impl Trainable for LoraSet {
    fn vars(&self) -> Vec<Var> {
        LoraSet::vars(self)
    }
    fn attach(&self, model: &FluxTransformer, trainable: bool) {
        LoraSet::attach(self, model, trainable)
    }
    fn detach(&self, model: &FluxTransformer) {
        LoraSet::detach(model)
    }
    fn save(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()> {
        self.save_peft(path, metadata)
    }
    fn describe(&self) -> String {
        format!(
            "LoRA rank {} alpha {} on {} layers ({:.2}M parameters, f32)",
            self.rank,
            self.alpha,
            self.adapters.len(),
            self.parameter_count() as f64 / 1e6
        )
    }
}
