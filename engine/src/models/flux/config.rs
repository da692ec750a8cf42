//! FLUX transformer hyper-parameters: the published models and the project's small test sizes.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// Packed latent channels: 16 latent channels × a 2×2 patch (FLUX.1-Fill's also read the
    /// masked image's and the mask's).
    pub in_channels: usize,
    /// The velocity's channels when they differ from `in_channels` (FLUX.1-Fill's 64 of 384).
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Double-stream (joint text/image) blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single: usize,
    /// T5 hidden size.
    pub context_dim: usize,
    /// CLIP pooled-output size.
    pub vec_dim: usize,
    pub mlp_ratio: f64,
    /// RoPE dimensions for the (text index, row, column) axes; they sum to the head dimension.
    pub axes_dims: Vec<usize>,
    pub theta: f64,
    /// FLUX.1-dev is guidance-distilled and takes the guidance scale as an input; schnell does not.
    pub guidance_embed: bool,
}

impl FluxConfig {
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            out_channels: None,
            hidden_size: 3072,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            context_dim: 4096,
            vec_dim: 768,
            mlp_ratio: 4.0,
            axes_dims: vec![16, 56, 56],
            theta: 10_000.0,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// The channels of the velocity the transformer predicts.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Reads diffusers' `transformer/config.json`.
    pub fn from_diffusers_json(json: &serde_json::Value) -> Result<Self> {
        let get = |k: &str| {
            json[k]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("transformer config.json lacks `{k}`"))
        };
        let heads = get("num_attention_heads")?;
        let head_dim = get("attention_head_dim")?;
        let axes_dims = match json["axes_dims_rope"].as_array() {
            Some(a) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect(),
            None => vec![16, 56, 56],
        };
        Ok(Self {
            in_channels: get("in_channels")?,
            out_channels: json["out_channels"].as_u64().map(|v| v as usize),
            hidden_size: heads * head_dim,
            num_heads: heads,
            depth: get("num_layers")?,
            depth_single: get("num_single_layers")?,
            context_dim: get("joint_attention_dim")?,
            vec_dim: get("pooled_projection_dim")?,
            mlp_ratio: 4.0,
            axes_dims,
            theta: 10_000.0,
            guidance_embed: json["guidance_embeds"].as_bool().unwrap_or(false),
        })
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.hidden_size.is_multiple_of(self.num_heads),
            "hidden size {} is not a multiple of {} heads",
            self.hidden_size,
            self.num_heads
        );
        anyhow::ensure!(
            self.axes_dims.iter().sum::<usize>() == self.head_dim()
                && self.axes_dims.iter().all(|d| d % 2 == 0),
            "RoPE axes {:?} must be even and sum to the head dimension {}",
            self.axes_dims,
            self.head_dim()
        );
        Ok(())
    }
}
