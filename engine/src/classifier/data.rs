//! The labelled prompts of `data/classifier/*.jsonl`: one `{"text", "label", "source", "context"}`
//! object a line.

use std::path::Path;

use anyhow::{Context, Result};
use app::{ContextTurn, TurnKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::label::Label;

/// The data set, relative to the repository root: `train.jsonl` and `test.jsonl` are written by
/// `scripts/gen-classifier-data.py`, `written-test.jsonl` by hand.
pub const DEFAULT_DATA_DIR: &str = "data/classifier";

/// The files of the data folder never trained on: the generated test split (held out by
/// construction: its own words and phrasings) and a hand-written set apart from the generator.
pub const HELD_OUT_SPLITS: [&str; 2] = ["test.jsonl", "written-test.jsonl"];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: Label,
    /// Where the row came from (template, chitchat, ...): lets the report break errors down.
    #[serde(default)]
    pub source: String,
    /// The turns before the prompt, as `/classify/` takes them; absent for a message judged alone.
    #[serde(default)]
    pub context: Vec<ContextTurn>,
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

    /// The held-out files of `dir` (`HELD_OUT_SPLITS`), each by name.
    pub fn load_held_out(dir: &Path) -> Result<Vec<(&'static str, Self)>> {
        HELD_OUT_SPLITS
            .iter()
            .map(|name| Ok((*name, Self::load(&dir.join(name))?)))
            .collect()
    }

    /// Several splits as one (for figures over all of them); the hash is over the parts' hashes.
    pub fn join<'a>(parts: impl IntoIterator<Item = &'a Split>) -> Self {
        let mut examples = Vec::new();
        let mut hasher = Sha256::new();
        for part in parts {
            examples.extend(part.examples.iter().cloned());
            hasher.update(part.sha256.as_bytes());
        }
        Self {
            examples,
            sha256: format!("{:x}", hasher.finalize()),
        }
    }

    pub fn texts(&self) -> Vec<&str> {
        self.examples.iter().map(|e| e.text.as_str()).collect()
    }

    /// Each example's last answer, what the classifier reads of its context.
    pub fn last_answers(&self) -> Vec<Option<TurnKind>> {
        self.examples
            .iter()
            .map(|e| app::last_answer(&e.context))
            .collect()
    }

    /// 1.0 for image requests, 0.0 for conversation: the head's binary target.
    pub fn targets(&self) -> Vec<f32> {
        self.examples
            .iter()
            .map(|e| f32::from(u8::from(e.label == Label::ImageRequest)))
            .collect()
    }
}
