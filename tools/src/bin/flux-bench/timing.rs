//! Timing helpers shared by the subcommands.

use anyhow::Result;
use candle_core::{Device, Tensor};
use engine::models::flux::FluxConfig;
use std::time::Instant;

/// Multiply-adds ×2 of one transformer step: every block's linear layers (4h² + 2h·mlp per token,
/// the same for both block kinds) and attention (q·kᵀ and p·v over the joint sequence), plus the
/// input projections. Modulation and the other per-vector layers are negligible and left out.
pub fn step_flops(cfg: &FluxConfig, img_tokens: usize, txt_tokens: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    let m = cfg.mlp_hidden() as f64;
    let (img, txt) = (img_tokens as f64, txt_tokens as f64);
    let l = img + txt;
    let blocks = (cfg.depth + cfg.depth_single) as f64;
    let per_block = 2.0 * (4.0 * h * h + 2.0 * h * m) * l + 4.0 * l * l * h;
    let io = 2.0 * txt * cfg.context_dim as f64 * h + 4.0 * img * cfg.in_channels as f64 * h;
    blocks * per_block + io
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times `f` (after one warm-up call): the median of `n` synchronised runs, in seconds.
pub fn time_median(
    device: &Device,
    n: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    f()?;
    sync(device)?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        sync(device)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

pub fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}
