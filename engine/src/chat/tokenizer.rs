//! The tokenizer of a GGUF model: its `tokenizer.json` when one lies beside the file, else built from
//! the file's own metadata (`tokenizer.ggml.*`) as llama.cpp reads it: a byte-level BPE vocabulary
//! (`tokenizer.ggml.model = gpt2`, what Qwen2, Llama 3 and SmolLM ship), its merges, its control
//! tokens kept whole, and the pre-tokenizer its `tokenizer.ggml.pre` names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use tokenizers::Tokenizer;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Llama 3's split (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer for the GGUF at `path` whose metadata is `content`.
pub fn load(path: &Path, content: &Content) -> Result<Tokenizer> {
    let beside = path.with_file_name("tokenizer.json");
    if beside.is_file() {
        return Tokenizer::from_file(&beside)
            .map_err(|e| anyhow!("reading {}: {e}", beside.display()));
    }
    from_metadata(&content.metadata)
        .with_context(|| format!("building the tokenizer from {}'s metadata (a tokenizer.json beside the file is used instead when there is one)", path.display()))
}

fn get<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .ok_or_else(|| anyhow!("the GGUF has no `{key}`"))
}

fn strings(value: &Value) -> Result<Vec<String>> {
    value
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, in `tokenizer.json`'s terms.
fn pre_tokenizer(pre: &str) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // GPT-2's split after cutting every digit apart.
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        other => bail!(
            "the pre-tokenizer `{other}` is not known here: put the model's tokenizer.json beside the GGUF"
        ),
    })
}

/// A `tokenizers` tokenizer equal to the one the metadata describes.
pub fn from_metadata(metadata: &HashMap<String, Value>) -> Result<Tokenizer> {
    let model = get(metadata, "tokenizer.ggml.model")?.to_string()?;
    if model != "gpt2" {
        bail!("tokenizer `{model}` is not byte-level BPE: put the model's tokenizer.json beside the GGUF");
    }
    let tokens = strings(get(metadata, "tokenizer.ggml.tokens")?)?;
    let merges = strings(get(metadata, "tokenizer.ggml.merges")?)?;
    let types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<Result<_, _>>()?,
        None => vec![],
    };
    let pre = match metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string()?.clone(),
        None => "default".to_string(),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(id, &t)| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == TOKEN_CONTROL})
        })
        .collect();
    let normalizer = if pre.starts_with("qwen2") {
        json!({"type": "NFC"})
    } else {
        serde_json::Value::Null
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer(&pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| anyhow!("the GGUF's vocabulary does not make a tokenizer: {e}"))
}
