//! BERT, the sentence encoder's architecture (all-MiniLM-L6-v2's), for inference, reading a
//! checkpoint by its own tensor names as candle-transformers' `bert` does and computing the same
//! function. It is the project's own for the classifier's time on a CPU, where a chat message is a
//! few rows through every layer and fixed costs dominate: each linear weight is stored transposed
//! in memory, as candle's CPU products read it, so they do not repack it on every call; query, key
//! and value are one product; GELU's erf is vectorised ([`crate::ops::activation::gelu_erf`]).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use crate::ops::activation::gelu_erf;

/// A linear layer whose `[out, in]` weight is laid out transposed in memory (its shape unchanged):
/// `Linear` multiplies by the weight's transpose, which is then contiguous.
fn linear(weight: Tensor, bias: Tensor) -> Result<Linear> {
    let weight = weight.to_dtype(DType::F32)?.t()?.contiguous()?.t()?;
    Ok(Linear::new(weight, Some(bias.to_dtype(DType::F32)?)))
}

fn load_linear(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Linear> {
    linear(
        vb.get((outputs, inputs), "weight")?,
        vb.get(outputs, "bias")?,
    )
}

struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            word_embeddings: candle_nn::embedding(
                config.vocab_size,
                hidden,
                vb.pp("word_embeddings"),
            )?,
            position_embeddings: candle_nn::embedding(
                config.max_position_embeddings,
                hidden,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: candle_nn::embedding(
                config.type_vocab_size,
                hidden,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: candle_nn::layer_norm(hidden, config.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let (_, tokens) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, tokens as u32, input_ids.device())?;
        let embeddings = (self.word_embeddings.forward(input_ids)?
            + self.token_type_embeddings.forward(token_type_ids)?)?
        .broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        self.layer_norm.forward(&embeddings)
    }
}

struct BertLayer {
    /// `attention.self.{query,key,value}` as one product, their outputs side by side.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    heads: usize,
}

impl BertLayer {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let hidden = config.hidden_size;
        let attention = vb.pp("attention");
        let part = |name: &str| -> Result<(Tensor, Tensor)> {
            let vb = attention.pp("self").pp(name);
            Ok((vb.get((hidden, hidden), "weight")?, vb.get(hidden, "bias")?))
        };
        let (q, k, v) = (part("query")?, part("key")?, part("value")?);
        let qkv = linear(
            Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
            Tensor::cat(&[&q.1, &k.1, &v.1], 0)?,
        )?;
        let eps = config.layer_norm_eps;
        Ok(Self {
            qkv,
            attention_output: load_linear(attention.pp("output").pp("dense"), hidden, hidden)?,
            attention_norm: candle_nn::layer_norm(
                hidden,
                eps,
                attention.pp("output").pp("LayerNorm"),
            )?,
            intermediate: load_linear(
                vb.pp("intermediate").pp("dense"),
                hidden,
                config.intermediate_size,
            )?,
            output: load_linear(
                vb.pp("output").pp("dense"),
                config.intermediate_size,
                hidden,
            )?,
            output_norm: candle_nn::layer_norm(hidden, eps, vb.pp("output").pp("LayerNorm"))?,
            heads: config.num_attention_heads,
        })
    }

    /// `additive`: `[n, 1, 1, tokens]`, 0 for real tokens and very negative for padding.
    fn forward(&self, x: &Tensor, additive: Option<&Tensor>) -> Result<Tensor> {
        let (n, tokens, hidden) = x.dims3()?;
        let head_dim = hidden / self.heads;
        let qkv = self.qkv.forward(x)?;
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * hidden, hidden)?
                .reshape((n, tokens, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let mut scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        if let Some(additive) = additive {
            scores = scores.broadcast_add(additive)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, tokens, hidden))?;
        let attended = self
            .attention_norm
            .forward(&(self.attention_output.forward(&context)? + x)?)?;
        let inner = gelu_erf(&self.intermediate.forward(&attended)?)?;
        self.output_norm
            .forward(&(self.output.forward(&inner)? + attended)?)
    }
}

/// BERT's layers (`layer.{i}.…`), without the embeddings: the classifier's tuned top.
pub struct BertEncoder {
    layers: Vec<BertLayer>,
}

impl BertEncoder {
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        if !matches!(config.hidden_act, HiddenAct::Gelu) {
            candle_core::bail!(
                "only BERT encoders with the exact GELU (hidden_act \"gelu\") are supported, \
                 found {:?}",
                config.hidden_act
            );
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp(format!("layer.{i}")), config))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// `hidden`: `[n, tokens, width]`; `mask`: `[n, tokens]`, 1 for real tokens and 0 for padding,
    /// or `None` when no row is padded.
    pub fn forward(&self, hidden: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        // Padding gets the most negative f32, as transformers does: no weight after the softmax.
        let additive = mask
            .map(|m| {
                let m = m.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
                (m.ones_like()? - m)? * f32::MIN as f64
            })
            .transpose()?;
        let mut x = hidden.clone();
        for layer in &self.layers {
            x = layer.forward(&x, additive.as_ref())?;
        }
        Ok(x)
    }
}

/// The embeddings and layers of a BERT checkpoint, its tensors at the root or under `bert.`.
pub struct BertModel {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
}

impl BertModel {
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        Ok(Self {
            embeddings: BertEmbeddings::load(vb.pp("embeddings"), config)?,
            encoder: BertEncoder::load(vb.pp("encoder"), config)?,
        })
    }

    /// Hidden states `[n, tokens, width]` for `[n, tokens]` token and token-type ids; `mask` as
    /// [`BertEncoder::forward`] takes it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embedded = self.embeddings.forward(input_ids, token_type_ids)?;
        self.encoder.forward(&embedded, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::Device;
    use std::collections::HashMap;

    /// A small BERT with random weights in the checkpoints' layout.
    fn random_bert() -> Result<(HashMap<String, Tensor>, Config)> {
        let config: Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "max_position_embeddings": 16, "type_vocab_size": 2,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "classifier_dropout": null, "model_type": "bert"
        }))
        .expect("a valid config");
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        let mut put = |name: String, shape: &[usize]| -> Result<()> {
            t.insert(name, Tensor::randn(0f32, 0.5, shape, &dev)?);
            Ok(())
        };
        put("embeddings.word_embeddings.weight".into(), &[50, 32])?;
        put("embeddings.position_embeddings.weight".into(), &[16, 32])?;
        put("embeddings.token_type_embeddings.weight".into(), &[2, 32])?;
        let norm = |t: &mut HashMap<String, Tensor>, p: String| -> Result<()> {
            t.insert(
                format!("{p}.weight"),
                (Tensor::randn(0f32, 0.1, 32, &dev)? + 1.0)?,
            );
            t.insert(format!("{p}.bias"), Tensor::randn(0f32, 0.1, 32, &dev)?);
            Ok(())
        };
        norm(&mut t, "embeddings.LayerNorm".into())?;
        for i in 0..2 {
            let p = format!("encoder.layer.{i}");
            for (name, out, inp) in [
                ("attention.self.query", 32, 32),
                ("attention.self.key", 32, 32),
                ("attention.self.value", 32, 32),
                ("attention.output.dense", 32, 32),
                ("intermediate.dense", 64, 32),
                ("output.dense", 32, 64),
            ] {
                t.insert(
                    format!("{p}.{name}.weight"),
                    Tensor::randn(0f32, 0.3, (out, inp), &dev)?,
                );
                t.insert(
                    format!("{p}.{name}.bias"),
                    Tensor::randn(0f32, 0.1, out, &dev)?,
                );
            }
            norm(&mut t, format!("{p}.attention.output.LayerNorm"))?;
            norm(&mut t, format!("{p}.output.LayerNorm"))?;
        }
        Ok((t, config))
    }

    #[test]
    fn the_encoder_computes_what_candle_transformers_bert_computes() -> Result<()> {
        let (tensors, config) = random_bert()?;
        let dev = Device::Cpu;
        let vb = || VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
        let ours = BertModel::load(vb(), &config)?;
        let reference = candle_transformers::models::bert::BertModel::load(vb(), &config)?;
        // Two rows, the second padded after three tokens.
        let ids = Tensor::new(&[[1u32, 7, 9, 23, 4], [1, 30, 4, 0, 0]], &dev)?;
        let types = ids.zeros_like()?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
        let expected = reference.forward(&ids, &types, Some(&mask))?;
        let got = ours.forward(&ids, &types, Some(&mask))?;
        let diff = max_abs_diff(&got, &expected)?;
        assert!(diff < 1e-4, "largest difference {diff}");
        // A row without padding needs no mask.
        let one = ids.narrow(0, 0, 1)?;
        let alone = ours.forward(&one, &one.zeros_like()?, None)?;
        let diff = max_abs_diff(&alone, &expected.narrow(0, 0, 1)?)?;
        assert!(diff < 1e-4, "largest difference without a mask {diff}");
        Ok(())
    }
}
