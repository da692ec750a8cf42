//! FLUX's autoencoder (diffusers' AutoencoderKL layout, 16 latent channels, no quant convs):
//! images to latents for training, latents to images for generation.

use crate::ops::{self, Kernels};
use anyhow::{Context, Result};
use candle_core::{Module, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub mid_block_attention: bool,
}

impl AutoencoderConfig {
    pub fn flux() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
            mid_block_attention: true,
        }
    }

    pub fn from_diffusers_json(json: &serde_json::Value) -> Result<Self> {
        let f = Self::flux();
        let usize_of = |k: &str, d: usize| json[k].as_u64().map_or(d, |v| v as usize);
        let quant = json["use_quant_conv"].as_bool().unwrap_or(false)
            || json["use_post_quant_conv"].as_bool().unwrap_or(false);
        anyhow::ensure!(
            !quant,
            "autoencoders with quant convs (SD-style) are not FLUX's"
        );
        Ok(Self {
            block_out_channels: json["block_out_channels"]
                .as_array()
                .context("vae config.json lacks block_out_channels")?
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as usize))
                .collect(),
            layers_per_block: usize_of("layers_per_block", f.layers_per_block),
            latent_channels: usize_of("latent_channels", f.latent_channels),
            norm_num_groups: usize_of("norm_num_groups", f.norm_num_groups),
            scaling_factor: json["scaling_factor"].as_f64().unwrap_or(f.scaling_factor),
            shift_factor: json["shift_factor"].as_f64().unwrap_or(f.shift_factor),
            mid_block_attention: json["mid_block_add_attention"].as_bool().unwrap_or(true),
        })
    }

    /// Pixels per latent cell along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const EPS: f64 = 1e-6;

/// GroupNorm keeping its affine parameters at hand for the fused CUDA kernel.
struct GroupNorm {
    plain: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    kernels: Kernels,
}

fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
    k: Kernels,
) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    Ok(GroupNorm {
        plain: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        kernels: k,
    })
}

impl GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, false)
    }

    /// SiLU(GroupNorm(x)), as every resnet and the output head use it.
    fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let eps = EPS as f32;
        ops::norm::group_norm(
            self.kernels,
            x,
            &self.plain,
            [&self.weight, &self.bias],
            self.groups,
            eps,
            silu,
        )
    }
}

/// A 3x3 convolution that takes the fused path where it fits ([`ops::conv::conv2d`]).
struct Conv3(Conv2d, Kernels);

impl Module for Conv3 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::conv::conv2d(self.1, x, &self.0)
    }
}

impl Conv3 {
    /// On `x` upsampled twice by nearest neighbour, without making that copy where the fused path runs.
    fn forward_upsampled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::conv::upsample_conv2d(self.1, x, &self.0, 2)
    }
}

fn conv3(
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
    k: Kernels,
) -> Result<Conv3> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv3(conv2d(cin, cout, 3, cfg, vb)?, k))
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv3,
    norm2: GroupNorm,
    conv2: Conv3,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder, k: Kernels) -> Result<Self> {
        let shortcut = if cin != cout {
            Some(conv2d(
                cin,
                cout,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, cin, EPS, vb.pp("norm1"), k)?,
            conv1: conv3(cin, cout, 1, 1, vb.pp("conv1"), k)?,
            norm2: group_norm(groups, cout, EPS, vb.pp("norm2"), k)?,
            conv2: conv3(cout, cout, 1, 1, vb.pp("conv2"), k)?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all spatial positions, with a residual.
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder, k: Kernels) -> Result<Self> {
        Ok(Self {
            norm: group_norm(groups, c, EPS, vb.pp("group_norm"), k)?,
            q: linear(c, c, vb.pp("to_q"))?,
            k: linear(c, c, vb.pp("to_k"))?,
            v: linear(c, c, vb.pp("to_v"))?,
            out: linear(c, c, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.q.forward(&t)?;
        let k = self.k.forward(&t)?;
        let v = self.v.forward(&t)?;
        let q = (q * (1.0 / (c as f64).sqrt()))?;
        let o = self.out.forward(&ops::attention::softmax_attention(
            &q,
            &k,
            &v,
            candle_core::DType::F32,
        )?)?;
        x + o.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

struct MidBlock {
    res0: Resnet,
    attn: Option<SpatialAttention>,
    res1: Resnet,
}

impl MidBlock {
    fn new(c: usize, cfg: &AutoencoderConfig, vb: VarBuilder, k: Kernels) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            res0: Resnet::new(c, c, g, vb.pp("resnets.0"), k)?,
            attn: if cfg.mid_block_attention {
                Some(SpatialAttention::new(c, g, vb.pp("attentions.0"), k)?)
            } else {
                None
            },
            res1: Resnet::new(c, c, g, vb.pp("resnets.1"), k)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.res1.forward(&x)
    }
}

struct Encoder {
    conv_in: Conv3,
    down: Vec<(Vec<Resnet>, Option<Conv3>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv3,
}

impl Encoder {
    fn new(cfg: &AutoencoderConfig, vb: VarBuilder, k: Kernels) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down = Vec::new();
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let b = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    Resnet::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                        b.pp(format!("resnets.{j}")),
                        k,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < ch.len() {
                Some(conv3(cout, cout, 2, 0, b.pp("downsamplers.0.conv"), k)?)
            } else {
                None
            };
            down.push((resnets, downsample));
            cin = cout;
        }
        let last = *ch.last().context("empty block_out_channels")?;
        Ok(Self {
            conv_in: conv3(3, ch[0], 1, 1, vb.pp("conv_in"), k)?,
            down,
            mid: MidBlock::new(last, cfg, vb.pp("mid_block"), k)?,
            norm_out: group_norm(g, last, EPS, vb.pp("conv_norm_out"), k)?,
            conv_out: conv3(last, 2 * cfg.latent_channels, 1, 1, vb.pp("conv_out"), k)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                x = r.forward(&x)?;
            }
            if let Some(d) = downsample {
                // diffusers pads right and bottom only before its stride-2 convolution.
                x = d.forward(&x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?;
            }
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

struct Decoder {
    conv_in: Conv3,
    mid: MidBlock,
    up: Vec<(Vec<Resnet>, Option<Conv3>)>,
    norm_out: GroupNorm,
    conv_out: Conv3,
}

impl Decoder {
    fn new(cfg: &AutoencoderConfig, vb: VarBuilder, k: Kernels) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up = Vec::new();
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let b = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    Resnet::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                        b.pp(format!("resnets.{j}")),
                        k,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(conv3(cout, cout, 1, 1, b.pp("upsamplers.0.conv"), k)?)
            } else {
                None
            };
            up.push((resnets, upsample));
            cin = cout;
        }
        let first = *rev.last().context("empty block_out_channels")?;
        Ok(Self {
            conv_in: conv3(cfg.latent_channels, rev[0], 1, 1, vb.pp("conv_in"), k)?,
            mid: MidBlock::new(rev[0], cfg, vb.pp("mid_block"), k)?,
            up,
            norm_out: group_norm(g, first, EPS, vb.pp("conv_norm_out"), k)?,
            conv_out: conv3(first, 3, 1, 1, vb.pp("conv_out"), k)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(&x)?;
            }
            if let Some(u) = upsample {
                x = u.forward_upsampled(&x)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

/// The tiles of [`Autoencoder::tiled_decode`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// A tile's side in pixels.
    pub sample: usize,
    /// The share of a tile that overlaps its neighbour.
    pub overlap: f64,
}

/// `b` with its first `extent` rows (`dim` 2) or columns (`dim` 3) faded in from the last ones of `a`,
/// diffusers' `blend_v` / `blend_h`: `a·(1 − y/extent) + b·(y/extent)` at offset y.
fn blend_edge(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let ramp: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let fade: Vec<f32> = (0..extent)
        .map(|y| (1.0 - y as f64 / extent as f64) as f32)
        .collect();
    let shape = if dim == 2 {
        (1, 1, extent, 1)
    } else {
        (1, 1, 1, extent)
    };
    let ramp = Tensor::from_vec(ramp, shape, b.device())?.to_dtype(b.dtype())?;
    let fade = Tensor::from_vec(fade, shape, b.device())?.to_dtype(b.dtype())?;
    let tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = b.narrow(dim, 0, extent)?;
    let blended = (tail.broadcast_mul(&fade)? + head.broadcast_mul(&ramp)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[&blended, &rest], dim)
}

/// `run` on overlapping tiles of `tile` cells of `x`, `stride` apart, each output tile's first `blend`
/// rows and columns faded in from its upper and left neighbours (as those are once blended themselves,
/// diffusers' in-place `blend_v` / `blend_h`), then cropped to `keep` and joined: diffusers' tiled
/// decode and encode.
fn tiled(
    x: &Tensor,
    tile: usize,
    stride: usize,
    blend: usize,
    keep: usize,
    run: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    anyhow::ensure!(stride > 0, "tiles of {tile} cells are too small");
    let (_, _, h, w) = x.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let part = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(run(&part)?);
        }
        rows.push(row);
    }
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend_edge(&rows[i - 1][j], &t, blend, 2)?;
            }
            if j > 0 {
                t = blend_edge(&rows[i][j - 1], &t, blend, 3)?;
            }
            rows[i][j] = t;
        }
    }
    let rows = rows
        .iter()
        .map(|row| {
            let cropped = row
                .iter()
                .map(|t| {
                    let (_, _, th, tw) = t.dims4()?;
                    t.narrow(2, 0, keep.min(th))?.narrow(3, 0, keep.min(tw))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&cropped, 3)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 2)?)
}

/// The latent distribution of an encoded image.
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

pub struct Autoencoder {
    encoder: Encoder,
    decoder: Decoder,
    pub config: AutoencoderConfig,
}

impl Autoencoder {
    /// The autoencoder of `cfg` from `vb`, its ops taking the path `kernels` says.
    pub fn new(cfg: &AutoencoderConfig, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let k = kernels;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"), k).context("autoencoder encoder")?,
            decoder: Decoder::new(cfg, vb.pp("decoder"), k).context("autoencoder decoder")?,
            config: cfg.clone(),
        })
    }

    /// Loads diffusers' `vae/` folder (config.json + safetensors).
    pub fn load(
        dir: &Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("config.json"))
                .with_context(|| format!("reading {}/config.json", dir.display()))?,
        )?;
        let cfg = AutoencoderConfig::from_diffusers_json(&json)?;
        Self::new(
            &cfg,
            crate::weights::var_builder(dir, dtype, device)?,
            kernels,
        )
    }

    /// Images in [-1, 1] (B, 3, H, W) to the raw latent distribution.
    pub fn encode(&self, images: &Tensor) -> Result<LatentDist> {
        Ok(self.distribution(&self.encoder.forward(images)?)?)
    }

    /// Raw latents (B, C, h, w) to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decoder.forward(latents)?)
    }

    /// [`Self::decode`] in overlapping tiles, as diffusers' `AutoencoderKL.tiled_decode`: each tile of
    /// `tiling.sample` pixels is decoded alone, and each tile's top and left `overlap` share is blended
    /// linearly into its neighbours' so that no seam shows. The memory of a decode is then one tile's,
    /// whatever the image's size. Latents no larger than one tile decode whole, as in diffusers.
    pub fn tiled_decode(&self, latents: &Tensor, tiling: Tiling) -> Result<Tensor> {
        let tile_latent = tiling.sample / self.config.downscale();
        let (_, _, h, w) = latents.dims4()?;
        if h <= tile_latent && w <= tile_latent {
            return self.decode(latents);
        }
        let blend = (tiling.sample as f64 * tiling.overlap) as usize;
        tiled(
            latents,
            tile_latent,
            (tile_latent as f64 * (1.0 - tiling.overlap)) as usize,
            blend,
            tiling.sample - blend,
            |tile| Ok(self.decoder.forward(tile)?),
        )
    }

    /// [`Self::encode`] in overlapping tiles, as diffusers' `AutoencoderKL._tiled_encode`: each tile of
    /// `tiling.sample` pixels is encoded alone and the latent moments are blended across each tile's top
    /// and left `overlap` share. Images no larger than one tile encode whole, as in diffusers.
    pub fn tiled_encode(&self, images: &Tensor, tiling: Tiling) -> Result<LatentDist> {
        let (_, _, h, w) = images.dims4()?;
        if h <= tiling.sample && w <= tiling.sample {
            return self.encode(images);
        }
        let tile_latent = tiling.sample / self.config.downscale();
        let blend = (tile_latent as f64 * tiling.overlap) as usize;
        let moments = tiled(
            images,
            tiling.sample,
            (tiling.sample as f64 * (1.0 - tiling.overlap)) as usize,
            blend,
            tile_latent - blend,
            |tile| Ok(self.encoder.forward(tile)?),
        )?;
        Ok(self.distribution(&moments)?)
    }

    /// The latent distribution of the encoder's moments (mean ‖ log-variance).
    fn distribution(&self, moments: &Tensor) -> candle_core::Result<LatentDist> {
        let c = self.config.latent_channels;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30.0, 20.0)?;
        Ok(LatentDist {
            std: (logvar * 0.5)?.exp()?,
            mean,
        })
    }

    /// Raw latents to the normalised space the transformer works in.
    pub fn to_model_space(&self, raw: &Tensor) -> candle_core::Result<Tensor> {
        (raw - self.config.shift_factor)? * self.config.scaling_factor
    }

    pub fn from_model_space(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        (z / self.config.scaling_factor)? + self.config.shift_factor
    }
}
