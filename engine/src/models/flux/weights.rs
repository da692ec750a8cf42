//! Reads FLUX transformer weights from either checkpoint layout into BFL-named layers, its linear
//! layers' weights in the format they are stored in (bf16, fp8, GGUF blocks) or the one asked for.

use super::layout::{diffusers_parts, DiffusersParts};
use crate::models::linear::{Linear, QuantizedWeight};
use crate::ops::Kernels;
use crate::weights::WeightFormat;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The prefix ComfyUI's single files put before BFL's names.
const COMFY_PREFIX: &str = "model.diffusion_model.";

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
    /// Where linear layers' weights are read as they are stored when that is not the compute dtype.
    stored: Stored,
    /// The format loading makes of the linear layers' weights; `None` keeps each as stored.
    format: Option<WeightFormat>,
}

/// Linear layers' weights as a checkpoint stores them, beside the converting [`VarBuilder`].
enum Stored {
    /// Everything is read through the `VarBuilder`.
    Dense,
    /// BFL-layout safetensors files, read raw so that `F8_E4M3` weights stay fp8: BFL's and
    /// ComfyUI's fp8 releases. `prefix` is ComfyUI's `model.diffusion_model.` or empty.
    Safetensors {
        st: Arc<MmapedSafetensors>,
        prefix: &'static str,
    },
    /// A GGUF file's quantized tensors by BFL name (city96's FLUX GGUF files); its F32, F16 and
    /// BF16 tensors are in the `VarBuilder`.
    Gguf(HashMap<String, Arc<QTensor>>),
}

impl FluxWeights {
    /// Opens a FLUX transformer: a BFL or ComfyUI single file (bf16 or fp8), a diffusers
    /// `transformer/` folder, or a GGUF file (or a folder holding one). Linear layers come as
    /// stored unless [`Self::in_format`] asks for another format.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let read = || -> Result<Self> {
            if let Some(file) = crate::weights::gguf_file(path)? {
                return Self::open_gguf(&file, dtype, device);
            }
            let vb = crate::weights::var_builder(path, dtype, device)?;
            let mut weights = Self::from_var_builder(vb)?;
            let files = crate::weights::safetensors_files(path)?;
            // SAFETY: as `var_builder`'s: model files are not written while a model is alive.
            let st = Arc::new(unsafe { MmapedSafetensors::multi(&files)? });
            weights.stored = match weights.layout {
                Layout::Bfl => {
                    let prefix = if st.get(&format!("{COMFY_PREFIX}img_in.weight")).is_ok() {
                        COMFY_PREFIX
                    } else {
                        ""
                    };
                    Stored::Safetensors { st, prefix }
                }
                Layout::Diffusers => {
                    if st
                        .get("x_embedder.weight")
                        .is_ok_and(|t| t.dtype() == safetensors::Dtype::F8_E4M3)
                        || st
                            .get("transformer_blocks.0.attn.to_q.weight")
                            .is_ok_and(|t| t.dtype() == safetensors::Dtype::F8_E4M3)
                    {
                        bail!("fp8 weights in a diffusers folder are not read: use the BFL or ComfyUI single file with --transformer-file");
                    }
                    Stored::Dense
                }
            };
            Ok(weights)
        };
        read().with_context(|| format!("reading the FLUX transformer at {}", path.display()))
    }

    /// Linear layers made in `format` as they load (fp8 by a per-tensor absmax scale, GGUF blocks
    /// by candle's quantizer), or kept as stored when it is `None`.
    pub fn in_format(mut self, format: Option<WeightFormat>) -> Self {
        self.format = format;
        self
    }

    /// Whether the linear layers load in a quantized format (fp8, GGUF): made where the weights are
    /// read, from full-precision copies, unless the checkpoint stores them so.
    pub fn quantizes(&self) -> bool {
        self.format.is_some_and(|f| f != WeightFormat::Bf16)
    }

    /// A GGUF file in BFL's names, as city96's FLUX GGUF files ship: its quantized tensors stay
    /// quantized (in host memory until the transformer places them), its F32, F16 and BF16 ones are
    /// read as `dtype` on `device`.
    fn open_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a readable GGUF file ({e}); download it again",
                path.display()
            )
        })?;
        let (mut dense, mut quantized) = (HashMap::new(), HashMap::new());
        for name in content.tensor_infos.keys() {
            // Into host memory: the transformer places each layer (on the GPU, or left in host
            // memory to be streamed) as it builds it, so a file larger than the GPU still loads.
            let q = content.tensor(&mut file, name, &Device::Cpu)?;
            let name = name.strip_prefix(COMFY_PREFIX).unwrap_or(name).to_string();
            match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    dense.insert(name, q.dequantize(device)?);
                }
                _ => {
                    quantized.insert(name, Arc::new(q));
                }
            }
        }
        if !(dense.contains_key("img_in.weight") || quantized.contains_key("img_in.weight"))
            || !dense.contains_key("double_blocks.0.img_attn.norm.query_norm.scale")
        {
            bail!("not a FLUX transformer GGUF file: BFL's tensor names (img_in, double_blocks.0.img_attn.qkv, ...) are not present");
        }
        Ok(Self {
            vb: VarBuilder::from_tensors(dense, dtype, device),
            layout: Layout::Bfl,
            stored: Stored::Gguf(quantized),
            format: None,
        })
    }

    /// The layout is told by the image embedder's name, which every FLUX transformer has whatever its
    /// blocks (a model of single blocks only included).
    pub fn from_var_builder(vb: VarBuilder<'static>) -> Result<Self> {
        let (vb, layout) = if vb.contains_tensor("img_in.weight") {
            (vb, Layout::Bfl)
        } else if vb.contains_tensor("model.diffusion_model.img_in.weight") {
            (vb.pp("model.diffusion_model"), Layout::Bfl)
        } else if vb.contains_tensor("x_embedder.weight") {
            (vb, Layout::Diffusers)
        } else {
            bail!("not a FLUX transformer checkpoint: neither BFL keys (img_in, double_blocks.0.img_attn.qkv, ...) nor diffusers keys (x_embedder, transformer_blocks.0.attn.to_q, ...) are present")
        };
        Ok(Self {
            vb,
            layout,
            stored: Stored::Dense,
            format: None,
        })
    }

    /// A layer's weight as the checkpoint stores it, when that is quantized (fp8, GGUF blocks).
    fn stored_weight(&self, layer: &str) -> Result<Option<QuantizedWeight>> {
        let name = format!("{layer}.weight");
        match &self.stored {
            Stored::Dense => Ok(None),
            Stored::Gguf(q) => Ok(q.get(&name).cloned().map(QuantizedWeight::Gguf)),
            Stored::Safetensors { st, prefix } => {
                let full = format!("{prefix}{name}");
                // A missing weight is reported by the dense path, with the shape expected.
                if !st
                    .get(&full)
                    .is_ok_and(|t| t.dtype() == safetensors::Dtype::F8_E4M3)
                {
                    return Ok(None);
                }
                let weight = st.load(&full, self.vb.device())?;
                // ComfyUI's "scaled fp8" files write `<layer>.scale_weight` (and a `scaled_fp8`
                // marker); other exporters `<layer>.weight_scale`; BFL's fp8 files none (scale 1).
                let mut scale = 1.0;
                for suffix in ["scale_weight", "weight_scale"] {
                    let Ok(s) = st.load(&format!("{prefix}{layer}.{suffix}"), &Device::Cpu) else {
                        continue;
                    };
                    let s = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let [s] = s.as_slice() else {
                        bail!("`{layer}.{suffix}` holds {} scales: only per-tensor fp8 scales are read", s.len());
                    };
                    scale = *s;
                    break;
                }
                Ok(Some(QuantizedWeight::Fp8 { weight, scale }))
            }
        }
    }

    /// The shape of a layer's weight, read without loading it where the file says it.
    fn weight_dims(&self, layer: &str) -> Result<Vec<usize>> {
        let name = format!("{layer}.weight");
        match &self.stored {
            Stored::Gguf(q) if q.contains_key(&name) => Ok(q[&name].shape().dims().to_vec()),
            Stored::Safetensors { st, prefix } => {
                Ok(st.get(&format!("{prefix}{name}"))?.shape().to_vec())
            }
            _ => Ok(self.tensor(layer, "weight")?.dims().to_vec()),
        }
    }

    pub fn contains(&self, layer: &str) -> bool {
        match self.layout {
            Layout::Bfl => {
                self.vb.contains_tensor(&format!("{layer}.weight"))
                    || self.vb.contains_tensor(&format!("{layer}.scale"))
                    || matches!(&self.stored, Stored::Gguf(q) if q.contains_key(&format!("{layer}.weight")))
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
        let b = self.shaped(layer, "bias", &[out_dim])?;
        let dtype = self.vb.dtype();
        let w = match self.stored_weight(layer)? {
            Some(q) => {
                if q.dims()? != (out_dim, in_dim) {
                    bail!(
                        "FLUX layer `{layer}` has a weight of shape {:?}, the config expects {:?}",
                        q.dims()?,
                        (out_dim, in_dim)
                    );
                }
                match self.format {
                    None => return Ok(Linear::quantized(layer, q, Some(b), kernels)?),
                    Some(f) if f == q.format() => {
                        return Ok(Linear::quantized(layer, q, Some(b), kernels)?)
                    }
                    // Another format: from the stored weight's values.
                    Some(_) => q.dequantize(DType::F32)?,
                }
            }
            None => self.shaped(layer, "weight", &[out_dim, in_dim])?,
        };
        let made = match self.format {
            Some(f) => QuantizedWeight::from_dense(&w, f)?,
            None => None,
        };
        Ok(match made {
            Some(q) => Linear::quantized(layer, q, Some(b), kernels)?,
            // bf16, or a layer whose rows do not split into the format's blocks.
            None => Linear::new(layer, w.to_dtype(dtype)?, Some(b), kernels),
        })
    }

    pub fn norm_scale(&self, layer: &str, dim: usize) -> Result<Tensor> {
        self.shaped(layer, "scale", &[dim])
    }

    /// Guesses the config of a BFL single file from its tensor shapes. The RoPE axes cannot be
    /// read off the weights: FLUX's own split is used when the head dimension is FLUX's (128).
    pub fn infer_config(&self) -> Result<super::FluxConfig> {
        let dims = |layer: &str| self.weight_dims(layer);
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
        let out_channels = dims("final_layer.linear")?[0];
        let cfg = super::FluxConfig {
            in_channels,
            out_channels: (out_channels != in_channels).then_some(out_channels),
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
