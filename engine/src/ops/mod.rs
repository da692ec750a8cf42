//! The models' ops, one module per family, each with a plain candle path and (with the `cuda` feature)
//! a path through the engine's own kernels (`crate::kernels`). Which one runs is the [`Kernels`] policy a
//! model is built with and hands to every op it calls: never a process-wide switch, so a benchmark or a
//! test can hold a fused and a plain model side by side. The plain path is also the reference the kernels
//! are checked against (engine/tests/gpu_kernels.rs).

// The policy is read on the CUDA path only.
#![cfg_attr(not(feature = "cuda"), allow(unused_variables))]

pub mod activation;
pub mod attention;
pub mod autodiff;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod qkv;
pub mod residual;

#[cfg(feature = "cuda")]
use candle_core::Tensor;

/// Which path the ops of a model take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's ops everywhere: the reference, and what the CPU always runs.
    Plain,
    /// The engine's fused CUDA kernels wherever the build (`cuda` feature), the device and the tensors'
    /// dtype and layout allow them; candle's ops elsewhere. What a loaded model uses.
    #[default]
    Fused,
    /// The fused kernels as an Ampere GPU (compute capability 8.x: RTX 30 series, A100) runs them,
    /// whatever the GPU: attention on warp MMAs instead of Hopper's warpgroup MMAs, and fp8 weights
    /// dequantized for their products instead of multiplied on FP8 tensor cores. How a Hopper GPU
    /// checks and times the path older cards take (`flux-bench --ampere`).
    Ampere,
}

impl Kernels {
    /// Whether the engine's own kernels run where they can (`Fused` or `Ampere`).
    pub fn is_fused(self) -> bool {
        self != Kernels::Plain
    }

    /// Whether the instructions newer than Ampere's (Hopper's warpgroup MMAs, FP8 tensor cores) may be
    /// used where the GPU has them.
    pub fn newest_instructions(self) -> bool {
        self == Kernels::Fused
    }

    /// Whether the fused kernels take these inputs: the policy says fused, they are bf16 on a CUDA
    /// device, and no gradient to carry (for the ops whose kernels have no backward pass; a training
    /// forward takes the plain, differentiable path).
    #[cfg(feature = "cuda")]
    pub(crate) fn fused(self, inputs: &[&Tensor]) -> bool {
        inputs.iter().all(|t| !t.track_op()) && self.fused_value(inputs)
    }

    /// Whether the fused kernels take these inputs' values even when they carry a gradient: the ops with
    /// a hand-written backward (attention, the modulated norm, the gated residual).
    #[cfg(feature = "cuda")]
    pub(crate) fn fused_value(self, inputs: &[&Tensor]) -> bool {
        self.is_fused() && crate::kernels::fused_ops::supports(inputs[0])
    }
}

/// FLUX's norms: LayerNorm without affine and the q/k RMS norms, eps 1e-6.
const EPS: f32 = 1e-6;

/// A fused kernel's `value` of three inputs, with `backward` as its gradient where an input carries one.
#[cfg(feature = "cuda")]
fn differentiable3(
    inputs: [&Tensor; 3],
    value: Tensor,
    backward: impl Fn([&Tensor; 3], &Tensor, &Tensor) -> candle_core::Result<[Tensor; 3]>
        + Send
        + Sync
        + 'static,
) -> candle_core::Result<Tensor> {
    if inputs.iter().all(|t| !t.track_op()) {
        return Ok(value);
    }
    autodiff::with_gradient3(inputs, value, backward)
}

/// The largest absolute difference between two tensors of one shape: how the tests compare paths.
#[cfg(test)]
pub(crate) fn max_abs_diff(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::attention::{attention_backward, plain_attention};
    use super::norm::{norm_modulate, norm_modulate_backward};
    use super::residual::{gated_add, gated_add_backward};
    use super::*;
    use candle_core::{Device, Tensor, Var};

    type Backward = fn([&Tensor; 3], &Tensor, &Tensor) -> candle_core::Result<[Tensor; 3]>;

    /// A hand-written backward (given the plain path's value, as the fused kernel's stands in for it on
    /// CUDA) against candle's autograd through the plain path, for inputs of these shapes.
    fn check(
        shapes: [&[usize]; 3],
        plain: impl Fn([&Tensor; 3]) -> candle_core::Result<Tensor>,
        backward: Backward,
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let vars = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::randn(0f32, 1.0, *s, &dev)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inputs = [0, 1, 2].map(|i| vars[i].as_tensor());
        let detached = inputs.map(|t| t.detach());
        let value = plain([&detached[0], &detached[1], &detached[2]])?;
        let weights = Tensor::randn(0f32, 1.0, value.shape(), &dev)?;
        let grads_of = |y: Tensor| (y * &weights)?.sum_all()?.backward();
        let ours = grads_of(autodiff::with_gradient3(inputs, value, backward)?)?;
        let want = grads_of(plain(inputs)?)?;
        for var in &vars {
            let (a, b) = (ours.get(var.as_tensor()), want.get(var.as_tensor()));
            let (a, b) = (a.expect("a gradient"), b.expect("a gradient"));
            assert_eq!(a.dims(), b.dims());
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 2e-5, "{diff}");
        }
        Ok(())
    }

    #[test]
    fn hand_written_backwards_match_autograd() -> candle_core::Result<()> {
        let heads: &[usize] = &[2, 3, 7, 8];
        check(
            [heads, heads, heads],
            |[q, k, v]| plain_attention(q, k, v),
            |qkv, o, g| attention_backward(Kernels::Plain, qkv, o, g, None),
        )?;
        let (x, m): (&[usize], &[usize]) = (&[2, 5, 16], &[2, 1, 16]);
        check(
            [x, m, m],
            |[x, s, c]| norm_modulate(Kernels::Plain, x, s, c),
            |i, o, g| norm_modulate_backward(Kernels::Plain, i, o, g),
        )?;
        check(
            [x, x, m],
            |[r, x, g]| gated_add(Kernels::Plain, r, x, g),
            |i, o, g| gated_add_backward(Kernels::Plain, i, o, g),
        )?;
        Ok(())
    }
}
