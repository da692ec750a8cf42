//! LoRA adapters for the FLUX transformer: files from every common trainer (kohya, ComfyUI,
//! diffusers/PEFT, XLabs, PEFT on BFL names), read by their keys, placed on the model's
//! adapter-aware layers (`y = W x + Σ sᵢ Bᵢ(Aᵢ x)`, merged into `W` for generation and restored
//! exactly), stacked with one scale each, swapped per request on one resident model. docs/lora.md
//! describes the formats and the name mapping.

mod cache;
mod file;
mod keys;
mod place;
mod source;
mod stack;

pub use cache::LoraCache;
pub use file::{LoraFile, Module};
pub use keys::Format;
pub use place::apply;
pub use source::{with_trigger_words, LoraSource, LoraSpec};
pub use stack::{prompt_with_trigger_words, FailedLora, LoraStack};
