//! Reads FLUX transformer weights from either checkpoint layout into BFL-named layers.

use super::layout::{diffusers_parts, DiffusersParts};
use crate::models::linear::Linear;
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
    /// Random weights instead of a checkpoint's (benchmarks at full size without the files).
    random: Option<(DType, Device)>,
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
                random: None,
            })
        } else if vb.contains_tensor("model.diffusion_model.double_blocks.0.img_attn.qkv.weight") {
            Ok(Self {
                vb: vb.pp("model.diffusion_model"),
                layout: Layout::Bfl,
                random: None,
            })
        } else if vb.contains_tensor("transformer_blocks.0.attn.to_q.weight") {
            Ok(Self {
                vb,
                layout: Layout::Diffusers,
                random: None,
            })
        } else {
            bail!("not a FLUX transformer checkpoint: neither BFL keys (double_blocks.0.img_attn.qkv) nor diffusers keys (transformer_blocks.0.attn.to_q) are present")
        }
    }

    /// Weights drawn from N(0, 0.02) (norm scales around 1), as a model is built: for timing a full-size
    /// model without its files. The values are never zeros, so no kernel can take a shortcut.
    pub fn random(dtype: DType, device: &Device) -> Self {
        Self {
            vb: VarBuilder::zeros(dtype, device),
            layout: Layout::Bfl,
            random: Some((dtype, device.clone())),
        }
    }

    fn random_tensor(&self, shape: &[usize], mean: f64) -> Result<Option<Tensor>> {
        match &self.random {
            Some((dtype, device)) => Ok(Some(
                Tensor::randn(mean as f32, 0.02, shape, device)?.to_dtype(*dtype)?,
            )),
            None => Ok(None),
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

    /// A linear layer with bias, checked against the shape the config expects.
    pub fn linear(&self, layer: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
        if let Some(w) = self.random_tensor(&[out_dim, in_dim], 0.0)? {
            let b = self.random_tensor(&[out_dim], 0.0)?;
            return Ok(Linear::new(layer, w, b));
        }
        let w = self.tensor(layer, "weight")?;
        let b = self.tensor(layer, "bias")?;
        if w.dims() != [out_dim, in_dim] || b.dims() != [out_dim] {
            bail!(
                "FLUX layer `{layer}` has shape {:?} (bias {:?}), the config expects [{out_dim}, {in_dim}]",
                w.dims(),
                b.dims()
            );
        }
        Ok(Linear::new(layer, w, Some(b)))
    }

    pub fn norm_scale(&self, layer: &str, dim: usize) -> Result<Tensor> {
        if let Some(s) = self.random_tensor(&[dim], 1.0)? {
            return Ok(s);
        }
        let s = self.tensor(layer, "scale")?;
        if s.dims() != [dim] {
            bail!(
                "FLUX norm `{layer}` has shape {:?}, expected [{dim}]",
                s.dims()
            );
        }
        Ok(s)
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
