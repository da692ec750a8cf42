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

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use uuid::Uuid;

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
}

impl DataDir {
    pub fn create(root: &Path) -> std::io::Result<DataDir> {
        let dir = DataDir {
            root: root.to_path_buf(),
        };
        std::fs::create_dir_all(dir.root.join("images"))?;
        std::fs::create_dir_all(dir.root.join("jobs"))?;
        Ok(dir)
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

    #[test]
    fn sample_names_cannot_leave_the_samples_folder() {
        let data = DataDir {
            root: PathBuf::from("d"),
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
