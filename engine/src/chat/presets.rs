//! The chat models the studio knows by name: the default that a registry ships (no hub, no GPU
//! needed) and hub presets for real use. The one owner of their names and files.

use std::path::PathBuf;

use anyhow::Result;

use crate::hub::{Hub, ProgressFn};

/// Where `scripts/fetch-models` installs the default model, relative to the repository root.
pub const DEFAULT_LM_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a preset's GGUF comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmSource {
    /// A file installed by `scripts/fetch-models` (relative to the working directory).
    Installed(&'static str),
    /// One file of a hub repository.
    Hub {
        repo: &'static str,
        file: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmPreset {
    pub name: &'static str,
    pub source: LmSource,
    pub description: &'static str,
}

pub const LM_PRESETS: &[LmPreset] = &[
    LmPreset {
        name: "smollm2-135m",
        source: LmSource::Installed(DEFAULT_LM_FILE),
        description: "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 98 MB): the default with no GPU; \
                      fluent small talk, little knowledge",
    },
    LmPreset {
        name: "qwen2.5-3b",
        source: LmSource::Hub {
            repo: "bartowski/Qwen2.5-3B-Instruct-GGUF",
            file: "Qwen2.5-3B-Instruct-Q4_K_M.gguf",
        },
        description: "Qwen2.5-3B-Instruct, Q4_K_M (about 1.9 GB)",
    },
    LmPreset {
        name: "qwen2.5-7b",
        source: LmSource::Hub {
            repo: "bartowski/Qwen2.5-7B-Instruct-GGUF",
            file: "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        },
        description: "Qwen2.5-7B-Instruct, Q4_K_M (about 4.7 GB)",
    },
    LmPreset {
        name: "llama-3.2-3b",
        source: LmSource::Hub {
            repo: "bartowski/Llama-3.2-3B-Instruct-GGUF",
            file: "Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        },
        description: "Llama-3.2-3B-Instruct, Q4_K_M (about 2.0 GB; Llama 3.2 Community License)",
    },
];

/// The model the studio answers with when none is configured.
pub fn default_preset() -> &'static LmPreset {
    &LM_PRESETS[0]
}

pub fn preset(name: &str) -> Option<&'static LmPreset> {
    LM_PRESETS.iter().find(|p| p.name == name)
}

/// A model setting's GGUF on disk: a preset's name, a path to a `.gguf`, or `owner/repo:file.gguf`
/// on the hub (fetched into the hub cache on first use).
pub fn resolve(setting: &str, hub: &Hub, on: ProgressFn) -> Result<PathBuf> {
    let hub_file = |repo: &str, file: &str| hub.file(repo, file, on.clone());
    if let Some(preset) = preset(setting) {
        return match preset.source {
            LmSource::Installed(path) => {
                let path = PathBuf::from(path);
                anyhow::ensure!(
                    path.is_file(),
                    "the chat model {} is missing at {}: run scripts/fetch-models to install it",
                    preset.name,
                    path.display()
                );
                Ok(path)
            }
            LmSource::Hub { repo, file } => hub_file(repo, file),
        };
    }
    let path = PathBuf::from(setting);
    if path.is_file() {
        return Ok(path);
    }
    if let Some((repo, file)) = setting.split_once(':') {
        if file.ends_with(".gguf") && repo.split('/').count() == 2 {
            return hub_file(repo, file);
        }
    }
    let names: Vec<&str> = LM_PRESETS.iter().map(|p| p.name).collect();
    anyhow::bail!(
        "chat model `{setting}` is none of the presets ({}), no .gguf file, and not owner/repo:file.gguf",
        names.join(", ")
    )
}
