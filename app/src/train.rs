use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::JobStatus;

/// `POST /train/` multipart form. Documented for the OpenAPI page; the server reads the parts as a stream
/// and turns the text fields into a [`TrainRequest`].
#[derive(Debug, ToSchema)]
pub struct TrainForm {
    /// ZIP of png/jpg/jpeg/webp images at any folder depth, each with an optional same-stem `.txt` caption.
    #[schema(value_type = String, format = Binary)]
    pub dataset: Vec<u8>,
    /// A JSON list of strings (`["realistic", "detailed"]`) or a comma-separated string.
    pub keywords: String,
    /// Optional fields, each a form field of its own (`-F rank=32`).
    #[schema(inline)]
    pub settings: TrainSettingsForm,
}

/// What `POST /train/` asks for, besides its dataset: the form's text fields, typed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRequest {
    pub keywords: Vec<String>,
    pub settings: TrainSettingsForm,
}

/// At most this many trigger words, of at most [`MAX_KEYWORD_CHARS`] characters each.
pub const MAX_KEYWORDS: usize = 50;
pub const MAX_KEYWORD_CHARS: usize = 200;
/// Form fields besides the dataset and keywords: more is no settings form.
pub const MAX_SETTINGS_FIELDS: usize = 64;

impl TrainRequest {
    /// The `keywords` field and the other text fields (name, text) of the form. `Err`: what is wrong,
    /// naming the field (answered 422).
    pub fn from_form(keywords: &str, fields: &[(String, String)]) -> Result<TrainRequest, String> {
        Ok(TrainRequest {
            keywords: parse_keywords(keywords)?,
            settings: TrainSettingsForm::from_fields(fields)?,
        })
    }
}

/// A JSON list of strings, or a comma-separated string.
pub fn parse_keywords(text: &str) -> Result<Vec<String>, String> {
    let text = text.trim();
    let raw: Vec<String> = if text.starts_with('[') {
        serde_json::from_str(text).map_err(|_| {
            "keywords must be a JSON list of strings or a comma-separated string".to_string()
        })?
    } else {
        text.split(',').map(str::to_owned).collect()
    };
    let keywords: Vec<String> = raw
        .iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if keywords.is_empty() {
        return Err("keywords must name at least one keyword".into());
    }
    if keywords.len() > MAX_KEYWORDS {
        return Err(format!("more than {MAX_KEYWORDS} keywords"));
    }
    if let Some(long) = keywords
        .iter()
        .find(|k| k.chars().count() > MAX_KEYWORD_CHARS)
    {
        return Err(format!(
            "keyword longer than {MAX_KEYWORD_CHARS} characters: {long:.40}..."
        ));
    }
    Ok(keywords)
}

/// Which linear layers get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// The attention projections: q, k, v and the output projection of both streams of the double
    /// blocks, and q, k, v of the single blocks (diffusers' `to_q`, `to_k`, `to_v`, `to_out.0`,
    /// `add_{q,k,v}_proj`, `to_add_out`).
    Attention,
    /// Every linear layer of the transformer.
    AllLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The learning rate after warm-up stays put.
    Constant,
    /// Half a cosine from the learning rate to 0 after warm-up.
    Cosine,
}

/// How the noise level σ of each step is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SigmaSampling {
    /// Uniform over the scheduler's 1000 training noise levels: diffusers' default (`none`).
    Uniform,
    /// σ = sigmoid(n), n ~ N(0, 1): more steps at middle noise levels (diffusers' `logit_normal`).
    LogitNormal,
}

/// The trainer's settings as a request gives them: each absent field keeps the trainer's default
/// (docs/training.md describes each). Checked against its range when read from the form; the trainer
/// checks what depends on the model (its resolutions) and on other fields (warm-up within the steps).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSettingsForm {
    /// The base model's preset; by default the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// 1 to 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// 1e-8 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// 1 to 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// 0.001 to 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// Side of the square the buckets' areas match, in pixels: 512, 768 or 1024 (or a smaller model's
    /// own size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
    /// One image a step for now: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// The guidance value the guidance-distilled model is given while training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_sampling: Option<SigmaSampling>,
    /// Samples every N steps (and at the end); 0: only at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_every: Option<u32>,
    /// Checkpoints every N steps; 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u32>,
    /// The prompt of the samples; by default the keywords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `true`, `false`, or absent / `auto`: on with a GPU, off on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// The share of images trained with the empty caption, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_dropout: Option<f64>,
}

const SETTINGS_FIELDS: [&str; 20] = [
    "model",
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

impl TrainSettingsForm {
    /// Reads the form's text fields (name, text), each checked against its range with a message that
    /// names the field. Numbers and booleans arrive as text; JSON-looking values are taken as JSON.
    pub fn from_fields(fields: &[(String, String)]) -> Result<TrainSettingsForm, String> {
        if fields.len() > MAX_SETTINGS_FIELDS {
            return Err(format!("more than {MAX_SETTINGS_FIELDS} settings fields"));
        }
        let mut s = TrainSettingsForm::default();
        for (key, text) in fields {
            let value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()));
            let (k, v) = (key.as_str(), &value);
            match k {
                "model" => {
                    let name = v
                        .as_str()
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| format!("model must be a preset name (got {v})"))?;
                    s.model = Some(name.to_owned());
                }
                "steps" => s.steps = Some(int(k, v, 1, 100_000)? as u32),
                "learning_rate" => s.learning_rate = Some(float(k, v, 1e-8, 1.0)?),
                "rank" => s.rank = Some(int(k, v, 1, 256)? as u32),
                "alpha" => s.alpha = Some(float(k, v, 1e-3, 1024.0)?),
                "targets" => s.targets = Some(choice(k, v, &["attention", "all_linear"])?),
                "resolution" => s.resolution = Some(int(k, v, 1, 4096)? as u32),
                // One image a step for now; the field is accepted so that scripts can say so.
                "batch_size" => s.batch_size = Some(int(k, v, 1, 1)? as u32),
                "warmup_steps" => s.warmup_steps = Some(int(k, v, 0, 100_000)? as u32),
                "lr_schedule" => s.lr_schedule = Some(choice(k, v, &["constant", "cosine"])?),
                "max_grad_norm" => s.max_grad_norm = Some(float(k, v, 0.0, 1e6)?),
                "weight_decay" => s.weight_decay = Some(float(k, v, 0.0, 1.0)?),
                "guidance" => s.guidance = Some(float(k, v, 0.0, 100.0)?),
                "sigma_sampling" => {
                    s.sigma_sampling = Some(choice(k, v, &["uniform", "logit_normal"])?)
                }
                "sample_every" => s.sample_every = Some(int(k, v, 0, 100_000)? as u32),
                "checkpoint_every" => s.checkpoint_every = Some(int(k, v, 0, 100_000)? as u32),
                "sample_prompt" => {
                    let p = v
                        .as_str()
                        .map(str::trim)
                        .filter(|p| !p.is_empty() && p.chars().count() <= 2000)
                        .ok_or("sample_prompt must be a text of 1 to 2000 characters")?;
                    s.sample_prompt = Some(p.to_string());
                }
                "seed" => s.seed = Some(int(k, v, 0, i64::MAX as u64)?),
                "gradient_checkpointing" => s.gradient_checkpointing = boolean(k, v)?,
                "caption_dropout" => s.caption_dropout = Some(float(k, v, 0.0, 1.0)?),
                _ => {
                    return Err(format!(
                        "unknown training setting `{key}`; the settings are: {}",
                        SETTINGS_FIELDS.join(", ")
                    ))
                }
            }
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

/// `POST /train/` answer (202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainAccepted {
    pub model_id: String,
    pub status: JobStatus,
    pub keywords: Vec<String>,
    /// The settings fields given, as the trainer reads them.
    pub settings: TrainSettingsForm,
    pub dataset_bytes: u64,
    /// Images in the ZIP that will be trained on (they decode, within the limits).
    pub dataset_images: u32,
}

/// `GET /train/status/{model_id}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainStatus {
    pub model_id: String,
    pub status: JobStatus,
    pub step: u32,
    pub total_steps: u32,
    /// Latest loss; null before the first step.
    pub loss: Option<f32>,
    /// Null unless failed.
    pub error: Option<String>,
    pub keywords: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(fields: &[(&str, &str)]) -> Result<TrainSettingsForm, String> {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TrainSettingsForm::from_fields(&fields)
    }

    #[test]
    fn keywords_as_json_list_or_comma_separated() {
        let expected = vec![
            "realistic".to_string(),
            "detailed".into(),
            "high quality".into(),
        ];
        assert_eq!(
            parse_keywords(r#"["realistic", "detailed", "high quality"]"#).unwrap(),
            expected
        );
        assert_eq!(
            parse_keywords("realistic, detailed,high quality ,").unwrap(),
            expected
        );
        assert!(parse_keywords("[1, 2]").is_err());
        assert!(parse_keywords(" , ").is_err());
        assert!(parse_keywords(&"k,".repeat(MAX_KEYWORDS + 1)).is_err());
    }

    #[test]
    fn settings_fields_are_read_as_a_form_sends_them() {
        let s = form(&[
            ("rank", "32"),
            ("learning_rate", "5e-5"),
            ("targets", "all_linear"),
            ("resolution", "768"),
            ("model", "flux-dev"),
            ("gradient_checkpointing", "false"),
        ])
        .unwrap();
        assert_eq!(
            (s.rank, s.learning_rate, s.targets, s.resolution),
            (Some(32), Some(5e-5), Some(Targets::AllLinear), Some(768))
        );
        assert_eq!(s.model.as_deref(), Some("flux-dev"));
        assert_eq!(s.gradient_checkpointing, Some(false));
        assert_eq!(
            form(&[("gradient_checkpointing", "auto")]).unwrap(),
            TrainSettingsForm::default()
        );
        // Only the fields given are kept (and stored, and answered).
        assert_eq!(
            serde_json::to_value(form(&[("rank", "8")]).unwrap()).unwrap(),
            serde_json::json!({"rank": 8})
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (fields, word) in [
            (vec![("rank", "0")], "rank"),
            (vec![("rank", "many")], "rank"),
            (vec![("rank", "\"big\"")], "rank"),
            (vec![("learning_rate", "-1")], "learning_rate"),
            (vec![("targets", "mlp")], "targets"),
            (vec![("batch_size", "4")], "batch_size"),
            (vec![("lr", "1")], "`lr`"),
            (
                vec![("gradient_checkpointing", "yes")],
                "gradient_checkpointing",
            ),
        ] {
            let err = form(&fields).unwrap_err();
            assert!(err.contains(word), "{fields:?}: {err}");
        }
    }
}
