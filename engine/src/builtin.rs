//! The built-in model's shape and folder (docs/builtin-model.md): FLUX's transformer, small, on
//! 64x64 pixels folded 2x2 into channels, reading prompts with MiniLM. `builtin-model train` writes
//! such a folder with seeded weights and trains it; the `builtin-emoji` preset loads the committed one.

use crate::models::flux::FluxConfig;
use crate::pipeline::PIXEL_FLUX_CLASS;
use anyhow::Result;
use candle_core::Tensor;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Image side in pixels.
pub const SIZE: u32 = 64;
/// Pixels per latent cell along a side: 64×64×3 becomes 32×32 cells of 12 channels, 256 tokens.
pub const PIXEL_UNSHUFFLE: usize = 2;
/// MiniLM token states per prompt: emoji names are shorter.
pub const TEXT_TOKENS: usize = 24;

/// The model's transformer: FLUX's architecture, small (11.2M parameters), MiniLM-sized text inputs,
/// no guidance embedding (classifier-free guidance instead).
pub fn model_config() -> FluxConfig {
    FluxConfig {
        in_channels: 3 * PIXEL_UNSHUFFLE * PIXEL_UNSHUFFLE * 4,
        out_channels: None,
        hidden_size: 256,
        num_heads: 4,
        depth: 2,
        depth_single: 6,
        context_dim: 384,
        vec_dim: 384,
        mlp_ratio: 4.0,
        axes_dims: vec![16, 24, 24],
        theta: 10_000.0,
        guidance_embed: false,
    }
}

/// Writes a model folder: index, transformer config, scheduler, and `weights` as the transformer.
pub fn write_model_folder(
    dir: &Path,
    cfg: &FluxConfig,
    weights: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir_all(dir.join("transformer"))?;
    std::fs::create_dir_all(dir.join("scheduler"))?;
    let index = json!({
        "_class_name": PIXEL_FLUX_CLASS,
        "pixel_unshuffle": PIXEL_UNSHUFFLE,
        "text_tokens": TEXT_TOKENS,
        "text_encoder": "all-MiniLM-L6-v2 (scripts/fetch-models)",
        "size": SIZE,
    });
    let transformer = json!({
        "_class_name": "FluxTransformer2DModel",
        "in_channels": cfg.in_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single,
        "attention_head_dim": cfg.head_dim(),
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "pooled_projection_dim": cfg.vec_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": cfg.axes_dims,
    });
    // Pixels are highly correlated: a shift of 2 spends more of the steps at high noise, where the
    // picture's layout is decided.
    let scheduler = json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "shift": 2.0,
        "use_dynamic_shifting": false,
    });
    let write = |p: PathBuf, v: &serde_json::Value| -> Result<()> {
        Ok(std::fs::write(p, serde_json::to_vec_pretty(v)?)?)
    };
    write(dir.join("model_index.json"), &index)?;
    write(dir.join("transformer/config.json"), &transformer)?;
    write(dir.join("scheduler/scheduler_config.json"), &scheduler)?;
    crate::training::checkpoint::write_safetensors(
        &dir.join("transformer/diffusion_pytorch_model.safetensors"),
        weights,
        &Default::default(),
    )
}
