//! Sentence embeddings from a BERT-family encoder: mean pooling over the real tokens, then L2
//! normalisation, the recipe all-MiniLM-L6-v2 was trained with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::bert::{BertEncoder, BertModel};

/// The encoder that `scripts/fetch-models` installs, relative to the repository root.
pub const DEFAULT_ENCODER_DIR: &str = "models/all-MiniLM-L6-v2";

/// Prompts are short; 256 tokens is what the MiniLM sentence model was trained with.
const MAX_TOKENS: usize = 256;

/// Where an encoder's `config.json`, `tokenizer.json` and weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncoderSource {
    /// A local folder, as written by `scripts/fetch-models`.
    Dir(PathBuf),
    /// A Hugging Face hub repository such as `sentence-transformers/all-MiniLM-L6-v2`.
    Hub { repo: String, revision: String },
}

impl EncoderSource {
    /// An existing directory is taken as a folder; otherwise `owner/name[@revision]` is a hub id.
    pub fn parse(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        // The default folder also reads as `owner/name`: taken as a folder even before
        // fetch-models has made it, its absence says how to install it instead of trying the hub.
        if path.is_dir() || arg == DEFAULT_ENCODER_DIR {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let (repo, revision) = arg.split_once('@').unwrap_or((arg, "main"));
        if repo.split('/').count() == 2 && !path.is_absolute() && !arg.starts_with('.') {
            return Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        bail!(
            "encoder {arg:?} is neither a folder nor a hub id (owner/name); \
             for the default encoder run scripts/fetch-models first"
        )
    }

    /// A stable name recorded in the head's metadata.
    pub fn id(&self) -> String {
        match self {
            Self::Dir(dir) => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string()),
            Self::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }

    fn files(&self) -> Result<(PathBuf, PathBuf, PathBuf)> {
        match self {
            Self::Dir(dir) => {
                let file = |name: &str| {
                    let p = dir.join(name);
                    if p.is_file() {
                        Ok(p)
                    } else {
                        bail!(
                            "{} is missing; run scripts/fetch-models to install the encoder",
                            p.display()
                        )
                    }
                };
                Ok((
                    file("config.json")?,
                    file("tokenizer.json")?,
                    file("model.safetensors")?,
                ))
            }
            Self::Hub { repo, revision } => {
                let api = hf_hub::api::sync::Api::new()?;
                let repo = api.repo(hf_hub::Repo::with_revision(
                    repo.clone(),
                    hf_hub::RepoType::Model,
                    revision.clone(),
                ));
                Ok((
                    repo.get("config.json")?,
                    repo.get("tokenizer.json")?,
                    repo.get("model.safetensors")?,
                ))
            }
        }
    }
}

/// A BERT encoder with its tokenizer, producing one unit-length vector per text.
///
/// The encoder may run in two parts: the pretrained bottom layers and `top`, its last layers
/// as fine-tuned by this project (shipped inside the head file). Without `top` it is the
/// pretrained model as is.
pub struct SentenceEncoder {
    bottom: BertModel,
    top: Option<BertEncoder>,
    config: Config,
    tokenizer: Tokenizer,
    device: Device,
}

impl SentenceEncoder {
    /// The pretrained encoder, all layers.
    pub fn load(source: &EncoderSource, device: &Device) -> Result<Self> {
        Self::load_with_top(source, device, HashMap::new())
    }

    /// The pretrained bottom layers topped with `top`: the weights of the last layers, named
    /// `layer.{i}.…` from 0 (as [`Self::pretrained_top`] gives them, or as fine-tuned).
    pub fn load_with_top(
        source: &EncoderSource,
        device: &Device,
        top: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let (config_path, tokenizer, weights) = source.files()?;
        let config = read_config(&config_path)?;
        let top_layers = layer_count(&top);
        if top_layers > config.num_hidden_layers {
            bail!(
                "{top_layers} tuned layers but the encoder has only {}",
                config.num_hidden_layers
            );
        }
        let tokenizer = load_tokenizer(&tokenizer, &config)?;
        // SAFETY of the mmap: the weights file is not modified while the process runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let bottom_config = Config {
            num_hidden_layers: config.num_hidden_layers - top_layers,
            ..config.clone()
        };
        let bottom = BertModel::load(vb, &bottom_config)
            .with_context(|| format!("loading BERT weights from {}", weights.display()))?;
        // Inference runs the tuned layers on super::bert's fused kernels: the same function as
        // the trainable TopLayers, and faster.
        let top = if top_layers > 0 {
            let vb = VarBuilder::from_tensors(top, DType::F32, device);
            let top_config = Config {
                num_hidden_layers: top_layers,
                ..config.clone()
            };
            Some(BertEncoder::load(vb, &top_config).context("loading the tuned top layers")?)
        } else {
            None
        };
        Ok(Self {
            bottom,
            top,
            config,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The pretrained weights of the last `layers` layers, renamed `layer.0.…` upwards: the
    /// starting point of fine-tuning.
    pub fn pretrained_top(
        source: &EncoderSource,
        device: &Device,
        layers: usize,
    ) -> Result<HashMap<String, Tensor>> {
        let (config_path, _, weights) = source.files()?;
        let config = read_config(&config_path)?;
        let first = config
            .num_hidden_layers
            .checked_sub(layers)
            .context("more layers to tune than the encoder has")?;
        let all = candle_core::safetensors::load(&weights, device)?;
        let mut top = HashMap::new();
        for (name, tensor) in all {
            // Checkpoints name layers `encoder.layer.N.…`, some under a `bert.` prefix.
            let Some(rest) = name.split("encoder.layer.").nth(1) else {
                continue;
            };
            let Some((index, tail)) = rest.split_once('.') else {
                continue;
            };
            if let Some(i) = index.parse::<usize>().ok().filter(|&i| i >= first) {
                top.insert(
                    format!("layer.{}.{tail}", i - first),
                    tensor.to_dtype(DType::F32)?,
                );
            }
        }
        if layer_count(&top) != layers {
            bail!(
                "found {} of {layers} top layers in {}",
                layer_count(&top),
                weights.display()
            );
        }
        Ok(top)
    }

    /// Whether the last layers are the project's fine-tuned ones rather than the pretrained.
    pub fn is_tuned(&self) -> bool {
        self.top.is_some()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Hidden states after the pretrained bottom layers, `[n, tokens, hidden]`, and the
    /// attention mask, `[n, tokens]` (1 for real tokens, 0 for padding).
    pub fn bottom_states(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        // A single prompt skips the batch path's thread pool: cheaper for one short text.
        let encodings = match texts {
            [text] => vec![self
                .tokenizer
                .encode(*text, true)
                .map_err(anyhow::Error::msg)?],
            _ => self
                .tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(anyhow::Error::msg)?,
        };
        let rows = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor> {
            let rows = encodings
                .iter()
                .map(|e| Tensor::new(f(e), &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        };
        let ids = rows(&|e| e.get_ids())?;
        let mask = rows(&|e| e.get_attention_mask())?;
        let type_ids = ids.zeros_like()?;
        let hidden = self.bottom.forward(&ids, &type_ids, padding(&mask)?)?;
        Ok((hidden, mask))
    }

    /// Embeds `texts` in one forward pass: a `[texts.len(), hidden_size]` f32 tensor of unit rows.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.hidden_size()),
                DType::F32,
                &self.device,
            )?);
        }
        let (hidden, mask) = self.bottom_states(texts)?;
        let hidden = match &self.top {
            Some(top) => top.forward(&hidden, padding(&mask)?)?,
            None => hidden,
        };
        pool(&hidden, &mask)
    }

    /// Embeds many texts in batches, so that padding stays short and memory stays small.
    pub fn embed_all(&self, texts: &[&str], batch: usize) -> Result<Tensor> {
        let order = length_order(texts);
        let mut parts = Vec::new();
        for chunk in order.chunks(batch.max(1)) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            parts.push(self.embed(&batch_texts)?);
        }
        if parts.is_empty() {
            return self.embed(&[]);
        }
        let sorted = Tensor::cat(&parts, 0)?;
        let mut inverse = vec![0u32; texts.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), &self.device)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }
}

/// Indices of `texts` from shortest to longest: batches of similar length need little padding.
pub fn length_order(texts: &[&str]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    order
}

/// Mean over real tokens, then unit length, as the sentence-transformers model does.
pub fn pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1f32, f32::MAX)?;
    let mean = summed.broadcast_div(&counts)?;
    let norms = mean
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    Ok(mean.broadcast_div(&norms)?)
}

/// The attention mask where some row is padded; `None` when every token is real (one prompt
/// alone), which spares the layers the masking.
fn padding(mask: &Tensor) -> Result<Option<&Tensor>> {
    let padded = mask.min_all()?.to_scalar::<u32>()? == 0;
    Ok(padded.then_some(mask))
}

/// How many layers a `layer.{i}.…` tensor map holds.
fn layer_count(tensors: &HashMap<String, Tensor>) -> usize {
    tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix("layer.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn read_config(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn load_tokenizer(path: &Path, config: &Config) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("loading {}", path.display()))?;
    // Some exported tokenizers (this MiniLM's among them) pad every input to a fixed length;
    // padding only to the longest text of a batch keeps single prompts fast, and the
    // attention mask keeps pads out of both attention and pooling.
    let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
    let pad_token = tokenizer
        .get_padding()
        .map_or_else(|| "[PAD]".to_string(), |p| p.pad_token.clone());
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_id,
        pad_token,
        ..Default::default()
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_TOKENS.min(config.max_position_embeddings),
            ..Default::default()
        }))
        .map_err(anyhow::Error::msg)?;
    Ok(tokenizer)
}
