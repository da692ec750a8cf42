//! FLUX's flow-matching schedule (diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline
//! drives it): N sigmas from 1 towards 0, time-shifted by an amount that grows with the image's
//! token count for FLUX.1-dev; a final 0.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ScheduleConfig {
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "half")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_len")]
    pub max_image_seq_len: usize,
}

fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_len() -> usize {
    256
}
fn max_len() -> usize {
    4096
}

impl ScheduleConfig {
    /// FLUX.1-dev's scheduler_config.json.
    pub fn dev() -> Self {
        Self {
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
        }
    }

    /// FLUX.1-schnell's: no shift at all.
    pub fn schnell() -> Self {
        Self {
            shift: 1.0,
            use_dynamic_shifting: false,
            ..Self::dev()
        }
    }

    /// The resolution-dependent shift `mu`: linear in the packed token count.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    /// `steps + 1` sigmas, the last one 0.
    pub fn sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f64> {
        let n = steps.max(1);
        let mu = self.mu(image_seq_len);
        let mut sigmas: Vec<f64> = (0..n)
            .map(|i| {
                // np.linspace(1, 1/n, n), rounded to f32 as diffusers does before shifting.
                let s = if n == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / n as f64 - 1.0) * i as f64 / (n - 1) as f64
                };
                let s = s as f32 as f64;
                if self.use_dynamic_shifting {
                    mu.exp() / (mu.exp() + (1.0 / s - 1.0))
                } else {
                    self.shift * s / (1.0 + (self.shift - 1.0) * s)
                }
            })
            .collect();
        sigmas.push(0.0);
        sigmas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schnell_is_a_plain_linspace() {
        let s = ScheduleConfig::schnell().sigmas(4, 4096);
        let want = [1.0, 0.75, 0.5, 0.25, 0.0];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{s:?}");
        }
    }

    #[test]
    fn dev_shift_grows_with_resolution() {
        let cfg = ScheduleConfig::dev();
        assert!((cfg.mu(256) - 0.5).abs() < 1e-12);
        assert!((cfg.mu(4096) - 1.15).abs() < 1e-12);
        let small = cfg.sigmas(28, 256);
        let big = cfg.sigmas(28, 4096);
        assert!(
            big[14] > small[14],
            "larger images spend longer at high noise"
        );
    }
}
