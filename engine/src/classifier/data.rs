//! The labelled prompts of `data/classifier/*.jsonl`: one `{"text", "label"}` object a line.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::label::Label;

/// The data set that `scripts/gen-classifier-data.py` writes, relative to the repository root.
pub const DEFAULT_DATA_DIR: &str = "data/classifier";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: Label,
    /// Where the row came from (template, chitchat, ...): lets the report break errors down.
    #[serde(default)]
    pub source: String,
}

/// A split read from disk, with the hash that ties a trained head to the exact data it saw.
#[derive(Debug, Clone)]
pub struct Split {
    pub examples: Vec<Example>,
    pub sha256: String,
}

impl Split {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let text = std::str::from_utf8(&bytes).with_context(|| format!("{}", path.display()))?;
        let examples = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: bad example", path.display(), i + 1))
            })
            .collect::<Result<Vec<Example>>>()?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        Ok(Self { examples, sha256 })
    }

    pub fn texts(&self) -> Vec<&str> {
        self.examples.iter().map(|e| e.text.as_str()).collect()
    }

    /// 1.0 for image requests, 0.0 for conversation: the head's binary target.
    pub fn targets(&self) -> Vec<f32> {
        self.examples
            .iter()
            .map(|e| f32::from(u8::from(e.label == Label::ImageRequest)))
            .collect()
    }
}
