//! Getting model files: a local folder or file as it is, or a Hugging Face hub repository
//! downloaded (with progress) into the hub cache. Errors say what the user can do.

use anyhow::{anyhow, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Progress of fetching one model: bytes of the file in flight and how many files are done.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadProgress {
    pub file: String,
    pub file_bytes: u64,
    pub file_total: u64,
    pub files_done: usize,
    pub files_total: usize,
}

pub type ProgressFn = Arc<dyn Fn(&DownloadProgress) + Send + Sync>;

/// The hub token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`). The studio's binary
/// loads `.env` into the environment at start, so a token there counts too.
pub fn hf_token() -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|t| t.trim().to_string())
        .find(|t| !t.is_empty())
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "location", rename_all = "lowercase")]
pub enum Source {
    Hub(String),
    Local(PathBuf),
}

impl Source {
    /// A path that exists is local; anything shaped `owner/name` is a hub repository.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(Self::Local(p.to_path_buf()));
        }
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |x: &str| {
            !x.is_empty()
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && x != "."
                && x != ".."
        };
        if parts.len() == 2 && parts.iter().all(|x| ok(x)) {
            Ok(Self::Hub(s.to_string()))
        } else {
            Err(anyhow!(
                "`{s}` is neither an existing path nor a hub repository id (owner/name)"
            ))
        }
    }
}

struct Reporter {
    state: DownloadProgress,
    on: ProgressFn,
}

impl Progress for Reporter {
    fn init(&mut self, size: usize, filename: &str) {
        self.state.file = filename.to_string();
        self.state.file_total = size as u64;
        self.state.file_bytes = 0;
        (self.on)(&self.state);
    }
    fn update(&mut self, size: usize) {
        self.state.file_bytes += size as u64;
        (self.on)(&self.state);
    }
    fn finish(&mut self) {
        self.state.file_bytes = self.state.file_total;
        (self.on)(&self.state);
    }
}

/// A hub repository or file that does not exist: the name asked for is wrong, not the network.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// Turns the hub's HTTP failures into what the user should do about them.
fn explain(repo: &str, file: &str, err: ApiError) -> anyhow::Error {
    if let ApiError::RequestError(e) = &err {
        if let ureq::Error::Status(code, _) = e.as_ref() {
            return match code {
                401 if hf_token().is_none() => anyhow!(
                    "{repo} is gated and needs a Hugging Face token: create one at https://huggingface.co/settings/tokens, accept the model's license at https://huggingface.co/{repo}, then set HF_TOKEN in the environment or in a .env file beside the studio"
                ),
                401 => anyhow!("the Hugging Face token in HF_TOKEN was refused (HTTP 401): check that it is valid"),
                403 => anyhow!(
                    "your Hugging Face token has no access to {repo}: accept the license at https://huggingface.co/{repo} with the account the token belongs to"
                ),
                404 => anyhow::Error::new(NotFound(format!(
                    "{repo} has no file {file} (HTTP 404): check the repository id and file name"
                ))),
                c => anyhow!("the Hugging Face hub answered HTTP {c} for {repo}/{file}"),
            };
        }
        return anyhow!(
            "cannot reach the Hugging Face hub for {repo}/{file} ({e}): check the network, or point the studio at a local copy of the model"
        );
    }
    anyhow!("downloading {repo}/{file}: {err}")
}

/// Downloads the files of `repo` for which `wanted` holds (resuming into the hub cache) and
/// returns the local snapshot folder.
pub fn snapshot(repo: &str, wanted: &dyn Fn(&str) -> bool, on: ProgressFn) -> Result<PathBuf> {
    let api = ApiBuilder::from_env()
        .with_token(hf_token())
        .with_progress(false)
        .build()
        .context("setting up the Hugging Face hub client")?;
    let r = api.model(repo.to_string());
    let info = r.info().map_err(|e| explain(repo, "", e))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f))
        .collect();
    anyhow::ensure!(
        !files.is_empty(),
        "{repo} has none of the files the studio needs"
    );
    let mut root = None;
    for (i, f) in files.iter().enumerate() {
        let reporter = Reporter {
            state: DownloadProgress {
                files_done: i,
                files_total: files.len(),
                ..Default::default()
            },
            on: on.clone(),
        };
        let path = r
            .download_with_progress(f, reporter)
            .map_err(|e| explain(repo, f, e))?;
        // The snapshot root is the downloaded path less the file's own relative path.
        if root.is_none() {
            let depth = Path::new(f).components().count();
            root = path.ancestors().nth(depth).map(Path::to_path_buf);
        }
    }
    on(&DownloadProgress {
        files_done: files.len(),
        files_total: files.len(),
        ..Default::default()
    });
    root.context("no file was downloaded")
}

/// Whether `file` of `repo` is already in the local hub cache (no network).
pub fn is_cached(repo: &str, file: &str) -> bool {
    cached_file(repo, file).is_some()
}

/// `file` of `repo` in the local hub cache, if it is there (no network).
pub fn cached_file(repo: &str, file: &str) -> Option<PathBuf> {
    hf_hub::Cache::from_env().model(repo.to_string()).get(file)
}

/// The file names of a hub repository.
pub fn repo_files(repo: &str) -> Result<Vec<String>> {
    let api = ApiBuilder::from_env()
        .with_token(hf_token())
        .with_progress(false)
        .build()
        .context("setting up the Hugging Face hub client")?;
    let info = api
        .model(repo.to_string())
        .info()
        .map_err(|e| explain(repo, "", e))?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// One file of a hub repository (a LoRA, say).
pub fn file(repo: &str, name: &str, on: ProgressFn) -> Result<PathBuf> {
    let api = ApiBuilder::from_env()
        .with_token(hf_token())
        .with_progress(false)
        .build()
        .context("setting up the Hugging Face hub client")?;
    let reporter = Reporter {
        state: DownloadProgress {
            files_total: 1,
            ..Default::default()
        },
        on,
    };
    api.model(repo.to_string())
        .download_with_progress(name, reporter)
        .map_err(|e| explain(repo, name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> ApiError {
        let response = ureq::Response::new(code, "status", "").unwrap();
        ApiError::RequestError(Box::new(ureq::Error::Status(code, response)))
    }

    #[test]
    fn hub_refusals_say_what_to_do() {
        let repo = "black-forest-labs/FLUX.1-dev";
        let forbidden = explain(repo, "model_index.json", status(403)).to_string();
        assert!(forbidden.contains("accept the license"), "{forbidden}");
        let missing = explain(repo, "nope.json", status(404)).to_string();
        assert!(missing.contains("nope.json"), "{missing}");
        // Which 401 message depends on whether this machine has a token set.
        let unauthorized = explain(repo, "x", status(401)).to_string();
        assert!(unauthorized.contains("HF_TOKEN"), "{unauthorized}");
    }

    #[test]
    fn sources_are_told_apart() {
        assert_eq!(
            Source::parse("black-forest-labs/FLUX.1-dev").unwrap(),
            Source::Hub("black-forest-labs/FLUX.1-dev".into())
        );
        assert!(matches!(Source::parse("."), Ok(Source::Local(_))));
        assert!(Source::parse("../../etc/passwd").is_err());
        assert!(Source::parse("a/b/c").is_err());
    }
}
