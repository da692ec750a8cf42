//! The full fine-tune: every weight of the transformer is trained, for a small model trained from its
//! first step (the built-in model, docs/builtin-model.md). The weights are the pipeline's own variables
//! ([`FluxPipeline::load_dir_trainable`](crate::pipeline::FluxPipeline::load_dir_trainable)), so the
//! model computes with them directly and sampling during training needs no swap.

use super::checkpoint;
use super::trainable::Trainable;
use crate::models::flux::FluxTransformer;
use crate::ops::Kernels;
use anyhow::Result;
use candle_core::{DType, Var};
use std::collections::HashMap;
use std::path::Path;

pub struct FullWeights {
    weights: Vec<(String, Var)>,
    /// The dtype of the saved file (training itself is f32).
    save_dtype: DType,
}

impl FullWeights {
    pub fn new(weights: &[(String, Var)], save_dtype: DType) -> Self {
        Self {
            weights: weights.to_vec(),
            save_dtype,
        }
    }

    pub fn parameter_count(&self) -> usize {
        self.weights.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

impl Trainable for FullWeights {
    fn vars(&self) -> Vec<Var> {
        self.weights.iter().map(|(_, v)| v.clone()).collect()
    }

    fn attach(&self, _: &FluxTransformer, _: bool) {}

    fn checkpointable(&self) -> bool {
        false
    }

    fn detach(&self, _: &FluxTransformer) {}

    /// The transformer's checkpoint, under the names it was loaded with.
    fn save(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()> {
        let tensors = self
            .weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(self.save_dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        checkpoint::write_safetensors(path, &tensors, metadata)
    }

    fn describe(&self) -> String {
        format!(
            "every transformer weight ({:.2}M parameters, f32; saved as {:?})",
            self.parameter_count() as f64 / 1e6,
            self.save_dtype
        )
    }
}

/// Fresh weights for a model trained from its first step, drawn from `seed` on the CPU (the same on
/// every machine), under the BFL checkpoint names: as DiT initialises (adaLN-Zero), linear layers
/// Xavier-uniform with zero biases, except that every modulation and the final projection start at
/// zero, so that each block starts as the identity and the model predicts zero; norm scales one.
pub fn initial_weights(
    cfg: &crate::models::flux::FluxConfig,
    seed: u64,
) -> Result<Vec<(String, candle_core::Tensor)>> {
    use crate::models::flux::FluxWeights;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    let cpu = Device::Cpu;
    // The model built on zeros names every linear layer and its shape.
    let zeros = FluxWeights::from_var_builder(candle_nn::VarBuilder::zeros(DType::F32, &cpu))?;
    let shapes = FluxTransformer::load(&zeros, cfg, DType::F32, &cpu, Kernels::Plain)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for linear in shapes.linears() {
        let name = linear.name();
        let (rows, cols) = (linear.out_features(), linear.in_features());
        let zero = name.contains("_mod.lin")
            || name.contains("modulation")
            || name == "final_layer.linear";
        let weight: Vec<f32> = if zero {
            vec![0.0; rows * cols]
        } else {
            let a = (6.0 / (rows + cols) as f64).sqrt();
            (0..rows * cols)
                .map(|_| rng.random_range(-a..a) as f32)
                .collect()
        };
        out.push((
            format!("{name}.weight"),
            Tensor::from_vec(weight, (rows, cols), &cpu)?,
        ));
        out.push((
            format!("{name}.bias"),
            Tensor::zeros(rows, DType::F32, &cpu)?,
        ));
    }
    let norms = (0..cfg.depth)
        .flat_map(|i| ["img", "txt"].map(|s| format!("double_blocks.{i}.{s}_attn.norm")))
        .chain((0..cfg.depth_single).map(|i| format!("single_blocks.{i}.norm")));
    for norm in norms {
        for which in ["query_norm", "key_norm"] {
            out.push((
                format!("{norm}.{which}.scale"),
                Tensor::ones(cfg.head_dim(), DType::F32, &cpu)?,
            ));
        }
    }
    Ok(out)
}
