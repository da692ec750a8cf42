//! Loaded LoRA files kept between requests, keyed by path and modification time, so that asking
//! for the same LoRA again costs nothing and a file replaced on disk is read afresh.

use super::file::LoraFile;
use super::source::LoraSource;
use crate::hub::ProgressFn;
use anyhow::Result;
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Files kept loaded: a FLUX LoRA is tens to hundreds of MB of device memory.
const CAPACITY: usize = 4;

struct Entry {
    path: PathBuf,
    stamp: (SystemTime, u64),
    file: Arc<LoraFile>,
}

pub struct LoraCache {
    device: Device,
    dtype: DType,
    /// Most recently used first.
    entries: Mutex<Vec<Entry>>,
    /// Hub references already resolved to a file in the hub cache (no network on later uses).
    fetched: Mutex<HashMap<LoraSource, PathBuf>>,
}

impl LoraCache {
    /// LoRAs are read onto the model's device in its compute dtype.
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            dtype,
            entries: Mutex::new(Vec::new()),
            fetched: Mutex::new(HashMap::new()),
        }
    }

    /// The loaded file of `source`, downloading it first when it is on the hub and not cached.
    pub fn get(&self, source: &LoraSource, progress: ProgressFn) -> Result<Arc<LoraFile>> {
        let known = self
            .fetched
            .lock()
            .expect("lora cache poisoned")
            .get(source)
            .cloned();
        let path = match known {
            Some(p) if p.is_file() => p,
            _ => {
                let p = source.fetch(progress)?;
                self.fetched
                    .lock()
                    .expect("lora cache poisoned")
                    .insert(source.clone(), p.clone());
                p
            }
        };
        self.load(&path)
    }

    /// The loaded file at `path`, read again only if it changed on disk.
    pub fn load(&self, path: &Path) -> Result<Arc<LoraFile>> {
        let meta = std::fs::metadata(path)?;
        let stamp = (meta.modified()?, meta.len());
        let mut entries = self.entries.lock().expect("lora cache poisoned");
        if let Some(i) = entries
            .iter()
            .position(|e| e.path == path && e.stamp == stamp)
        {
            let e = entries.remove(i);
            let file = e.file.clone();
            entries.insert(0, e);
            return Ok(file);
        }
        let file = Arc::new(LoraFile::load(path, self.dtype, &self.device)?);
        entries.retain(|e| e.path != path);
        entries.insert(
            0,
            Entry {
                path: path.to_path_buf(),
                stamp,
                file: file.clone(),
            },
        );
        entries.truncate(CAPACITY);
        Ok(file)
    }

    /// How many files are loaded now.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("lora cache poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
