//! Reading safetensors checkpoints: one file, or shards listed by a `*.index.json`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// The safetensors files of a model folder (diffusers / transformers layout) or a single file.
pub fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("model path {} does not exist", path.display());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    if let Some(index) = entries
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
    {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(index)?)
            .with_context(|| format!("parsing {}", index.display()))?;
        let map = json["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| path.join(f))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.is_file() {
                bail!(
                    "shard {} listed in {} is missing: the download is incomplete",
                    f.display(),
                    index.display()
                );
            }
        }
        return Ok(files);
    }
    let files: Vec<PathBuf> = entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    if files.is_empty() {
        bail!("no .safetensors file in {}", path.display());
    }
    Ok(files)
}

/// The safetensors files a model folder lacks (names relative to it): the shards its
/// `*.safetensors.index.json` lists that are not there, or `*.safetensors` when it has neither an
/// index nor a file.
pub fn missing_safetensors(dir: &Path) -> Vec<String> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(index) = names
        .iter()
        .find(|n| n.ends_with(".safetensors.index.json"))
    {
        let json: serde_json::Value = match std::fs::read(dir.join(index))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(json) => json,
            None => return vec![index.clone()],
        };
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_str())
            .filter(|f| !dir.join(f).is_file())
            .map(str::to_string)
            .collect();
        shards.sort();
        shards.dedup();
        return shards;
    }
    if names.iter().any(|n| n.ends_with(".safetensors")) {
        Vec::new()
    } else {
        vec!["*.safetensors".into()]
    }
}

/// The GGUF file among `path`: the file itself, or the one `.gguf` of a folder that has no
/// safetensors (city96's FLUX transformer or T5 encoder in a model folder's part).
pub fn gguf_file(path: &Path) -> Result<Option<PathBuf>> {
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    if path.is_file() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if entries
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "safetensors"))
    {
        return Ok(None);
    }
    entries.retain(|p| is_gguf(p));
    entries.sort();
    match entries.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        more => bail!(
            "{} holds {} .gguf files: keep the one to load",
            path.display(),
            more.len()
        ),
    }
}

/// The number of weights in a checkpoint (a file, or a folder's safetensors files), from the headers
/// alone: what the memory plan counts bytes from.
pub fn parameter_count(path: &Path) -> Result<u64> {
    use std::io::Read;
    if let Some(file) = gguf_file(path)? {
        return Ok(gguf_tensors(&file)?
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum());
    }
    let mut total = 0u64;
    for file in safetensors_files(path)? {
        check_header(&file)?;
        let mut f = std::fs::File::open(&file)?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n)?;
        let mut header = vec![0u8; u64::from_le_bytes(n) as usize];
        f.read_exact(&mut header)?;
        let json: serde_json::Value = serde_json::from_slice(&header)?;
        total += json
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.get("shape")?.as_array())
            .map(|shape| shape.iter().filter_map(|d| d.as_u64()).product::<u64>())
            .sum::<u64>();
    }
    Ok(total)
}

/// Memory-maps the checkpoint; tensors are converted to `dtype` on `device` as they are read.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let files = safetensors_files(path)?;
    for f in &files {
        check_header(f)?;
    }
    // SAFETY: the files are memory-mapped read-only; the studio never writes model files while
    // a model built from them is alive.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    Ok(vb)
}

/// A truncated or corrupt file is reported with its name and what to do, rather than as a
/// bare parse error deep inside a model constructor.
fn check_header(file: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    let corrupt = |why: &str| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({why}); delete it so it is downloaded again",
            file.display()
        )
    };
    f.read_exact(&mut n).map_err(|_| corrupt("too short"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > len.saturating_sub(8) {
        return Err(corrupt("header longer than the file"));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|_| corrupt("unreadable header"))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| corrupt("header is not JSON"))?;
    let data_len = len - 8 - header_len;
    let end = json
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if end > data_len {
        return Err(corrupt(
            "truncated: the tensors run past the end of the file",
        ));
    }
    Ok(())
}

/// How a model's large weights (its linear layers') are held on the device: what the memory plan
/// counts and what loading makes of a checkpoint. Norms, biases and embeddings stay in the compute
/// dtype whatever the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// bf16 (or the compute dtype): today's exact numerics.
    Bf16,
    /// `float8_e4m3fn` with a per-tensor scale, as Black Forest Labs' and ComfyUI's fp8 files ship.
    Fp8,
    /// A GGUF block type (Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, ...), as city96's GGUF files ship.
    Gguf(candle_core::quantized::GgmlDType),
}

impl WeightFormat {
    /// Bytes that `params` weights take in this format (GGUF's per-block scales included).
    pub fn bytes(&self, params: u64) -> u64 {
        match self {
            Self::Bf16 => 2 * params,
            Self::Fp8 => params,
            Self::Gguf(t) => params * t.type_size() as u64 / t.block_size() as u64,
        }
    }

    /// The name users write (`--weights fp8`, a preset's field): `bf16`, `fp8`, `q8_0`, `q6_k`,
    /// `q5_k`, `q4_k`, `q4_0`.
    pub fn parse(name: &str) -> Result<Self> {
        use candle_core::quantized::GgmlDType as G;
        Ok(match name.to_ascii_lowercase().as_str() {
            "bf16" => Self::Bf16,
            "fp8" | "float8_e4m3fn" => Self::Fp8,
            "q8_0" => Self::Gguf(G::Q8_0),
            "q6_k" => Self::Gguf(G::Q6K),
            "q5_k" | "q5_k_s" => Self::Gguf(G::Q5K),
            "q4_k" | "q4_k_s" => Self::Gguf(G::Q4K),
            "q4_0" => Self::Gguf(G::Q4_0),
            other => bail!(
                "unknown weight format `{other}`: use bf16, fp8, q8_0, q6_k, q5_k, q4_k or q4_0"
            ),
        })
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use candle_core::quantized::GgmlDType as G;
        let name = match self {
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Gguf(G::Q8_0) => "q8_0",
            Self::Gguf(G::Q6K) => "q6_k",
            Self::Gguf(G::Q5K) => "q5_k",
            Self::Gguf(G::Q4K) => "q4_k",
            Self::Gguf(G::Q4_0) => "q4_0",
            Self::Gguf(other) => return write!(f, "{}", format!("{other:?}").to_lowercase()),
        };
        f.write_str(name)
    }
}

/// The tensors of a GGUF file, from its header.
fn gguf_tensors(
    file: &Path,
) -> Result<std::collections::HashMap<String, candle_core::quantized::gguf_file::TensorInfo>> {
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a readable GGUF file ({e}); download it again",
            file.display()
        )
    })?;
    Ok(content.tensor_infos)
}

/// The format a checkpoint already holds its large weights in, when it is not a dense one: a GGUF
/// file's block type (its most common among 2-D weights), or fp8 for a safetensors file with
/// `F8_E4M3` weights. The memory plan keeps it: making another from it would cost memory or
/// precision for nothing.
pub fn stored_format(path: &Path) -> Result<Option<WeightFormat>> {
    use candle_core::quantized::GgmlDType as G;
    if let Some(file) = gguf_file(path)? {
        let mut counts: std::collections::HashMap<G, usize> = Default::default();
        for t in gguf_tensors(&file)?.values() {
            if t.shape.rank() == 2 && !matches!(t.ggml_dtype, G::F32 | G::F16 | G::BF16) {
                *counts.entry(t.ggml_dtype).or_default() += 1;
            }
        }
        return Ok(counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(t, _)| WeightFormat::Gguf(t)));
    }
    for file in safetensors_files(path)? {
        // SAFETY: as `var_builder`'s: model files are not written while they are read.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file)? };
        if st
            .tensors()
            .iter()
            .any(|(_, v)| v.dtype() == safetensors::Dtype::F8_E4M3)
        {
            return Ok(Some(WeightFormat::Fp8));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::WeightFormat;

    #[test]
    fn weight_formats_round_trip_their_names_and_count_block_scales() {
        for name in ["bf16", "fp8", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0"] {
            let format = WeightFormat::parse(name).unwrap();
            assert_eq!(format.to_string(), name);
        }
        // Q8_0: 32 weights in 34 bytes (a f16 scale per block); Q4_0: 32 in 18.
        assert_eq!(WeightFormat::parse("q8_0").unwrap().bytes(32), 34);
        assert_eq!(WeightFormat::parse("q4_0").unwrap().bytes(32), 18);
        assert_eq!(WeightFormat::Bf16.bytes(10), 20);
        assert!(WeightFormat::parse("nf4")
            .unwrap_err()
            .to_string()
            .contains("q4_0"));
    }
}
