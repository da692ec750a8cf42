//! `builtin-model prepare`: the emoji of npm's emoji-datasource-google paired with their names.

use crate::{Entry, HOLD_OUT_EVERY};
use anyhow::{bail, Context, Result};
use engine::builtin::SIZE;
use image::{RgbImage, RgbaImage};
use std::io::Write;
use std::path::Path;

fn caption_of(e: &serde_json::Value) -> Option<String> {
    let name = e["name"]
        .as_str()
        .map(str::to_string)
        .or_else(|| e["short_name"].as_str().map(|s| s.replace(['_', '-'], " ")))?;
    let caption = name.to_lowercase().trim().to_string();
    (!caption.is_empty()).then_some(caption)
}

pub fn prepare(package: &Path, out: &Path) -> Result<()> {
    let emoji: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(package.join("emoji.json")).context("emoji.json in the npm package")?,
    )?;
    let mut emoji: Vec<&serde_json::Value> = emoji
        .iter()
        .filter(|e| e["has_img_google"].as_bool() == Some(true))
        .collect();
    emoji.sort_by_key(|e| e["sort_order"].as_u64().unwrap_or(u64::MAX));
    std::fs::create_dir_all(out.join("images"))?;
    let zip_file = std::fs::File::create(out.join("train.zip"))?;
    let mut zip = zip::ZipWriter::new(zip_file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut entries = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in emoji {
        let (Some(caption), Some(file)) = (caption_of(e), e["image"].as_str()) else {
            continue;
        };
        if !seen.insert(caption.clone()) {
            continue;
        }
        let src = package.join("img/google/64").join(file);
        let rgba: RgbaImage = image::open(&src)
            .with_context(|| format!("reading {}", src.display()))?
            .to_rgba8();
        let rgb = on_white(&rgba);
        if rgb.dimensions() != (SIZE, SIZE) {
            bail!("{} is not {SIZE}x{SIZE}", src.display());
        }
        rgb.save(out.join("images").join(file))?;
        let held_out = entries.len() % HOLD_OUT_EVERY == HOLD_OUT_EVERY / 2;
        if !held_out {
            let stem = file.trim_end_matches(".png");
            let mut png = Vec::new();
            rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            zip.start_file(format!("{stem}.png"), opts)?;
            zip.write_all(&png)?;
            zip.start_file(format!("{stem}.txt"), opts)?;
            zip.write_all(caption.as_bytes())?;
        }
        entries.push(Entry {
            file: file.to_string(),
            caption,
            category: e["category"].as_str().unwrap_or("").to_string(),
            subcategory: e["subcategory"].as_str().unwrap_or("").to_string(),
            held_out,
        });
    }
    zip.finish()?;
    std::fs::write(out.join("index.json"), serde_json::to_vec_pretty(&entries)?)?;
    let held = entries.iter().filter(|e| e.held_out).count();
    println!(
        "prepare: {} emoji, {} for training (train.zip), {held} held out; index.json and images/ in {}",
        entries.len(),
        entries.len() - held,
        out.display()
    );
    Ok(())
}

/// Composites RGBA over white.
fn on_white(rgba: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = f32::from(p[3]) / 255.0;
        let mix = |c: u8| (f32::from(c) * a + 255.0 * (1.0 - a)).round() as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}
