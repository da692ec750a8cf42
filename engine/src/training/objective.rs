//! FLUX's flow-matching objective as diffusers' `train_dreambooth_lora_flux.py` sets it up, and the
//! random draws of each step. Every step draws from its own generator seeded by (seed, step), and the
//! image order of each epoch from one seeded by (seed, epoch): a run resumed at step N draws exactly what
//! the uninterrupted run drew, with no generator state to save.

use super::settings::SigmaSampling;
use crate::sampling::schedule::ScheduleConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// The scheduler's training timesteps: 1000 noise levels, σ = t/1000 for t = 1000 … 1, shifted by
/// `shift` when the scheduler does not shift by resolution (FLUX.1-dev shifts only while sampling, so its
/// training levels are the plain grid). Index 0 is σ = 1.
pub fn training_sigmas(schedule: &ScheduleConfig) -> Vec<f64> {
    (0..1000)
        .map(|i| {
            let s = (1000 - i) as f64 / 1000.0;
            if schedule.use_dynamic_shifting {
                s
            } else {
                schedule.shift * s / (1.0 + (schedule.shift - 1.0) * s)
            }
        })
        .collect()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn rng(seed: u64, stream: u64, n: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(splitmix(seed ^ splitmix(stream ^ splitmix(n))))
}

/// The dataset index trained on at 0-based step `step`: each epoch a fresh seeded shuffle.
pub fn image_for(seed: u64, step: u32, images: usize) -> usize {
    let epoch = u64::from(step) / images as u64;
    let mut order: Vec<usize> = (0..images).collect();
    order.shuffle(&mut rng(seed, 1, epoch));
    order[step as usize % images]
}

/// Whether the `item`th image of step `step` trains with the empty caption (probability `p`): what
/// teaches a model the unconditional prediction that classifier-free guidance needs.
pub fn caption_dropped(seed: u64, step: u32, item: u32, p: f64) -> bool {
    p > 0.0 && rng(seed, 4, u64::from(step) | u64::from(item) << 32).random::<f64>() < p
}

/// The random numbers of one step.
pub struct StepDraws {
    /// Into [`training_sigmas`].
    pub sigma_index: usize,
    /// N(0, 1) for sampling the cached latent distribution (`mean + std · eps`).
    pub latent_eps: Vec<f32>,
    /// The flow's noise endpoint.
    pub noise: Vec<f32>,
}

impl StepDraws {
    /// The draws of 1-based step `step` for latents of `n` values.
    pub fn new(seed: u64, step: u32, sampling: SigmaSampling, n: usize) -> Self {
        Self::item(seed, step, 0, sampling, n)
    }

    /// The draws of the `item`th image of a step's batch (item 0: [`Self::new`]'s).
    pub fn item(seed: u64, step: u32, item: u32, sampling: SigmaSampling, n: usize) -> Self {
        let mut r = rng(seed, 2, u64::from(step) | u64::from(item) << 32);
        // diffusers: u in [0, 1), then index = floor(u · 1000).
        let u: f64 = match sampling {
            SigmaSampling::Uniform => r.random(),
            SigmaSampling::LogitNormal => {
                let z: f64 = StandardNormal.sample(&mut r);
                1.0 / (1.0 + (-z).exp())
            }
        };
        let sigma_index = ((u * 1000.0) as usize).min(999);
        Self::with_sigma(r, sigma_index, n)
    }

    /// Fixed draws at a chosen noise level, for the `k`th validation point: the same for every call.
    pub fn validation(seed: u64, k: u64, sigma_index: usize, n: usize) -> Self {
        Self::with_sigma(rng(seed, 3, k), sigma_index, n)
    }

    fn with_sigma(mut r: rand::rngs::StdRng, sigma_index: usize, n: usize) -> Self {
        let mut normal =
            |n| -> Vec<f32> { (0..n).map(|_| StandardNormal.sample(&mut r)).collect() };
        let latent_eps = normal(n);
        let noise = normal(n);
        Self {
            sigma_index,
            latent_eps,
            noise,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_trains_on_the_plain_grid_schnell_style_shifts_it() {
        let dev = training_sigmas(&ScheduleConfig::dev());
        assert_eq!((dev[0], dev[999]), (1.0, 0.001));
        assert!((dev[500] - 0.5).abs() < 1e-12);
        let shifted = training_sigmas(&ScheduleConfig {
            shift: 3.0,
            use_dynamic_shifting: false,
            ..ScheduleConfig::dev()
        });
        assert!((shifted[500] - 0.75).abs() < 1e-12);
    }

    #[test]
    fn draws_depend_only_on_seed_and_step() {
        let a = StepDraws::new(1, 5, SigmaSampling::Uniform, 8);
        let b = StepDraws::new(1, 5, SigmaSampling::Uniform, 8);
        let c = StepDraws::new(1, 6, SigmaSampling::Uniform, 8);
        assert_eq!((a.sigma_index, &a.noise), (b.sigma_index, &b.noise));
        assert_ne!(a.noise, c.noise);
        // Every epoch visits every image once.
        let mut seen: Vec<usize> = (0..5).map(|s| image_for(3, s, 5)).collect();
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
    }
}
