//! The server's settings. Every setting is a flag with an environment variable beside it (the command line
//! in `cli` flattens these); `.env` in the working directory is read first (for HF_TOKEN), and values
//! already in the environment win over it.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser};
use engine::classifier::{DEFAULT_ENCODER_DIR, DEFAULT_HEAD_PATH};
use engine::device::DeviceChoice;
use engine::weights::WeightFormat;

use crate::store::Location;

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Where the database, uploads, LoRAs and images live.
    #[arg(long, env = "STUDIO_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Where jobs, their events, settings, conversations and API tokens are kept: a SQLite file, or a
    /// PostgreSQL database shared by a cluster's nodes (`postgres://user:password@host:5432/studio`;
    /// run `studio migrate --database URL` once first). Default: `studio.db` in --data-dir.
    #[arg(long, env = "STUDIO_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Serve the API and UI only, running no jobs: a cluster's API node, beside `studio worker` nodes,
    /// all on one PostgreSQL store (--database) and one shared --data-dir or --file-store. See
    /// docs/deployment.md.
    #[arg(long, env = "STUDIO_API_ONLY")]
    pub api_only: bool,
    /// Where a cluster's nodes that share no folder keep their files (images, uploads, LoRAs, training
    /// checkpoints): `s3://bucket/prefix` (S3-compatible; credentials and endpoint from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT, AWS_ALLOW_HTTP) or `file:///folder` (mounted on
    /// every node). --data-dir is then this node's working copy. Default: none, --data-dir alone.
    #[arg(long, env = "STUDIO_FILE_STORE")]
    pub file_store: Option<String>,
    /// This node's name in a cluster (which node holds which job); unique per process. Default: the
    /// host's name and the process id.
    #[arg(long, env = "STUDIO_NODE_NAME")]
    pub node_name: Option<String>,
    /// How long a cluster's node holds a job without renewing its lease (a heartbeat every third of it);
    /// past it, the job goes back to the queue for another node. Seconds.
    #[arg(long, env = "STUDIO_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_seconds: u64,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, env = "STUDIO_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Port to listen on (0 picks a free one, which the startup line names).
    #[arg(long, env = "STUDIO_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Where the models run: auto (CUDA when built with it and a GPU answers, else the CPU), cpu, cuda.
    #[arg(long, env = "STUDIO_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// One worker per GPU: `all`, or CUDA ordinals as nvidia-smi numbers them (`0,1`). Each worker
    /// keeps its own models in its GPU's memory under its own memory plan (--gpu-memory applies to
    /// each GPU); jobs go to the worker that already holds their model. Needs a CUDA build.
    #[arg(long, env = "STUDIO_GPUS", conflicts_with = "workers")]
    pub gpus: Option<engine::device::Gpus>,
    /// Workers on the CPU (`--device cpu`), each with its own copy of the models: several jobs run at
    /// once. For GPUs use --gpus.
    #[arg(long, env = "STUDIO_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// The most GPU memory a model may use (`16G`, `12GiB`, `8000M`): its memory plan (weight formats,
    /// where the text encoders run, tiled decoding) is chosen to fit it. Default: the preset's own cap,
    /// else what the GPU has free when the model loads. See docs/memory.md.
    #[arg(long, env = "STUDIO_GPU_MEMORY", value_parser = engine::memory::parse_size)]
    pub gpu_memory: Option<u64>,
    /// Model preset for requests that name none; the engine's own default when not given.
    #[arg(long, env = "STUDIO_PRESET")]
    pub preset: Option<String>,
    /// A local copy of a hub preset's model in diffusers' layout (model_index.json, transformer/, vae/, the
    /// text encoders and tokenizers): used instead of the hub for --preset (flux-dev when not given), e.g.
    /// on a machine with no network or with the weights already on disk. No token is needed then.
    #[arg(long, env = "STUDIO_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// The format the FLUX transformer's linear layers are held in: bf16, fp8, q8_0, q6_k, q5_k,
    /// q4_k or q4_0, made from the checkpoint as it loads. Not given: as the checkpoint stores them
    /// (an fp8 or GGUF file stays fp8 or GGUF).
    #[arg(long, env = "STUDIO_WEIGHTS", value_parser = parse_weights)]
    pub weights: Option<WeightFormat>,
    /// The precision of requests that set none, for every preset (`fp8`) or per preset
    /// (`flux-dev=fp8,flux-schnell=exact`; `fp8,flux-dev=exact`: flux-dev exact, the others fp8):
    /// `exact` (bf16 products; needs the transformer in bf16) or `fp8` (fp8 products: faster, not
    /// exact; a bf16 transformer gets an fp8 copy for each run). Not given for a preset: its
    /// transformer as it is loaded. See docs/performance.md, "Precision".
    #[arg(long, env = "STUDIO_PRECISION")]
    pub precision: Option<PrecisionDefaults>,
    /// Folder of LoRA files (`.safetensors`) that `/generate/` may name by file name, with or without
    /// the extension; `<data-dir>/loras` when not given. No other server-side path is accepted over HTTP.
    #[arg(long, env = "STUDIO_LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// When set, every route and WebSocket needs `Authorization: Bearer <token>` (WebSockets may pass
    /// `?token=<token>` instead, as browsers cannot set headers on them).
    #[arg(long, env = "STUDIO_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// Hugging Face token for gated weights (FLUX.1-dev); usually from `.env`.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<Secret>,
    /// Largest JSON body or WebSocket message, in bytes (K, M, G suffixes allowed): room for a
    /// generation's input image and mask as base64.
    #[arg(long, env = "STUDIO_JSON_LIMIT", default_value = "32M", value_parser = parse_bytes)]
    pub json_limit: u64,
    /// Largest training upload (the whole multipart body), in bytes (K, M, G suffixes allowed).
    #[arg(long, env = "STUDIO_UPLOAD_LIMIT", default_value = "2G", value_parser = parse_bytes)]
    pub upload_limit: u64,
    /// Generation jobs that may wait for the worker; one more is answered 429.
    #[arg(long, env = "STUDIO_GENERATION_QUEUE", default_value_t = 16)]
    pub generation_queue: usize,
    /// Training jobs that may wait for the worker; one more is answered 429.
    #[arg(long, env = "STUDIO_TRAINING_QUEUE", default_value_t = 4)]
    pub training_queue: usize,
    /// Classification requests in progress at once; one more is answered 429.
    #[arg(long, env = "STUDIO_CLASSIFY_QUEUE", default_value_t = 32)]
    pub classify_queue: usize,
    /// Web origins (`https://host:port`) whose pages may call the API from a browser, comma-separated;
    /// `*` allows any. None by default: only the studio's own pages (same origin) and non-browser clients.
    #[arg(long, env = "STUDIO_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origins: Vec<CorsOrigin>,
    /// The browser UI's built files (wasm, JS, CSS, icon), as `scripts/build-web` writes them.
    #[arg(long, env = "STUDIO_SITE_DIR", default_value = "target/site")]
    pub site_dir: PathBuf,
    #[command(flatten)]
    pub classifier: ClassifierConfig,
    #[command(flatten)]
    pub chat: ChatConfig,
}

/// Where the store is: `--database` when given, else `studio.db` in the data directory.
pub fn store_location(data_dir: &std::path::Path, database: Option<&str>) -> Location {
    database.map_or_else(
        || Location::File(crate::files::DataDir::database_in(data_dir)),
        Location::parse,
    )
}

/// The chat's language model: a local GGUF model, or an OpenAI-compatible server the user runs.
#[derive(Debug, Clone, Args)]
pub struct ChatConfig {
    /// The local model: a preset (smollm2-135m, qwen2.5-3b, qwen2.5-7b, llama-3.2-3b), a .gguf file, or
    /// owner/repo:file.gguf on the hub. The default is installed by `scripts/fetch-models`.
    #[arg(long, env = "STUDIO_CHAT_MODEL", default_value = "smollm2-135m")]
    pub chat_model: String,
    /// Where the local model runs: auto (the GPU when there is one), cpu, cuda.
    #[arg(long, env = "STUDIO_CHAT_DEVICE", default_value = "auto")]
    pub chat_device: DeviceChoice,
    /// An OpenAI-compatible server to answer instead of the local model: its base URL up to `/v1`
    /// (Ollama: http://127.0.0.1:11434/v1, llama.cpp's llama-server: http://127.0.0.1:8080/v1).
    #[arg(long, env = "STUDIO_CHAT_SERVER")]
    pub chat_server: Option<String>,
    /// The model name to ask that server for (e.g. `llama3.2` for Ollama).
    #[arg(long, env = "STUDIO_CHAT_SERVER_MODEL", requires = "chat_server")]
    pub chat_server_model: Option<String>,
    /// The API key that server wants, sent as a bearer token.
    #[arg(long, env = "STUDIO_CHAT_SERVER_KEY", hide_env_values = true)]
    pub chat_server_key: Option<Secret>,
    /// New tokens an answer may have at most (a request's `max_tokens` is capped by it).
    #[arg(long, env = "STUDIO_CHAT_MAX_TOKENS", default_value_t = 512)]
    pub chat_max_tokens: u32,
    /// Chat answers waiting or in progress at once (answered one at a time); one more is answered 429.
    #[arg(long, env = "STUDIO_CHAT_QUEUE", default_value_t = 8)]
    pub chat_queue: usize,
    /// The sentence encoder that finds the sections of the studio's own docs a question is about (a
    /// folder or a hub id, as `--classifier-model` takes); installed by `scripts/fetch-models`.
    #[arg(long, env = "STUDIO_CHAT_DOCS_ENCODER", default_value = DEFAULT_ENCODER_DIR)]
    pub chat_docs_encoder: String,
    /// Whether the chat answers from the studio's own docs. Off, nothing is indexed at start (which
    /// takes a minute or more on a small, busy CPU) and no answer gets docs.
    #[arg(long, env = "STUDIO_CHAT_DOCS", default_value_t = true, action = clap::ArgAction::Set)]
    pub chat_docs: bool,
}

/// Where the prompt classifier's two parts come from. The defaults are relative to the working directory, the
/// repository root when started by `scripts/run`.
#[derive(Debug, Clone, Args)]
pub struct ClassifierConfig {
    /// The sentence encoder: a local folder or a hub id (owner/name[@revision]); `scripts/fetch-models`
    /// installs the default.
    #[arg(long, env = "STUDIO_CLASSIFIER_MODEL", default_value = DEFAULT_ENCODER_DIR)]
    pub classifier_model: String,
    /// The classifier head trained for that encoder (safetensors, from `train-classifier`).
    #[arg(long, env = "STUDIO_CLASSIFIER_HEAD", default_value = DEFAULT_HEAD_PATH)]
    pub classifier_head: PathBuf,
}

/// The settings alone as a command line, for their defaults.
#[derive(Parser)]
#[command(name = "studio")]
struct SettingsOnly {
    #[command(flatten)]
    serve: ServeConfig,
}

impl ServeConfig {
    /// The defaults, as `studio serve` with no flags and no environment would have them.
    pub fn defaults() -> ServeConfig {
        SettingsOnly::parse_from(["studio"]).serve
    }
}

/// `--weights`: a [`WeightFormat`] by the name users write.
pub fn parse_weights(name: &str) -> Result<WeightFormat, String> {
    WeightFormat::parse(name).map_err(|e| e.to_string())
}

/// `--precision`: the precision of requests that name none, for all presets and per preset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrecisionDefaults {
    /// For presets not named in `presets`.
    pub all: Option<app::Precision>,
    /// `(preset, precision)`, each preset once.
    pub presets: Vec<(String, app::Precision)>,
}

impl PrecisionDefaults {
    /// The same precision for every preset.
    pub fn all(precision: app::Precision) -> PrecisionDefaults {
        PrecisionDefaults {
            all: Some(precision),
            presets: Vec::new(),
        }
    }

    /// The precision of a request for `preset` that names none.
    pub fn of(&self, preset: &str) -> Option<app::Precision> {
        self.presets
            .iter()
            .find(|(name, _)| name == preset)
            .map(|(_, p)| *p)
            .or(self.all)
    }
}

impl std::str::FromStr for PrecisionDefaults {
    type Err = String;

    /// A comma-separated list of `precision` (at most one: every preset not named) and
    /// `preset=precision` items.
    fn from_str(spec: &str) -> Result<Self, String> {
        let mut defaults = PrecisionDefaults::default();
        for item in spec.split(',').map(str::trim) {
            match item.split_once('=') {
                None if defaults.all.is_some() => {
                    return Err(format!(
                        "`{item}`: a precision for every preset is given twice; name a preset as `preset=precision`"
                    ))
                }
                None => defaults.all = Some(item.parse()?),
                Some((preset, precision)) => {
                    let preset = preset.trim();
                    if engine::presets::find(preset).is_none() {
                        let names: Vec<&str> =
                            engine::presets::PRESETS.iter().map(|p| p.name).collect();
                        return Err(format!(
                            "unknown preset `{preset}`: choose one of {}",
                            names.join(", ")
                        ));
                    }
                    if defaults.presets.iter().any(|(name, _)| name == preset) {
                        return Err(format!("preset `{preset}` is given twice"));
                    }
                    defaults
                        .presets
                        .push((preset.to_owned(), precision.trim().parse()?));
                }
            }
        }
        Ok(defaults)
    }
}

/// A value never printed: Debug and logs show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Secret(s.to_owned()))
    }
}

/// A browser origin allowed to call the API, or any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigin {
    Any,
    Exact(String),
}

fn parse_origin(s: &str) -> Result<CorsOrigin, String> {
    let s = s.trim().trim_end_matches('/');
    if s == "*" {
        return Ok(CorsOrigin::Any);
    }
    let ok = (s.starts_with("http://") || s.starts_with("https://"))
        && !s["https://".len().min(s.len())..].contains('/')
        && axum::http::HeaderValue::from_str(s).is_ok();
    if ok {
        Ok(CorsOrigin::Exact(s.to_owned()))
    } else {
        Err(format!(
            "{s:?} is not an origin like https://example.com:8080 (scheme, host, optional port) or *"
        ))
    }
}

/// `123`, `64K`, `1M`, `2G` (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512K, 1M or 2G"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999999G").is_err());
    }

    #[test]
    fn weights_take_a_format_by_name_and_refuse_others_with_the_list() {
        let config = SettingsOnly::parse_from(["studio", "--weights", "Q8_0"]).serve;
        assert_eq!(
            config.weights,
            Some(WeightFormat::Gguf(candle_core::quantized::GgmlDType::Q8_0))
        );
        assert_eq!(ServeConfig::defaults().weights, None);
        let err = SettingsOnly::try_parse_from(["studio", "--weights", "nf4"])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("fp8") && err.contains("q4_0"), "{err}");
    }

    #[test]
    fn precision_is_set_for_every_preset_or_per_preset_and_a_wrong_spec_says_what_is_wrong() {
        use app::Precision::{Exact, Fp8};
        let config = SettingsOnly::parse_from(["studio", "--precision", "FP8"]).serve;
        let all = config.precision.unwrap();
        assert_eq!(
            (all.of("flux-dev"), all.of("flux-schnell")),
            (Some(Fp8), Some(Fp8))
        );
        let spec: PrecisionDefaults = "fp8, flux-dev = exact".parse().unwrap();
        assert_eq!(spec.of("flux-dev"), Some(Exact));
        assert_eq!(spec.of("flux-schnell"), Some(Fp8));
        let one: PrecisionDefaults = "flux-schnell=fp8".parse().unwrap();
        assert_eq!(
            (one.of("flux-schnell"), one.of("flux-dev")),
            (Some(Fp8), None)
        );
        assert_eq!(ServeConfig::defaults().precision, None);
        for (bad, says) in [
            ("fp16", "choose exact or fp8"),
            (
                "flux-pro=fp8",
                "unknown preset `flux-pro`: choose one of flux-dev",
            ),
            ("flux-dev=fp8,flux-dev=exact", "`flux-dev` is given twice"),
            ("fp8,exact", "given twice"),
            ("flux-dev=", "unknown precision"),
        ] {
            let err = SettingsOnly::try_parse_from(["studio", "--precision", bad])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn cors_origins_are_exact_origins_or_any() {
        let config = SettingsOnly::parse_from([
            "studio",
            "--cors-origins",
            "https://a.example:8443/,http://localhost:3000",
        ])
        .serve;
        assert_eq!(
            config.cors_origins,
            [
                CorsOrigin::Exact("https://a.example:8443".into()),
                CorsOrigin::Exact("http://localhost:3000".into())
            ]
        );
        assert_eq!(parse_origin("*"), Ok(CorsOrigin::Any));
        for bad in [
            "example.com",
            "https://a.example/path",
            "ftp://x",
            "http://a\nb",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        assert!(ServeConfig::defaults().cors_origins.is_empty());
    }

    #[test]
    fn secrets_do_not_print() {
        let secret: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "***");
    }
}
