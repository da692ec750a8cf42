//! Seeded noise and FLUX's 2×2 packing of latents into tokens.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Gaussian noise (1, channels, h, w) from `seed`. Drawn on the CPU with a portable generator,
/// so one seed gives the same starting noise on every device and every run.
pub fn seeded_noise(
    seed: u64,
    channels: usize,
    h: usize,
    w: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = channels * h * w;
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(data, (1, channels, h, w), &Device::Cpu)?.to_device(device)?)
}

/// (B, C, H, W) -> (B, H/2 · W/2, C · 4): each 2×2 patch becomes one token.
pub fn pack(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack`] for a latent of `h` × `w` cells.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _l, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_groups_patches() -> Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 6.0, &Device::Cpu)?.reshape((1, 2, 4, 6))?;
        let p = pack(&x)?;
        assert_eq!(p.dims(), [1, 6, 8]);
        // Token 0 holds channel 0's top-left 2×2 patch, then channel 1's.
        assert_eq!(
            p.get(0)?.get(0)?.to_vec1::<f32>()?,
            [0., 1., 6., 7., 24., 25., 30., 31.]
        );
        assert_eq!(
            unpack(&p, 4, 6)?.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn same_seed_same_noise() -> Result<()> {
        let a = seeded_noise(7, 16, 4, 4, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = seeded_noise(7, 16, 4, 4, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let c = seeded_noise(8, 16, 4, 4, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }
}
