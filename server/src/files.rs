//! The data directory's layout. Every file path is built here from a validated id, so no request can
//! name a path of its own.
//!
//! ```text
//! <data>/studio.db                        jobs, events, settings
//! <data>/images/<job_id>.png              generated images (a request for several: also <job_id>-<i>.png)
//! <data>/jobs/<model_id>/dataset.zip      a training upload
//! <data>/jobs/<model_id>/lora.safetensors the trained LoRA
//! <data>/jobs/<model_id>/samples/*.png    samples made during training
//! <data>/jobs/<model_id>/...              the trainer's checkpoints
//! ```
//!
//! With a file store (`--file-store`, a cluster whose nodes share no folder) the data directory is this
//! node's working copy: files are published to the store under the same relative names and fetched from
//! it where missing (`crate::file_store`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use uuid::Uuid;

use crate::file_store::FileStore;

/// A job's id (for training jobs, also its `model_id`): a UUID, the only form accepted in paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId(Uuid);

impl JobId {
    pub fn random() -> JobId {
        JobId(Uuid::new_v4())
    }
}

impl FromStr for JobId {
    type Err = String;

    fn from_str(s: &str) -> Result<JobId, String> {
        // Only the hyphenated form: one spelling per id, so an id is also a unique folder name.
        if s.len() != 36 {
            return Err(format!("{s:?} is not a job id"));
        }
        Uuid::try_parse(s)
            .map(JobId)
            .map_err(|_| format!("{s:?} is not a job id"))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    files: Option<Arc<FileStore>>,
}

impl DataDir {
    pub fn create(root: &Path) -> std::io::Result<DataDir> {
        let dir = DataDir {
            root: root.to_path_buf(),
            files: None,
        };
        std::fs::create_dir_all(dir.root.join("images"))?;
        std::fs::create_dir_all(dir.root.join("jobs"))?;
        Ok(dir)
    }

    /// The same folder, as this node's working copy of `files`.
    pub fn with_file_store(self, files: FileStore) -> DataDir {
        DataDir {
            files: Some(Arc::new(files)),
            ..self
        }
    }

    pub fn file_store(&self) -> Option<&FileStore> {
        self.files.as_deref()
    }

    /// The file store and `path`'s name there, when there is a store.
    fn remote(&self, path: &Path) -> anyhow::Result<Option<(&FileStore, String)>> {
        let Some(files) = self.files.as_deref() else {
            return Ok(None);
        };
        let relative = path
            .strip_prefix(&self.root)
            .map_err(|_| anyhow::anyhow!("{} is not in the data directory", path.display()))?;
        let parts: Vec<&str> = relative
            .components()
            .map(|c| c.as_os_str().to_str().unwrap_or("?"))
            .collect();
        Ok(Some((files, parts.join("/"))))
    }

    /// Makes a file this node wrote reachable from every node (nothing to do without a file store).
    pub fn publish(&self, path: &Path) -> anyhow::Result<()> {
        match self.remote(path)? {
            Some((files, key)) => files.put(&key, path),
            None => Ok(()),
        }
    }

    pub async fn publish_async(&self, path: &Path) -> anyhow::Result<()> {
        match self.remote(path)? {
            Some((files, key)) => files.put_async(&key, path).await,
            None => Ok(()),
        }
    }

    /// Makes sure `path` is here, copying it from the file store when another node wrote it; false when
    /// it is nowhere.
    pub fn fetch(&self, path: &Path) -> anyhow::Result<bool> {
        if path.is_file() {
            return Ok(true);
        }
        match self.remote(path)? {
            Some((files, key)) => files.get(&key, path),
            None => Ok(false),
        }
    }

    pub async fn fetch_async(&self, path: &Path) -> anyhow::Result<bool> {
        if tokio::fs::metadata(path).await.is_ok_and(|m| m.is_file()) {
            return Ok(true);
        }
        match self.remote(path)? {
            Some((files, key)) => files.get_async(&key, path).await,
            None => Ok(false),
        }
    }

    /// The size of the file at `path`, here or in the file store; `None` when it is nowhere.
    pub fn size(&self, path: &Path) -> anyhow::Result<Option<u64>> {
        if let Ok(meta) = std::fs::metadata(path) {
            return Ok(Some(meta.len()));
        }
        match self.remote(path)? {
            Some((files, key)) => files.size(&key),
            None => Ok(None),
        }
    }

    /// Publishes what changed in a job's folder (a training run's samples, checkpoints and LoRA).
    pub fn push_job(&self, id: JobId) -> anyhow::Result<()> {
        let dir = self.job_dir(id);
        match self.remote(&dir)? {
            Some((files, key)) => files.push_folder(&key, &dir),
            None => Ok(()),
        }
    }

    /// Brings a job's folder up to date from the file store (a training run starting or resuming here).
    pub fn pull_job(&self, id: JobId) -> anyhow::Result<()> {
        let dir = self.job_dir(id);
        match self.remote(&dir)? {
            Some((files, key)) => files.pull_folder(&key, &dir),
            None => Ok(()),
        }
    }

    pub fn database(&self) -> PathBuf {
        DataDir::database_in(&self.root)
    }

    /// The embedded store's file in the data directory `root`.
    pub fn database_in(root: &Path) -> PathBuf {
        root.join("studio.db")
    }

    pub fn image(&self, id: JobId) -> PathBuf {
        self.root.join("images").join(format!("{id}.png"))
    }

    /// Image `index` of a generation: the first is [`Self::image`], the others `<job_id>-<index>.png`.
    pub fn image_at(&self, id: JobId, index: u32) -> PathBuf {
        match index {
            0 => self.image(id),
            i => self.root.join("images").join(format!("{id}-{i}.png")),
        }
    }

    pub fn job_dir(&self, id: JobId) -> PathBuf {
        self.root.join("jobs").join(id.to_string())
    }

    pub fn dataset(&self, id: JobId) -> PathBuf {
        self.job_dir(id).join("dataset.zip")
    }

    pub fn lora(&self, id: JobId) -> PathBuf {
        self.job_dir(id).join("lora.safetensors")
    }

    pub fn samples_dir(&self, id: JobId) -> PathBuf {
        self.job_dir(id).join("samples")
    }

    /// The ids of the folders under `jobs/`; anything else there (not one of our names) is ignored.
    pub fn job_dirs(&self) -> std::io::Result<Vec<JobId>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(self.root.join("jobs"))? {
            if let Some(id) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// A sample's file, when `name` is a plain `[A-Za-z0-9_-]+.png` name.
    pub fn sample(&self, id: JobId, name: &str) -> Option<PathBuf> {
        let stem = name.strip_suffix(".png")?;
        let plain = !stem.is_empty()
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        plain.then(|| self.samples_dir(id).join(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_only_hyphenated_uuids() {
        let id = JobId::random();
        assert_eq!(id.to_string().parse::<JobId>(), Ok(id));
        for bad in [
            "../etc/passwd",
            "",
            "x",
            &id.to_string().replace('-', ""),
            &format!("{{{id}}}"),
        ] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }

    /// Two nodes with folders of their own and one file store: a shared folder, `file:///...`.
    fn two_nodes() -> (tempfile::TempDir, DataDir, DataDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        let node = |name: &str| {
            let files = FileStore::open(&url).unwrap();
            DataDir::create(&dir.path().join(name))
                .unwrap()
                .with_file_store(files)
        };
        let (a, b) = (node("a"), node("b"));
        (dir, a, b)
    }

    #[test]
    fn a_file_one_node_publishes_is_fetched_by_another_and_a_missing_one_is_nowhere() {
        let (_dir, a, b) = two_nodes();
        let id = JobId::random();
        std::fs::write(a.image(id), b"png bytes").unwrap();
        a.publish(&a.image(id)).unwrap();
        assert_eq!(b.size(&b.image(id)).unwrap(), Some(9));
        assert!(!b.image(id).exists());
        assert!(b.fetch(&b.image(id)).unwrap());
        assert_eq!(std::fs::read(b.image(id)).unwrap(), b"png bytes");
        let other = JobId::random();
        assert!(!b.fetch(&b.image(other)).unwrap());
        assert_eq!(b.size(&b.image(other)).unwrap(), None);
    }

    #[test]
    fn a_job_folder_pushed_by_one_node_is_pulled_whole_by_another_with_its_changes() {
        let (_dir, a, b) = two_nodes();
        let id = JobId::random();
        std::fs::create_dir_all(a.samples_dir(id)).unwrap();
        std::fs::write(a.dataset(id), b"zip").unwrap();
        std::fs::write(a.samples_dir(id).join("step_2.png"), b"sample").unwrap();
        std::fs::write(a.job_dir(id).join("checkpoint.safetensors"), b"step 2").unwrap();
        a.push_job(id).unwrap();
        b.pull_job(id).unwrap();
        assert_eq!(std::fs::read(b.dataset(id)).unwrap(), b"zip");
        assert_eq!(
            std::fs::read(b.samples_dir(id).join("step_2.png")).unwrap(),
            b"sample"
        );
        // Node b resumes and writes a later checkpoint; node a pulls it back.
        std::fs::write(b.job_dir(id).join("checkpoint.safetensors"), b"step 40").unwrap();
        b.push_job(id).unwrap();
        a.pull_job(id).unwrap();
        assert_eq!(
            std::fs::read(a.job_dir(id).join("checkpoint.safetensors")).unwrap(),
            b"step 40"
        );
    }

    #[test]
    fn a_file_store_of_an_unknown_kind_is_refused_with_the_forms_to_use() {
        for url in ["gs://bucket", "ftp://host/folder", "not a url"] {
            let err = format!("{:#}", FileStore::open(url).unwrap_err());
            assert!(
                err.contains("s3://") || err.contains("file:///"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn sample_names_cannot_leave_the_samples_folder() {
        let data = DataDir {
            root: PathBuf::from("d"),
            files: None,
        };
        let id = JobId::random();
        assert_eq!(
            data.sample(id, "step_10.png"),
            Some(data.samples_dir(id).join("step_10.png"))
        );
        for bad in ["../x.png", ".png", "a/b.png", "a.PNG", "..", "a.png/"] {
            assert_eq!(data.sample(id, bad), None, "{bad}");
        }
    }
}
