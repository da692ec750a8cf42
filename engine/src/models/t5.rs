//! T5's encoder stack (FLUX's T5-XXL v1.1), in transformers' `T5EncoderModel` names, computed as
//! candle-transformers' `t5::T5EncoderModel` computes it (this module's test holds the two equal), on the
//! engine's [`Linear`] layers: the memory plan can then keep the blocks' weights in page-locked host
//! memory and copy each layer to the GPU as it runs ([`T5EncoderModel::place`]), so that a 9 GB
//! encoder runs on a GPU that holds the transformer and little else.

use crate::models::linear::Linear;
use crate::ops::Kernels;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Activation, Embedding, VarBuilder};
use candle_transformers::models::t5::Config;

/// T5's layer norm: a root-mean-square norm in f32, scaled, without a mean or a bias.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            weight: vb.get(cfg.d_model, "weight")?,
            eps: cfg.layer_norm_epsilon,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }

    fn move_to(&mut self, device: &Device) -> Result<()> {
        self.weight = self.weight.to_device(device)?;
        Ok(())
    }
}

fn linear(
    vb: &VarBuilder,
    name: &str,
    inputs: usize,
    outputs: usize,
    k: Kernels,
) -> Result<Linear> {
    let weight = vb.pp(name).get((outputs, inputs), "weight")?;
    Ok(Linear::new(
        format!("{}.{name}", vb.prefix()),
        weight,
        None,
        k,
    ))
}

#[derive(Debug)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    d_kv: usize,
}

impl T5Attention {
    /// `x` (batch, tokens, d_model) attending to itself, `bias` (1, heads, tokens, tokens) added to the
    /// scores (T5 scales nothing: the initialisation folds 1/sqrt(d_kv) into q).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let heads = |t: Tensor| {
            t.reshape((b, n, self.n_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = p
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.n_heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

/// The feed-forward layer: gated (v1.1: `act(wi_0 x) * wi_1 x`) or the original one (`relu(wi x)`).
#[derive(Debug)]
struct DenseReluDense {
    /// `wi_0` in a gated layer, `wi` in the original one.
    wi: Linear,
    /// A gated layer's `wi_1` and its gate's activation.
    gate: Option<(Linear, Activation)>,
    wo: Linear,
}

impl DenseReluDense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.wi.forward(x)?;
        let h = match &self.gate {
            Some((wi_1, act)) => act.forward(&h)?.broadcast_mul(&wi_1.forward(x)?)?,
            None => h.relu()?,
        };
        self.wo.forward(&h)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.wi];
        out.extend(self.gate.as_ref().map(|(wi_1, _)| wi_1));
        out.push(&self.wo);
        out
    }
}

/// `encoder.block.{i}`: self-attention (`layer.0`) and the feed-forward layer (`layer.1`), each with a
/// norm before it and a residual around it.
#[derive(Debug)]
struct T5Block {
    attention: T5Attention,
    attention_norm: T5LayerNorm,
    ff: DenseReluDense,
    ff_norm: T5LayerNorm,
}

impl T5Block {
    fn load(vb: VarBuilder, cfg: &Config, k: Kernels) -> Result<Self> {
        let attn = vb.pp("layer.0");
        let sa = attn.pp("SelfAttention");
        let inner = cfg.num_heads * cfg.d_kv;
        let attention = T5Attention {
            q: linear(&sa, "q", cfg.d_model, inner, k)?,
            k: linear(&sa, "k", cfg.d_model, inner, k)?,
            v: linear(&sa, "v", cfg.d_model, inner, k)?,
            o: linear(&sa, "o", inner, cfg.d_model, k)?,
            n_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        };
        let ff = vb.pp("layer.1");
        let dense = ff.pp("DenseReluDense");
        let ff_layer = if cfg.feed_forward_proj.gated {
            DenseReluDense {
                wi: linear(&dense, "wi_0", cfg.d_model, cfg.d_ff, k)?,
                gate: Some((
                    linear(&dense, "wi_1", cfg.d_model, cfg.d_ff, k)?,
                    cfg.feed_forward_proj.activation,
                )),
                wo: linear(&dense, "wo", cfg.d_ff, cfg.d_model, k)?,
            }
        } else {
            DenseReluDense {
                wi: linear(&dense, "wi", cfg.d_model, cfg.d_ff, k)?,
                gate: None,
                wo: linear(&dense, "wo", cfg.d_ff, cfg.d_model, k)?,
            }
        };
        Ok(Self {
            attention,
            attention_norm: T5LayerNorm::load(attn.pp("layer_norm"), cfg)?,
            ff: ff_layer,
            ff_norm: T5LayerNorm::load(ff.pp("layer_norm"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let x = (x + self
            .attention
            .forward(&self.attention_norm.forward(x)?, bias)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }

    fn linears(&self) -> Vec<&Linear> {
        let a = &self.attention;
        let mut out = vec![&a.q, &a.k, &a.v, &a.o];
        out.extend(self.ff.linears());
        out
    }
}

/// T5's encoder: token embeddings, the blocks (the first holds the relative position bias every
/// block adds to its attention scores), a final norm.
#[derive(Debug)]
pub struct T5EncoderModel {
    shared: Embedding,
    relative_attention_bias: Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    num_buckets: usize,
    max_distance: usize,
    d_model: usize,
    device: Device,
}

impl T5EncoderModel {
    /// From a checkpoint in transformers' names (`shared.weight` or `encoder.embed_tokens.weight`,
    /// `encoder.block.{i}...`, `encoder.final_layer_norm.weight`), every weight on `vb`'s device.
    pub fn load(vb: VarBuilder, cfg: &Config, kernels: Kernels) -> Result<Self> {
        let shared = if vb.contains_tensor("shared.weight") {
            vb.pp("shared")
        } else {
            vb.pp("encoder.embed_tokens")
        };
        let shared = candle_nn::embedding(cfg.vocab_size, cfg.d_model, shared)?;
        let enc = vb.pp("encoder");
        let relative_attention_bias = candle_nn::embedding(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::load(enc.pp(format!("block.{i}")), cfg, kernels))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shared,
            relative_attention_bias,
            blocks,
            final_layer_norm: T5LayerNorm::load(enc.pp("final_layer_norm"), cfg)?,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            d_model: cfg.d_model,
            device: vb.device().clone(),
        })
    }

    /// Moves the model to `device`: with `streamed`, the blocks' linear weights stay in host memory
    /// (page-locked on a GPU) and each is copied to `device` for its product, and the token
    /// embeddings stay there too (a prompt's rows are looked up on the host and its states copied
    /// over), so that only the norms, the position bias and one layer at a time take GPU memory;
    /// else everything moves there.
    pub fn place(&mut self, device: &Device, streamed: bool) -> Result<()> {
        for block in &mut self.blocks {
            for l in block.linears() {
                l.place(device, streamed)?;
            }
            block.attention_norm.move_to(device)?;
            block.ff_norm.move_to(device)?;
        }
        self.final_layer_norm.move_to(device)?;
        let d_model = self.d_model;
        let embedding = |e: &Embedding| -> Result<Embedding> {
            Ok(Embedding::new(e.embeddings().to_device(device)?, d_model))
        };
        if !streamed {
            self.shared = embedding(&self.shared)?;
        }
        let heads = self.relative_attention_bias.embeddings().dim(1)?;
        self.relative_attention_bias = Embedding::new(
            self.relative_attention_bias
                .embeddings()
                .to_device(device)?,
            heads,
        );
        self.device = device.clone();
        Ok(())
    }

    /// The bytes of the blocks' linear weights streamed from host memory at each forward.
    pub fn streamed_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|b| b.linears())
            .filter(|l| l.is_streamed())
            .map(|l| l.bytes() as u64)
            .sum()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// (batch, tokens, d_model) hidden states of `input_ids` (batch, tokens), computed in `dtype`.
    /// No attention mask: every token attends to every other, padding included.
    pub fn forward(&self, input_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let tokens = input_ids.dim(1)?;
        let table = self.shared.embeddings().device();
        let mut x = self
            .shared
            .forward(&input_ids.to_device(table)?)?
            .to_dtype(dtype)?
            .to_device(&self.device)?;
        let bias = self.position_bias(tokens)?.to_dtype(dtype)?;
        for (i, block) in self.blocks.iter().enumerate() {
            // A streamed encoder copies the next block in while this one computes.
            for l in self
                .blocks
                .get(i + 1)
                .map(T5Block::linears)
                .unwrap_or_default()
            {
                l.prefetch()?;
            }
            x = block.forward(&x, &bias)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// (1, heads, tokens, tokens): the learnt bias of each query-key offset's bucket.
    fn position_bias(&self, tokens: usize) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..tokens)
            .flat_map(|i| (0..tokens).map(move |j| (i, j)))
            .map(|(i, j)| self.bucket(j as i64 - i as i64))
            .collect();
        let buckets = Tensor::from_vec(buckets, (tokens, tokens), &self.device)?;
        self.relative_attention_bias
            .forward(&buckets)?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// transformers' `_relative_position_bucket`, bidirectional: half the buckets for keys after the
    /// query; within each half, exact offsets below a quarter of the buckets, then logarithmically
    /// wider ones up to `max_distance` (the logarithm in f32).
    fn bucket(&self, offset: i64) -> u32 {
        let half = (self.num_buckets / 2) as u32;
        let exact = half / 2;
        let after = if offset > 0 { half } else { 0 };
        let n = offset.unsigned_abs() as u32;
        let within = if n < exact {
            n
        } else {
            let scale = (n as f32 / exact as f32).ln()
                / (self.max_distance as f32 / exact as f32).ln()
                * (half - exact) as f32;
            (exact + scale as u32).min(half - 1)
        };
        after + within
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use candle_transformers::models::t5 as reference;

    fn config(feed_forward_proj: &str) -> Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 3,
            "num_heads": 4, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 20, "dropout_rate": 0.0,
            "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
            "feed_forward_proj": feed_forward_proj, "is_encoder_decoder": true,
            "pad_token_id": 0, "eos_token_id": 1
        }))
        .unwrap()
    }

    /// The largest absolute difference over the largest absolute value of `want`.
    fn relative(got: &Tensor, want: &Tensor) -> f32 {
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        let size = want.abs().unwrap().max_all().unwrap();
        (diff.to_scalar::<f32>().unwrap()) / size.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn the_encoder_computes_what_candle_transformers_t5_computes_resident_or_streamed() {
        // 40 tokens: offsets beyond the exact buckets and beyond max_distance take the log buckets and
        // the last one.
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 100).collect();
        for proj in ["gated-gelu", "relu"] {
            let cfg = config(proj);
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            // The reference creates the random weights; ours reads the same ones by name.
            let mut want_model = reference::T5EncoderModel::load(vb, &cfg).unwrap();
            // Norm weights are made zero by the VarMap: random ones near 1 (the reference holds these
            // variables' storage, so it sees them).
            let mut tensors = std::collections::HashMap::new();
            for (name, var) in map.data().lock().unwrap().iter() {
                if name.ends_with("layer_norm.weight") {
                    let w = (var.randn_like(0.0, 0.1).unwrap() + 1.0).unwrap();
                    var.set(&w).unwrap();
                }
                // Ours reads copies: a variable (a weight being trained) is never streamed.
                tensors.insert(name.clone(), var.as_tensor().copy().unwrap());
            }
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
            let mut ours = T5EncoderModel::load(vb, &cfg, Kernels::Plain).unwrap();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want = want_model.forward(&input).unwrap();
            let got = ours.forward(&input, DType::F32).unwrap();
            assert_eq!(got.dims(), &[1, 40, 32]);
            assert!(
                relative(&got, &want) < 1e-6,
                "{proj}: {}",
                relative(&got, &want)
            );
            // Streamed (blocks copied from host memory for each product): the same numbers.
            ours.place(&Device::Cpu, true).unwrap();
            assert!(ours.streamed_bytes() > 0);
            let streamed = ours.forward(&input, DType::F32).unwrap();
            assert_eq!(relative(&streamed, &got), 0.0, "{proj}");
        }
    }
}
