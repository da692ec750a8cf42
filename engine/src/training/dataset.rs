//! The training set from an uploaded ZIP: images at any folder depth with optional same-stem `.txt`
//! captions, read by `app::dataset::archive` (the rules and limits the upload check and the browser apply
//! too: nothing extracted, every read bounded, headers checked before decoding); each image cropped to
//! the aspect-ratio bucket closest to its shape; and a report of what was used and what was skipped, and why.

use anyhow::{bail, Context, Result};
use app::dataset::archive::Archive;
pub use app::dataset::{
    MAX_CAPTION_BYTES, MAX_ENTRIES, MAX_IMAGES, MAX_IMAGE_BYTES, MAX_PIXELS, MAX_TOTAL_BYTES,
};
pub use app::SkippedFile as Skipped;
use image::{imageops::FilterType, DynamicImage, RgbImage};
use serde::Serialize;
use std::io::{Read, Seek};
use std::path::Path;

/// Buckets range from 1:2 to 2:1.
const MAX_ASPECT: f64 = 2.0;

/// One image ready for the autoencoder.
pub struct Sample {
    /// Its path inside the ZIP.
    pub file: String,
    /// The caption as trained on: the keywords, then the image's own caption if it has one.
    pub caption: String,
    /// Cropped and resized to its bucket.
    pub image: RgbImage,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsedImage {
    pub file: String,
    pub caption: String,
    /// Whether the caption came from a `.txt` file beside the image.
    pub has_caption_file: bool,
    pub original: [u32; 2],
    pub bucket: [u32; 2],
}

/// What was used and what was skipped; kept as `dataset-report.json` in the job's folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetReport {
    pub resolution: u32,
    pub keywords: Vec<String>,
    pub used: Vec<UsedImage>,
    pub skipped: Vec<Skipped>,
    /// Images per bucket, as "WxH".
    pub buckets: std::collections::BTreeMap<String, usize>,
}

impl DatasetReport {
    /// The report as log lines: a summary, then one line per skipped file.
    pub fn lines(&self) -> Vec<String> {
        let buckets: Vec<String> = self
            .buckets
            .iter()
            .map(|(b, n)| format!("{b}: {n}"))
            .collect();
        let captioned = self.used.iter().filter(|u| u.has_caption_file).count();
        let mut lines = vec![format!(
            "dataset: {} images used ({captioned} with a caption file), {} files skipped; buckets {}",
            self.used.len(),
            self.skipped.len(),
            buckets.join(", ")
        )];
        lines.extend(
            self.skipped
                .iter()
                .map(|s| format!("skipped {}: {}", s.file, s.reason)),
        );
        lines
    }
}

/// The aspect-ratio buckets for a training resolution: sides multiples of `multiple`, about
/// `resolution²` pixels, aspect ratios from 1:2 to 2:1.
pub fn buckets(resolution: u32, multiple: u32) -> Vec<(u32, u32)> {
    // Steps of 1/8 of the resolution (64 px at 512) keep the set small, as kohya's buckets do.
    let step = (resolution / 8).max(multiple).div_ceil(multiple) * multiple;
    let area = u64::from(resolution) * u64::from(resolution);
    let mut out = Vec::new();
    let mut w = step;
    while w <= resolution * 2 {
        let h = ((area / u64::from(w)) as u32 / step) * step;
        let aspect = f64::from(w) / f64::from(h.max(1));
        if h > 0 && (1.0 / MAX_ASPECT..=MAX_ASPECT).contains(&aspect) {
            out.push((w, h));
        }
        w += step;
    }
    out.dedup();
    out
}

/// The bucket whose aspect ratio is closest (in log scale) to `width`×`height`.
pub fn nearest_bucket(width: u32, height: u32, buckets: &[(u32, u32)]) -> (u32, u32) {
    let a = (f64::from(width) / f64::from(height)).ln();
    *buckets
        .iter()
        .min_by(|x, y| {
            let dx = ((f64::from(x.0) / f64::from(x.1)).ln() - a).abs();
            let dy = ((f64::from(y.0) / f64::from(y.1)).ln() - a).abs();
            dx.total_cmp(&dy)
        })
        .expect("at least one bucket")
}

/// Scales to cover the bucket, then crops the centre.
fn fit(image: &DynamicImage, (bw, bh): (u32, u32)) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let scale = (f64::from(bw) / f64::from(w)).max(f64::from(bh) / f64::from(h));
    let sw = ((f64::from(w) * scale).round() as u32).max(bw);
    let sh = ((f64::from(h) * scale).round() as u32).max(bh);
    let resized = image.resize_exact(sw, sh, FilterType::Lanczos3).to_rgb8();
    image::imageops::crop_imm(&resized, (sw - bw) / 2, (sh - bh) / 2, bw, bh).to_image()
}

/// The keywords first, then the image's caption, without repeating a keyword it already holds.
pub fn caption_with_keywords(keywords: &[String], caption: Option<&str>) -> String {
    let caption = caption.map(str::trim).unwrap_or("");
    let lower = caption.to_lowercase();
    let mut parts: Vec<&str> = keywords
        .iter()
        .map(String::as_str)
        .filter(|k| !lower.contains(&k.to_lowercase()))
        .collect();
    if !caption.is_empty() {
        parts.push(caption);
    }
    parts.join(", ")
}

/// Reads the ZIP at `path`: the images it can use, cropped to buckets of `resolution` with sides
/// multiples of `multiple`, and the report. Fails only when the file is no ZIP or no image is usable.
pub fn load(
    path: &Path,
    keywords: &[String],
    resolution: u32,
    multiple: u32,
) -> Result<(Vec<Sample>, DatasetReport)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the dataset {}", path.display()))?;
    read(file, keywords, resolution, multiple)
}

pub fn read(
    reader: impl Read + Seek,
    keywords: &[String],
    resolution: u32,
    multiple: u32,
) -> Result<(Vec<Sample>, DatasetReport)> {
    let mut archive = Archive::open(reader).map_err(anyhow::Error::msg)?;
    let buckets = buckets(resolution, multiple);
    let mut samples = Vec::new();
    let mut used = Vec::new();
    for (index, name) in archive.images() {
        if samples.len() >= MAX_IMAGES {
            archive.skip(name, format!("over the limit of {MAX_IMAGES} images"));
            continue;
        }
        let image = match archive.image(index) {
            Ok(image) => image,
            Err(reason) => {
                archive.skip(name, reason);
                continue;
            }
        };
        let own_caption = archive.caption(&name).unwrap_or_else(|skipped| {
            archive.skip(skipped.file, skipped.reason);
            None
        });
        let caption = caption_with_keywords(keywords, own_caption.as_deref());
        let bucket = nearest_bucket(image.width(), image.height(), &buckets);
        used.push(UsedImage {
            file: name.clone(),
            caption: caption.clone(),
            has_caption_file: own_caption.is_some(),
            original: [image.width(), image.height()],
            bucket: [bucket.0, bucket.1],
        });
        samples.push(Sample {
            file: name,
            caption,
            image: fit(&image, bucket),
        });
    }
    let mut counts = std::collections::BTreeMap::new();
    for u in &used {
        *counts
            .entry(format!("{}x{}", u.bucket[0], u.bucket[1]))
            .or_insert(0) += 1;
    }
    let report = DatasetReport {
        resolution,
        keywords: keywords.to_vec(),
        used,
        skipped: archive.skipped().to_vec(),
        buckets: counts,
    };
    if samples.is_empty() {
        let why: Vec<String> = report
            .skipped
            .iter()
            .take(5)
            .map(|s| format!("{}: {}", s.file, s.reason))
            .collect();
        bail!(
            "the dataset has no usable image (png, jpg, jpeg or webp){}",
            if why.is_empty() {
                String::new()
            } else {
                format!("; skipped: {}", why.join("; "))
            }
        );
    }
    Ok((samples, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Cursor;
    use std::io::Write;

    fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let mut out = Vec::new();
        RgbImage::from_pixel(w, h, image::Rgb(rgb))
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Cursor<Vec<u8>> {
        let mut buffer = Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buffer);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap();
        buffer.set_position(0);
        buffer
    }

    #[test]
    fn buckets_cover_the_area_and_stay_on_the_grid() {
        let b = buckets(512, 16);
        assert!(b.contains(&(512, 512)));
        for (w, h) in &b {
            assert!(w % 64 == 0 && h % 64 == 0, "{w}x{h}");
            let area = f64::from(w * h) / (512.0 * 512.0);
            assert!((0.75..=1.0).contains(&area), "{w}x{h}");
        }
        assert_eq!(nearest_bucket(1000, 1000, &b), (512, 512));
        let (w, h) = nearest_bucket(1920, 1080, &b);
        assert!(w > h, "{w}x{h}");
        assert_eq!(
            buckets(64, 4)[..]
                .iter()
                .filter(|b| **b == (64, 64))
                .count(),
            1
        );
    }

    #[test]
    fn keywords_lead_every_caption_once() {
        let kw = vec!["sks dog".to_string(), "photo".to_string()];
        assert_eq!(caption_with_keywords(&kw, None), "sks dog, photo");
        assert_eq!(
            caption_with_keywords(&kw, Some(" a Photo of a dog on grass\n")),
            "sks dog, a Photo of a dog on grass"
        );
    }

    #[test]
    fn reads_images_at_any_depth_with_captions_and_reports_the_rest() {
        let red = png(40, 20, [255, 0, 0]);
        let blue = png(16, 16, [0, 0, 255]);
        let zip = zip_of(&[
            ("a/b/red.PNG", &red),
            ("a/b/red.txt", b"a red banner"),
            ("blue.webp", &blue), // PNG bytes under another extension: read by content
            ("notes.md", b"hello"),
            ("broken.jpg", b"not a jpeg"),
            ("../escape.png", &red),
            ("__MACOSX/a/._red.PNG", b"x"),
            ("lonely.txt", b"caption without image"),
        ]);
        let (samples, report) = read(zip, &["kw".to_string()], 64, 4).unwrap();
        let files: Vec<&str> = samples.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(files, ["a/b/red.PNG", "blue.webp"]);
        assert_eq!(samples[0].caption, "kw, a red banner");
        assert_eq!(samples[1].caption, "kw");
        assert!(samples[0].image.width() > samples[0].image.height());
        assert_eq!(samples[1].image.dimensions(), (64, 64));
        assert_eq!(samples[0].image.get_pixel(3, 3).0, [255, 0, 0]);
        let reasons: HashMap<&str, &str> = report
            .skipped
            .iter()
            .map(|s| (s.file.as_str(), s.reason.as_str()))
            .collect();
        assert!(reasons["notes.md"].contains("not a png"));
        assert!(reasons["broken.jpg"].contains("not a readable"));
        assert!(reasons["../escape.png"].contains("unsafe name"));
        assert!(reasons["__MACOSX/a/._red.PNG"].contains("system file"));
        assert!(reasons["lonely.txt"].contains("caption without an image"));
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert_eq!(report.used.len(), 2);
        assert!(report.lines()[0]
            .starts_with("dataset: 2 images used (1 with a caption file), 5 files skipped"));
    }

    #[test]
    fn a_decompression_bomb_is_skipped_before_decoding() {
        // A tiny PNG whose header claims 20000x20000 pixels.
        let mut bomb = png(16, 16, [0, 0, 0]);
        bomb[16..20].copy_from_slice(&20_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&20_000u32.to_be_bytes());
        let crc = crc32fast::hash(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let ok = png(16, 16, [1, 2, 3]);
        let (samples, report) =
            read(zip_of(&[("bomb.png", &bomb), ("ok.png", &ok)]), &[], 64, 4).unwrap();
        assert_eq!(samples.len(), 1);
        assert!(report.skipped[0].reason.contains("megapixel"), "{report:?}");
    }

    #[test]
    fn no_usable_image_is_an_error_naming_why() {
        let err = read(zip_of(&[("x.png", b"nope")]), &[], 64, 4)
            .err()
            .unwrap();
        assert!(err.to_string().contains("x.png"), "{err}");
        assert!(read(Cursor::new(b"not a zip".to_vec()), &[], 64, 4).is_err());
    }
}
