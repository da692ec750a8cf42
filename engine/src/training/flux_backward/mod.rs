//! LoRA training's pass through the FLUX transformer: the loss and the adapters' gradients of one step.
//! The blocks' backward passes are written out by hand ([`blocks`]); the head, the tail and the
//! modulations keep candle's autograd. docs/training.md describes it.

mod blocks;

use crate::models::flux::{FluxInputs, FluxTransformer};
use crate::models::linear::Linear;
use crate::ops::qkv::Rope;
use anyhow::Result;
use blocks::{BlockGrads, DoubleSaved, SingleSaved};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use std::collections::HashSet;

/// The blocks' training forward from the head's image and text tokens: the joint sequence after the
/// last block, and what `keep` says to keep of each double and single block.
#[allow(clippy::type_complexity)]
fn forward_kept(
    model: &FluxTransformer,
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
    let heads = model.config().num_heads;
    let (mut i, mut t) = (img.detach(), txt.detach());
    let mut doubles = Vec::with_capacity(model.double_blocks.len());
    for b in &model.double_blocks {
        let (ni, nt, saved) = b.forward_saved(&i, &t, vec, rope, heads)?;
        match keep {
            Keep::Inputs => doubles.push(Kept::Input((i, t))),
            Keep::Saved => doubles.push(Kept::Saved(saved)),
        }
        (i, t) = (ni, nt);
    }
    let mut x_all = Tensor::cat(&[&t, &i], 1)?;
    let mut singles = Vec::with_capacity(model.single_blocks.len());
    for b in &model.single_blocks {
        let (y, saved) = b.forward_saved(&x_all, vec, rope, heads)?;
        match keep {
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
/// training takes the blocks' hand-written backward passes ([`blocks`]): the forward keeps what
/// each block's backward reads (with `checkpointing`, only each block's input, and the block is run
/// again just before its backward), then the blocks are backpropagated from the last to the first.
/// The head (embedders), the tail (final layer and loss) and the modulations, all small, keep candle's
/// autograd. See docs/training.md.
pub fn loss_and_grads(
    model: &FluxTransformer,
    x: &FluxInputs,
    loss: &dyn Fn(&Tensor) -> Result<Tensor>,
    checkpointing: bool,
) -> Result<(Tensor, GradStore)> {
    if model.linears().iter().any(|l| l.trains_weight()) {
        let l = loss(&model.forward(x)?)?;
        let grads = l.backward()?;
        return Ok((l.detach(), grads));
    }
    let heads = model.config().num_heads;
    let rope = model.rope(x)?;
    // Which blocks have a trained layer before them, and so must pass a gradient to their input.
    let head_trains = trains(&model.head_linears());
    let mut before = head_trains;
    let mut double_needs = Vec::with_capacity(model.double_blocks.len());
    for b in &model.double_blocks {
        double_needs.push(before);
        before |= trains(&b.linears());
    }
    let mut single_needs = Vec::with_capacity(model.single_blocks.len());
    for b in &model.single_blocks {
        single_needs.push(before);
        before |= trains(&b.linears());
    }
    let tail_needs = before;

    // The head keeps its graph (when it trains) until the blocks' gradients reach it. The blocks read
    // the conditioning vector through `vec_in`, whose gradient is summed over all of them in f32.
    let (vec, img, txt) = model.head(x)?;
    let vec_in = Input::new(&vec.detach(), head_trains)?;
    let t_len = txt.dim(1)?;
    let keep = if checkpointing {
        Keep::Inputs
    } else {
        Keep::Saved
    };
    let (x_all, doubles, singles) = forward_kept(model, &img, &txt, vec_in.tensor(), &rope, keep)?;

    let mut gathered = Gathered::new(model, &vec_in);
    let x_in = Input::new(&x_all, tail_needs)?;
    let l = loss(&model.tail(x_in.tensor(), t_len, vec_in.tensor())?)?;
    let mut grads = l.backward()?;
    // The final layer's graph goes now, not after the blocks.
    let l = l.detach();
    let mut x_grad = x_in.take_grad(&mut grads);
    gathered.keep(grads)?;

    for ((b, kept), needs) in model
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
    for ((b, kept), needs) in model
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
