//! LoRA training's pass through the blocks without candle's autograd: each block's forward keeps what its
//! backward reads (as torch's autograd would save it), and its backward is written out op by op with the
//! fused kernels' backward passes. candle's graph kept every intermediate, added every gradient into a fresh
//! zero tensor and padded each narrow's gradient to full size, and those adds were most of a step's
//! kernel time (docs/performance.md). The modulation vectors, which come from the small
//! conditioning vector, keep their candle graph: [`BlockGrads::modulation`] hands their gradients back.

use crate::models::flux::{DoubleBlock, SingleBlock, Stream};
use crate::models::linear::Saved;
use crate::ops::qkv::{self, Rope};
use crate::ops::{activation, attention, norm, residual, Kernels};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, D};

/// What a block's backward gives besides its input's gradient: the adapters' gradients, and each
/// modulation vector with its gradient, for a candle backward pass through the modulation layer to the
/// conditioning vector.
#[derive(Default)]
pub(super) struct BlockGrads {
    pub(super) adapters: GradStore,
    pub(super) modulation: Vec<(Tensor, Tensor)>,
}

/// What a double block's stream keeps from its input to its q/k/v rows.
struct StreamIn {
    x: Tensor,
    m: Vec<Tensor>,
    qkv: Tensor,
    qkv_saved: Saved,
}

/// What a double block's stream keeps from its attention rows to its output.
struct StreamOut {
    attn_saved: Saved,
    proj: Tensor,
    x1: Tensor,
    fc1_saved: Saved,
    h: Tensor,
    fc2_saved: Saved,
    mlp: Tensor,
}

/// What [`DoubleBlock::backward`] reads: both streams' activations and the joint attention's.
pub(super) struct DoubleSaved {
    img: (StreamIn, StreamOut),
    txt: (StreamIn, StreamOut),
    attn: AttentionSaved,
}

/// What [`SingleBlock::backward`] reads.
pub(super) struct SingleSaved {
    x: Tensor,
    m: Vec<Tensor>,
    h1: Tensor,
    h1_saved: Saved,
    attn: AttentionSaved,
    out_saved: Saved,
    out: Tensor,
}

/// What an attention's backward reads: its heads, its output (B, L, H·D) and, from the fused kernel,
/// its rows' log-sum-exp.
struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Option<Tensor>,
}

impl AttentionSaved {
    fn new(kn: Kernels, [q, k, v]: [Tensor; 3]) -> Result<Self> {
        let (out, lse) = attention::attention_saved(kn, &q, &k, &v)?;
        Ok(Self { q, k, v, out, lse })
    }

    fn qkv(&self) -> [&Tensor; 3] {
        [&self.q, &self.k, &self.v]
    }
}

/// The modulation vectors' values, for the fused ops (their graph stays with the originals).
fn detached(m: &[Tensor]) -> Vec<Tensor> {
    m.iter().map(Tensor::detach).collect()
}

impl Stream {
    fn forward_in(&self, kn: Kernels, x: &Tensor, vec: &Tensor) -> Result<StreamIn> {
        let m = self.modulation.forward(vec)?;
        let md = detached(&m);
        let (qkv, qkv_saved) = self
            .qkv
            .forward_saved(&norm::norm_modulate(kn, x, &md[0], &md[1])?)?;
        Ok(StreamIn {
            x: x.clone(),
            m,
            qkv,
            qkv_saved,
        })
    }

    /// The stream's output from its rows of the attention, and what the backward reads.
    fn forward_out(
        &self,
        kn: Kernels,
        input: &StreamIn,
        attn: &Tensor,
    ) -> Result<(Tensor, StreamOut)> {
        let md = detached(&input.m);
        let (proj, attn_saved) = self.proj.forward_saved(&attn.contiguous()?)?;
        let x1 = residual::gated_add(kn, &input.x, &proj, &md[2])?;
        let (h, fc1_saved) = self
            .mlp
            .fc1
            .forward_saved(&norm::norm_modulate(kn, &x1, &md[3], &md[4])?)?;
        let (mlp, fc2_saved) = self.mlp.fc2.forward_saved(&activation::gelu(kn, &h)?)?;
        let y = residual::gated_add(kn, &x1, &mlp, &md[5])?;
        Ok((
            y,
            StreamOut {
                attn_saved,
                proj,
                x1,
                fc1_saved,
                h,
                fc2_saved,
                mlp,
            },
        ))
    }

    /// From the stream output's gradient to its attention rows' gradient; `mods` collects the
    /// modulation gradients (shift, scale and gate of the attention and the MLP, in that order). The
    /// norm's and gated add's backward passes read no output value: `dy` stands in for it.
    fn backward_out(
        &self,
        kn: Kernels,
        input: &StreamIn,
        saved: StreamOut,
        dy: &Tensor,
        out: &mut BlockGrads,
        mods: &mut [Option<Tensor>; 6],
    ) -> Result<(Tensor, Tensor)> {
        let grads = &mut out.adapters;
        let md = detached(&input.m);
        let [_, d_mlp, d_gate2] =
            residual::gated_add_backward(kn, [&saved.x1, &saved.mlp, &md[5]], dy, dy)?;
        let d_act = needed(
            self.mlp
                .fc2
                .backward(saved.fc2_saved, &d_mlp, grads, true)?,
        )?;
        let d_h = activation::gelu_backward(kn, &saved.h, &d_act)?;
        let d_in2 = needed(self.mlp.fc1.backward(saved.fc1_saved, &d_h, grads, true)?)?;
        let [d_x1n, d_shift2, d_scale2] =
            norm::norm_modulate_backward(kn, [&saved.x1, &md[3], &md[4]], dy, &d_in2)?;
        let d_x1 = (dy + d_x1n)?;
        let [_, d_proj, d_gate1] =
            residual::gated_add_backward(kn, [&input.x, &saved.proj, &md[2]], &d_x1, &d_x1)?;
        let d_attn = needed(self.proj.backward(saved.attn_saved, &d_proj, grads, true)?)?;
        mods[2] = Some(d_gate1);
        mods[3] = Some(d_shift2);
        mods[4] = Some(d_scale2);
        mods[5] = Some(d_gate2);
        Ok((d_x1, d_attn))
    }

    /// From the gradient of the stream's q/k/v heads (the joint attention's dq, dk, dv (B, H, L', D),
    /// this stream's tokens from `at`) and of its residual `d_x1` to its input's.
    fn backward_in(
        &self,
        input: StreamIn,
        (d_heads, at): ([&Tensor; 3], usize),
        d_x1: Tensor,
        (kn, heads, rope): (Kernels, usize, &Rope),
        mut mods: [Option<Tensor>; 6],
        out: &mut BlockGrads,
    ) -> Result<Tensor> {
        let md = detached(&input.m);
        let d_qkv = qkv::qkv_heads_grad(kn, &input.qkv, d_heads, at, heads, &self.norm, rope)?;
        let d_in = needed(
            self.qkv
                .backward(input.qkv_saved, &d_qkv, &mut out.adapters, true)?,
        )?;
        let [d_xn, d_shift1, d_scale1] =
            norm::norm_modulate_backward(kn, [&input.x, &md[0], &md[1]], &d_x1, &d_in)?;
        mods[0] = Some(d_shift1);
        mods[1] = Some(d_scale1);
        push_modulation(out, input.m, mods)?;
        d_x1 + d_xn
    }
}

/// An input gradient that was asked for.
fn needed(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg("an input gradient was asked for".into()))
}

fn push_modulation<const N: usize>(
    out: &mut BlockGrads,
    m: Vec<Tensor>,
    grads: [Option<Tensor>; N],
) -> Result<()> {
    for (m, d) in m.into_iter().zip(grads) {
        let d =
            d.ok_or_else(|| candle_core::Error::Msg("a modulation gradient is missing".into()))?;
        out.modulation.push((m, d));
    }
    Ok(())
}

impl DoubleBlock {
    /// [`DoubleBlock::forward`] recording no graph (but the modulation's), keeping what
    /// [`DoubleBlock::backward`] reads.
    pub(super) fn forward_saved(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> Result<(Tensor, Tensor, DoubleSaved)> {
        let kn = self.kernels;
        let (t_len, i_len) = (txt.dim(1)?, img.dim(1)?);
        let img_in = self.img.forward_in(kn, img, vec)?;
        let txt_in = self.txt.forward_in(kn, txt, vec)?;
        let attn =
            AttentionSaved::new(kn, self.joint_heads(&txt_in.qkv, &img_in.qkv, rope, heads)?)?;
        let (img_y, img_out) =
            self.img
                .forward_out(kn, &img_in, &attn.out.narrow(1, t_len, i_len)?)?;
        let (txt_y, txt_out) = self
            .txt
            .forward_out(kn, &txt_in, &attn.out.narrow(1, 0, t_len)?)?;
        Ok((
            img_y,
            txt_y,
            DoubleSaved {
                img: (img_in, img_out),
                txt: (txt_in, txt_out),
                attn,
            },
        ))
    }

    /// The gradients of the block's image and text inputs from its outputs' `d_img` and `d_txt`.
    pub(super) fn backward(
        &self,
        saved: DoubleSaved,
        (d_img, d_txt): (&Tensor, &Tensor),
        rope: &Rope,
        heads: usize,
        out: &mut BlockGrads,
    ) -> Result<(Tensor, Tensor)> {
        let kn = self.kernels;
        let (img_in, img_out) = saved.img;
        let (txt_in, txt_out) = saved.txt;
        let (t_len, i_len) = (txt_in.x.dim(1)?, img_in.x.dim(1)?);
        let mut img_mods: [Option<Tensor>; 6] = Default::default();
        let mut txt_mods: [Option<Tensor>; 6] = Default::default();
        let (d_img1, d_img_attn) =
            self.img
                .backward_out(kn, &img_in, img_out, d_img, out, &mut img_mods)?;
        let (d_txt1, d_txt_attn) =
            self.txt
                .backward_out(kn, &txt_in, txt_out, d_txt, out, &mut txt_mods)?;
        let d_attn = Tensor::cat(&[&d_txt_attn, &d_img_attn], 1)?;
        let a = &saved.attn;
        let d = attention::attention_backward(kn, a.qkv(), &a.out, &d_attn, a.lse.as_ref())?;
        let d_heads = [&d[0], &d[1], &d[2]];
        let d_img = self.img.backward_in(
            img_in,
            (d_heads, t_len),
            d_img1,
            (kn, heads, &rope.rows(t_len, i_len)?),
            img_mods,
            out,
        )?;
        let d_txt = self.txt.backward_in(
            txt_in,
            (d_heads, 0),
            d_txt1,
            (kn, heads, &rope.rows(0, t_len)?),
            txt_mods,
            out,
        )?;
        Ok((d_img, d_txt))
    }
}

impl SingleBlock {
    /// [`SingleBlock::forward`] recording no graph (but the modulation's), keeping what
    /// [`SingleBlock::backward`] reads.
    pub(super) fn forward_saved(
        &self,
        x: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> Result<(Tensor, SingleSaved)> {
        let kn = self.kernels;
        let m = self.modulation.forward(vec)?;
        let md = detached(&m);
        let (h1, h1_saved) = self
            .linear1
            .forward_saved(&norm::norm_modulate(kn, x, &md[0], &md[1])?)?;
        let (q, k, v) = qkv::qkv_heads(kn, &h1, heads, &self.norm, rope)?;
        let attn = AttentionSaved::new(kn, [q, k, v])?;
        let (out, out_saved) = self.linear2.forward_saved(&activation::gelu_cat(
            kn,
            &attn.out,
            &self.mlp_input(&h1)?,
        )?)?;
        let y = residual::gated_add(kn, x, &out, &md[2])?;
        Ok((
            y,
            SingleSaved {
                x: x.clone(),
                m,
                h1,
                h1_saved,
                attn,
                out_saved,
                out,
            },
        ))
    }

    /// linear1's output past q, k and v: the MLP's input.
    fn mlp_input(&self, h1: &Tensor) -> Result<Tensor> {
        let three_hidden = 3 * self.linear2.out_features();
        h1.narrow(D::Minus1, three_hidden, h1.dim(D::Minus1)? - three_hidden)
    }

    /// The gradient of the block's input from its output's `dy`.
    pub(super) fn backward(
        &self,
        saved: SingleSaved,
        dy: &Tensor,
        rope: &Rope,
        heads: usize,
        out: &mut BlockGrads,
    ) -> Result<Tensor> {
        let kn = self.kernels;
        let md = detached(&saved.m);
        let hidden = self.linear2.out_features();
        let [_, d_out, d_gate] =
            residual::gated_add_backward(kn, [&saved.x, &saved.out, &md[2]], dy, dy)?;
        let d_cat =
            needed(
                self.linear2
                    .backward(saved.out_saved, &d_out, &mut out.adapters, true)?,
            )?;
        let a = &saved.attn;
        let [dq, dk, dv] = attention::attention_backward(
            kn,
            a.qkv(),
            &a.out,
            &d_cat.narrow(D::Minus1, 0, hidden)?,
            a.lse.as_ref(),
        )?;
        let d_h1 = qkv::qkv_heads_grad(kn, &saved.h1, [&dq, &dk, &dv], 0, heads, &self.norm, rope)?;
        // qkv_heads' gradient leaves the MLP's columns zero: the MLP's goes there.
        activation::gelu_backward_into(
            kn,
            &d_h1,
            3 * hidden,
            &self.mlp_input(&saved.h1)?,
            &d_cat.narrow(D::Minus1, hidden, d_cat.dim(D::Minus1)? - hidden)?,
        )?;
        drop(d_cat);
        let d_in =
            needed(
                self.linear1
                    .backward(saved.h1_saved, &d_h1, &mut out.adapters, true)?,
            )?;
        let [d_xn, d_shift, d_scale] =
            norm::norm_modulate_backward(kn, [&saved.x, &md[0], &md[1]], dy, &d_in)?;
        push_modulation(out, saved.m, [Some(d_shift), Some(d_scale), Some(d_gate)])?;
        dy + d_xn
    }
}
