//! The settings of a training run: a request's [`TrainSettingsForm`] (typed and range-checked in `app`)
//! over the defaults, with the checks that depend on the model and on other fields. docs/training.md
//! describes each.

pub use app::{Schedule, SigmaSampling, Targets, TrainSettingsForm};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub steps: u32,
    pub learning_rate: f64,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Targets,
    /// Side of the square the buckets' areas match, in pixels.
    pub resolution: u32,
    pub batch_size: u32,
    pub warmup_steps: u32,
    pub lr_schedule: Schedule,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// The guidance value the guidance-distilled model is given while training.
    pub guidance: f64,
    pub sigma_sampling: SigmaSampling,
    /// Samples every N steps (and at the end); 0: only at the end.
    pub sample_every: u32,
    /// Checkpoints every N steps; 0: none (a cancelled run then starts over).
    pub checkpoint_every: u32,
    /// The prompt of the samples; by default the keywords.
    pub sample_prompt: Option<String>,
    pub seed: u64,
    /// Recompute each transformer block in the backward pass instead of keeping its activations
    /// (docs/training.md); `None`: on with a GPU, off on the CPU.
    #[serde(default)]
    pub gradient_checkpointing: Option<bool>,
    /// The share of images trained with the empty caption (classifier-free guidance needs it).
    #[serde(default)]
    pub caption_dropout: f64,
}

/// The resolutions a full-size model trains at; a model whose own size is smaller (the tiny test model)
/// also takes that size, which is then its default.
pub const RESOLUTIONS: [u32; 3] = [512, 768, 1024];

impl TrainSettings {
    /// The defaults for a model whose native image side is `native_size` pixels.
    pub fn defaults(native_size: u32) -> Self {
        Self {
            steps: 1000,
            learning_rate: 1e-4,
            rank: 16,
            alpha: 16.0,
            targets: Targets::Attention,
            resolution: native_size.min(512),
            batch_size: 1,
            warmup_steps: 0,
            lr_schedule: Schedule::Constant,
            max_grad_norm: 1.0,
            weight_decay: 1e-4,
            guidance: 1.0,
            sigma_sampling: SigmaSampling::Uniform,
            sample_every: 250,
            checkpoint_every: 250,
            sample_prompt: None,
            seed: 0,
            gradient_checkpointing: None,
            caption_dropout: 0.0,
        }
    }

    /// The request's settings over the defaults. `native_size`: the model's own image side. The preset
    /// (`model`) is the server's to resolve.
    pub fn resolve(form: &TrainSettingsForm, native_size: u32) -> Result<Self, String> {
        let d = Self::defaults(native_size);
        if let Some(r) = form.resolution {
            let small = native_size < RESOLUTIONS[0] && r == native_size;
            if !RESOLUTIONS.contains(&r) && !small {
                let mut allowed: Vec<String> = RESOLUTIONS.iter().map(u32::to_string).collect();
                if native_size < RESOLUTIONS[0] {
                    allowed.insert(0, native_size.to_string());
                }
                return Err(format!(
                    "resolution must be one of {} (got {r})",
                    allowed.join(", ")
                ));
            }
        }
        let s = Self {
            steps: form.steps.unwrap_or(d.steps),
            learning_rate: form.learning_rate.unwrap_or(d.learning_rate),
            rank: form.rank.map_or(d.rank, |r| r as usize),
            alpha: form.alpha.unwrap_or(d.alpha),
            targets: form.targets.unwrap_or(d.targets),
            resolution: form.resolution.unwrap_or(d.resolution),
            batch_size: form.batch_size.unwrap_or(d.batch_size),
            warmup_steps: form.warmup_steps.unwrap_or(d.warmup_steps),
            lr_schedule: form.lr_schedule.unwrap_or(d.lr_schedule),
            max_grad_norm: form.max_grad_norm.unwrap_or(d.max_grad_norm),
            weight_decay: form.weight_decay.unwrap_or(d.weight_decay),
            guidance: form.guidance.unwrap_or(d.guidance),
            sigma_sampling: form.sigma_sampling.unwrap_or(d.sigma_sampling),
            sample_every: form.sample_every.unwrap_or(d.sample_every),
            checkpoint_every: form.checkpoint_every.unwrap_or(d.checkpoint_every),
            sample_prompt: form.sample_prompt.clone().or(d.sample_prompt),
            seed: form.seed.unwrap_or(d.seed),
            gradient_checkpointing: form.gradient_checkpointing.or(d.gradient_checkpointing),
            caption_dropout: form.caption_dropout.unwrap_or(d.caption_dropout),
        };
        if s.warmup_steps > s.steps {
            return Err(format!(
                "warmup_steps ({}) must not exceed steps ({})",
                s.warmup_steps, s.steps
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fields: &[(&str, &str)], native: u32) -> Result<TrainSettings, String> {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TrainSettings::resolve(&TrainSettingsForm::from_fields(&fields)?, native)
    }

    #[test]
    fn defaults_and_overrides() {
        let s = parse(&[], 1024).unwrap();
        assert_eq!(
            (s.steps, s.rank, s.alpha, s.resolution),
            (1000, 16, 16.0, 512)
        );
        assert_eq!(parse(&[], 64).unwrap().resolution, 64);
        let s = parse(
            &[
                ("rank", "32"),
                ("learning_rate", "5e-5"),
                ("targets", "all_linear"),
                ("resolution", "768"),
                ("model", "flux-dev"),
            ],
            1024,
        )
        .unwrap();
        assert_eq!(
            (s.rank, s.learning_rate, s.targets, s.resolution),
            (32, 5e-5, Targets::AllLinear, 768)
        );
        for (v, want) in [("false", Some(false)), ("true", Some(true)), ("auto", None)] {
            let s = parse(&[("gradient_checkpointing", v)], 1024).unwrap();
            assert_eq!(s.gradient_checkpointing, want);
        }
    }

    #[test]
    fn errors_name_the_field() {
        for (fields, word) in [
            (vec![("resolution", "640")], "resolution"),
            (
                vec![("warmup_steps", "20"), ("steps", "10")],
                "warmup_steps",
            ),
            (vec![("rank", "0")], "rank"),
        ] {
            let err = parse(&fields, 1024).unwrap_err();
            assert!(err.contains(word), "{fields:?}: {err}");
        }
        assert!(parse(&[("resolution", "64")], 1024).is_err());
        assert!(parse(&[("resolution", "64")], 64).is_ok());
    }
}
