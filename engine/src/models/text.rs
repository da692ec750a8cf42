//! FLUX's two text encoders: T5-XXL v1.1 (per-token hidden states) and CLIP ViT-L/14's text
//! tower (pooled output), each with its tokenizer, read from diffusers' folders.

use crate::models::t5::T5EncoderModel;
use crate::ops::Kernels;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::{clip::text_model as clip, t5};
use std::path::Path;
use tokenizers::{
    models::bpe::BPE,
    normalizers::{self, replace::ReplacePattern, BertNormalizer, Lowercase, Replace, NFC},
    pre_tokenizers::{
        byte_level::ByteLevel,
        sequence::Sequence,
        split::{Split, SplitPattern},
    },
    processors::roberta::RobertaProcessing,
    PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer, TruncationParams,
};

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// A special token named in tokenizer_config.json, either as a string or as `{content: ...}`.
fn special_token(dir: &Path, key: &str) -> Option<String> {
    let cfg = read_json(&dir.join("tokenizer_config.json")).ok()?;
    let v = &cfg[key];
    v.as_str()
        .or_else(|| v["content"].as_str())
        .map(str::to_string)
}

/// Tokenizes to exactly `len` ids, truncating and padding as diffusers' FLUX pipeline does.
fn fixed_length(mut tok: Tokenizer, len: usize, pad: &str) -> Result<Tokenizer> {
    let pad_id = tok
        .token_to_id(pad)
        .with_context(|| format!("the tokenizer has no padding token `{pad}`"))?;
    tok.with_truncation(Some(TruncationParams {
        max_length: len,
        ..Default::default()
    }))
    .map_err(anyhow::Error::msg)?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(len),
        pad_id,
        pad_token: pad.to_string(),
        ..Default::default()
    }));
    Ok(tok)
}

fn encode_ids(tok: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(prompt, true)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec())
}

pub struct T5Encoder {
    model: T5EncoderModel,
    tokenizer: Tokenizer,
    dtype: DType,
}

impl T5Encoder {
    /// `model_dir` is diffusers' `text_encoder_2/`, `tokenizer_dir` its `tokenizer_2/`. With `streamed`
    /// the blocks' weights stay in host memory and are copied to `device` layer by layer as each
    /// prompt is encoded (the memory plan's streamed placement): the checkpoint is read into host
    /// memory, and only the norms and the position bias move to `device` (the token embeddings are
    /// looked up on the host).
    pub fn load(
        model_dir: &Path,
        tokenizer_dir: &Path,
        max_len: usize,
        dtype: DType,
        device: &Device,
        kernels: Kernels,
        streamed: bool,
    ) -> Result<Self> {
        let read_on = if streamed { &Device::Cpu } else { device };
        let json = read_json(&model_dir.join("config.json"))?;
        let cfg: t5::Config = serde_json::from_value(json.clone()).context("T5 config.json")?;
        let vb = match crate::weights::gguf_file(model_dir)? {
            Some(file) => {
                // Gated (v1.1, FLUX's) T5s have two input projections, the original one.
                let gated = json["is_gated_act"].as_bool().unwrap_or(false)
                    || json["feed_forward_proj"]
                        .as_str()
                        .is_some_and(|f| f.starts_with("gated-"));
                t5_gguf(&file, gated, dtype, read_on)?
            }
            None => crate::weights::var_builder(model_dir, dtype, read_on)?,
        };
        let mut model =
            T5EncoderModel::load(vb, &cfg, kernels).context("loading the T5 encoder")?;
        if streamed {
            model
                .place(device, true)
                .context("placing the T5 encoder's blocks in page-locked host memory")?;
        }
        let tok = Tokenizer::from_file(tokenizer_dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("T5 tokenizer: {e}"))?;
        let pad = special_token(tokenizer_dir, "pad_token").unwrap_or_else(|| "<pad>".into());
        Ok(Self {
            model,
            tokenizer: fixed_length(tok, max_len, &pad)?,
            dtype,
        })
    }

    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        encode_ids(&self.tokenizer, prompt)
    }

    /// (1, max_len, d_model) hidden states. Padding is attended to, as in diffusers' pipeline,
    /// which passes no attention mask to T5.
    pub fn encode(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.token_ids(prompt)?;
        let ids = Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(0)?;
        Ok(self.model.forward(&ids, self.dtype)?)
    }

    /// The bytes of its weights copied from host memory for each prompt (0 unless streamed).
    pub fn streamed_bytes(&self) -> u64 {
        self.model.streamed_bytes()
    }
}

/// transformers' name of a T5 encoder tensor that llama.cpp names `name` (city96's t5-v1_1-xxl GGUF
/// files): gguf-py's `MODEL_TENSORS[T5ENCODER]` and `tensor_mapping.py`.
fn t5_name_from_llama_cpp(name: &str, gated: bool) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let hf = match stem {
        "token_embd" => "shared".to_string(),
        "enc.output_norm" => "encoder.final_layer_norm".to_string(),
        _ => {
            let rest = stem.strip_prefix("enc.blk.")?;
            let (i, part) = rest.split_once('.')?;
            let b = format!("encoder.block.{i}.layer");
            match part {
                "attn_norm" => format!("{b}.0.layer_norm"),
                "attn_q" => format!("{b}.0.SelfAttention.q"),
                "attn_k" => format!("{b}.0.SelfAttention.k"),
                "attn_v" => format!("{b}.0.SelfAttention.v"),
                "attn_o" => format!("{b}.0.SelfAttention.o"),
                "attn_rel_b" => format!("{b}.0.SelfAttention.relative_attention_bias"),
                "ffn_norm" => format!("{b}.1.layer_norm"),
                "ffn_gate" => format!("{b}.1.DenseReluDense.wi_0"),
                "ffn_up" if gated => format!("{b}.1.DenseReluDense.wi_1"),
                "ffn_up" => format!("{b}.1.DenseReluDense.wi"),
                "ffn_down" => format!("{b}.1.DenseReluDense.wo"),
                _ => return None,
            }
        }
    };
    Some(format!("{hf}.{suffix}"))
}

/// A T5 encoder GGUF file in llama.cpp's names, dequantized into the encoder's tensors by
/// transformers' names. (The encoder is held in `dtype`: a quantized T5 is a later step.)
fn t5_gguf(
    file: &Path,
    gated: bool,
    dtype: DType,
    device: &Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    use candle_core::quantized::gguf_file;
    let mut reader =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a readable GGUF file ({e}); download it again",
            file.display()
        )
    })?;
    let mut tensors = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let hf = t5_name_from_llama_cpp(name, gated).with_context(|| {
            format!(
                "{}: `{name}` is not a T5 encoder tensor of llama.cpp's layout",
                file.display()
            )
        })?;
        let q = content.tensor(&mut reader, name, device)?;
        tensors.insert(hf, q.dequantize(device)?.to_dtype(dtype)?);
    }
    Ok(candle_nn::VarBuilder::from_tensors(tensors, dtype, device))
}

pub struct ClipEncoder {
    model: clip::ClipTextTransformer,
    tokenizer: Tokenizer,
    eos_id: u32,
    legacy_argmax_pooling: bool,
    device: Device,
}

impl ClipEncoder {
    /// `model_dir` is diffusers' `text_encoder/`, `tokenizer_dir` its `tokenizer/`.
    pub fn load(
        model_dir: &Path,
        tokenizer_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let json = read_json(&model_dir.join("config.json"))?;
        let get = |k: &str| {
            json[k]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("CLIP config.json lacks `{k}`"))
        };
        let act = json["hidden_act"].as_str().unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            bail!(
                "CLIP text models with activation `{act}` are not supported (FLUX uses quick_gelu)"
            );
        }
        let cfg = clip::ClipTextConfig {
            vocab_size: get("vocab_size")?,
            embed_dim: get("hidden_size")?,
            activation: clip::Activation::QuickGelu,
            intermediate_size: get("intermediate_size")?,
            max_position_embeddings: get("max_position_embeddings")?,
            pad_with: None,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads: get("num_attention_heads")?,
            projection_dim: get("projection_dim").unwrap_or(768),
        };
        let vb = crate::weights::var_builder(model_dir, dtype, device)?;
        // FLUX.1-dev's file keeps transformers' `text_model.` prefix; transformers 5 saves without it.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let model =
            clip::ClipTextTransformer::new(vb, &cfg).context("loading the CLIP text encoder")?;
        let tok = clip_tokenizer(tokenizer_dir)?;
        let eos =
            special_token(tokenizer_dir, "eos_token").unwrap_or_else(|| "<|endoftext|>".into());
        let pad = special_token(tokenizer_dir, "pad_token").unwrap_or_else(|| eos.clone());
        let eos_id = tok
            .token_to_id(&eos)
            .with_context(|| format!("the CLIP tokenizer has no `{eos}` token"))?;
        let config_eos = json["eos_token_id"].as_u64();
        Ok(Self {
            model,
            tokenizer: fixed_length(tok, cfg.max_position_embeddings, &pad)?,
            eos_id,
            // transformers pools at argmax(ids) when the config's eos id is the legacy 2
            // (openai/clip-vit-large-patch14), else at the first EOS token.
            legacy_argmax_pooling: config_eos == Some(2),
            device: device.clone(),
        })
    }

    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        encode_ids(&self.tokenizer, prompt)
    }

    /// The pooled output (1, hidden): the final hidden state at the end-of-text token.
    pub fn encode(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.token_ids(prompt)?;
        let pos = if self.legacy_argmax_pooling {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max)
        } else {
            ids.iter().position(|&i| i == self.eos_id)
        }
        .unwrap_or(ids.len() - 1);
        let t = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let hidden = self.model.forward_with_mask(&t, usize::MAX)?;
        Ok(hidden.i((.., pos))?)
    }
}

/// CLIP's tokenizer from `tokenizer.json`, or, for repos that ship only the slow tokenizer's
/// `vocab.json` + `merges.txt` (FLUX.1-dev's `tokenizer/`, whose model_index.json names the slow
/// `CLIPTokenizer`), built to give that tokenizer's ids: BERT's text cleaning, NFC, lower-cased,
/// CLIP's word split, byte-level BPE with `</w>` word ends.
pub fn clip_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Tokenizer::from_file(&json).map_err(|e| anyhow::anyhow!("CLIP tokenizer: {e}"));
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !vocab.is_file() || !merges.is_file() {
        bail!(
            "{} has neither tokenizer.json nor vocab.json + merges.txt",
            dir.display()
        );
    }
    let err = |e: tokenizers::Error| anyhow::anyhow!("building the CLIP tokenizer: {e}");
    let bos = special_token(dir, "bos_token").unwrap_or_else(|| "<|startoftext|>".into());
    let eos = special_token(dir, "eos_token").unwrap_or_else(|| "<|endoftext|>".into());
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .end_of_word_suffix("</w>".into())
        .continuing_subword_prefix(String::new())
        .unk_token(eos.clone())
        .build()
        .map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(normalizers::Sequence::new(vec![
        // The slow CLIPTokenizer (transformers 4, without ftfy) cleans the text with BERT's basic
        // tokenizer first: control and format characters dropped, Unicode spaces made spaces, CJK
        // ideographs each a word of their own.
        BertNormalizer::new(true, true, Some(false), false).into(),
        NFC.into(),
        // Python's str.lower() writes a capital sigma that ends a word as the final form `ς`;
        // the Lowercase normalizer maps each character alone.
        Replace::new(
            ReplacePattern::Regex(r"(?<=[\p{Lu}\p{Ll}\p{Lt}])Σ(?![\p{Lu}\p{Ll}\p{Lt}])".into()),
            "ς",
        )
        .map_err(err)?
        .into(),
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(err)?
            .into(),
        Lowercase.into(),
    ])));
    let words = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        Split::new(
            SplitPattern::Regex(words.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(err)?
        .into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    let id = |t: &str| {
        tok.token_to_id(t)
            .with_context(|| format!("CLIP vocab.json lacks `{t}`"))
    };
    let processor = RobertaProcessing::new((eos.clone(), id(&eos)?), (bos.clone(), id(&bos)?))
        .trim_offsets(false)
        .add_prefix_space(false);
    tok.with_post_processor(Some(processor));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}
