//! The encoder's last layers as plain, differentiable tensor operations. The engine's BERT
//! inference (`engine::classifier`'s bert) uses fused layer-norm, softmax and GELU kernels that
//! have no backward pass, so gradients would silently stop there; these layers compute the same
//! function and can be trained.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, D};
use candle_transformers::models::bert::{Config, HiddenAct};

/// BERT layers whose weights are named `layer.{i}.…` as in the checkpoints.
#[derive(Clone)]
pub struct TopLayers {
    weights: HashMap<String, Tensor>,
    layers: usize,
    heads: usize,
    eps: f64,
}

impl TopLayers {
    pub fn new(weights: HashMap<String, Tensor>, layers: usize, config: &Config) -> Result<Self> {
        anyhow::ensure!(
            matches!(config.hidden_act, HiddenAct::Gelu),
            "only GELU encoders can be fine-tuned"
        );
        Ok(Self {
            weights,
            layers,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps,
        })
    }

    fn w(&self, i: usize, name: &str) -> Result<&Tensor> {
        self.weights
            .get(&format!("layer.{i}.{name}"))
            .with_context(|| format!("tuned layer {i}: {name} missing"))
    }

    fn linear(&self, x: &Tensor, i: usize, name: &str) -> Result<Tensor> {
        let w = self.w(i, &format!("{name}.weight"))?;
        let b = self.w(i, &format!("{name}.bias"))?;
        Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
    }

    fn layer_norm(&self, x: &Tensor, i: usize, name: &str) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(self.w(i, &format!("{name}.weight"))?)?
            .broadcast_add(self.w(i, &format!("{name}.bias"))?)?)
    }

    /// `hidden` is `[n, tokens, width]`; `mask` is the `[n, tokens]` 0/1 attention mask.
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (n, tokens, width) = hidden.dims3()?;
        let head_dim = width / self.heads;
        // Additive mask: 0 where attention is allowed, very negative on padding.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        let additive = ((mask.ones_like()? - mask)? * -1e4)?;
        let split = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((n, tokens, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut x = hidden.clone();
        for i in 0..self.layers {
            let q = split(self.linear(&x, i, "attention.self.query")?)?;
            let k = split(self.linear(&x, i, "attention.self.key")?)?;
            let v = split(self.linear(&x, i, "attention.self.value")?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? / (head_dim as f64).sqrt())?
                .broadcast_add(&additive)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let context = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, tokens, width))?;
            let attended = self.linear(&context, i, "attention.output.dense")?;
            let a = self.layer_norm(&(attended + &x)?, i, "attention.output.LayerNorm")?;
            let inner = self.linear(&a, i, "intermediate.dense")?.gelu_erf()?;
            let out = self.linear(&inner, i, "output.dense")?;
            x = self.layer_norm(&(out + a)?, i, "output.LayerNorm")?;
        }
        Ok(x)
    }
}
