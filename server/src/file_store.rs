//! The files of a cluster whose nodes do not share a folder: an object store every node reaches
//! (S3-compatible storage, or a folder mounted on every node), through the `object_store` crate.
//!
//! Each node keeps its own data folder as its working copy. What a node writes that another may need (an
//! image, an uploaded dataset, a trained LoRA, a training run's samples and checkpoints) it publishes
//! under the same relative name (`images/<id>.png`, `jobs/<id>/lora.safetensors`, ...); a node that needs
//! a file it does not have fetches it into its own folder first. Without a file store (one box, or nodes
//! sharing the data folder) every call here is a no-op on the local folder.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;

/// An object store, with the small runtime its clients run on (so it serves blocking threads and any
/// async runtime alike).
pub struct FileStore {
    store: Arc<dyn ObjectStore>,
    shown: String,
    runtime: Option<tokio::runtime::Runtime>,
    /// What this process uploaded of each file (length, modification time): a folder is pushed again
    /// file by file only where something changed.
    pushed: Mutex<HashMap<PathBuf, (u64, SystemTime)>>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        // A runtime dropped inside another one's task would panic; this one's work is all awaited.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl FileStore {
    /// `s3://bucket[/prefix]` (credentials, region and endpoint from the usual `AWS_*` variables:
    /// `AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for MinIO, Ceph, Garage or another S3-compatible server)
    /// or `file:///folder` (a folder every node mounts). Checks that the store answers.
    pub fn open(url: &str) -> anyhow::Result<FileStore> {
        let parsed = url::Url::parse(url).with_context(|| {
            format!("--file-store {url:?} is not a URL: give s3://bucket/prefix or file:///folder")
        })?;
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" => Arc::new(
                AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .with_context(|| format!("configuring the S3 file store {url}"))?,
            ),
            "file" => {
                let folder = parsed.to_file_path().map_err(|()| {
                    anyhow::anyhow!("--file-store {url:?}: give an absolute folder, file:///folder")
                })?;
                std::fs::create_dir_all(&folder).with_context(|| {
                    format!("creating the file store's folder {}", folder.display())
                })?;
                Arc::new(LocalFileSystem::new_with_prefix(&folder)?)
            }
            other => anyhow::bail!(
                "--file-store {url:?}: `{other}` stores are not supported: give s3://bucket/prefix \
                 or file:///folder"
            ),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("file-store")
            .enable_all()
            .build()?;
        let files = FileStore {
            store,
            shown: url.to_owned(),
            runtime: Some(runtime),
            pushed: Mutex::new(HashMap::new()),
        };
        let store = files.store.clone();
        files
            .blocking(async move { store.list_with_delimiter(None).await })
            .with_context(|| {
                format!(
                    "the file store {url} does not answer: check the bucket exists and AWS_ENDPOINT, \
                     AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION (AWS_ALLOW_HTTP=true for \
                     plain http)"
                )
            })?;
        Ok(files)
    }

    fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .spawn(work)
    }

    /// Runs `work` on the store's runtime and waits for it: for threads that may block.
    fn blocking<T: Send + 'static>(
        &self,
        work: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(async move {
            let _ = tx.send(work.await);
        });
        Ok(rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the file store's runtime stopped"))??)
    }

    async fn awaited<T: Send + 'static>(
        &self,
        work: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        Ok(self.spawn(work).await??)
    }

    /// Uploads the file at `path` as `key`.
    pub fn put(&self, key: &str, path: &Path) -> anyhow::Result<()> {
        let (store, key, path) = (self.store.clone(), Key::from(key), path.to_path_buf());
        let uploaded = self.blocking(upload(store, key, path.clone()));
        uploaded.with_context(|| format!("copying {} to the file store {self}", path.display()))
    }

    pub async fn put_async(&self, key: &str, path: &Path) -> anyhow::Result<()> {
        let (store, key, path) = (self.store.clone(), Key::from(key), path.to_path_buf());
        let uploaded = self.awaited(upload(store, key, path.clone())).await;
        uploaded.with_context(|| format!("copying {} to the file store {self}", path.display()))
    }

    /// Downloads `key` to `path`; false when the store has no such file.
    pub fn get(&self, key: &str, path: &Path) -> anyhow::Result<bool> {
        let (store, key, to) = (self.store.clone(), Key::from(key), path.to_path_buf());
        let got = self.blocking(download(store, key, to));
        got.with_context(|| format!("copying {} from the file store {self}", path.display()))
    }

    pub async fn get_async(&self, key: &str, path: &Path) -> anyhow::Result<bool> {
        let (store, key, to) = (self.store.clone(), Key::from(key), path.to_path_buf());
        let got = self.awaited(download(store, key, to)).await;
        got.with_context(|| format!("copying {} from the file store {self}", path.display()))
    }

    /// The size of `key` in the store, `None` when it has no such file.
    pub fn size(&self, key: &str) -> anyhow::Result<Option<u64>> {
        let (store, key) = (self.store.clone(), Key::from(key));
        self.blocking(async move {
            match store.head(&key).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(err) => Err(err),
            }
        })
    }

    /// Uploads each file under `folder` (named `prefix/<relative path>`) that changed since this
    /// process last pushed it.
    pub fn push_folder(&self, prefix: &str, folder: &Path) -> anyhow::Result<()> {
        let mut files = Vec::new();
        list_files(folder, &mut files)?;
        for path in files {
            let meta = std::fs::metadata(&path)?;
            let stamp = (meta.len(), meta.modified()?);
            if self.pushed.lock().unwrap().get(&path) == Some(&stamp) {
                continue;
            }
            let relative = path.strip_prefix(folder)?.to_string_lossy().into_owned();
            self.put(&format!("{prefix}/{relative}"), &path)?;
            self.pushed.lock().unwrap().insert(path, stamp);
        }
        Ok(())
    }

    /// Downloads each file under `prefix/` that `folder` lacks or holds with another size.
    pub fn pull_folder(&self, prefix: &str, folder: &Path) -> anyhow::Result<()> {
        let (store, key) = (self.store.clone(), Key::from(prefix));
        let listed = self.blocking(async move {
            let mut listing = store.list(Some(&key));
            let mut found = Vec::new();
            while let Some(meta) = listing.next().await {
                found.push(meta?);
            }
            Ok(found)
        })?;
        for meta in listed {
            let Some(relative) = meta.location.prefix_match(&Key::from(prefix)) else {
                continue;
            };
            let relative: PathBuf = relative.map(|part| part.as_ref().to_owned()).collect();
            let path = folder.join(relative);
            let here = std::fs::metadata(&path).map(|m| m.len()).ok();
            if here != Some(meta.size) {
                self.get(meta.location.as_ref(), &path)?;
            }
            // Already in the store: not to be pushed back.
            let local = std::fs::metadata(&path)?;
            let stamp = (local.len(), local.modified()?);
            self.pushed.lock().unwrap().insert(path, stamp);
        }
        Ok(())
    }
}

async fn upload(store: Arc<dyn ObjectStore>, key: Key, path: PathBuf) -> object_store::Result<()> {
    let io = |source: std::io::Error| object_store::Error::Generic {
        store: "local file",
        source: Box::new(source),
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
    // Small files in one request, large ones in parts.
    let mut writer = object_store::buffered::BufWriter::new(store, key);
    tokio::io::copy(&mut file, &mut writer).await.map_err(io)?;
    writer.shutdown().await.map_err(io)?;
    Ok(())
}

/// Writes beside `path` and renames, so a reader never sees half a file.
async fn download(
    store: Arc<dyn ObjectStore>,
    key: Key,
    path: PathBuf,
) -> object_store::Result<bool> {
    let io = |source: std::io::Error| object_store::Error::Generic {
        store: "local file",
        source: Box::new(source),
    };
    let got = match store.get(&key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(err) => return Err(err),
    };
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    let partial = path.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
    let written = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut chunks = got.into_stream();
        while let Some(chunk) = chunks.next().await {
            file.write_all(&chunk?).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        tokio::fs::rename(&partial, &path).await.map_err(io)
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    written.map(|()| true)
}

fn list_files(folder: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}
