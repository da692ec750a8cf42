//! Reads FLUX transformer weights from either checkpoint layout into BFL-named layers.

use super::layout::{diffusers_parts, DiffusersParts};
use crate::models::linear::Linear;
use crate::ops::Kernels;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Black Forest Labs' single file (`flux1-dev.safetensors`), also ComfyUI's with a
    /// `model.diffusion_model.` prefix.
    Bfl,
    /// diffusers' `transformer/` folder.
    Diffusers,
}

pub struct FluxWeights {
    vb: VarBuilder<'static>,
    pub layout: Layout,
}

impl FluxWeights {
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let vb = crate::weights::var_builder(path, dtype, device)?;
        Self::from_var_builder(vb)
            .with_context(|| format!("reading the FLUX transformer at {}", path.display()))
    }

    pub fn from_var_builder(vb: VarBuilder<'static>) -> Result<Self> {
        if vb.contains_tensor("double_blocks.0.img_attn.qkv.weight") {
            Ok(Self {
                vb,
                layout: Layout::Bfl,
            })
        } else if vb.contains_tensor("model.diffusion_model.double_blocks.0.img_attn.qkv.weight") {
            Ok(Self {
                vb: vb.pp("model.diffusion_model"),
                layout: Layout::Bfl,
            })
        } else if vb.contains_tensor("transformer_blocks.0.attn.to_q.weight") {
            Ok(Self {
                vb,
                layout: Layout::Diffusers,
            })
        } else {
            bail!("not a FLUX transformer checkpoint: neither BFL keys (double_blocks.0.img_attn.qkv) nor diffusers keys (transformer_blocks.0.attn.to_q) are present")
        }
    }

    pub fn contains(&self, layer: &str) -> bool {
        match self.layout {
            Layout::Bfl => {
                self.vb.contains_tensor(&format!("{layer}.weight"))
                    || self.vb.contains_tensor(&format!("{layer}.scale"))
            }
            Layout::Diffusers => match diffusers_parts(layer) {
                Some(DiffusersParts::Same(n)) | Some(DiffusersParts::SwappedHalves(n)) => {
                    self.vb.contains_tensor(&format!("{n}.weight"))
                }
                Some(DiffusersParts::Stacked(parts)) => {
                    self.vb.contains_tensor(&format!("{}.weight", parts[0]))
                }
                None => false,
            },
        }
    }

    /// A tensor of a BFL-named layer; `suffix` is `weight`, `bias` or `scale` (RMSNorm).
    pub fn tensor(&self, layer: &str, suffix: &str) -> Result<Tensor> {
        match self.layout {
            Layout::Bfl => Ok(self.vb.get_unchecked(&format!("{layer}.{suffix}"))?),
            Layout::Diffusers => {
                let suffix = if suffix == "scale" { "weight" } else { suffix };
                let parts = diffusers_parts(layer).with_context(|| {
                    format!("no diffusers name is known for FLUX layer `{layer}`")
                })?;
                let get = |n: &str| -> Result<Tensor> {
                    Ok(self.vb.get_unchecked(&format!("{n}.{suffix}"))?)
                };
                match parts {
                    DiffusersParts::Same(n) => get(&n),
                    DiffusersParts::Stacked(ns) => {
                        let ts = ns.iter().map(|n| get(n)).collect::<Result<Vec<_>>>()?;
                        Ok(Tensor::cat(&ts, 0)?)
                    }
                    DiffusersParts::SwappedHalves(n) => {
                        let t = get(&n)?;
                        let half = t.dim(0)? / 2;
                        Ok(Tensor::cat(
                            &[t.narrow(0, half, half)?, t.narrow(0, 0, half)?],
                            0,
                        )?)
                    }
                }
            }
        }
    }

    /// A tensor of a BFL-named layer that must have `shape`. A BFL checkpoint is asked with the shape
    /// (a [`VarBuilder`] that makes its tensors, as `VarBuilder::zeros` does, needs it); a diffusers
    /// one is assembled first and checked after.
    fn shaped(&self, layer: &str, suffix: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self.layout {
            Layout::Bfl => self
                .vb
                .get(shape, &format!("{layer}.{suffix}"))
                .with_context(|| format!("FLUX layer `{layer}`: the config expects {shape:?}"))?,
            Layout::Diffusers => self.tensor(layer, suffix)?,
        };
        if t.dims() != shape {
            bail!(
                "FLUX layer `{layer}` has a {suffix} of shape {:?}, the config expects {shape:?}",
                t.dims()
            );
        }
        Ok(t)
    }

    /// A linear layer with bias, checked against the shape the config expects, its products taking the
    /// path `kernels` says.
    pub fn linear(
        &self,
        layer: &str,
        in_dim: usize,
        out_dim: usize,
        kernels: Kernels,
    ) -> Result<Linear> {
        let w = self.shaped(layer, "weight", &[out_dim, in_dim])?;
        let b = self.shaped(layer, "bias", &[out_dim])?;
        Ok(Linear::new(layer, w, Some(b), kernels))
    }

    pub fn norm_scale(&self, layer: &str, dim: usize) -> Result<Tensor> {
        self.shaped(layer, "scale", &[dim])
    }

    /// Guesses the config of a BFL single file from its tensor shapes. The RoPE axes cannot be
    /// read off the weights: FLUX's own split is used when the head dimension is FLUX's (128).
    pub fn infer_config(&self) -> Result<super::FluxConfig> {
        let dims = |layer: &str| -> Result<Vec<usize>> {
            Ok(self.tensor(layer, "weight")?.dims().to_vec())
        };
        let img_in = dims("img_in")?;
        let (hidden, in_channels) = (img_in[0], img_in[1]);
        let head_dim = self
            .tensor("double_blocks.0.img_attn.norm.query_norm", "scale")?
            .dim(0)?;
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    self.contains(&format!("{prefix}.{i}.linear1"))
                        || self.contains(&format!("{prefix}.{i}.img_attn.qkv"))
                })
                .count()
        };
        let axes_dims = if head_dim == 128 {
            vec![16, 56, 56]
        } else {
            bail!("cannot infer the RoPE axes for head dimension {head_dim}: give the model's config.json")
        };
        let cfg = super::FluxConfig {
            in_channels,
            hidden_size: hidden,
            num_heads: hidden / head_dim,
            depth: count("double_blocks"),
            depth_single: count("single_blocks"),
            context_dim: dims("txt_in")?[1],
            vec_dim: dims("vector_in.in_layer")?[1],
            mlp_ratio: dims("double_blocks.0.img_mlp.0")?[0] as f64 / hidden as f64,
            axes_dims,
            theta: 10_000.0,
            guidance_embed: self.contains("guidance_in.in_layer"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
