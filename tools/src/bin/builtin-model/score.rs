//! `builtin-model score`: every held-out caption (and some training captions) generated on the CPU,
//! scored by how often the nearest dataset image is the one asked for.

use crate::Entry;
use anyhow::{Context, Result};
use candle_core::Device;
use engine::builtin::{SIZE, TEXT_TOKENS};
use engine::ops::Kernels;
use engine::pipeline::{FluxPipeline, GenerateParams, LoadOptions};
use image::{imageops::FilterType, RgbImage};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

pub struct ScoreArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub steps: usize,
    pub guidance: f64,
    pub train_captions: usize,
    pub out: PathBuf,
    pub text_encoder: PathBuf,
}

/// An image as a comparison vector: 16x16, RGB in [0, 1]. Coarse on purpose: a generated emoji
/// that is the right thing a few pixels off should still be nearest to it.
fn features(img: &RgbImage) -> Vec<f32> {
    image::imageops::resize(img, 16, 16, FilterType::Triangle)
        .into_raw()
        .into_iter()
        .map(|v| f32::from(v) / 255.0)
        .collect()
}

fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[derive(Default, Serialize)]
struct Tally {
    captions: usize,
    /// The nearest dataset image is the requested emoji.
    exact_top1: usize,
    /// The requested emoji is among the 10 nearest.
    exact_top10: usize,
    /// The nearest dataset image is of the requested emoji's subcategory (e.g. "animal-bird").
    subcategory_top1: usize,
    /// What a random pick of the dataset would score, summed over captions.
    subcategory_chance: f64,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let entries: Vec<Entry> = serde_json::from_slice(
        &std::fs::read(a.data.join("index.json"))
            .context("index.json: run scripts/builtin/prepare-data first")?,
    )?;
    let images: Vec<RgbImage> = entries
        .iter()
        .map(|e| Ok(image::open(a.data.join("images").join(&e.file))?.to_rgb8()))
        .collect::<Result<_>>()?;
    let feats: Vec<Vec<f32>> = images.iter().map(features).collect();
    let n = entries.len();
    let opts = LoadOptions {
        source: engine::hub::Source::Local(a.model.clone()),
        transformer_file: None,
        t5_max_len: TEXT_TOKENS,
        text_encoder_dir: a.text_encoder.clone(),
        kernels: Kernels::default(),
        weights: None,
        memory: Default::default(),
    };
    let pipe = FluxPipeline::load_dir(&a.model, &opts, &Device::Cpu)?;
    let held: Vec<usize> = (0..n).filter(|&i| entries[i].held_out).collect();
    let train_all: Vec<usize> = (0..n).filter(|&i| !entries[i].held_out).collect();
    let stride = (train_all.len() / a.train_captions.max(1)).max(1);
    let train: Vec<usize> = train_all
        .iter()
        .step_by(stride)
        .take(a.train_captions)
        .copied()
        .collect();
    std::fs::create_dir_all(&a.out)?;
    let mut seconds = Vec::new();
    let mut examples: Vec<(usize, RgbImage, usize)> = Vec::new();
    let mut run = |set: &[usize], keep_examples: bool| -> Result<Tally> {
        let mut t = Tally::default();
        for &i in set {
            let e = &entries[i];
            let start = Instant::now();
            let mut out = pipe.generate(
                &GenerateParams::new(
                    e.caption.clone(),
                    (SIZE as usize, SIZE as usize),
                    a.steps,
                    a.guidance,
                    0,
                ),
                &mut |_| engine::pipeline::Control::Continue,
            )?;
            seconds.push(start.elapsed().as_secs_f64());
            let f = features(out.image());
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&x, &y| distance(&f, &feats[x]).total_cmp(&distance(&f, &feats[y])));
            t.captions += 1;
            t.exact_top1 += usize::from(order[0] == i);
            t.exact_top10 += usize::from(order[..10].contains(&i));
            let same = |j: usize| entries[j].subcategory == e.subcategory;
            t.subcategory_top1 += usize::from(same(order[0]));
            t.subcategory_chance += (0..n).filter(|&j| same(j)).count() as f64 / n as f64;
            if keep_examples {
                examples.push((i, out.images.swap_remove(0), order[0]));
            }
        }
        Ok(t)
    };
    let held_tally = run(&held, true)?;
    let train_tally = run(&train, false)?;
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    let summary = |t: &Tally| {
        json!({
            "captions": t.captions,
            "exact_top1": t.exact_top1 as f64 / t.captions as f64,
            "exact_top10": t.exact_top10 as f64 / t.captions as f64,
            "exact_top1_chance": 1.0 / n as f64,
            "exact_top10_chance": 10.0 / n as f64,
            "subcategory_top1": t.subcategory_top1 as f64 / t.captions as f64,
            "subcategory_top1_chance": t.subcategory_chance / t.captions as f64,
        })
    };
    let result = json!({
        "model": a.model.display().to_string(),
        "dataset_images": n,
        "steps": a.steps,
        "guidance": a.guidance,
        "seed": 0,
        "held_out": summary(&held_tally),
        "training_captions": summary(&train_tally),
        "cpu_seconds_per_image_median": median,
        "cpu_threads": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1),
    });
    std::fs::write(
        a.out.join("score.json"),
        serde_json::to_vec_pretty(&result)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    // A strip per held-out example: what was asked (the dataset's image), what was drawn.
    let shown: Vec<&(usize, RgbImage, usize)> = examples.iter().take(12).collect();
    let mut grid = RgbImage::from_pixel(SIZE * shown.len() as u32, 2 * SIZE, image::Rgb([255; 3]));
    for (k, (i, img, _)) in shown.iter().enumerate() {
        image::imageops::overlay(&mut grid, &images[*i], i64::from(SIZE) * k as i64, 0);
        image::imageops::overlay(&mut grid, img, i64::from(SIZE) * k as i64, i64::from(SIZE));
    }
    grid.save(a.out.join("held-out.png"))?;
    let captions: Vec<&str> = shown
        .iter()
        .map(|(i, _, _)| entries[*i].caption.as_str())
        .collect();
    std::fs::write(
        a.out.join("held-out.txt"),
        format!(
            "top row: the dataset's image; bottom row: generated from its caption\n{}\n",
            captions.join("\n")
        ),
    )?;
    Ok(())
}
