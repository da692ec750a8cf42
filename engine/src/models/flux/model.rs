//! The FLUX.1 rectified-flow transformer (double-stream then single-stream blocks), written
//! against BFL's layer names. Every linear layer is the adapter-aware [`Linear`].

use super::backward::{BlockGrads, DoubleSaved, SingleSaved};
use super::{FluxConfig, FluxWeights};
use crate::models::fused::{self, QkScales, Rope};
use crate::models::linear::Linear;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, TensorId, Var, D};
use std::collections::HashSet;

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

/// cos/sin tables (positions × head_dim/2) of FLUX's 3-axis RoPE for position ids (L, 3).
pub fn rope_tables(ids: &Tensor, cfg: &FluxConfig, dtype: DType) -> Result<(Tensor, Tensor)> {
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
    let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu)?.to_dtype(dtype)?;
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

struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn load(w: &FluxWeights, name: &str, in_dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            in_layer: w.linear(&format!("{name}.in_layer"), in_dim, hidden)?,
            out_layer: w.linear(&format!("{name}.out_layer"), hidden, hidden)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }
}

/// Projects `silu(vec)` to `n` modulation vectors of (B, 1, hidden).
pub(super) struct Modulation {
    pub(super) lin: Linear,
    pub(super) n: usize,
}

impl Modulation {
    fn load(w: &FluxWeights, name: &str, hidden: usize, n: usize) -> Result<Self> {
        Ok(Self {
            lin: w.linear(name, hidden, n * hidden)?,
            n,
        })
    }

    pub(super) fn forward(&self, vec: &Tensor) -> candle_core::Result<Vec<Tensor>> {
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

pub(super) struct Mlp {
    pub(super) fc1: Linear,
    pub(super) fc2: Linear,
}

impl Mlp {
    fn load(w: &FluxWeights, prefix: &str, hidden: usize, mlp_hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: w.linear(&format!("{prefix}.0"), hidden, mlp_hidden)?,
            fc2: w.linear(&format!("{prefix}.2"), mlp_hidden, hidden)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&fused::gelu(&self.fc1.forward(x)?)?)
    }
}

/// One stream (image or text) of a double block.
pub(super) struct Stream {
    pub(super) modulation: Modulation,
    pub(super) qkv: Linear,
    pub(super) norm: QkScales,
    pub(super) proj: Linear,
    pub(super) mlp: Mlp,
}

impl Stream {
    fn load(w: &FluxWeights, block: &str, which: &str, cfg: &FluxConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            modulation: Modulation::load(w, &format!("{block}.{which}_mod.lin"), h, 6)?,
            qkv: w.linear(&format!("{block}.{which}_attn.qkv"), h, 3 * h)?,
            norm: qk_norm(w, &format!("{block}.{which}_attn.norm"), cfg.head_dim())?,
            proj: w.linear(&format!("{block}.{which}_attn.proj"), h, h)?,
            mlp: Mlp::load(w, &format!("{block}.{which}_mlp"), h, cfg.mlp_hidden())?,
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

pub(super) struct DoubleBlock {
    pub(super) img: Stream,
    pub(super) txt: Stream,
}

impl DoubleBlock {
    fn linears(&self) -> Vec<&Linear> {
        let mut out = self.img.linears().to_vec();
        out.extend(self.txt.linears());
        out
    }

    /// The heads of the joint attention over `[text | image]` from each stream's q|k|v rows: q, k, v
    /// (B, H, L, D). Text tokens come first, as in the position ids.
    pub(super) fn joint_heads(
        &self,
        txt_qkv: &Tensor,
        img_qkv: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> candle_core::Result<[Tensor; 3]> {
        let (t_len, i_len) = (txt_qkv.dim(1)?, img_qkv.dim(1)?);
        let (tq, tk, tv) = fused::qkv_heads(txt_qkv, heads, &self.txt.norm, &rope.rows(0, t_len)?)?;
        let (iq, ik, iv) =
            fused::qkv_heads(img_qkv, heads, &self.img.norm, &rope.rows(t_len, i_len)?)?;
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
        let im = self.img.modulation.forward(vec)?;
        let tm = self.txt.modulation.forward(vec)?;
        let img_in = fused::norm_modulate(img, &im[0], &im[1])?;
        let txt_in = fused::norm_modulate(txt, &tm[0], &tm[1])?;
        // Text tokens come first in the joint sequence, as in the position ids.
        let (t_len, i_len) = (txt.dim(1)?, img.dim(1)?);
        let [q, k, v] = self.joint_heads(
            &self.txt.qkv.forward(&txt_in)?,
            &self.img.qkv.forward(&img_in)?,
            rope,
            heads,
        )?;
        let attn = fused::attention(&q, &k, &v)?;
        let txt_attn = attn.narrow(1, 0, t_len)?;
        let img_attn = attn.narrow(1, t_len, i_len)?;

        let img = fused::gated_add(img, &self.img.proj.forward(&img_attn)?, &im[2])?;
        let img_mlp = self
            .img
            .mlp
            .forward(&fused::norm_modulate(&img, &im[3], &im[4])?)?;
        let img = fused::gated_add(&img, &img_mlp, &im[5])?;

        let txt = fused::gated_add(txt, &self.txt.proj.forward(&txt_attn)?, &tm[2])?;
        let txt_mlp = self
            .txt
            .mlp
            .forward(&fused::norm_modulate(&txt, &tm[3], &tm[4])?)?;
        let txt = fused::gated_add(&txt, &txt_mlp, &tm[5])?;
        Ok((img, txt))
    }
}

pub(super) struct SingleBlock {
    pub(super) modulation: Modulation,
    pub(super) linear1: Linear,
    pub(super) linear2: Linear,
    pub(super) norm: QkScales,
}

impl SingleBlock {
    fn load(w: &FluxWeights, i: usize, cfg: &FluxConfig) -> Result<Self> {
        let p = format!("single_blocks.{i}");
        let h = cfg.hidden_size;
        let m = cfg.mlp_hidden();
        Ok(Self {
            modulation: Modulation::load(w, &format!("{p}.modulation.lin"), h, 3)?,
            linear1: w.linear(&format!("{p}.linear1"), h, 3 * h + m)?,
            linear2: w.linear(&format!("{p}.linear2"), h + m, h)?,
            norm: qk_norm(w, &format!("{p}.norm"), cfg.head_dim())?,
        })
    }

    fn linears(&self) -> [&Linear; 3] {
        [&self.modulation.lin, &self.linear1, &self.linear2]
    }

    fn forward(
        &self,
        x: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        let m = self.modulation.forward(vec)?;
        let x_mod = fused::norm_modulate(x, &m[0], &m[1])?;
        // linear1's output is q | k | v | mlp; qkv_heads reads the first three.
        let h1 = self.linear1.forward(&x_mod)?;
        let three_hidden = 3 * x.dim(D::Minus1)?;
        let mlp_len = h1.dim(D::Minus1)? - three_hidden;
        let mlp = h1.narrow(D::Minus1, three_hidden, mlp_len)?;
        let (q, k, v) = fused::qkv_heads(&h1, heads, &self.norm, rope)?;
        let attn = fused::attention(&q, &k, &v)?;
        let out = self.linear2.forward(&fused::gelu_cat(&attn, &mlp)?)?;
        fused::gated_add(x, &out, &m[2])
    }
}

pub struct FluxTransformer {
    cfg: FluxConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    final_modulation: Linear,
    final_linear: Linear,
    dtype: DType,
    device: Device,
}

impl FluxTransformer {
    pub fn load(w: &FluxWeights, cfg: &FluxConfig, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let guidance_in = if cfg.guidance_embed {
            Some(MlpEmbedder::load(w, "guidance_in", 256, h)?)
        } else {
            None
        };
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                let p = format!("double_blocks.{i}");
                Ok(DoubleBlock {
                    img: Stream::load(w, &p, "img", cfg)?,
                    txt: Stream::load(w, &p, "txt", cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.depth_single)
            .map(|i| SingleBlock::load(w, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            img_in: w.linear("img_in", cfg.in_channels, h)?,
            txt_in: w.linear("txt_in", cfg.context_dim, h)?,
            time_in: MlpEmbedder::load(w, "time_in", 256, h)?,
            vector_in: MlpEmbedder::load(w, "vector_in", cfg.vec_dim, h)?,
            guidance_in,
            double_blocks,
            single_blocks,
            final_modulation: w.linear("final_layer.adaLN_modulation.1", h, 2 * h)?,
            final_linear: w.linear("final_layer.linear", h, cfg.in_channels)?,
            dtype,
            device: device.clone(),
        })
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

    /// The linear layers before the first block: the embedders of the inputs, the time and the guidance.
    fn head_linears(&self) -> Vec<&Linear> {
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
    fn head(&self, x: &FluxInputs) -> Result<(Tensor, Tensor, Tensor)> {
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

    fn rope(&self, x: &FluxInputs) -> Result<Rope> {
        let ids = Tensor::cat(&[x.txt_ids, x.img_ids], 0)?;
        let (cos, sin) = rope_tables(&ids, &self.cfg, self.dtype)?;
        Ok(Rope::new(
            cos.to_device(&self.device)?,
            sin.to_device(&self.device)?,
        )?)
    }

    /// The final modulation and projection of the image tokens of the joint sequence `x_all`.
    fn tail(&self, x_all: &Tensor, t_len: usize, vec: &Tensor) -> Result<Tensor> {
        // A batch of several makes this slice strided; the norm's fused kernel needs it whole.
        let img = x_all
            .narrow(1, t_len, x_all.dim(1)? - t_len)?
            .contiguous()?;
        let m = self
            .final_modulation
            .forward(&vec.silu()?)?
            .unsqueeze(1)?
            .chunk(2, D::Minus1)?;
        let img = fused::norm_modulate(&img, &m[0], &m[1])?;
        Ok(self.final_linear.forward(&img)?)
    }

    /// The predicted velocity (B, L, in_channels) for the noisy packed latents.
    pub fn forward(&self, x: &FluxInputs) -> Result<Tensor> {
        let (vec, mut img, mut txt) = self.head(x)?;
        let rope = self.rope(x)?;
        let heads = self.cfg.num_heads;
        for b in &self.double_blocks {
            (img, txt) = b.forward(&img, &txt, &vec, &rope, heads)?;
        }
        let t_len = txt.dim(1)?;
        let mut x_all = Tensor::cat(&[&txt, &img], 1)?;
        for b in &self.single_blocks {
            x_all = b.forward(&x_all, &vec, &rope, heads)?;
        }
        self.tail(&x_all, t_len, &vec)
    }

    /// LoRA training's forward pass alone, as [`Self::loss_and_grads`] runs it (no graph, the adapters
    /// unmerged and added into their rows in place) and keeping nothing: what `flux-bench train` times.
    pub fn training_forward(&self, x: &FluxInputs) -> Result<Tensor> {
        let (vec, img, txt) = self.head(x)?;
        let t_len = txt.dim(1)?;
        let (x_all, _, _) = self.forward_kept(&img, &txt, &vec, &self.rope(x)?, Keep::Nothing)?;
        self.tail(&x_all, t_len, &vec)
    }

    /// The blocks' training forward from the head's image and text tokens: the joint sequence after the
    /// last block, and what `keep` says to keep of each double and single block.
    #[allow(clippy::type_complexity)]
    fn forward_kept(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        keep: Keep,
    ) -> Result<(
        Tensor,
        Vec<Kept<(Tensor, Tensor), DoubleSaved>>,
        Vec<Kept<Tensor, SingleSaved>>,
    )> {
        let heads = self.cfg.num_heads;
        let (mut i, mut t) = (img.detach(), txt.detach());
        let mut doubles = Vec::with_capacity(self.double_blocks.len());
        for b in &self.double_blocks {
            let (ni, nt, saved) = b.forward_saved(&i, &t, vec, rope, heads)?;
            match keep {
                Keep::Nothing => {}
                Keep::Inputs => doubles.push(Kept::Input((i, t))),
                Keep::Saved => doubles.push(Kept::Saved(saved)),
            }
            (i, t) = (ni, nt);
        }
        let mut x_all = Tensor::cat(&[&t, &i], 1)?;
        let mut singles = Vec::with_capacity(self.single_blocks.len());
        for b in &self.single_blocks {
            let (y, saved) = b.forward_saved(&x_all, vec, rope, heads)?;
            match keep {
                Keep::Nothing => {}
                Keep::Inputs => singles.push(Kept::Input(x_all)),
                Keep::Saved => singles.push(Kept::Saved(saved)),
            }
            x_all = y;
        }
        Ok((x_all, doubles, singles))
    }

    /// `loss(forward(x))` (detached) and the gradients of the variables it depends on.
    ///
    /// A full fine-tune (the base weights are variables) takes candle's autograd over the whole pass. LoRA
    /// training takes the blocks' hand-written backward passes ([`super::backward`]): the forward keeps what
    /// each block's backward reads (with `checkpointing`, only each block's input, and the block is run
    /// again just before its backward), then the blocks are backpropagated from the last to the first.
    /// The head (embedders), the tail (final layer and loss) and the modulations, all small, keep candle's
    /// autograd. See docs/training.md.
    pub fn loss_and_grads(
        &self,
        x: &FluxInputs,
        loss: &dyn Fn(&Tensor) -> Result<Tensor>,
        checkpointing: bool,
    ) -> Result<(Tensor, GradStore)> {
        if self.linears().iter().any(|l| l.trains_weight()) {
            let l = loss(&self.forward(x)?)?;
            let grads = l.backward()?;
            return Ok((l.detach(), grads));
        }
        let heads = self.cfg.num_heads;
        let rope = self.rope(x)?;
        // Which blocks have a trained layer before them, and so must pass a gradient to their input.
        let head_trains = trains(&self.head_linears());
        let mut before = head_trains;
        let mut double_needs = Vec::with_capacity(self.double_blocks.len());
        for b in &self.double_blocks {
            double_needs.push(before);
            before |= trains(&b.linears());
        }
        let mut single_needs = Vec::with_capacity(self.single_blocks.len());
        for b in &self.single_blocks {
            single_needs.push(before);
            before |= trains(&b.linears());
        }
        let tail_needs = before;

        // The head keeps its graph (when it trains) until the blocks' gradients reach it. The blocks read
        // the conditioning vector through `vec_in`, whose gradient is summed over all of them in f32.
        let (vec, img, txt) = self.head(x)?;
        let vec_in = Input::new(&vec.detach(), head_trains)?;
        let t_len = txt.dim(1)?;
        let keep = if checkpointing {
            Keep::Inputs
        } else {
            Keep::Saved
        };
        let (x_all, doubles, singles) =
            self.forward_kept(&img, &txt, vec_in.tensor(), &rope, keep)?;

        let mut gathered = Gathered::new(self, &vec_in);
        let x_in = Input::new(&x_all, tail_needs)?;
        let l = loss(&self.tail(x_in.tensor(), t_len, vec_in.tensor())?)?;
        let mut grads = l.backward()?;
        // The final layer's graph goes now, not after the blocks.
        let l = l.detach();
        let mut x_grad = x_in.take_grad(&mut grads);
        gathered.keep(grads)?;

        for ((b, kept), needs) in self
            .single_blocks
            .iter()
            .zip(singles)
            .zip(single_needs)
            .rev()
        {
            let Some(g) = x_grad.take() else { break };
            let saved = match kept {
                Kept::Saved(s) => s,
                Kept::Input(x) => b.forward_saved(&x, vec_in.tensor(), &rope, heads)?.1,
            };
            let mut back = BlockGrads::default();
            let dx = b.backward(saved, &g, &rope, heads, &mut back)?;
            gathered.block(back)?;
            x_grad = needs.then_some(dx);
        }

        // The joint sequence was [text | image].
        let mut stream_grads = match x_grad {
            Some(g) => Some((
                g.narrow(1, t_len, g.dim(1)? - t_len)?,
                g.narrow(1, 0, t_len)?,
            )),
            None => None,
        };
        for ((b, kept), needs) in self
            .double_blocks
            .iter()
            .zip(doubles)
            .zip(double_needs)
            .rev()
        {
            let Some((g_img, g_txt)) = stream_grads.take() else {
                break;
            };
            let saved = match kept {
                Kept::Saved(s) => s,
                Kept::Input((i, t)) => b.forward_saved(&i, &t, vec_in.tensor(), &rope, heads)?.2,
            };
            let mut back = BlockGrads::default();
            let d = b.backward(saved, (&g_img, &g_txt), &rope, heads, &mut back)?;
            gathered.block(back)?;
            stream_grads = needs.then_some(d);
        }

        if head_trains {
            let vec_grad = gathered.vec_grad.take();
            let vec_grad = vec_grad.map(|g| g.to_dtype(vec.dtype())).transpose()?;
            let mut pairs = Vec::new();
            if let Some(g) = &vec_grad {
                pairs.push((&vec, g));
            }
            if let Some((g_img, g_txt)) = &stream_grads {
                pairs.extend([(&img, g_img), (&txt, g_txt)]);
            }
            gathered.keep(backprop(&pairs)?)?;
        }
        Ok((l, gathered.total))
    }
}

/// The gradients gathered over a LoRA step's backward passes: the adapters', and the conditioning
/// vector's summed over every block in f32.
struct Gathered<'a> {
    adapter_ids: HashSet<TensorId>,
    vec_in: &'a Input,
    vec_grad: Option<Tensor>,
    total: GradStore,
}

impl<'a> Gathered<'a> {
    fn new(model: &FluxTransformer, vec_in: &'a Input) -> Self {
        Self {
            adapter_ids: model
                .linears()
                .iter()
                .flat_map(|l| l.adapter_ids())
                .collect(),
            vec_in,
            vec_grad: None,
            total: GradStore::default(),
        }
    }

    /// A candle backward pass's gradients: the conditioning vector's is added up; of the rest only the
    /// adapters' are kept (candle also leaves gradients for inputs that track nothing: tables, constants).
    fn keep(&mut self, mut grads: GradStore) -> Result<()> {
        if let Some(g) = self.vec_in.take_grad(&mut grads) {
            let g = g.to_dtype(DType::F32)?;
            self.vec_grad = Some(match self.vec_grad.take() {
                Some(sum) => (sum + g)?,
                None => g,
            });
        }
        let mut mine = GradStore::default();
        for id in &self.adapter_ids {
            if let Some(g) = grads.get_id(*id) {
                mine.insert_id(*id, g.clone());
            }
        }
        Ok(self.total.extend(mine)?)
    }

    /// A block's backward: its adapters' gradients, and its modulations' taken through candle's graph to
    /// the conditioning vector and any adapters of the modulation layers.
    fn block(&mut self, grads: BlockGrads) -> Result<()> {
        let pairs: Vec<_> = grads.modulation.iter().map(|(m, d)| (m, d)).collect();
        self.keep(backprop(&pairs)?)?;
        Ok(self.total.extend(grads.adapters)?)
    }
}

/// What a training forward keeps of each block.
#[derive(Clone, Copy)]
enum Keep {
    Nothing,
    /// Its input (gradient checkpointing: the block runs again before its backward).
    Inputs,
    /// What its backward reads.
    Saved,
}

/// What the forward kept of a block for its backward.
enum Kept<I, S> {
    Input(I),
    Saved(S),
}

/// Whether any of these layers carries an adapter (in training: a trained one).
fn trains(linears: &[&Linear]) -> bool {
    linears.iter().any(|l| l.adapter_count() > 0)
}

/// Where a candle graph starts inside a training step (the tail's input, the conditioning vector): a fresh
/// variable when the gradient must flow past it.
enum Input {
    Variable(Var),
    Fixed(Tensor),
}

impl Input {
    fn new(t: &Tensor, needs_grad: bool) -> Result<Self> {
        Ok(if needs_grad {
            Self::Variable(Var::from_tensor(t)?)
        } else {
            Self::Fixed(t.clone())
        })
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Self::Variable(v) => v.as_tensor(),
            Self::Fixed(t) => t,
        }
    }

    /// Its gradient, taken out of `grads` so that only the adapters' remain there.
    fn take_grad(&self, grads: &mut GradStore) -> Option<Tensor> {
        match self {
            Self::Variable(v) => grads.remove(v.as_tensor()),
            Self::Fixed(_) => None,
        }
    }
}

/// Backpropagates the output gradients `grad` of the graph outputs `out`: the gradients of
/// `Σ sum(out ⊙ grad)`, whose gradient with respect to each `out` is its `grad`.
fn backprop(pairs: &[(&Tensor, &Tensor)]) -> Result<GradStore> {
    let mut surrogate: Option<Tensor> = None;
    for (out, grad) in pairs {
        if !out.track_op() {
            continue;
        }
        let s = (*out * *grad)?.sum_all()?.to_dtype(DType::F32)?;
        surrogate = Some(match surrogate {
            Some(sum) => (sum + s)?,
            None => s,
        });
    }
    Ok(match surrogate {
        Some(s) => s.backward()?,
        None => GradStore::default(),
    })
}
