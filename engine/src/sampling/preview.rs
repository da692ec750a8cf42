//! A fast latent-to-RGB preview for progress events: a per-cell affine map from the latent
//! channels to RGB, fitted by least squares against the model's own autoencoder (or pixel folding) when the
//! pipeline loads (so it fits whatever VAE is in use, including test models), instead of a
//! table of factors made for one model.

use crate::models::codec::ImageCodec;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

pub struct LatentPreview {
    /// (channels + 1) × 3: one row per latent channel, then the bias row.
    weights: Vec<[f64; 3]>,
}

impl LatentPreview {
    /// Encodes a synthetic, colourful test card and regresses each latent cell's average
    /// pixel colour on its latent channels (model space).
    pub fn fit(codec: &ImageCodec, dtype: DType, device: &Device) -> Result<Self> {
        let f = codec.downscale();
        let cells = 16;
        let size = cells * f;
        let mut px = vec![0f32; 3 * size * size];
        for y in 0..size {
            for x in 0..size {
                let (u, v) = (x as f64 / size as f64, y as f64 / size as f64);
                let rgb = [
                    (6.0 * u).sin() * (3.0 * v).cos(),
                    (5.0 * v + 1.0).sin(),
                    ((4.0 * (u + v)).cos() + (9.0 * u * v).sin()) / 2.0,
                ];
                for (ch, val) in rgb.iter().enumerate() {
                    px[ch * size * size + y * size + x] = *val as f32;
                }
            }
        }
        let img = Tensor::from_vec(px.clone(), (1, 3, size, size), device)?.to_dtype(dtype)?;
        let z = codec.to_model_space(&codec.encode(&img)?.mean)?;
        let c = z.dim(1)?;
        let z = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let n = cells * cells;
        let k = c + 1;
        // Normal equations (XᵀX + λI) W = XᵀY, solved by Gaussian elimination: k is 17 for FLUX.
        let mut xtx = vec![vec![0f64; k]; k];
        let mut xty = vec![[0f64; 3]; k];
        for cell in 0..n {
            let (cy, cx) = (cell / cells, cell % cells);
            let mut row: Vec<f64> = (0..c).map(|ch| z[ch * n + cell] as f64).collect();
            row.push(1.0);
            let mut target = [0f64; 3];
            for (ch, t) in target.iter_mut().enumerate() {
                let mut s = 0.0;
                for dy in 0..f {
                    for dx in 0..f {
                        s += px[ch * size * size + (cy * f + dy) * size + cx * f + dx] as f64;
                    }
                }
                *t = s / (f * f) as f64;
            }
            for i in 0..k {
                for j in 0..k {
                    xtx[i][j] += row[i] * row[j];
                }
                for (o, t) in target.iter().enumerate() {
                    xty[i][o] += row[i] * t;
                }
            }
        }
        for (i, r) in xtx.iter_mut().enumerate() {
            r[i] += 1e-3;
        }
        Ok(Self {
            weights: solve(xtx, xty),
        })
    }

    /// Packed-or-not model-space latents of one image (C, h, w) to an RGB picture, one pixel a cell.
    pub fn render(&self, latents: &Tensor) -> Result<RgbImage> {
        let (c, h, w) = latents.dims3()?;
        let z = latents
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut img = RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let mut rgb = self.weights[c];
                for ch in 0..c.min(self.weights.len() - 1) {
                    let v = z[ch * h * w + y * w + x] as f64;
                    for (o, val) in rgb.iter_mut().enumerate() {
                        *val += v * self.weights[ch][o];
                    }
                }
                let px = rgb.map(|v| ((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8);
                img.put_pixel(x as u32, y as u32, image::Rgb(px));
            }
        }
        Ok(img)
    }
}

fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<[f64; 3]>) -> Vec<[f64; 3]> {
    let k = a.len();
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (pivot_row, pivot_b) = (a[col].clone(), b[col]);
        for (row, (ar, br)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
            if row != col {
                let factor = ar[col] / pivot_row[col];
                for (x, p) in ar.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= factor * p;
                }
                for (x, p) in br.iter_mut().zip(pivot_b) {
                    *x -= factor * p;
                }
            }
        }
    }
    (0..k).map(|i| b[i].map(|v| v / a[i][i])).collect()
}
