//! AdamW with its moments in the open (candle-nn's keeps them private, so a checkpoint could not hold
//! them), the learning-rate schedule, and gradient clipping by global norm, as torch does them.

use super::settings::Schedule;
use crate::ops::Kernels;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// torch.optim.AdamW: decoupled weight decay, bias-corrected moments, f32 state.
pub struct AdamW {
    pub vars: Vec<Var>,
    /// First moments, one per variable.
    pub m: Vec<Var>,
    /// Second moments, one per variable.
    pub v: Vec<Var>,
    /// Updates taken so far (the bias correction's t).
    pub t: u32,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The path of its update and of [`clip_grads`]' norm: one kernel each on CUDA where fused.
    pub kernels: Kernels,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64, kernels: Kernels) -> Result<Self> {
        let zeros = |v: &Var| Var::zeros(v.shape(), v.dtype(), v.device());
        Ok(Self {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            vars,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            kernels,
        })
    }

    /// One update with these gradients, each multiplied by `grad_scale` first (gradient clipping's
    /// factor, [`Clipped::scale`]: inside the kernel on the fused path), at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], grad_scale: f64, lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        #[cfg(feature = "cuda")]
        let fused_step = crate::kernels::adamw::AdamWStep {
            grad_scale,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            inv_sqrt_bc2: 1.0 / bc2.sqrt(),
            decay: 1.0 - lr * self.weight_decay,
            step_size: lr / bc1,
        };
        for (((var, m), v), g) in self.vars.iter().zip(&self.m).zip(&self.v).zip(grads) {
            // One kernel for the whole update where it fits, the ops below as ~17 kernels otherwise.
            #[cfg(feature = "cuda")]
            if fused(
                self.kernels,
                [var.as_tensor(), m.as_tensor(), v.as_tensor(), g],
            ) {
                crate::kernels::adamw::adamw_step(var, m, v, g, &fused_step)?;
                continue;
            }
            let g = &(g * grad_scale)?;
            let next_m = ((m.as_tensor() * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let next_v = ((v.as_tensor() * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((next_v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            let next = (decayed - ((&next_m / denom)? * (lr / bc1))?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
            var.set(&next)?;
        }
        Ok(())
    }
}

/// The gradients of `vars` (zeros for one the loss does not reach) with the factor that scales them
/// down so that their global L2 norm is at most `max_norm` (torch's clip_grad_norm_), and that norm
/// before clipping. [`AdamW::step`] applies the factor (on the GPU inside its kernel: a pass of its own
/// over every gradient was hundreds of kernel launches a step).
pub struct Clipped {
    pub grads: Vec<Tensor>,
    pub scale: f64,
    pub norm: f64,
}

impl Clipped {
    /// The gradients with the factor applied, as torch's clip_grad_norm_ leaves them.
    pub fn scaled(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .grads
            .iter()
            .map(|g| g * self.scale)
            .collect::<candle_core::Result<_>>()?)
    }
}

/// [`Clipped`] gradients of `vars` from `grads`.
pub fn clip_grads(
    vars: &[Var],
    grads: &GradStore,
    max_norm: f64,
    kernels: Kernels,
) -> Result<Clipped> {
    let gs = vars
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let norm = sum_of_squares(kernels, &gs)?.sqrt();
    let scale = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    Ok(Clipped {
        grads: gs,
        scale,
        norm,
    })
}

/// Σ g² over all of `gs`, read back from the device once for all of them, not once per variable. On
/// CUDA one kernel per gradient writes partial sums (candle's square, sum and copy into the stack take
/// three).
// The policy is read on the CUDA path only.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn sum_of_squares(kernels: Kernels, gs: &[Tensor]) -> candle_core::Result<f64> {
    #[cfg(feature = "cuda")]
    if !gs.is_empty() && fused(kernels, gs) {
        use crate::kernels::adamw::{sum_squares, PARTIALS};
        let partials = Tensor::zeros((gs.len(), PARTIALS), DType::F32, gs[0].device())?;
        for (i, g) in gs.iter().enumerate() {
            sum_squares(&partials.get(i)?, g)?;
        }
        return partials.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>();
    }
    let squares = gs
        .iter()
        .map(|g| g.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&squares, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()
}

/// Whether the optimizer's kernels take these tensors: the policy says fused and every tensor is
/// contiguous f32 on CUDA.
#[cfg(feature = "cuda")]
fn fused<'a>(kernels: Kernels, ts: impl IntoIterator<Item = &'a Tensor>) -> bool {
    kernels.is_fused() && ts.into_iter().all(crate::kernels::adamw::supports)
}

/// The learning rate of 1-based step `step` of `total`: linear warm-up from 0, then constant or half a
/// cosine down to 0 (diffusers' `constant_with_warmup` / `cosine`).
pub fn learning_rate(base: f64, schedule: Schedule, warmup: u32, step: u32, total: u32) -> f64 {
    // torch schedulers count from 0: the first update uses lr(0).
    let s = f64::from(step.saturating_sub(1));
    let warmup = f64::from(warmup);
    if s < warmup {
        return base * s / warmup.max(1.0);
    }
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            let span = (f64::from(total) - warmup).max(1.0);
            let progress = ((s - warmup) / span).min(1.0);
            base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_follows_its_shape() {
        let lr = |sched, step| learning_rate(1.0, sched, 10, step, 110);
        assert_eq!(lr(Schedule::Constant, 1), 0.0);
        assert!((lr(Schedule::Constant, 6) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 11), 1.0);
        assert_eq!(lr(Schedule::Constant, 110), 1.0);
        assert_eq!(lr(Schedule::Cosine, 11), 1.0);
        assert!((lr(Schedule::Cosine, 61) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 110) < 0.001);
        assert_eq!(learning_rate(2.0, Schedule::Constant, 0, 1, 5), 2.0);
    }

    /// Two steps checked against torch.optim.AdamW's formula worked by hand.
    #[test]
    fn adamw_matches_torch() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev)?;
        let mut opt = AdamW::new(vec![w.clone()], 0.1, Kernels::Plain)?;
        let g = Tensor::new(&[0.5f32, 0.25], &dev)?;
        opt.step(&[g], 1.0, 0.01)?;
        // Step 1: m̂ = g, v̂ = g², so the update is lr·sign(g) (eps aside), after the decay.
        let got = w.as_tensor().to_vec1::<f32>()?;
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01];
        for (a, b) in got.iter().zip(want) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{got:?} {want:?}");
        }
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[3.0f32], &dev)?;
        let b = Var::new(&[4.0f32], &dev)?;
        let loss = ((a.as_tensor() * 3.0)? + (b.as_tensor() * 4.0)?)?.sum_all()?;
        let grads = loss.backward()?;
        let clipped = clip_grads(&[a, b], &grads, 1.0, Kernels::Plain)?;
        assert!((clipped.norm - 5.0).abs() < 1e-9);
        let g: Vec<f32> = clipped
            .scaled()?
            .iter()
            .map(|g| g.to_vec1::<f32>().unwrap()[0])
            .collect();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
        Ok(())
    }
}
