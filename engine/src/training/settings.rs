//! The settings of a training run, read from the JSON fields of a request, every one with a default and
//! checked with a message that names the field. docs/training.md describes each.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which linear layers get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// The attention projections: q, k, v and the output projection of both streams of the double
    /// blocks, and q, k, v of the single blocks (diffusers' `to_q`, `to_k`, `to_v`, `to_out.0`,
    /// `add_{q,k,v}_proj`, `to_add_out`).
    Attention,
    /// Every linear layer of the transformer.
    AllLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The learning rate after warm-up stays put.
    Constant,
    /// Half a cosine from the learning rate to 0 after warm-up.
    Cosine,
}

/// How the noise level σ of each step is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmaSampling {
    /// Uniform over the scheduler's 1000 training noise levels: diffusers' default (`none`).
    Uniform,
    /// σ = sigmoid(n), n ~ N(0, 1): more steps at middle noise levels (diffusers' `logit_normal`).
    LogitNormal,
}

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

const KNOWN: [&str; 19] = [
    "steps",
    "learning_rate",
    "rank",
    "alpha",
    "targets",
    "resolution",
    "batch_size",
    "warmup_steps",
    "lr_schedule",
    "max_grad_norm",
    "weight_decay",
    "guidance",
    "sigma_sampling",
    "sample_every",
    "checkpoint_every",
    "sample_prompt",
    "seed",
    "gradient_checkpointing",
    "caption_dropout",
];

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

    /// Reads the fields of a request over the defaults. `native_size`: the model's own image side.
    /// Fields the server handles itself (`model`) are left to it.
    pub fn from_fields(fields: &Map<String, Value>, native_size: u32) -> Result<Self, String> {
        let mut s = Self::defaults(native_size);
        for (key, value) in fields {
            let k = key.as_str();
            match k {
                "model" => {}
                "steps" => s.steps = int(k, value, 1, 100_000)? as u32,
                "learning_rate" => s.learning_rate = float(k, value, 1e-8, 1.0)?,
                "rank" => s.rank = int(k, value, 1, 256)? as usize,
                "alpha" => s.alpha = float(k, value, 1e-3, 1024.0)?,
                "targets" => s.targets = choice(k, value, &["attention", "all_linear"])?,
                "resolution" => {
                    let r = int(k, value, 1, 4096)? as u32;
                    let small = native_size < RESOLUTIONS[0] && r == native_size;
                    if !RESOLUTIONS.contains(&r) && !small {
                        let mut allowed: Vec<String> =
                            RESOLUTIONS.iter().map(u32::to_string).collect();
                        if native_size < RESOLUTIONS[0] {
                            allowed.insert(0, native_size.to_string());
                        }
                        return Err(format!(
                            "resolution must be one of {} (got {r})",
                            allowed.join(", ")
                        ));
                    }
                    s.resolution = r;
                }
                // One image a step for now; the field is accepted so that scripts can say so.
                "batch_size" => s.batch_size = int(k, value, 1, 1)? as u32,
                "warmup_steps" => s.warmup_steps = int(k, value, 0, 100_000)? as u32,
                "lr_schedule" => s.lr_schedule = choice(k, value, &["constant", "cosine"])?,
                "max_grad_norm" => s.max_grad_norm = float(k, value, 0.0, 1e6)?,
                "weight_decay" => s.weight_decay = float(k, value, 0.0, 1.0)?,
                "guidance" => s.guidance = float(k, value, 0.0, 100.0)?,
                "sigma_sampling" => {
                    s.sigma_sampling = choice(k, value, &["uniform", "logit_normal"])?
                }
                "sample_every" => s.sample_every = int(k, value, 0, 100_000)? as u32,
                "checkpoint_every" => s.checkpoint_every = int(k, value, 0, 100_000)? as u32,
                "sample_prompt" => {
                    let p = value
                        .as_str()
                        .map(str::trim)
                        .filter(|p| !p.is_empty() && p.chars().count() <= 2000)
                        .ok_or("sample_prompt must be a text of 1 to 2000 characters")?;
                    s.sample_prompt = Some(p.to_string());
                }
                "seed" => s.seed = int(k, value, 0, i64::MAX as u64)?,
                "gradient_checkpointing" => s.gradient_checkpointing = boolean(k, value)?,
                "caption_dropout" => s.caption_dropout = float(k, value, 0.0, 1.0)?,
                _ => {
                    return Err(format!(
                        "unknown training setting `{key}`; the settings are: model, {}",
                        KNOWN.join(", ")
                    ))
                }
            }
        }
        if s.warmup_steps > s.steps {
            return Err(format!(
                "warmup_steps ({}) must not exceed steps ({})",
                s.warmup_steps, s.steps
            ));
        }
        Ok(s)
    }
}

fn int(key: &str, v: &Value, min: u64, max: u64) -> Result<u64, String> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ if min == max => Err(format!("{key} must be {min} (got {v})")),
        _ => Err(format!(
            "{key} must be a whole number from {min} to {max} (got {v})"
        )),
    }
}

fn float(key: &str, v: &Value, min: f64, max: f64) -> Result<f64, String> {
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match x {
        Some(x) if x.is_finite() && (min..=max).contains(&x) => Ok(x),
        _ => Err(format!(
            "{key} must be a number from {min} to {max} (got {v})"
        )),
    }
}

/// `true`, `false` (JSON or text, as a form sends it) or `auto`: the device decides.
fn boolean(key: &str, v: &Value) -> Result<Option<bool>, String> {
    match v {
        Value::Bool(b) => Ok(Some(*b)),
        Value::String(s) if s.trim() == "true" => Ok(Some(true)),
        Value::String(s) if s.trim() == "false" => Ok(Some(false)),
        Value::String(s) if s.trim() == "auto" => Ok(None),
        _ => Err(format!("{key} must be true, false or auto (got {v})")),
    }
}

fn choice<T: serde::de::DeserializeOwned>(
    key: &str,
    v: &Value,
    names: &[&str],
) -> Result<T, String> {
    match v.as_str() {
        Some(s) if names.contains(&s) => {
            serde_json::from_value(Value::String(s.to_string())).map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "{key} must be one of {} (got {v})",
            names.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value, native: u32) -> Result<TrainSettings, String> {
        TrainSettings::from_fields(v.as_object().unwrap(), native)
    }

    #[test]
    fn defaults_and_overrides() {
        let s = parse(json!({}), 1024).unwrap();
        assert_eq!(
            (s.steps, s.rank, s.alpha, s.resolution),
            (1000, 16, 16.0, 512)
        );
        assert_eq!(parse(json!({}), 64).unwrap().resolution, 64);
        let s = parse(
            json!({"rank": 32, "learning_rate": "5e-5", "targets": "all_linear", "resolution": 768, "model": "flux-dev"}),
            1024,
        )
        .unwrap();
        assert_eq!(
            (s.rank, s.learning_rate, s.targets, s.resolution),
            (32, 5e-5, Targets::AllLinear, 768)
        );
        for (v, want) in [
            (json!(false), Some(false)),
            (json!("true"), Some(true)),
            (json!("auto"), None),
        ] {
            let s = parse(json!({ "gradient_checkpointing": v }), 1024).unwrap();
            assert_eq!(s.gradient_checkpointing, want);
        }
    }

    #[test]
    fn errors_name_the_field() {
        for (fields, word) in [
            (json!({"rank": 0}), "rank"),
            (json!({"rank": "many"}), "rank"),
            (json!({"learning_rate": -1}), "learning_rate"),
            (json!({"targets": "mlp"}), "targets"),
            (json!({"resolution": 640}), "resolution"),
            (json!({"batch_size": 4}), "batch_size"),
            (json!({"warmup_steps": 20, "steps": 10}), "warmup_steps"),
            (json!({"lr": 1}), "`lr`"),
            (
                json!({"gradient_checkpointing": "yes"}),
                "gradient_checkpointing",
            ),
        ] {
            let err = parse(fields.clone(), 1024).unwrap_err();
            assert!(err.contains(word), "{fields}: {err}");
        }
        assert!(parse(json!({"resolution": 64}), 1024).is_err());
        assert!(parse(json!({"resolution": 64}), 64).is_ok());
    }
}
