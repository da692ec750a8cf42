//! What editing an image adds to sampling, as diffusers' FLUX pipelines do it: the schedule trimmed
//! by `strength` and the image's latents noised to its first sigma (FluxImg2ImgPipeline), the mask on
//! the latent grid and the kept part re-noised after every step (FluxInpaintPipeline), the masked
//! image and the mask as extra channels (FluxFillPipeline), the image's tokens beside the noise
//! (FluxKontextPipeline).

use super::latents;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

/// Which way a model takes an input image: told by its `model_index.json` and transformer config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditModel {
    /// Any other FLUX model: denoising starts from the image's latents (image-to-image) and, with a
    /// mask, keeps the unmasked part (inpainting).
    Latents,
    /// FLUX.1-Fill: the masked image's latents and the mask are extra input channels of every token.
    Fill,
    /// FLUX.1-Kontext: the image's tokens follow the noise's in the sequence.
    Kontext,
}

/// What the denoising loop adds at each step for an edit.
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// Text to image, or image-to-image once started.
    None,
    /// After each step the kept part (`mask` 0) is the image's latents noised to the next sigma with
    /// the starting noise: `(1 - mask) · scale_noise(image, next, noise) + mask · x`.
    Inpaint {
        /// Packed (1, tokens, C·4).
        image: Tensor,
        /// Packed (images, tokens, C·4): each image's own starting noise.
        noise: Tensor,
        /// Packed (1, tokens, C·4), 1 where repainted.
        mask: Tensor,
    },
    /// Appended to every token's channels (1, tokens, extra).
    Channels(Tensor),
    /// Appended to the sequence after the noise's tokens: packed latents (1, n, C·4) and their
    /// position ids (n, 3).
    Tokens { latents: Tensor, ids: Tensor },
}

/// The sigmas that remain for `strength` (diffusers' `get_timesteps`): the last
/// `min(steps · strength, steps)` steps, rounded as diffusers rounds them. `sigmas` ends in 0.
pub fn strength_sigmas(sigmas: &[f64], strength: f64) -> Result<Vec<f64>> {
    if !(strength > 0.0 && strength <= 1.0) {
        bail!("strength must be in (0, 1] (got {strength})");
    }
    let steps = sigmas.len() - 1;
    let init = (steps as f64 * strength).min(steps as f64);
    // Python's int() of a non-negative float: truncation.
    // A strength above 0 keeps at least the last step.
    let start = (steps as f64 - init).max(0.0) as usize;
    Ok(sigmas[start.min(steps - 1)..].to_vec())
}

/// `sigma · noise + (1 - sigma) · sample`: the flow-matching scheduler's `scale_noise`.
pub fn scale_noise(sample: &Tensor, sigma: f64, noise: &Tensor) -> candle_core::Result<Tensor> {
    (noise * sigma)?.broadcast_add(&(sample * (1.0 - sigma))?)
}

/// An RGB image as (1, 3, H, W) f32 in [-1, 1], as diffusers' image processor makes it.
pub fn image_tensor(image: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| 2.0 * (v as f32 / 255.0) - 1.0)
        .collect();
    Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// The mask binarized as diffusers' mask processor does (`value / 255 ≥ 0.5` is repainted): (1, 1, H, W)
/// f32 of 0 and 1.
pub fn mask_tensor(mask: &GrayImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(data, (1, 1, h, w), device)
}

/// FluxInpaintPipeline's mask: the binarized mask resized to the latent grid by nearest neighbour
/// (torch's `interpolate`: cell (i, j) takes pixel (i·f, j·f)), repeated over the `channels`
/// latent channels and packed: (1, tokens, channels · 4).
pub fn inpaint_mask(mask: &Tensor, f: usize, channels: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let rows = Tensor::arange_step(0u32, h as u32, f as u32, mask.device())?;
    let cols = Tensor::arange_step(0u32, w as u32, f as u32, mask.device())?;
    let small = mask.index_select(&rows, 2)?.index_select(&cols, 3)?;
    latents::pack(&small.repeat((1, channels, 1, 1))?)
}

/// FluxFillPipeline's mask channels: each `f`×`f` square of mask pixels folded into `f²` channels
/// (row-major within the square), then packed: (1, tokens, f² · 4).
pub fn fill_mask(mask: &Tensor, f: usize) -> candle_core::Result<Tensor> {
    let (b, _, h, w) = mask.dims4()?;
    let folded = mask
        .reshape((b, h / f, f, w / f, f))?
        .permute((0, 2, 4, 1, 3))?
        .reshape((b, f * f, h / f, w / f))?;
    latents::pack(&folded)
}

/// The position ids of a Kontext input image's tokens: the latent grid's, first axis 1.
pub fn kontext_image_ids(rows: usize, cols: usize, device: &Device) -> candle_core::Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [1.0, r as f32, c as f32]))
        .collect();
    Tensor::from_vec(ids, (rows * cols, 3), device)
}

impl Conditioning {
    /// The transformer's image input: `x` (images, tokens, C·4) with the extra channels or tokens,
    /// each image given its own copy.
    pub fn model_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let images = x.dim(0)?;
        let each = |t: &Tensor| t.to_dtype(x.dtype())?.repeat((images, 1, 1));
        match self {
            Self::Channels(extra) => Tensor::cat(&[x, &each(extra)?], 2),
            Self::Tokens { latents, .. } => Tensor::cat(&[x, &each(latents)?], 1),
            Self::None | Self::Inpaint { .. } => Ok(x.clone()),
        }
    }

    /// The position ids of [`Self::model_input`]'s tokens, from the noise's.
    pub fn image_ids(&self, noise_ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Tokens { ids, .. } => Tensor::cat(&[noise_ids, ids], 0),
            _ => Ok(noise_ids.clone()),
        }
    }

    /// The model's output for the noise's `tokens` only.
    pub fn velocity(&self, out: Tensor, tokens: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Tokens { .. } => out.narrow(1, 0, tokens),
            _ => Ok(out),
        }
    }

    /// The latents after a step to `next`: inpainting puts back the kept part.
    pub fn after_step(&self, x: Tensor, next: f64) -> candle_core::Result<Tensor> {
        match self {
            Self::Inpaint { image, noise, mask } => {
                let kept = scale_noise(image, next, noise)?;
                let mask = mask.to_dtype(DType::F32)?;
                let keep = mask.affine(-1.0, 1.0)?;
                kept.broadcast_mul(&keep)? + x.broadcast_mul(&mask)?
            }
            _ => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_keeps_the_last_steps_as_diffusers_rounds_them() -> Result<()> {
        let sigmas = [1.0, 0.75, 0.5, 0.25, 0.0];
        assert_eq!(strength_sigmas(&sigmas, 1.0)?, sigmas);
        // 4 · 0.6 = 2.4 steps: t_start = int(1.6) = 1, three steps run.
        assert_eq!(strength_sigmas(&sigmas, 0.6)?, [0.75, 0.5, 0.25, 0.0]);
        assert_eq!(strength_sigmas(&sigmas, 0.25)?, [0.25, 0.0]);
        // Any strength above 0 keeps at least the last step: t_start = int(4 - 0.4) = 3.
        assert_eq!(strength_sigmas(&sigmas, 0.1)?, [0.25, 0.0]);
        assert!(strength_sigmas(&sigmas, 0.0).is_err());
        assert!(strength_sigmas(&sigmas, 1.5).is_err());
        Ok(())
    }

    #[test]
    fn the_inpaint_mask_samples_each_cells_top_left_pixel_and_binarizes() -> Result<()> {
        let dev = Device::Cpu;
        let mut m = GrayImage::new(4, 4);
        m.put_pixel(0, 0, image::Luma([128]));
        m.put_pixel(2, 0, image::Luma([127]));
        m.put_pixel(1, 1, image::Luma([255]));
        let t = mask_tensor(&m, &dev)?;
        let packed = inpaint_mask(&t, 2, 1)?;
        // One token of one channel's 2×2 cells: (0,0) repainted, (0,1) kept (127 < 128),
        // (1,*) kept ((1,1) is not a cell's top-left pixel).
        assert_eq!(
            packed.flatten_all()?.to_vec1::<f32>()?,
            [1.0, 0.0, 0.0, 0.0]
        );
        let fill = fill_mask(&t, 2)?;
        assert_eq!(fill.dims(), [1, 1, 16]);
        Ok(())
    }
}
