//! The chat's language model: quantized GGUF models of the llama and Qwen2 families run with
//! candle-transformers (`quantized_llama`, `quantized_qwen2`), their tokenizer read from the GGUF's
//! own metadata (or a `tokenizer.json` beside it), their chat template, seeded sampling and
//! token-by-token streaming that the caller can stop; or, instead, an OpenAI-compatible server the
//! user already runs (Ollama, llama.cpp's server, vLLM).

pub mod docs;
pub mod gguf;
pub mod openai;
pub mod presets;
pub mod prompt_help;
pub mod template;
pub mod tokenizer;

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

pub use gguf::{GgufChat, LmMemory};
pub use openai::OpenAiChat;
pub use presets::{LmPreset, LmSource, DEFAULT_LM_FILE, LM_PRESETS};
pub use template::ChatTemplate;

/// Who said a turn of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

impl Turn {
    pub fn new(role: Role, content: impl Into<String>) -> Turn {
        Turn {
            role,
            content: content.into(),
        }
    }
}

/// How an answer is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingSettings {
    /// New tokens at most.
    pub max_tokens: usize,
    /// 0 picks the most likely token every time (greedy).
    pub temperature: f64,
    /// Nucleus sampling's mass; `None` samples from the whole distribution.
    pub top_p: Option<f64>,
    /// Logits of tokens already in the recent context are divided by this (1 turns it off); small models
    /// loop without it.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        SamplingSettings {
            max_tokens: 512,
            temperature: 0.7,
            top_p: Some(0.9),
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn (an end-of-sequence or stop token).
    Stop,
    /// `max_tokens` were written.
    Length,
    /// The caller stopped it.
    Cancelled,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub tokens: usize,
    pub finish: FinishReason,
    /// Tokens of the prompt (0 where the backend does not say).
    pub prompt_tokens: usize,
}

/// A chat backend: a local GGUF model or an OpenAI-compatible server. `on_text` gets each new piece of
/// text as it is decoded; `ControlFlow::Break` stops the answer there (`FinishReason::Cancelled`).
pub trait LanguageModel: Send {
    /// The model's name as answers report it.
    fn name(&self) -> &str;

    fn answer(
        &mut self,
        turns: &[Turn],
        settings: &SamplingSettings,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> anyhow::Result<Answer>;
}
