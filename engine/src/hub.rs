//! Getting model files: a local folder or file as it is, or a Hugging Face hub repository
//! through the hub cache (`$HF_HOME/hub`, the layout `huggingface_hub` and `hf-hub` share:
//! `models--owner--name/{refs/main, snapshots/<commit>/<file>, blobs/}`). A file of the
//! repository's current revision that is already in the cache is used as it is; a missing one is
//! downloaded with progress (resuming a partial download). Offline (`HF_HUB_OFFLINE=1`, or the
//! hub unreachable) a complete cached snapshot is used. Errors say what the user can do.

use anyhow::{anyhow, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
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

/// What a model needs of a hub repository.
pub struct Wanted<'a> {
    /// Which of the repository's files to fetch.
    pub file: &'a dyn Fn(&str) -> bool,
    /// What a snapshot folder still lacks to be loadable (paths relative to it); empty when
    /// complete. Offline, this is what tells a complete cached snapshot from a partial one.
    pub missing: &'a dyn Fn(&Path) -> Vec<String>,
}

/// The hub and its local cache, as `huggingface_hub` configures them from the environment.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The hub's address (`HF_ENDPOINT`; https://huggingface.co by default).
    pub endpoint: String,
    /// The cache folder (`$HF_HOME/hub`; `~/.cache/huggingface/hub` by default).
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    /// Never ask the hub, use only the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl Hub {
    /// `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE` and the token (`HF_TOKEN`, else the one
    /// `huggingface-cli login` saved in `$HF_HOME/token`).
    pub fn from_env() -> Self {
        let cache = hf_hub::Cache::from_env();
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
            ["1", "ON", "YES", "TRUE"].contains(&v.trim().to_ascii_uppercase().as_str())
        });
        Self {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".to_string()),
            token: hf_token().or_else(|| cache.token()),
            cache_dir: cache.path().clone(),
            offline,
        }
    }

    fn api(&self) -> Result<Api> {
        ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .context("setting up the Hugging Face hub client")
    }

    fn cache(&self, repo: &str) -> hf_hub::CacheRepo {
        hf_hub::Cache::new(self.cache_dir.clone()).model(repo.to_string())
    }

    /// The repository's folder in the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(hf_hub::Repo::model(repo.to_string()).folder_name())
    }

    /// The cached snapshot `refs/main` points at, if there is one (no network).
    pub fn cached_snapshot(&self, repo: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo);
        let commit = std::fs::read_to_string(dir.join("refs").join("main")).ok()?;
        let snapshot = dir.join("snapshots").join(commit.trim());
        snapshot.is_dir().then_some(snapshot)
    }

    /// `file` of `repo` in the cache, if it is there (no network).
    pub fn cached_file(&self, repo: &str, file: &str) -> Option<PathBuf> {
        self.cache(repo).get(file).filter(|p| p.is_file())
    }

    /// The snapshot folder of `repo` holding every file `wanted` names: the cached files of the
    /// hub's current revision as they are, the others downloaded. Without the hub, the cached
    /// snapshot when `wanted.missing` finds it complete.
    pub fn snapshot(&self, repo: &str, wanted: &Wanted, on: ProgressFn) -> Result<PathBuf> {
        if self.offline {
            return self.offline_snapshot(repo, wanted, "HF_HUB_OFFLINE is set");
        }
        let api = self.api()?;
        let r = api.model(repo.to_string());
        let info = match listing(&r) {
            Ok(info) => info,
            Err(e) => {
                let err = explain(repo, "", e);
                return match self.offline_snapshot(repo, wanted, &format!("{err:#}")) {
                    Ok(dir) => {
                        tracing::warn!(
                            "{err:#}: using the cached copy of {repo} at {}",
                            dir.display()
                        );
                        Ok(dir)
                    }
                    // Not cached at all: the hub's own answer says what to do.
                    Err(_) if self.cached_snapshot(repo).is_none() => Err(err),
                    Err(offline) => Err(offline),
                };
            }
        };
        let dir = self.repo_dir(repo).join("snapshots").join(&info.sha);
        let files: Vec<Sibling> = info
            .siblings
            .into_iter()
            .filter(|s| (wanted.file)(&s.rfilename))
            .collect();
        anyhow::ensure!(
            !files.is_empty(),
            "{repo} has none of the files the studio needs"
        );
        for (i, sibling) in files.iter().enumerate() {
            let f = &sibling.rfilename;
            let expected = dir.join(f);
            if expected.is_file() {
                continue;
            }
            // A file unchanged since a revision already cached: its blob is there, by content hash.
            if let Some(blob) = sibling.blob() {
                let blob_path = self.repo_dir(repo).join("blobs").join(blob);
                if blob_path.is_file() {
                    link_blob(&blob_path, &expected, f)
                        .with_context(|| format!("linking {}", expected.display()))?;
                    continue;
                }
            }
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
            anyhow::ensure!(
                path == expected,
                "{repo} changed while its files were downloaded (now {}): load it again",
                path.display()
            );
        }
        // Every file may have come from the cache: `refs/main` still says which revision is current.
        self.cache(repo)
            .create_ref(&info.sha)
            .with_context(|| format!("writing {}", self.repo_dir(repo).display()))?;
        on(&DownloadProgress {
            files_done: files.len(),
            files_total: files.len(),
            ..Default::default()
        });
        let missing = (wanted.missing)(&dir);
        anyhow::ensure!(
            missing.is_empty(),
            "{repo} (revision {}) lacks {}",
            info.sha,
            list(&missing)
        );
        Ok(dir)
    }

    /// The cached snapshot, when complete; `why` says why the hub is not asked.
    fn offline_snapshot(&self, repo: &str, wanted: &Wanted, why: &str) -> Result<PathBuf> {
        let dir = self.cached_snapshot(repo).with_context(|| {
            format!(
                "{repo} is not in the Hugging Face cache ({}) and the hub cannot be asked ({why}): connect to the hub once to download it",
                self.repo_dir(repo).display()
            )
        })?;
        let missing = (wanted.missing)(&dir);
        anyhow::ensure!(
            missing.is_empty(),
            "the cached copy of {repo} ({}) is incomplete: it lacks {}, and the hub cannot be asked ({why}): connect to the hub to download the rest",
            dir.display(),
            list(&missing)
        );
        Ok(dir)
    }

    /// One file of a hub repository (a LoRA, say): the cached one, else downloaded.
    pub fn file(&self, repo: &str, name: &str, on: ProgressFn) -> Result<PathBuf> {
        if let Some(path) = self.cached_file(repo, name) {
            return Ok(path);
        }
        anyhow::ensure!(
            !self.offline,
            "{repo}/{name} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
            self.repo_dir(repo).display()
        );
        let reporter = Reporter {
            state: DownloadProgress {
                files_total: 1,
                ..Default::default()
            },
            on,
        };
        self.api()?
            .model(repo.to_string())
            .download_with_progress(name, reporter)
            .map_err(|e| explain(repo, name, e))
    }

    /// The file names of a hub repository.
    pub fn repo_files(&self, repo: &str) -> Result<Vec<String>> {
        anyhow::ensure!(
            !self.offline,
            "listing the files of {repo} needs the hub, and HF_HUB_OFFLINE is set: name the file (owner/repo:file.safetensors)"
        );
        let info = self
            .api()?
            .model(repo.to_string())
            .info()
            .map_err(|e| explain(repo, "", e))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
}

/// The repository's listing with each file's blob id (`?blobs=true`, as `huggingface_hub` asks).
#[derive(Debug, serde::Deserialize)]
struct Listing {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, serde::Deserialize)]
struct Lfs {
    sha256: String,
}

impl Sibling {
    /// The name of its blob in the cache: the ETag the hub gives it, an LFS file's SHA-256, else
    /// the git blob id.
    fn blob(&self) -> Option<&str> {
        self.lfs
            .as_ref()
            .map(|l| l.sha256.as_str())
            .or(self.blob_id.as_deref())
            .filter(|b| !b.is_empty() && b.chars().all(|c| c.is_ascii_hexdigit()))
    }
}

fn listing(r: &hf_hub::api::sync::ApiRepo) -> Result<Listing, ApiError> {
    let response = r
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(Box::new)?;
    Ok(response.into_json()?)
}

/// The snapshot's entry for `file`, pointing at its blob as `huggingface_hub` lays it out
/// (`snapshots/<commit>/<file>` → `../../blobs/<id>`).
fn link_blob(blob: &Path, entry: &Path, file: &str) -> std::io::Result<()> {
    if let Some(parent) = entry.parent() {
        std::fs::create_dir_all(parent)?;
    }
    #[cfg(unix)]
    {
        let up = "../".repeat(Path::new(file).components().count() + 1);
        let name = blob.file_name().expect("a blob path ends in its id");
        std::os::unix::fs::symlink(Path::new(&up).join("blobs").join(name), entry)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, entry).map(|_| ())
    }
}

/// At most a few names, and how many more.
fn list(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
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

/// Whether `file` of `repo` is already in the local hub cache (no network).
pub fn is_cached(repo: &str, file: &str) -> bool {
    cached_file(repo, file).is_some()
}

/// `file` of `repo` in the local hub cache, if it is there (no network).
pub fn cached_file(repo: &str, file: &str) -> Option<PathBuf> {
    Hub::from_env().cached_file(repo, file)
}

/// The file names of a hub repository.
pub fn repo_files(repo: &str) -> Result<Vec<String>> {
    Hub::from_env().repo_files(repo)
}

/// One file of a hub repository (a LoRA, say), from the cache when it is there.
pub fn file(repo: &str, name: &str, on: ProgressFn) -> Result<PathBuf> {
    Hub::from_env().file(repo, name, on)
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
        assert!(Source::parse("../no-such-folder/weights").is_err());
        assert!(Source::parse("../no-such-folder").is_err());
        assert!(Source::parse("a/b/c").is_err());
    }
}
