//! Where a LoRA comes from (a hub repository, a local file) and how it is asked for, plus the
//! trigger words that go in front of a prompt.

use crate::hub::{self, ProgressFn};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LoraSource {
    /// `owner/repo:file.safetensors`, or `owner/repo` when the repository holds one
    /// `.safetensors` file.
    Hub {
        repo: String,
        file: Option<String>,
    },
    Local(PathBuf),
}

/// One LoRA for one generation: where from, how strongly, what it is called in responses, and the
/// words that make it show (put in front of the prompt when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub name: String,
    pub source: LoraSource,
    pub scale: f64,
    pub trigger_words: Vec<String>,
}

fn repo_part_ok(x: &str) -> bool {
    !x.is_empty()
        && x != "."
        && x != ".."
        && x.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl LoraSource {
    /// A hub reference only: `owner/repo` or `owner/repo:path/in/repo.safetensors`. What the HTTP
    /// API accepts besides trained models and the operator's LoRA folder: never a path on the
    /// server.
    pub fn hub(s: &str) -> Result<Self> {
        let (repo, file) = match s.split_once(':') {
            Some((r, f)) => (r, Some(f)),
            None => (s, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| repo_part_ok(p)) {
            bail!("`{s}` is not a hub LoRA: write owner/repo or owner/repo:file.safetensors");
        }
        if let Some(f) = file {
            let ok = f.ends_with(".safetensors") && f.split('/').all(repo_part_ok);
            if !ok {
                bail!("`{f}` is not a .safetensors file name inside a hub repository");
            }
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            file: file.map(str::to_string),
        })
    }

    /// The command line's reading: an existing file, else a hub reference.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.is_file() {
            return Ok(Self::Local(p.to_path_buf()));
        }
        if s.ends_with(".safetensors") && !s.contains(':') {
            bail!("the LoRA file {s} does not exist");
        }
        Self::hub(s).map_err(|e| anyhow!("`{s}` is not an existing file, and {e}"))
    }

    /// How responses and logs name it.
    pub fn display(&self) -> String {
        match self {
            Self::Hub {
                repo,
                file: Some(f),
            } => format!("{repo}:{f}"),
            Self::Hub { repo, file: None } => repo.clone(),
            Self::Local(p) => p.display().to_string(),
        }
    }

    /// The local file, downloading it into the hub cache first if needed.
    pub fn fetch(&self, progress: ProgressFn) -> Result<PathBuf> {
        match self {
            Self::Local(p) if p.is_file() => Ok(p.clone()),
            Self::Local(p) => bail!("the LoRA file {} does not exist", p.display()),
            Self::Hub { repo, file } => {
                let file = match file {
                    Some(f) => f.clone(),
                    None => only_safetensors(repo)?,
                };
                match hub::cached_file(repo, &file) {
                    Some(p) => Ok(p),
                    None => hub::file(repo, &file, progress),
                }
            }
        }
    }
}

/// The one `.safetensors` file of a repository named without a file.
fn only_safetensors(repo: &str) -> Result<String> {
    let files: Vec<String> = hub::repo_files(repo)?
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{repo} holds no .safetensors file"),
        many => bail!(
            "{repo} holds several .safetensors files ({}): name one as {repo}:FILE",
            many.join(", ")
        ),
    }
}

/// `prompt` with the trigger words it lacks (compared ignoring case) in front: "w1, w2, prompt".
pub fn with_trigger_words<'a>(prompt: &str, words: impl IntoIterator<Item = &'a str>) -> String {
    let lower = prompt.to_lowercase();
    let mut missing: Vec<&str> = Vec::new();
    for w in words {
        let w = w.trim();
        if !w.is_empty() && !lower.contains(&w.to_lowercase()) && !missing.contains(&w) {
            missing.push(w);
        }
    }
    if missing.is_empty() {
        prompt.to_string()
    } else {
        format!("{}, {prompt}", missing.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_references_parse_and_paths_do_not() {
        assert_eq!(
            LoraSource::hub("strangerzonehf/Flux-Super-Realism-LoRA:super-realism.safetensors")
                .unwrap(),
            LoraSource::Hub {
                repo: "strangerzonehf/Flux-Super-Realism-LoRA".into(),
                file: Some("super-realism.safetensors".into())
            }
        );
        assert!(matches!(
            LoraSource::hub("owner/repo").unwrap(),
            LoraSource::Hub { file: None, .. }
        ));
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/b:../../x.safetensors",
            "a/b:x.bin",
            "a/b/c",
            "plain",
        ] {
            assert!(LoraSource::hub(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trigger_words_go_in_front_once() {
        assert_eq!(
            with_trigger_words("a cat", ["Super Realism"]),
            "Super Realism, a cat"
        );
        assert_eq!(
            with_trigger_words("super realism photo of a cat", ["Super Realism"]),
            "super realism photo of a cat"
        );
        assert_eq!(
            with_trigger_words("a dog", ["ohwx", "photo", "ohwx"]),
            "ohwx, photo, a dog"
        );
        assert_eq!(with_trigger_words("x", []), "x");
    }
}
