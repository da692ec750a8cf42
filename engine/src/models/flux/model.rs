//! The FLUX.1 rectified-flow transformer (double-stream then single-stream blocks), written
//! against BFL's layer names. Every linear layer is the adapter-aware [`Linear`]; every op takes the path
//! of the [`Kernels`] the model is built with.

use super::{FluxConfig, FluxWeights};
use crate::models::linear::Linear;
use crate::ops::qkv::{self, QkScales, Rope};
use crate::ops::{activation, attention, norm, residual, Kernels};
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};

/// Sinusoidal embedding of `t` ∈ [0, 1] (FLUX scales it by 1000 first), `[cos | sin]`. As in Black
/// Forest Labs' and diffusers' code, `t` is cast to the model's dtype and scaled in it (in bf16,
/// guidance 3.5 becomes 3504, a timestep of 0.7595 becomes 756): the embedding both references
/// give the model. No change in f32.
pub fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> candle_core::Result<Tensor> {
    const TIME_FACTOR: f64 = 1000.0;
    const MAX_PERIOD: f64 = 10_000.0;
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-MAX_PERIOD.ln() * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    // The product of a bf16/f16 value and 1000 is exact in f32; rounding it is the dtype's multiply.
    let t = t.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let args = (t * TIME_FACTOR)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(dtype)
}

/// cos/sin tables (positions × head_dim/2) of FLUX's 3-axis RoPE for position ids (L, 3), in f32
/// whatever the model's dtype: Black Forest Labs' and diffusers' code keep them in f32 and rotate
/// q and k in f32, so a bf16 model sees the rotation they give it.
pub fn rope_tables(ids: &Tensor, cfg: &FluxConfig) -> Result<(Tensor, Tensor)> {
    let ids = ids.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let half = cfg.head_dim() / 2;
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for pos in &ids {
        for (axis, &d) in cfg.axes_dims.iter().enumerate() {
            for j in 0..d / 2 {
                let omega = 1.0 / cfg.theta.powf(2.0 * j as f64 / d as f64);
                let angle = pos[axis] * omega;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let n = ids.len();
    let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu)?;
    let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu)?;
    Ok((cos, sin))
}

/// Position ids of a packed latent grid: (0, row, col) per token, row-major.
pub fn image_ids(rows: usize, cols: usize, device: &Device) -> candle_core::Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Tensor::from_vec(ids, (rows * cols, 3), device)
}

/// Text tokens all sit at position 0 on every axis.
pub fn text_ids(len: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((len, 3), DType::F32, device)
}

/// Everything the transformer reads in one denoising step.
pub struct FluxInputs<'a> {
    /// Packed noisy latents (B, L, in_channels).
    pub img: &'a Tensor,
    pub img_ids: &'a Tensor,
    /// T5 hidden states (B, T, context_dim).
    pub txt: &'a Tensor,
    pub txt_ids: &'a Tensor,
    /// Flow time in [0, 1] (B,): 1 is pure noise.
    pub timesteps: &'a Tensor,
    /// CLIP pooled output (B, vec_dim).
    pub y: &'a Tensor,
    /// Embedded guidance scale (B,), for guidance-distilled models.
    pub guidance: Option<&'a Tensor>,
}

impl<'a> FluxInputs<'a> {
    /// The inputs as diffusers' `FluxTransformer2DModel.forward` names them (`hidden_states`,
    /// `encoder_hidden_states`, `timestep`, ...), as the parity fixtures and the GPU bench store
    /// them; `guidance` when present.
    pub fn from_diffusers_names(r: &'a std::collections::HashMap<String, Tensor>) -> Self {
        Self {
            img: &r["hidden_states"],
            img_ids: &r["img_ids"],
            txt: &r["encoder_hidden_states"],
            txt_ids: &r["txt_ids"],
            timesteps: &r["timestep"],
            y: &r["pooled_projections"],
            guidance: r.get("guidance"),
        }
    }
}

struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn load(w: &FluxWeights, name: &str, in_dim: usize, hidden: usize, k: Kernels) -> Result<Self> {
        Ok(Self {
            in_layer: w.linear(&format!("{name}.in_layer"), in_dim, hidden, k)?,
            out_layer: w.linear(&format!("{name}.out_layer"), hidden, hidden, k)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }
}

/// Projects `silu(vec)` to `n` modulation vectors of (B, 1, hidden).
pub(crate) struct Modulation {
    pub(crate) lin: Linear,
    pub(crate) n: usize,
}

impl Modulation {
    fn load(w: &FluxWeights, name: &str, hidden: usize, n: usize, k: Kernels) -> Result<Self> {
        Ok(Self {
            lin: w.linear(name, hidden, n * hidden, k)?,
            n,
        })
    }

    pub(crate) fn forward(&self, vec: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.lin
            .forward(&vec.silu()?)?
            .unsqueeze(1)?
            .chunk(self.n, D::Minus1)
    }
}

/// The q and k RMS-norm scales of one attention.
fn qk_norm(w: &FluxWeights, prefix: &str, head_dim: usize) -> Result<QkScales> {
    Ok(QkScales::new(
        w.norm_scale(&format!("{prefix}.query_norm"), head_dim)?,
        w.norm_scale(&format!("{prefix}.key_norm"), head_dim)?,
    )?)
}

pub(crate) struct Mlp {
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) kernels: Kernels,
}

impl Mlp {
    fn load(
        w: &FluxWeights,
        prefix: &str,
        hidden: usize,
        mlp_hidden: usize,
        k: Kernels,
    ) -> Result<Self> {
        Ok(Self {
            fc1: w.linear(&format!("{prefix}.0"), hidden, mlp_hidden, k)?,
            fc2: w.linear(&format!("{prefix}.2"), mlp_hidden, hidden, k)?,
            kernels: k,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2
            .forward(&activation::gelu(self.kernels, &self.fc1.forward(x)?)?)
    }
}

/// One stream (image or text) of a double block.
pub(crate) struct Stream {
    pub(crate) modulation: Modulation,
    pub(crate) qkv: Linear,
    pub(crate) norm: QkScales,
    pub(crate) proj: Linear,
    pub(crate) mlp: Mlp,
}

impl Stream {
    fn load(
        w: &FluxWeights,
        block: &str,
        which: &str,
        cfg: &FluxConfig,
        k: Kernels,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            modulation: Modulation::load(w, &format!("{block}.{which}_mod.lin"), h, 6, k)?,
            qkv: w.linear(&format!("{block}.{which}_attn.qkv"), h, 3 * h, k)?,
            norm: qk_norm(w, &format!("{block}.{which}_attn.norm"), cfg.head_dim())?,
            proj: w.linear(&format!("{block}.{which}_attn.proj"), h, h, k)?,
            mlp: Mlp::load(w, &format!("{block}.{which}_mlp"), h, cfg.mlp_hidden(), k)?,
        })
    }

    fn linears(&self) -> [&Linear; 5] {
        [
            &self.modulation.lin,
            &self.qkv,
            &self.proj,
            &self.mlp.fc1,
            &self.mlp.fc2,
        ]
    }
}

/// Where each linear layer goes as a transformer is placed: whole blocks streamed, from the first,
/// until `left` bytes are; every other layer resident on `device`.
struct Placer<'a> {
    device: &'a Device,
    left: u64,
}

impl Placer<'_> {
    fn place(&mut self, linears: &[&Linear], streamable: bool) -> Result<()> {
        let stream = streamable && self.left > 0;
        for l in linears {
            l.place(self.device, stream)?;
            if stream {
                self.left = self.left.saturating_sub(l.bytes() as u64);
            }
        }
        Ok(())
    }
}

pub(crate) struct DoubleBlock {
    pub(crate) img: Stream,
    pub(crate) txt: Stream,
    pub(crate) kernels: Kernels,
}

impl DoubleBlock {
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut out = self.img.linears().to_vec();
        out.extend(self.txt.linears());
        out
    }

    /// The heads of the joint attention over `[text | image]` from each stream's q|k|v rows: q, k, v
    /// (B, H, L, D). Text tokens come first, as in the position ids.
    pub(crate) fn joint_heads(
        &self,
        txt_qkv: &Tensor,
        img_qkv: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> candle_core::Result<[Tensor; 3]> {
        let (t_len, i_len) = (txt_qkv.dim(1)?, img_qkv.dim(1)?);
        let kn = self.kernels;
        let (tq, tk, tv) =
            qkv::qkv_heads(kn, txt_qkv, heads, &self.txt.norm, &rope.rows(0, t_len)?)?;
        let (iq, ik, iv) = qkv::qkv_heads(
            kn,
            img_qkv,
            heads,
            &self.img.norm,
            &rope.rows(t_len, i_len)?,
        )?;
        Ok([
            Tensor::cat(&[&tq, &iq], 2)?,
            Tensor::cat(&[&tk, &ik], 2)?,
            Tensor::cat(&[&tv, &iv], 2)?,
        ])
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let kn = self.kernels;
        let im = self.img.modulation.forward(vec)?;
        let tm = self.txt.modulation.forward(vec)?;
        let img_in = norm::norm_modulate(kn, img, &im[0], &im[1])?;
        let txt_in = norm::norm_modulate(kn, txt, &tm[0], &tm[1])?;
        // Text tokens come first in the joint sequence, as in the position ids.
        let (t_len, i_len) = (txt.dim(1)?, img.dim(1)?);
        let [q, k, v] = self.joint_heads(
            &self.txt.qkv.forward(&txt_in)?,
            &self.img.qkv.forward(&img_in)?,
            rope,
            heads,
        )?;
        let attn = attention::attention(kn, &q, &k, &v)?;
        let txt_attn = attn.narrow(1, 0, t_len)?;
        let img_attn = attn.narrow(1, t_len, i_len)?;

        let img = residual::gated_add(kn, img, &self.img.proj.forward(&img_attn)?, &im[2])?;
        let img_mlp = self
            .img
            .mlp
            .forward(&norm::norm_modulate(kn, &img, &im[3], &im[4])?)?;
        let img = residual::gated_add(kn, &img, &img_mlp, &im[5])?;

        let txt = residual::gated_add(kn, txt, &self.txt.proj.forward(&txt_attn)?, &tm[2])?;
        let txt_mlp = self
            .txt
            .mlp
            .forward(&norm::norm_modulate(kn, &txt, &tm[3], &tm[4])?)?;
        let txt = residual::gated_add(kn, &txt, &txt_mlp, &tm[5])?;
        Ok((img, txt))
    }
}

pub(crate) struct SingleBlock {
    pub(crate) modulation: Modulation,
    pub(crate) linear1: Linear,
    pub(crate) linear2: Linear,
    pub(crate) norm: QkScales,
    pub(crate) kernels: Kernels,
}

impl SingleBlock {
    fn load(w: &FluxWeights, i: usize, cfg: &FluxConfig, k: Kernels) -> Result<Self> {
        let p = format!("single_blocks.{i}");
        let h = cfg.hidden_size;
        let m = cfg.mlp_hidden();
        Ok(Self {
            modulation: Modulation::load(w, &format!("{p}.modulation.lin"), h, 3, k)?,
            linear1: w.linear(&format!("{p}.linear1"), h, 3 * h + m, k)?,
            linear2: w.linear(&format!("{p}.linear2"), h + m, h, k)?,
            norm: qk_norm(w, &format!("{p}.norm"), cfg.head_dim())?,
            kernels: k,
        })
    }

    pub(crate) fn linears(&self) -> [&Linear; 3] {
        [&self.modulation.lin, &self.linear1, &self.linear2]
    }

    fn forward(
        &self,
        x: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        let kn = self.kernels;
        let m = self.modulation.forward(vec)?;
        let x_mod = norm::norm_modulate(kn, x, &m[0], &m[1])?;
        // linear1's output is q | k | v | mlp; qkv_heads reads the first three.
        let h1 = self.linear1.forward(&x_mod)?;
        let three_hidden = 3 * x.dim(D::Minus1)?;
        let mlp_len = h1.dim(D::Minus1)? - three_hidden;
        let mlp = h1.narrow(D::Minus1, three_hidden, mlp_len)?;
        let (q, k, v) = qkv::qkv_heads(kn, &h1, heads, &self.norm, rope)?;
        let attn = attention::attention(kn, &q, &k, &v)?;
        let out = self
            .linear2
            .forward(&activation::gelu_cat(kn, &attn, &mlp)?)?;
        residual::gated_add(kn, x, &out, &m[2])
    }
}

pub struct FluxTransformer {
    cfg: FluxConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    pub(crate) double_blocks: Vec<DoubleBlock>,
    pub(crate) single_blocks: Vec<SingleBlock>,
    final_modulation: Linear,
    final_linear: Linear,
    dtype: DType,
    device: Device,
    kernels: Kernels,
}

impl FluxTransformer {
    /// The transformer of `cfg` from `w`, computing in `dtype` on `device`, its ops taking the path
    /// `kernels` says; every weight on `device`.
    pub fn load(
        w: &FluxWeights,
        cfg: &FluxConfig,
        dtype: DType,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        Self::load_streaming(w, cfg, dtype, device, kernels, 0)
    }

    /// [`Self::load`] with at least `streamed` bytes of its blocks' linear weights kept in host
    /// memory and copied to `device` as each layer runs (whole blocks, from the first; the memory
    /// plan's [`crate::memory::Placement::Streamed`]). Each block is placed as soon as it is read, so
    /// the GPU never holds more than the resident weights and one block.
    pub fn load_streaming(
        w: &FluxWeights,
        cfg: &FluxConfig,
        dtype: DType,
        device: &Device,
        kernels: Kernels,
        streamed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let k = kernels;
        let mut placer = Placer {
            device,
            left: streamed,
        };
        let mut place = |linears: &[&Linear], streamable: bool| placer.place(linears, streamable);
        let guidance_in = if cfg.guidance_embed {
            Some(MlpEmbedder::load(w, "guidance_in", 256, h, k)?)
        } else {
            None
        };
        let mut double_blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let p = format!("double_blocks.{i}");
            let block = DoubleBlock {
                img: Stream::load(w, &p, "img", cfg, k)?,
                txt: Stream::load(w, &p, "txt", cfg, k)?,
                kernels: k,
            };
            place(&block.linears(), true)?;
            double_blocks.push(block);
        }
        let mut single_blocks = Vec::with_capacity(cfg.depth_single);
        for i in 0..cfg.depth_single {
            let block = SingleBlock::load(w, i, cfg, k)?;
            place(&block.linears(), true)?;
            single_blocks.push(block);
        }
        let model = Self {
            cfg: cfg.clone(),
            img_in: w.linear("img_in", cfg.in_channels, h, k)?,
            txt_in: w.linear("txt_in", cfg.context_dim, h, k)?,
            time_in: MlpEmbedder::load(w, "time_in", 256, h, k)?,
            vector_in: MlpEmbedder::load(w, "vector_in", cfg.vec_dim, h, k)?,
            guidance_in,
            double_blocks,
            single_blocks,
            final_modulation: w.linear("final_layer.adaLN_modulation.1", h, 2 * h, k)?,
            final_linear: w.linear("final_layer.linear", h, cfg.out_channels(), k)?,
            dtype,
            device: device.clone(),
            kernels,
        };
        place(&model.head_linears(), false)?;
        place(&[&model.final_modulation, &model.final_linear], false)?;
        Ok(model)
    }

    /// Places every linear layer again, as [`Self::load_streaming`] would have: on `device`, with whole
    /// blocks from the first streamed from host memory until `streamed` bytes are. A transformer
    /// loaded onto the host and placed here afterwards comes to the GPU in one run of allocations
    /// (the weights made on the GPU as it loaded, fp8 or GGUF, would otherwise lie between the freed
    /// full-precision copies they were made from, which the GPU's memory pool then cannot give back).
    pub fn place(&mut self, device: &Device, streamed: u64) -> Result<()> {
        self.place_linears(device, streamed)?;
        self.device = device.clone();
        Ok(())
    }

    /// Streams `streamed` bytes of the blocks from host memory from now on (whole blocks, from the
    /// first), the rest resident on the transformer's device: a training step that needs more memory
    /// than generation streams more of it while it trains ([`crate::memory::MemoryPlan::training_streamed`]).
    pub fn stream(&self, streamed: u64) -> Result<()> {
        self.place_linears(&self.device, streamed)
    }

    fn place_linears(&self, device: &Device, streamed: u64) -> Result<()> {
        let mut placer = Placer {
            device,
            left: streamed,
        };
        for block in &self.double_blocks {
            placer.place(&block.linears(), true)?;
        }
        for block in &self.single_blocks {
            placer.place(&block.linears(), true)?;
        }
        placer.place(&self.head_linears(), false)?;
        placer.place(&[&self.final_modulation, &self.final_linear], false)
    }

    /// The bytes of linear weights streamed from host memory at each forward.
    pub fn streamed_bytes(&self) -> u64 {
        self.linears()
            .iter()
            .filter(|l| l.is_streamed())
            .map(|l| l.bytes() as u64)
            .sum()
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The linear layers before the first block: the embedders of the inputs, the time and the guidance.
    pub(crate) fn head_linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.img_in, &self.txt_in];
        for e in [
            Some(&self.time_in),
            Some(&self.vector_in),
            self.guidance_in.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            out.extend([&e.in_layer, &e.out_layer]);
        }
        out
    }

    /// Multiplies every linear layer by an fp8 copy of its weight, or (`false`) by the weight again
    /// ([`Linear::set_fp8_products`]).
    pub fn set_fp8_products(&self, on: bool) {
        for linear in self.linears() {
            linear.set_fp8_products(on);
        }
    }

    /// Every linear layer, for LoRA placement and training.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = self.head_linears();
        for b in &self.double_blocks {
            out.extend(b.linears());
        }
        for b in &self.single_blocks {
            out.extend(b.linears());
        }
        out.extend([&self.final_modulation, &self.final_linear]);
        out
    }

    /// The conditioning vector (time, guidance, pooled text) and the embedded image and text tokens.
    pub(crate) fn head(&self, x: &FluxInputs) -> Result<(Tensor, Tensor, Tensor)> {
        let dt = self.dtype;
        let mut vec = self
            .time_in
            .forward(&timestep_embedding(x.timesteps, 256, dt)?)?;
        match (&self.guidance_in, x.guidance) {
            (Some(g_in), Some(g)) => {
                vec = (vec + g_in.forward(&timestep_embedding(g, 256, dt)?)?)?;
            }
            (Some(_), None) => {
                anyhow::bail!("this FLUX model is guidance-distilled and needs a guidance value")
            }
            (None, _) => {}
        }
        vec = (vec + self.vector_in.forward(&x.y.to_dtype(dt)?)?)?;
        let img = self.img_in.forward(&x.img.to_dtype(dt)?)?;
        let txt = self.txt_in.forward(&x.txt.to_dtype(dt)?)?;
        Ok((vec, img, txt))
    }

    pub(crate) fn rope(&self, x: &FluxInputs) -> Result<Rope> {
        let ids = Tensor::cat(&[x.txt_ids, x.img_ids], 0)?;
        let (cos, sin) = rope_tables(&ids, &self.cfg)?;
        Ok(Rope::new(
            cos.to_device(&self.device)?,
            sin.to_device(&self.device)?,
        )?)
    }

    /// The final modulation and projection of the image tokens of the joint sequence `x_all`.
    pub(crate) fn tail(&self, x_all: &Tensor, t_len: usize, vec: &Tensor) -> Result<Tensor> {
        // A batch of several makes this slice strided; the norm's fused kernel needs it whole.
        let img = x_all
            .narrow(1, t_len, x_all.dim(1)? - t_len)?
            .contiguous()?;
        self.final_layer(&img, vec)
    }

    /// The final modulation and projection of the image tokens.
    fn final_layer(&self, img: &Tensor, vec: &Tensor) -> Result<Tensor> {
        let m = self
            .final_modulation
            .forward(&vec.silu()?)?
            .unsqueeze(1)?
            .chunk(2, D::Minus1)?;
        let img = norm::norm_modulate(self.kernels, img, &m[0], &m[1])?;
        Ok(self.final_linear.forward(&img)?)
    }

    /// The predicted velocity (B, L, out_channels) for the noisy packed latents.
    pub fn forward(&self, x: &FluxInputs) -> Result<Tensor> {
        let first = self.first_block(x)?;
        let img = self.remaining_blocks(&first)?;
        self.velocity(&img, &first)
    }

    /// The embeddings and the first double block: the part of a step that a step cache
    /// (`sampling::step_cache`) always runs, to judge from it whether the rest can be reused.
    pub fn first_block(&self, x: &FluxInputs) -> Result<FirstBlock> {
        self.prefetch_block(0)?;
        let (vec, img_in, txt) = self.head(x)?;
        let rope = self.rope(x)?;
        let (img, txt) = match self.double_blocks.first() {
            Some(block) => {
                self.prefetch_block(1)?;
                block.forward(&img_in, &txt, &vec, &rope, self.cfg.num_heads)?
            }
            // A model of single blocks only (one block measured alone): nothing comes before them.
            None => (img_in.clone(), txt),
        };
        Ok(FirstBlock {
            img_in,
            img,
            txt,
            vec,
            rope,
        })
    }

    /// The image tokens after every block following the first.
    pub fn remaining_blocks(&self, first: &FirstBlock) -> Result<Tensor> {
        let heads = self.cfg.num_heads;
        let (vec, rope) = (&first.vec, &first.rope);
        let (mut img, mut txt) = (first.img.clone(), first.txt.clone());
        for (i, b) in self.double_blocks.iter().enumerate().skip(1) {
            self.prefetch_block(i + 1)?;
            (img, txt) = b.forward(&img, &txt, vec, rope, heads)?;
        }
        let t_len = txt.dim(1)?;
        let mut x_all = Tensor::cat(&[&txt, &img], 1)?;
        let singles = self.double_blocks.len();
        for (i, b) in self.single_blocks.iter().enumerate() {
            self.prefetch_block(singles + i + 1)?;
            x_all = b.forward(&x_all, vec, rope, heads)?;
        }
        // A batch of several makes this slice strided; the norm's fused kernel needs it whole.
        Ok(x_all
            .narrow(1, t_len, x_all.dim(1)? - t_len)?
            .contiguous()?)
    }

    /// Starts copying the streamed layers of block `i` (the double blocks, then the single ones) to
    /// the GPU ([`Linear::prefetch`]): called as block `i - 1` starts, so that the copy runs while it
    /// computes. Resident blocks have nothing to copy.
    fn prefetch_block(&self, i: usize) -> Result<()> {
        let doubles = self.double_blocks.len();
        let linears = match (self.double_blocks.get(i), i.checked_sub(doubles)) {
            (Some(b), _) => b.linears(),
            (None, Some(j)) if j < self.single_blocks.len() => {
                self.single_blocks[j].linears().to_vec()
            }
            _ => return Ok(()),
        };
        for l in linears {
            l.prefetch()?;
        }
        Ok(())
    }

    /// The velocity from the image tokens after the last block.
    pub fn velocity(&self, img: &Tensor, first: &FirstBlock) -> Result<Tensor> {
        self.final_layer(img, &first.vec)
    }
}

/// A step after the first double block (see [`FluxTransformer::first_block`]).
pub struct FirstBlock {
    /// The image tokens entering the first block.
    img_in: Tensor,
    /// The image tokens leaving it.
    img: Tensor,
    txt: Tensor,
    vec: Tensor,
    rope: Rope,
}

impl FirstBlock {
    /// The image tokens leaving the first block.
    pub fn img(&self) -> &Tensor {
        &self.img
    }

    /// What the first block added to the image tokens: a step cache compares it between steps.
    pub fn img_residual(&self) -> Result<Tensor> {
        Ok((&self.img - &self.img_in)?)
    }
}
