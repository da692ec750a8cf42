//! Where the transformer's "latents" live: FLUX's autoencoder, or the pixels themselves, folded into
//! channels (pixel-unshuffle) so that a small image makes a short token sequence. The built-in CPU model
//! (docs/builtin-model.md) works on pixels: no autoencoder to train or ship, and decoding is free.

use crate::models::autoencoder::{Autoencoder, LatentDist, Tiling};
use anyhow::Result;
use candle_core::Tensor;

pub enum ImageCodec {
    Vae(Box<Autoencoder>),
    /// Pixels in [-1, 1], each `factor`×`factor` square of pixels one cell of 3·factor² channels.
    Pixels {
        factor: usize,
    },
}

impl ImageCodec {
    /// Image pixels per latent cell along a side.
    pub fn downscale(&self) -> usize {
        match self {
            Self::Vae(vae) => vae.config.downscale(),
            Self::Pixels { factor } => *factor,
        }
    }

    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Vae(vae) => vae.config.latent_channels,
            Self::Pixels { factor } => 3 * factor * factor,
        }
    }

    /// Images in [-1, 1] (B, 3, H, W) to the raw latent distribution (pixels have no spread).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDist> {
        match self {
            Self::Vae(vae) => vae.encode(images),
            Self::Pixels { factor } => {
                let mean = unshuffle(images, *factor)?;
                Ok(LatentDist {
                    std: mean.zeros_like()?,
                    mean,
                })
            }
        }
    }

    /// [`Self::encode`] in overlapping tiles (the autoencoder's; pixels need no encoding).
    pub fn tiled_encode(&self, images: &Tensor, tiling: Tiling) -> Result<LatentDist> {
        match self {
            Self::Vae(vae) => vae.tiled_encode(images, tiling),
            Self::Pixels { .. } => self.encode(images),
        }
    }

    /// Raw latents (B, C, h, w) to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vae(vae) => vae.decode(latents),
            Self::Pixels { factor } => Ok(shuffle(latents, *factor)?),
        }
    }

    /// [`Self::decode`] in overlapping tiles (the autoencoder's; pixels need no decoding).
    pub fn tiled_decode(&self, latents: &Tensor, tiling: Tiling) -> Result<Tensor> {
        match self {
            Self::Vae(vae) => vae.tiled_decode(latents, tiling),
            Self::Pixels { .. } => self.decode(latents),
        }
    }

    /// Raw latents to the space the transformer works in.
    pub fn to_model_space(&self, raw: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Vae(vae) => vae.to_model_space(raw),
            Self::Pixels { .. } => Ok(raw.clone()),
        }
    }

    pub fn from_model_space(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Vae(vae) => vae.from_model_space(z),
            Self::Pixels { .. } => Ok(z.clone()),
        }
    }
}

/// (B, C, H, W) -> (B, C·f², H/f, W/f), torch's `pixel_unshuffle`.
pub fn unshuffle(x: &Tensor, f: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / f, f, w / f, f))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * f * f, h / f, w / f))
}

/// The inverse of [`unshuffle`], torch's `pixel_shuffle`.
pub fn shuffle(x: &Tensor, f: usize) -> candle_core::Result<Tensor> {
    let (b, cff, h, w) = x.dims4()?;
    let c = cff / (f * f);
    x.reshape((b, c, f, f, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c, h * f, w * f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unshuffle_round_trips_and_keeps_each_square_together() -> Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &Device::Cpu)?.reshape((2, 3, 4, 6))?;
        let u = unshuffle(&x, 2)?;
        assert_eq!(u.dims(), [2, 12, 2, 3]);
        // Cell (0, 0) of channel 0 holds the 2×2 square at the top left of channel 0: 0, 1, 6, 7.
        let cell = u
            .narrow(1, 0, 4)?
            .narrow(2, 0, 1)?
            .narrow(3, 0, 1)?
            .get(0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(cell, [0.0, 1.0, 6.0, 7.0]);
        let back = shuffle(&u, 2)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
