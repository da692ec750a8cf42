//! A LoRA file read into adapters that are not yet placed on a model: each module's down and up
//! matrices with the file's own scale (alpha / rank), whatever trainer wrote it.

use super::keys::{self, Format, Key, Role, Rows, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One low-rank update of one layer, as the file names it.
#[derive(Debug, Clone)]
pub struct Module {
    /// The file's key for this adapter, less the `.lora_A.weight`-style suffix (for messages).
    pub key: String,
    pub layer: String,
    pub scheme: Scheme,
    pub rows: Rows,
    /// (rank, in)
    pub down: Tensor,
    /// (out, rank)
    pub up: Tensor,
    /// The file's own multiplier: alpha / rank (kohya, diffusers network alphas, PEFT configs;
    /// alpha / √rank for rsLoRA), 1 where the file has no alpha.
    pub scale: f64,
}

/// A parsed LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    pub format: Format,
    pub modules: Vec<Module>,
    /// What the file holds that the studio does not apply, by name: text-encoder adapters (its
    /// CLIP and T5 are not adapter-aware) and differences of biases and norm scales (only linear
    /// weights take adapters). Reported, never silently dropped; diffusers skips the same.
    pub skipped: Vec<String>,
}

/// The safetensors metadata key under which diffusers (≥ 0.35) stores the PEFT `LoraConfig`
/// of each component, as JSON with keys prefixed by the component (`transformer.lora_alpha`).
const DIFFUSERS_METADATA_KEY: &str = "lora_adapter_metadata";

#[derive(Default)]
struct Partial {
    layer: String,
    scheme: Option<Scheme>,
    rows: Option<Rows>,
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<f64>,
}

impl LoraFile {
    /// Reads a `.safetensors` LoRA onto `device` in `dtype`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading the LoRA {}", path.display()))?;
        let parse = || -> Result<Self> {
            let st = safetensors::SafeTensors::deserialize(&bytes)?;
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
            let mut tensors = HashMap::new();
            for (name, view) in st.tensors() {
                tensors.insert(name, view.load(&Device::Cpu)?);
            }
            let metadata = header.metadata().clone().unwrap_or_default();
            Self::from_tensors(tensors, &metadata, dtype, device)
        };
        parse().with_context(|| format!("reading the LoRA {}", path.display()))
    }

    /// Parses tensors (and the file's safetensors metadata) in any of the supported layouts.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        metadata: &HashMap<String, String>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let peft = PeftConfig::from_metadata(metadata)?;
        let mut partial: BTreeMap<String, Partial> = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut differences = Vec::new();
        let mut formats: BTreeMap<&'static str, (Format, usize)> = BTreeMap::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let tensor = &tensors[name];
            match keys::parse(name) {
                Some(Key::TextEncoder { module }) => {
                    if !skipped.contains(&module) {
                        skipped.push(module);
                    }
                }
                Some(Key::Transformer {
                    module,
                    layer,
                    scheme,
                    rows,
                    role,
                    format,
                }) => {
                    // An alpha key alone does not tell kohya-style names from PEFT ones.
                    if role != Role::Alpha {
                        formats.entry(format.name()).or_insert((format, 0)).1 += 1;
                    }
                    let p = partial.entry(module).or_default();
                    p.layer = layer;
                    p.scheme = Some(scheme);
                    p.rows = Some(rows);
                    match role {
                        Role::Down => p.down = Some((name.clone(), tensor.clone())),
                        Role::Up => p.up = Some((name.clone(), tensor.clone())),
                        Role::Alpha => p.alpha = Some(scalar(tensor).with_context(|| format!("`{name}`"))?),
                    }
                }
                Some(Key::Difference {
                    layer,
                    scheme,
                    bias,
                }) => {
                    if bias || tensor.rank() != 2 {
                        skipped.push(name.clone());
                    } else {
                        let f = format_of(&scheme);
                        formats.entry(f.name()).or_insert((f, 0)).1 += 1;
                        differences.push((name.clone(), layer, scheme, tensor.clone()));
                    }
                }
                None => bail!(
                    "cannot place the LoRA key `{name}`: it is not a FLUX LoRA matrix in any layout the studio knows (kohya, ComfyUI, diffusers/PEFT, XLabs, BFL); DoRA, LoHa and LoKr are not supported"
                ),
            }
        }
        let Some(format) = formats.values().max_by_key(|(_, n)| *n).map(|(f, _)| *f) else {
            bail!(
                "the file holds no transformer LoRA weights{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (only {} entries the studio does not apply: text-encoder adapters or bias and norm differences, such as `{}`)",
                        skipped.len(),
                        skipped[0]
                    )
                }
            );
        };
        let mut modules = Vec::with_capacity(partial.len() + differences.len());
        // A linear weight's whole difference is an adapter of full rank: the identity down, the
        // difference up (merged into the weight like any adapter, so it costs no extra compute).
        for (key, layer, scheme, diff) in differences {
            let (_, in_f) = diff.dims2()?;
            modules.push(Module {
                key,
                layer,
                scheme,
                rows: Rows::All,
                down: Tensor::eye(in_f, dtype, device)?,
                up: diff.to_device(device)?.to_dtype(dtype)?,
                scale: 1.0,
            });
        }
        for (key, p) in partial {
            let (Some((_, down)), Some((_, up))) = (&p.down, &p.up) else {
                let present = p
                    .down
                    .as_ref()
                    .or(p.up.as_ref())
                    .map(|(n, _)| n.clone())
                    .unwrap_or_else(|| format!("{key}.alpha"));
                bail!(
                    "the LoRA key `{present}` has no matching {} matrix",
                    if p.down.is_none() {
                        "down (lora_A / lora_down)"
                    } else {
                        "up (lora_B / lora_up)"
                    }
                );
            };
            let (rank, _) = down
                .dims2()
                .with_context(|| format!("`{key}` down matrix"))?;
            let (_, up_rank) = up.dims2().with_context(|| format!("`{key}` up matrix"))?;
            if rank != up_rank || rank == 0 {
                bail!(
                    "the LoRA `{key}` has a down matrix of rank {rank} but an up matrix of rank {up_rank}"
                );
            }
            let scheme = p.scheme.expect("set with the first key");
            let alpha = match p.alpha {
                Some(a) => Some(a),
                None if scheme == Scheme::Diffusers => peft.alpha(&p.layer),
                None => None,
            };
            let scale = match alpha {
                Some(a) if peft.use_rslora => a / (rank as f64).sqrt(),
                Some(a) => a / rank as f64,
                None => 1.0,
            };
            modules.push(Module {
                key,
                layer: p.layer,
                scheme,
                rows: p.rows.expect("set with the first key"),
                down: down.to_device(device)?.to_dtype(dtype)?,
                up: up.to_device(device)?.to_dtype(dtype)?,
                scale,
            });
        }
        Ok(Self {
            format,
            modules,
            skipped,
        })
    }
}

/// The layout a difference's name is in, when it is the only kind of key telling.
fn format_of(scheme: &Scheme) -> Format {
    match scheme {
        Scheme::BflFlat | Scheme::DiffusersFlat => Format::Kohya,
        Scheme::Bfl => Format::ComfyUi,
        Scheme::Diffusers => Format::Diffusers,
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match v.as_slice() {
        [a] => Ok(*a),
        _ => bail!("alpha must be a single number, found {} values", v.len()),
    }
}

/// The parts of a PEFT `LoraConfig` that set scales, from diffusers' metadata.
#[derive(Debug, Default)]
struct PeftConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftConfig {
    fn from_metadata(metadata: &HashMap<String, String>) -> Result<Self> {
        let Some(raw) = metadata.get(DIFFUSERS_METADATA_KEY) else {
            return Ok(Self::default());
        };
        let json: serde_json::Value = serde_json::from_str(raw)
            .with_context(|| format!("the `{DIFFUSERS_METADATA_KEY}` metadata is not JSON"))?;
        // Keys are the component's name, a dot, then the LoraConfig field.
        let field = |f: &str| json.get(format!("transformer.{f}")).or_else(|| json.get(f));
        let mut alpha_pattern = Vec::new();
        if let Some(obj) = field("alpha_pattern").and_then(|v| v.as_object()) {
            for (pattern, v) in obj {
                if pattern.contains(|c| "*+?[](){}|^$\\".contains(c)) {
                    bail!("the LoRA's alpha_pattern key `{pattern}` is a regular expression, which the studio does not read: list module names instead");
                }
                let a = v
                    .as_f64()
                    .with_context(|| format!("alpha_pattern `{pattern}` is not a number"))?;
                alpha_pattern.push((pattern.clone(), a));
            }
        }
        Ok(Self {
            lora_alpha: field("lora_alpha").and_then(|v| v.as_f64()),
            alpha_pattern,
            use_rslora: field("use_rslora")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        })
    }

    /// PEFT's rule: the pattern that names this module (itself, or a dotted suffix of its name),
    /// else the config's `lora_alpha`.
    fn alpha(&self, module: &str) -> Option<f64> {
        let hit = self
            .alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")));
        hit.map(|(_, a)| *a).or(self.lora_alpha)
    }
}
