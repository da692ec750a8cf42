//! Checkpoints: the adapters, the optimizer's moments and the step, in the job's folder, written so that
//! a crash at any moment leaves the previous checkpoint or the new one, never half of one. The random
//! state needs no saving: every step draws from a generator seeded by (seed, step).

use super::optim::AdamW;
use super::settings::TrainSettings;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MANIFEST: &str = "checkpoint.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Optimizer steps taken.
    pub step: u32,
    /// The tensor file, beside the manifest.
    pub file: String,
    /// The run's settings: a resume must train with the same ones.
    pub settings: TrainSettings,
    /// The loss of every step so far, for a resumed run's report.
    pub losses: Vec<f32>,
}

/// Writes `tensors` (and `metadata`) to `path` through a temporary file and a rename.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let on_cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize_to_file(on_cpu, meta, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Saves the state after `step`; the manifest is replaced last, then older tensor files go.
pub fn save(
    dir: &Path,
    step: u32,
    optimizer: &AdamW,
    settings: &TrainSettings,
    losses: &[f32],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let file = format!("checkpoint-{step}.safetensors");
    let mut tensors = Vec::new();
    for (i, ((var, m), v)) in optimizer
        .vars
        .iter()
        .zip(&optimizer.m)
        .zip(&optimizer.v)
        .enumerate()
    {
        tensors.push((format!("var.{i}"), var.as_tensor().clone()));
        tensors.push((format!("exp_avg.{i}"), m.as_tensor().clone()));
        tensors.push((format!("exp_avg_sq.{i}"), v.as_tensor().clone()));
    }
    write_safetensors(&dir.join(&file), &tensors, &HashMap::new())?;
    write_json_atomic(
        &dir.join(MANIFEST),
        &Manifest {
            step,
            file: file.clone(),
            settings: settings.clone(),
            losses: losses.to_vec(),
        },
    )?;
    for old in tensor_files(dir)? {
        if old.file_name().and_then(|n| n.to_str()) != Some(file.as_str()) {
            let _ = std::fs::remove_file(old);
        }
    }
    Ok(())
}

fn tensor_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("checkpoint-") && name.ends_with(".safetensors") {
            out.push(p);
        }
    }
    Ok(out)
}

/// The latest checkpoint's manifest, if there is one.
pub fn latest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(None);
    }
    let m: Manifest = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(m))
}

/// Restores the adapters and the optimizer from `manifest`'s tensors.
pub fn restore(dir: &Path, manifest: &Manifest, optimizer: &mut AdamW) -> Result<()> {
    let path = dir.join(&manifest.file);
    let device = optimizer
        .vars
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let tensors = candle_core::safetensors::load(&path, &device)
        .with_context(|| format!("reading the checkpoint {}", path.display()))?;
    let get = |k: String| {
        tensors
            .get(&k)
            .cloned()
            .with_context(|| format!("the checkpoint lacks `{k}`"))
    };
    if tensors.len() != 3 * optimizer.vars.len() {
        bail!(
            "the checkpoint holds {} tensors, this run has {} variables",
            tensors.len(),
            optimizer.vars.len()
        );
    }
    for (i, ((var, m), v)) in optimizer
        .vars
        .iter()
        .zip(&optimizer.m)
        .zip(&optimizer.v)
        .enumerate()
    {
        var.set(&get(format!("var.{i}"))?)?;
        m.set(&get(format!("exp_avg.{i}"))?)?;
        v.set(&get(format!("exp_avg_sq.{i}"))?)?;
    }
    // One update a step.
    optimizer.t = manifest.step;
    Ok(())
}
