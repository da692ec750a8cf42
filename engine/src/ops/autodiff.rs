//! Fused kernels where no gradient is needed, differentiable compositions where one is.
//!
//! candle's fused norm, softmax and RoPE kernels record no backward pass: a gradient reaching them
//! silently stops. Each function here takes the fused kernel when its input carries no gradient
//! (inference, or the part of a training forward pass before the first trained layer) and the
//! same maths written with differentiable ops when it does, so one model serves both.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor, D};
use std::sync::Mutex;

fn tracked(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    if tracked(&[x, weight, bias]) {
        candle_nn::ops::layer_norm_slow(x, weight, bias, eps)
    } else {
        candle_nn::ops::layer_norm(x, weight, bias, eps)
    }
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if tracked(&[x, weight]) {
        candle_nn::ops::rms_norm_slow(x, weight, eps)
    } else {
        candle_nn::ops::rms_norm(x, weight, eps)
    }
}

/// With a gradient: the fused kernel's value and softmax's backward `y ⊙ (g − Σ g⊙y)`, which keeps only
/// the input and the output alive (the composed version keeps four score-sized tensors per attention).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    with_gradient(x, y, |_, y, g| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    })
}

type Backward = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// `value` (computed from `x` without a graph, by any kernel) as a node of `x`'s graph whose input
/// gradient is `backward(x, value, output gradient)`. How a fused forward kernel gets a backward pass.
pub fn with_gradient(
    x: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    x.apply_op1(Precomputed {
        value: Value(Mutex::new(Some(value))),
        backward: Box::new(backward),
    })
}

/// The three input gradients of a three-input op: `(inputs, value, output gradient)`.
type Backward3 = dyn Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Tensor; 3]> + Send + Sync;

/// [`with_gradient`] for an op of three inputs (attention's q, k and v).
pub fn with_gradient3(
    x: [&Tensor; 3],
    value: Tensor,
    backward: impl Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Tensor; 3]> + Send + Sync + 'static,
) -> Result<Tensor> {
    x[0].apply_op3(
        x[1],
        x[2],
        Precomputed3 {
            value: Value(Mutex::new(Some(value))),
            backward: Box::new(backward),
        },
    )
}

/// A value computed ahead, handed to the graph once. It is taken out during the forward pass, so the
/// graph keeps only the copy it returns.
struct Value(Mutex<Option<Tensor>>);

impl Value {
    /// The value, in a storage of its own starting at offset 0 (`try_clone` copies a storage whole).
    fn take(&self) -> Result<Tensor> {
        let y = self
            .0
            .lock()
            .expect("precomputed-value lock poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("a precomputed op ran twice".into()))?;
        if y.is_contiguous() && y.layout().start_offset() == 0 {
            Ok(y)
        } else {
            y.force_contiguous()
        }
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => Err(candle_core::Error::Msg(
                "precomputed value not on the CPU".into(),
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => Err(candle_core::Error::Msg(
                "precomputed value not on the GPU".into(),
            )),
        }
    }
}

/// The op behind [`with_gradient`].
struct Precomputed {
    value: Value,
    backward: Box<Backward>,
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        "precomputed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(x, y, grad)?))
    }
}

/// The op behind [`with_gradient3`].
struct Precomputed3 {
    value: Value,
    backward: Box<Backward3>,
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        "precomputed3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = (self.backward)([a, b, c], y, grad)?;
        Ok((Some(ga), Some(gb), Some(gc)))
    }
}

/// Interleaved rotary embedding of (B, H, L, D) with (L, D/2) tables.
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if tracked(&[x, cos, sin]) {
        candle_nn::rotary_emb::rope_i_slow(x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope_i(x, cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::ops::max_abs_diff(a, b).unwrap()
    }

    /// The two paths agree, and a gradient flows through the tracked one.
    #[test]
    fn fused_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let v = Var::from_tensor(&x)?;
        let pairs = [
            (
                layer_norm(&x, &w, &b, 1e-6)?,
                layer_norm(v.as_tensor(), &w, &b, 1e-6)?,
            ),
            (rms_norm(&x, &w, 1e-6)?, rms_norm(v.as_tensor(), &w, 1e-6)?),
            (softmax_last_dim(&x)?, softmax_last_dim(v.as_tensor())?),
            (rope_i(&x, &cos, &sin)?, rope_i(v.as_tensor(), &cos, &sin)?),
        ];
        for (fused, slow) in pairs {
            assert!(!fused.track_op());
            assert!(max_diff(&fused, &slow) < 1e-5);
            let grads = slow.sqr()?.sum_all()?.backward()?;
            let g = grads
                .get(v.as_tensor())
                .expect("a gradient reaches the input");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        // Softmax's hand-written backward against candle's autograd through the composed softmax.
        let weights = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let grad_of = |y: Tensor| -> Result<Tensor> {
            let grads = (y * &weights)?.sum_all()?.backward()?;
            Ok(grads.get(v.as_tensor()).expect("a gradient").clone())
        };
        let ours = grad_of(softmax_last_dim(v.as_tensor())?)?;
        let composed = grad_of(candle_nn::ops::softmax(v.as_tensor(), D::Minus1)?)?;
        assert!(max_diff(&ours, &composed) < 1e-6);
        Ok(())
    }
}
