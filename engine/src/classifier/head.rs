//! The trained part of the classifier: a small network from a sentence embedding and the context's
//! features to one logit for "image request", plus the temperature that calibrates it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

/// The head that ships with the project, relative to the repository root.
pub const DEFAULT_HEAD_PATH: &str = "engine/assets/classifier-head.safetensors";

/// Prefix of the tuned encoder layers inside the head file.
const TOP: &str = "top.";

/// `hidden` is absent for a plain logistic regression on the embedding.
#[derive(Debug, Clone)]
pub struct Head {
    /// The encoder's last layers as fine-tuned with the head (`layer.{i}.…`, counted from the
    /// first tuned layer); empty when only the head was trained.
    pub top: HashMap<String, Tensor>,
    pub hidden: Option<(Tensor, Tensor)>,
    pub out: (Tensor, Tensor),
    /// Logits are divided by this before the sigmoid; fitted on a validation split.
    pub temperature: f32,
}

impl Head {
    /// The input width the head expects: the embedding's, plus `CONTEXT_FEATURES` for a head that
    /// reads the context.
    pub fn input_size(&self) -> Result<usize> {
        let w = self.hidden.as_ref().map_or(&self.out.0, |(w, _)| w);
        Ok(w.dim(1)?)
    }

    /// Uncalibrated logits, `[n]`, for `[n, width]` embeddings and their `[n, CONTEXT_FEATURES]`
    /// context features. A head trained before the context existed takes the embedding alone and
    /// ignores the context.
    pub fn logits(&self, embeddings: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut x = if self.input_size()? == embeddings.dim(1)? {
            embeddings.clone()
        } else {
            Tensor::cat(&[embeddings, context], 1)?
        };
        if let Some((w, b)) = &self.hidden {
            x = x.matmul(&w.t()?)?.broadcast_add(b)?.gelu_erf()?;
        }
        let (w, b) = &self.out;
        Ok(x.matmul(&w.t()?)?.broadcast_add(b)?.squeeze(D::Minus1)?)
    }

    /// Calibrated probabilities that each embedded prompt is an image request.
    pub fn image_probabilities(&self, embeddings: &Tensor, context: &Tensor) -> Result<Vec<f32>> {
        let scaled = (self.logits(embeddings, context)? / self.temperature as f64)?;
        Ok(candle_nn::ops::sigmoid(&scaled)?.to_vec1::<f32>()?)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        // Tuned encoder layers are stored in f16: that halves the committed file, and the
        // training command evaluates the file as written, so the rounding is measured.
        let mut tensors: HashMap<String, Tensor> = self
            .top
            .iter()
            .map(|(k, v)| Ok((format!("{TOP}{k}"), v.to_dtype(DType::F16)?)))
            .collect::<Result<_>>()?;
        if let Some((w, b)) = &self.hidden {
            tensors.insert("hidden.weight".into(), w.clone());
            tensors.insert("hidden.bias".into(), b.clone());
        }
        tensors.insert("out.weight".into(), self.out.0.clone());
        tensors.insert("out.bias".into(), self.out.1.clone());
        let device = self.out.0.device();
        tensors.insert(
            "temperature".into(),
            Tensor::new(&[self.temperature], device)?,
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device).with_context(|| {
            format!(
                "reading the classifier head {} (train one with the train-classifier command)",
                path.display()
            )
        })?;
        Self::from_tensors(tensors).with_context(|| format!("in {}", path.display()))
    }

    fn from_tensors(mut t: HashMap<String, Tensor>) -> Result<Self> {
        let top_names: Vec<String> = t.keys().filter(|k| k.starts_with(TOP)).cloned().collect();
        let top = top_names
            .into_iter()
            .filter_map(|k| t.remove(&k).map(|v| (k[TOP.len()..].to_string(), v)))
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let mut take = |name: &str| {
            t.remove(name)
                .with_context(|| format!("tensor {name} missing"))
                .and_then(|x| Ok(x.to_dtype(DType::F32)?))
        };
        let out = (take("out.weight")?, take("out.bias")?);
        let temperature = take("temperature")?.to_vec1::<f32>()?[0];
        let hidden = match (take("hidden.weight"), take("hidden.bias")) {
            (Ok(w), Ok(b)) => Some((w, b)),
            _ => None,
        };
        if temperature.is_nan() || temperature <= 0.0 {
            bail!("temperature must be positive, found {temperature}");
        }
        Ok(Self {
            top,
            hidden,
            out,
            temperature,
        })
    }
}
