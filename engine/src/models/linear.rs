//! The one linear layer type of every model the studio trains or adapts: a frozen base weight
//! plus any number of low-rank adapters applied unmerged, `y = W x + b + Σ sᵢ Bᵢ(Aᵢ x)`.
//! Generation swaps adapters per request on one resident base model; training makes the
//! adapters' tensors `Var`s and leaves the base alone.

use super::autodiff;
use candle_core::{Module, Result, Tensor};
use std::cell::Cell;
use std::sync::{Arc, RwLock};

thread_local! {
    static WITHOUT_GRADIENTS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every adapter's tensors detached: the same values with no graph recorded (so the
/// fused kernels run). Gradient checkpointing's first pass, which only keeps each block's input.
pub fn without_gradients<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WITHOUT_GRADIENTS.with(|w| w.set(self.0));
        }
    }
    let _restore = Restore(WITHOUT_GRADIENTS.with(|w| w.replace(true)));
    f()
}

/// A low-rank update: `down` is (rank, in), `up` is (out, rank). `up` may cover only a slice of
/// the output rows (a LoRA trained on `to_q` placed on a fused `qkv` layer): `out_offset` says
/// where that slice starts.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
    pub out_offset: usize,
}

#[derive(Debug)]
pub struct Linear {
    name: String,
    base: candle_nn::Linear,
    out_features: usize,
    adapters: RwLock<Vec<Arc<Adapter>>>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        let out_features = weight.dim(0).unwrap_or(0);
        Self {
            name: name.into(),
            base: candle_nn::Linear::new(weight, bias),
            out_features,
            adapters: RwLock::new(Vec::new()),
        }
    }

    /// The checkpoint name of this layer (BFL layout for FLUX), which LoRA keys are mapped to.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    pub fn in_features(&self) -> usize {
        self.base.weight().dim(1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn set_adapters(&self, adapters: Vec<Arc<Adapter>>) {
        *self.adapters.write().expect("adapter lock poisoned") = adapters;
    }

    pub fn clear_adapters(&self) {
        self.adapters
            .write()
            .expect("adapter lock poisoned")
            .clear();
    }

    /// The ids of the adapters' factors, `down` and `up` of each.
    pub fn adapter_ids(&self) -> Vec<candle_core::TensorId> {
        let adapters = self.adapters.read().expect("adapter lock poisoned");
        adapters
            .iter()
            .flat_map(|a| [a.down.id(), a.up.id()])
            .collect()
    }

    pub fn adapter_count(&self) -> usize {
        self.adapters.read().expect("adapter lock poisoned").len()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.base.weight().is_variable() {
            // A full fine-tune trains the weight itself: candle's matmul gives it its gradient.
            self.base.forward(x)?
        } else if x.track_op() {
            frozen_base(&self.base, x)?
        } else {
            crate::models::fused::linear(&self.base, x)?
        };
        let adapters = self.adapters.read().expect("adapter lock poisoned");
        if adapters.is_empty() {
            return Ok(y);
        }
        let detached = WITHOUT_GRADIENTS.with(Cell::get);
        let last = y.rank() - 1;
        // The updates summed per output slice (offset, update), each slice then added once.
        let mut slices: Vec<(usize, Tensor)> = Vec::new();
        for a in adapters.iter() {
            let (down, up) = if detached {
                (a.down.detach(), a.up.detach())
            } else {
                (a.down.clone(), a.up.clone())
            };
            // Adapters may be f32 (training) over a bf16 base: the product runs in the base's precision,
            // as peft's under autocast, with the scale folded into the small `up` (no full-size f32
            // copies of the input or the update; their gradients reach the f32 factors through the casts).
            let down = down.to_dtype(x.dtype())?;
            let up = (up * a.scale)?.to_dtype(x.dtype())?;
            let delta = x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?;
            let rows = delta.dim(last)?;
            match slices
                .iter_mut()
                .find(|(o, d)| *o == a.out_offset && d.dim(last).ok() == Some(rows))
            {
                Some((_, d)) => *d = (&*d + delta)?,
                None => slices.push((a.out_offset, delta)),
            }
        }
        slices.sort_by_key(|(o, _)| *o);
        let disjoint = slices
            .windows(2)
            .all(|w| w[0].1.dim(last).is_ok_and(|rows| w[0].0 + rows <= w[1].0));
        if !disjoint {
            return slices.iter().try_fold(y, |y, (offset, delta)| {
                add_rows(&y, *offset, delta, self.out_features)
            });
        }
        // Disjoint slices (a fused layer's q, k and v adapters): one concatenation for all of them.
        let mut pieces = Vec::with_capacity(2 * slices.len() + 1);
        let mut at = 0;
        for (offset, delta) in &slices {
            if *offset > at {
                pieces.push(y.narrow(last, at, offset - at)?);
            }
            let rows = delta.dim(last)?;
            pieces.push((y.narrow(last, *offset, rows)? + delta)?);
            at = offset + rows;
        }
        if at < self.out_features {
            pieces.push(y.narrow(last, at, self.out_features - at)?);
        }
        match pieces.len() {
            1 => Ok(pieces.remove(0)),
            _ => Tensor::cat(&pieces, last),
        }
    }
}

/// `y` with `delta` added to its output rows `offset ..`.
fn add_rows(y: &Tensor, offset: usize, delta: &Tensor, out: usize) -> Result<Tensor> {
    let last = y.rank() - 1;
    let rows = delta.dim(last)?;
    if offset == 0 && rows == out {
        return y + delta;
    }
    let before = y.narrow(last, 0, offset)?;
    let mid = (y.narrow(last, offset, rows)? + delta)?;
    let after = y.narrow(last, offset + rows, out - offset - rows)?;
    Tensor::cat(&[before, mid, after], last)
}

/// `W x + b` for an input that carries a gradient, passing the gradient to `x` only. Through candle's
/// matmul the backward pass would also compute the weight's gradient: wasted work on a frozen layer,
/// and a weight-sized buffer per layer kept until the optimizer step (24 GB for FLUX.1-dev in bf16).
fn frozen_base(base: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    let y = crate::models::fused::linear(base, &x.detach())?;
    let w = base.weight().clone();
    autodiff::with_gradient(x, y, move |_, _, grad| grad.broadcast_matmul(&w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The frozen path gives the same value and input gradient as candle's own matmul, gives the
    /// adapter its gradient, and gives the weight none.
    #[test]
    fn gradients_reach_the_input_and_the_adapter_not_the_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 6, &dev)?;
        let linear = Linear::new("l", w.clone(), Some(b.clone()));
        let down = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4), &dev)?)?;
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2), &dev)?)?;
        linear.set_adapters(vec![Arc::new(Adapter {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: 0.5,
            out_offset: 2,
        })]);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev)?;
        let ours = linear.forward(x.as_tensor())?;
        let grads = (&ours * &weights)?.sum_all()?.backward()?;

        let plain = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let delta = (x
            .as_tensor()
            .broadcast_matmul(&down.as_tensor().t()?)?
            .broadcast_matmul(&up.as_tensor().t()?)?
            * 0.5)?;
        let want = Tensor::cat(
            &[
                plain.narrow(2, 0, 2)?,
                (plain.narrow(2, 2, 3)? + delta)?,
                plain.narrow(2, 5, 1)?,
            ],
            2,
        )?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(&ours, &want)? < 1e-5);
        let reference = (&want * &weights)?.sum_all()?.backward()?;
        for v in [&x, &down, &up] {
            let (g, r) = (grads.get(v.as_tensor()), reference.get(v.as_tensor()));
            assert!(diff(g.expect("a gradient"), r.expect("a gradient"))? < 1e-4);
        }
        // No weight-shaped gradient was computed (candle's matmul backward would have made one).
        let shapes: Vec<Vec<usize>> = grads
            .get_ids()
            .filter_map(|id| grads.get_id(*id))
            .map(|g| g.dims().to_vec())
            .collect();
        assert!(
            !shapes.iter().any(|d| d == &[4, 6] || d == &[6, 4]),
            "{shapes:?}"
        );
        Ok(())
    }
}
