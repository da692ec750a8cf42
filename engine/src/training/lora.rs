//! Trainable LoRA adapters on the FLUX transformer's linear layers, one per diffusers module so that they
//! map 1:1 onto the PEFT file format (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`): a fused
//! BFL layer (`qkv`, `linear1`) gets one adapter per part, placed on its slice of the output rows.
//! Names come from [`layout::diffusers_parts`], the one table of the two layouts.

use super::settings::Targets;
use crate::models::flux::layout::{diffusers_parts, DiffusersParts};
use crate::models::flux::FluxTransformer;
use crate::models::linear::Adapter;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// One adapter: `down` (rank, in) and `up` (rows, rank), f32 variables.
pub struct LoraAdapter {
    /// The BFL layer it sits on.
    pub layer: String,
    /// Its diffusers module name, without the `transformer.` prefix.
    pub module: String,
    pub out_offset: usize,
    /// diffusers stores this layer's two output halves the other way round (the final modulation).
    swapped_halves: bool,
    pub down: Var,
    pub up: Var,
}

/// The adapters of a run and their common scale `alpha / rank`.
pub struct LoraSet {
    pub adapters: Vec<LoraAdapter>,
    pub rank: usize,
    pub alpha: f64,
}

/// diffusers' attention projections, the `attention` targets.
fn is_attention(module: &str) -> bool {
    const ENDS: [&str; 8] = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ];
    ENDS.iter().any(|e| module.ends_with(e))
}

/// The diffusers modules of a BFL layer with their (row offset, rows, swapped halves). Parts of a fused
/// layer are `hidden` rows each except the last, which takes the rest (`linear1`'s MLP input).
fn modules(layer: &str, out: usize, hidden: usize) -> Result<Vec<(String, usize, usize, bool)>> {
    Ok(
        match diffusers_parts(layer)
            .with_context(|| format!("no diffusers name for FLUX layer `{layer}`"))?
        {
            DiffusersParts::Same(m) => vec![(m, 0, out, false)],
            DiffusersParts::SwappedHalves(m) => vec![(m, 0, out, true)],
            DiffusersParts::Stacked(parts) => {
                let n = parts.len();
                parts
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let rows = if i + 1 == n {
                            out - hidden * (n - 1)
                        } else {
                            hidden
                        };
                        (m, i * hidden, rows, false)
                    })
                    .collect()
            }
        },
    )
}

impl LoraSet {
    /// New adapters on `targets`: `down` drawn as peft does (Kaiming-uniform, bound 1/√in) from `seed`,
    /// `up` zero, so training starts from the base model's output exactly.
    pub fn new(
        model: &FluxTransformer,
        targets: Targets,
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let hidden = model.config().hidden_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut adapters = Vec::new();
        for linear in model.linears() {
            let (inp, out) = (linear.in_features(), linear.out_features());
            for (module, out_offset, rows, swapped_halves) in modules(linear.name(), out, hidden)? {
                if targets == Targets::Attention && !is_attention(&module) {
                    continue;
                }
                let bound = 1.0 / (inp as f64).sqrt();
                let down: Vec<f32> = (0..rank * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let down = Tensor::from_vec(down, (rank, inp), &Device::Cpu)?.to_device(device)?;
                adapters.push(LoraAdapter {
                    layer: linear.name().to_string(),
                    module,
                    out_offset,
                    swapped_halves,
                    down: Var::from_tensor(&down)?,
                    up: Var::zeros((rows, rank), DType::F32, device)?,
                });
            }
        }
        if adapters.is_empty() {
            bail!("the model has no layer for the {targets:?} targets");
        }
        Ok(Self {
            adapters,
            rank,
            alpha,
        })
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The trained variables, `down` then `up` of each adapter.
    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .iter()
            .flat_map(|a| [a.down.clone(), a.up.clone()])
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Puts these adapters, and only these, on the model's layers. `trainable`: the variables themselves
    /// (gradients flow to them); otherwise detached copies, for sampling without building a graph.
    pub fn attach(&self, model: &FluxTransformer, trainable: bool) {
        let mut by_layer: HashMap<&str, Vec<Arc<Adapter>>> = HashMap::new();
        for a in &self.adapters {
            let (down, up) = if trainable {
                (a.down.as_tensor().clone(), a.up.as_tensor().clone())
            } else {
                (a.down.as_tensor().detach(), a.up.as_tensor().detach())
            };
            by_layer
                .entry(&a.layer)
                .or_default()
                .push(Arc::new(Adapter {
                    down,
                    up,
                    scale: self.scale(),
                    out_offset: a.out_offset,
                }));
        }
        for linear in model.linears() {
            linear.set_adapters(by_layer.remove(linear.name()).unwrap_or_default());
        }
    }

    /// Takes every adapter off the model: the base model as generation expects to find it.
    pub fn detach(model: &FluxTransformer) {
        for linear in model.linears() {
            linear.clear_adapters();
        }
    }

    fn keys(module: &str) -> (String, String) {
        (
            format!("transformer.{module}.lora_A.weight"),
            format!("transformer.{module}.lora_B.weight"),
        )
    }

    /// The PEFT/diffusers state dict, f32, with `alpha / rank` folded into `lora_B` so that every loader,
    /// whatever it assumes about alpha, computes the same update.
    pub fn peft_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for a in &self.adapters {
            let (ka, kb) = Self::keys(&a.module);
            let mut up = (a.up.as_tensor() * self.scale())?;
            if a.swapped_halves {
                let half = up.dim(0)? / 2;
                up = Tensor::cat(&[up.narrow(0, half, half)?, up.narrow(0, 0, half)?], 0)?;
            }
            out.insert(ka, a.down.as_tensor().to_device(&Device::Cpu)?);
            out.insert(kb, up.to_device(&Device::Cpu)?);
        }
        Ok(out)
    }

    /// Sets these adapters from a PEFT state dict written by [`LoraSet::peft_tensors`].
    pub fn load_peft_tensors(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for a in &self.adapters {
            let (ka, kb) = Self::keys(&a.module);
            let get = |k: &str| {
                tensors
                    .get(k)
                    .with_context(|| format!("the LoRA file has no `{k}`"))?
                    .to_dtype(DType::F32)?
                    .to_device(a.down.device())
                    .map_err(anyhow::Error::from)
            };
            let mut up = (get(&kb)? / self.scale())?;
            if a.swapped_halves {
                let half = up.dim(0)? / 2;
                up = Tensor::cat(&[up.narrow(0, half, half)?, up.narrow(0, 0, half)?], 0)?;
            }
            a.down.set(&get(&ka)?)?;
            a.up.set(&up)?;
        }
        Ok(())
    }

    /// Writes the LoRA in diffusers' PEFT format with `metadata` in the safetensors header.
    pub fn save_peft(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()> {
        let tensors = self.peft_tensors()?;
        let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
        super::checkpoint::write_safetensors(path, &views, metadata)
    }
}
