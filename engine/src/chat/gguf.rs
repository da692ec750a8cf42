//! A quantized GGUF chat model on candle: `quantized_llama` for `general.architecture = llama`
//! (Llama 3.x, SmolLM2), `quantized_qwen2` for `qwen2` (Qwen2/2.5); the tokenizer and chat template
//! from the same file.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use tokenizers::Tokenizer;

use super::{Answer, ChatTemplate, FinishReason, LanguageModel, SamplingSettings, Turn};

/// The transformer of one of the two families.
enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Weights {
    fn forward(&mut self, tokens: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Llama(m) => m.forward(tokens, position),
            Weights::Qwen2(m) => m.forward(tokens, position),
        }
    }

    fn clear_kv_cache(&mut self) {
        match self {
            Weights::Llama(m) => m.clear_kv_cache(),
            Weights::Qwen2(m) => m.clear_kv_cache(),
        }
    }
}

/// Tokens a chat model attends to at most on a GPU: its memory there grows with them (the key/value
/// cache, and a whole prompt's attention scores, which candle's quantized models hold at once), and the
/// trained contexts of the presets (32k tokens for Qwen2.5) would take gigabytes that FLUX's memory plan
/// needs. A longer conversation keeps its latest turns.
pub const GPU_CONTEXT: usize = 4096;

/// The tokens the model attends to: its trained context, within its rotary tables (llama) and, on a
/// GPU, [`GPU_CONTEXT`].
fn context_of(content: &Content, architecture: &str, on_gpu: bool) -> usize {
    let trained = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u32().ok())
        .map_or(quantized_llama::MAX_SEQ_LEN, |n| n as usize);
    let trained = if architecture == "llama" {
        trained.min(quantized_llama::MAX_SEQ_LEN)
    } else {
        trained
    };
    if on_gpu {
        trained.min(GPU_CONTEXT)
    } else {
        trained
    }
}

/// The block types candle multiplies on the CPU with portable code only (it has AVX2 products for Q4_0,
/// Q8_0 and the K-quants): an order of magnitude slower than a dense f32 product there.
const PORTABLE_ON_CPU: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// The most bytes a model's weights may take widened to f32 on the CPU ([`widened_on_cpu`]): the
/// default SmolLM2-135M in Q4_1 takes 0.5 GiB so; larger models stay as stored.
pub const WIDEN_MAX_BYTES: u64 = 1 << 30;

/// On the CPU, a model with weights in [`PORTABLE_ON_CPU`] types whose f32 copy fits in
/// [`WIDEN_MAX_BYTES`]: the same GGUF with those tensors widened to f32 (exactly: each value is its
/// block's scale times its quant plus its minimum, as llama.cpp dequantizes), in memory, so that its
/// products run as dense f32 ones. `None`: read the file as it is.
fn widened_on_cpu(
    content: &Content,
    file: &mut (impl Read + Seek),
    device: &Device,
    max_bytes: u64,
) -> Result<Option<(Content, Cursor<Vec<u8>>)>> {
    let infos = &content.tensor_infos;
    let portable = infos
        .values()
        .any(|t| PORTABLE_ON_CPU.contains(&t.ggml_dtype));
    let f32_bytes: u64 = infos
        .values()
        .map(|t| 4 * t.shape.elem_count() as u64)
        .sum();
    if !device.is_cpu() || !portable || f32_bytes > max_bytes {
        return Ok(None);
    }
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let q = content.tensor(file, name, &Device::Cpu)?;
        let q = if PORTABLE_ON_CPU.contains(&info.ggml_dtype) {
            QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::F32)?
        } else {
            q
        };
        tensors.push((name.as_str(), q));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
    let mut buffer = Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensors)?;
    buffer.set_position(0);
    let widened = Content::read(&mut buffer)?;
    Ok(Some((widened, buffer)))
}

/// What a GGUF chat model takes in a GPU's memory, read from its file's header: what FLUX's memory plan
/// leaves it, or why it runs on the CPU instead (docs/chat.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmMemory {
    /// Its weights as stored (quantized): allocated when it loads.
    pub weights: u64,
    /// What an answer allocates as it runs, at the full context: the key/value cache (f32), a
    /// whole-context prompt's attention scores and their softmax (f32), and an allowance for the
    /// activations and logits around them.
    pub working: u64,
    /// The tokens it attends to on the GPU.
    pub context: usize,
}

impl LmMemory {
    /// Room for activations, logits and the allocator's rounding.
    const ALLOWANCE: u64 = 256 << 20;

    /// The model at `path` as it would run on a GPU.
    pub fn of_file(path: &Path) -> Result<LmMemory> {
        let mut file = File::open(path)
            .with_context(|| format!("opening the language model {}", path.display()))?;
        let content = Content::read(&mut file)
            .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let number = |key: &str| -> Result<u64> {
            let key = format!("{arch}.{key}");
            content
                .metadata
                .get(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .with_context(|| format!("{}: no `{key}` in its header", path.display()))
        };
        let weights = content
            .tensor_infos
            .values()
            .map(|t| {
                let d = t.ggml_dtype;
                (t.shape.elem_count() / d.block_size() * d.type_size()) as u64
            })
            .sum();
        let (layers, heads, width) = (
            number("block_count")?,
            number("attention.head_count")?,
            number("embedding_length")?,
        );
        let kv_heads = number("attention.head_count_kv").unwrap_or(heads);
        let context = context_of(&content, &arch, true) as u64;
        let cache = layers * 2 * kv_heads * (width / heads) * context * 4;
        let scores = 2 * heads * context * context * 4;
        Ok(LmMemory {
            weights,
            working: cache + scores + Self::ALLOWANCE,
            context: context as usize,
        })
    }

    pub fn total(&self) -> u64 {
        self.weights + self.working
    }
}

pub struct GgufChat {
    name: String,
    weights: Weights,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Token ids that end the assistant's turn.
    stops: Vec<u32>,
    /// Tokens (prompt and answer) the model can attend to.
    context: usize,
    device: Device,
}

/// The transformer of `architecture` from a GGUF's tensors.
fn build(
    architecture: &str,
    content: Content,
    reader: &mut (impl Read + Seek),
    device: &Device,
) -> Result<Weights> {
    Ok(match architecture {
        "llama" => Weights::Llama(quantized_llama::ModelWeights::from_gguf(
            content, reader, device,
        )?),
        "qwen2" => Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
            content, reader, device,
        )?),
        other => bail!("architecture `{other}` is not supported; use a llama or qwen2 GGUF"),
    })
}

impl GgufChat {
    /// Reads the model at `path` onto `device`; `name` is what answers report.
    pub fn load(path: &Path, name: &str, device: &Device) -> Result<GgufChat> {
        let mut file = File::open(path)
            .with_context(|| format!("opening the language model {}", path.display()))?;
        let content = Content::read(&mut file)
            .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        let meta = |key: &str| content.metadata.get(key);
        let architecture = meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let tokenizer = super::tokenizer::load(path, &content)?;
        let jinja = meta("tokenizer.chat_template").and_then(|v| v.to_string().ok());
        let template = ChatTemplate::detect(jinja.map(String::as_str), |t| {
            tokenizer.token_to_id(t).is_some()
        })?;
        let mut stops: Vec<u32> = template
            .stop_tokens()
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        if let Some(eos) = meta("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()) {
            stops.push(eos);
        }
        let context = context_of(&content, &architecture, device.is_cuda());
        let weights = match widened_on_cpu(&content, &mut file, device, WIDEN_MAX_BYTES)? {
            Some((widened, mut memory)) => {
                tracing::info!(
                    "{name}: its Q4_1/Q5_0/Q5_1 weights widened to f32 for the CPU's dense products"
                );
                build(&architecture, widened, &mut memory, device)
            }
            None => build(&architecture, content, &mut file, device),
        }
        .with_context(|| format!("loading the language model {}", path.display()))?;
        Ok(GgufChat {
            name: name.to_string(),
            weights,
            tokenizer,
            template,
            stops,
            context,
            device: device.clone(),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> ChatTemplate {
        self.template
    }

    /// The ids of `text`, special tokens written in it (`<|im_start|>`) kept whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Forgets the attention cache: the next `logits` starts a new sequence at position 0.
    pub fn clear(&mut self) {
        self.weights.clear_kv_cache();
    }

    /// The next-token logits (f32, one row) after `tokens`, which continue the cached sequence at
    /// `position`.
    pub fn logits(&mut self, tokens: &[u32], position: usize) -> Result<Tensor> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        Ok(self
            .weights
            .forward(&input, position)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// The prompt's tokens, leaving out the oldest turns after the system turn while the prompt and
    /// `max_tokens` of answer would not fit in the context.
    fn prompt(&self, turns: &[Turn], max_tokens: usize) -> Result<Vec<u32>> {
        ChatTemplate::check(turns)?;
        let keep_first = usize::from(turns[0].role == super::Role::System);
        let mut dropped = 0;
        loop {
            let kept: Vec<Turn> = turns[..keep_first]
                .iter()
                .chain(&turns[keep_first + dropped..])
                .cloned()
                .collect();
            let tokens = self.encode(&self.template.render(&kept))?;
            if tokens.len() + max_tokens <= self.context {
                return Ok(tokens);
            }
            // Drop a user turn and its answer together, so that turns keep alternating.
            if keep_first + dropped + 2 >= turns.len() {
                bail!(
                    "the message is too long: {} tokens with room for {max_tokens} of answer, and the model reads {}",
                    tokens.len(),
                    self.context
                );
            }
            dropped += 2;
        }
    }
}

impl LanguageModel for GgufChat {
    fn name(&self) -> &str {
        &self.name
    }

    fn answer(
        &mut self,
        turns: &[Turn],
        settings: &SamplingSettings,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer> {
        let max_tokens = settings.max_tokens.min(self.context / 2).max(1);
        let prompt = self.prompt(turns, max_tokens)?;
        let sampling = if settings.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match settings.top_p {
                Some(p) => Sampling::TopP {
                    p,
                    temperature: settings.temperature,
                },
                None => Sampling::All {
                    temperature: settings.temperature,
                },
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(settings.seed, sampling);
        self.clear();
        let mut context = prompt.clone();
        let mut logits = self.logits(&prompt, 0)?;
        let mut answer: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        let mut finish = FinishReason::Length;
        for _ in 0..max_tokens {
            if settings.repeat_penalty != 1.0 {
                let start = context.len().saturating_sub(settings.repeat_last_n);
                logits = candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    settings.repeat_penalty,
                    &context[start..],
                )?;
            }
            let next = sampler.sample(&logits)?;
            if self.stops.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            answer.push(next);
            context.push(next);
            // Decoded whole each time: a character can span tokens, so text is shown once complete.
            let text = self.decode(&answer)?;
            let piece = text.get(shown..).unwrap_or_default();
            if !piece.is_empty() && !text.ends_with('\u{fffd}') {
                shown = text.len();
                if on_text(piece).is_break() {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            logits = self.logits(&[next], context.len() - 1)?;
        }
        Ok(Answer {
            text: self.decode(&answer)?,
            tokens: answer.len(),
            finish,
            prompt_tokens: prompt.len(),
        })
    }
}

impl GgufChat {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF in memory with one tensor of each given type (4 rows of 64 values).
    fn gguf_of(types: &[(&str, GgmlDType)]) -> Result<Cursor<Vec<u8>>> {
        let values = Tensor::arange(0f32, 256., &Device::Cpu)?
            .affine(0.37, -40.)?
            .sin()?
            .reshape((4, 64))?;
        let tensors = types
            .iter()
            .map(|(name, dtype)| Ok((*name, QTensor::quantize(&values, *dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
        let arch = gguf_file::Value::String("llama".into());
        let mut buffer = Cursor::new(Vec::new());
        gguf_file::write(&mut buffer, &[("general.architecture", &arch)], &refs)?;
        buffer.set_position(0);
        Ok(buffer)
    }

    fn values(content: &Content, file: &mut (impl Read + Seek), name: &str) -> Result<Vec<f32>> {
        let q = content.tensor(file, name, &Device::Cpu)?;
        Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
    }

    /// Q4_1, Q5_0 and Q5_1 tensors become f32 holding exactly their dequantized values; Q4_0 and Q8_0
    /// (which candle multiplies with AVX2) stay as stored; the metadata stays. A model whose f32 copy
    /// would exceed the bound is read as it is.
    #[test]
    fn portable_block_types_are_widened_to_their_exact_values_within_the_bound() -> Result<()> {
        let types = [
            ("a", GgmlDType::Q4_1),
            ("b", GgmlDType::Q5_0),
            ("c", GgmlDType::Q5_1),
            ("d", GgmlDType::Q4_0),
            ("e", GgmlDType::Q8_0),
        ];
        let mut file = gguf_of(&types)?;
        let content = Content::read(&mut file)?;
        let (widened, mut memory) =
            widened_on_cpu(&content, &mut file, &Device::Cpu, 1 << 20)?.expect("widened");
        for (name, dtype) in types {
            let want = if PORTABLE_ON_CPU.contains(&dtype) {
                GgmlDType::F32
            } else {
                dtype
            };
            assert_eq!(widened.tensor_infos[name].ggml_dtype, want, "{name}");
            let (before, after) = (
                values(&content, &mut file, name)?,
                values(&widened, &mut memory, name)?,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&before), bits(&after), "{name}");
        }
        assert_eq!(
            widened.metadata["general.architecture"].to_string()?,
            "llama"
        );
        let f32_bytes = 5 * 4 * 256;
        assert!(widened_on_cpu(&content, &mut file, &Device::Cpu, f32_bytes - 1)?.is_none());

        let mut stored = gguf_of(&[("d", GgmlDType::Q4_0), ("e", GgmlDType::Q8_0)])?;
        let content = Content::read(&mut stored)?;
        assert!(widened_on_cpu(&content, &mut stored, &Device::Cpu, 1 << 20)?.is_none());
        Ok(())
    }
}
