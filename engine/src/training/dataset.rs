//! The training set from an uploaded ZIP: images at any folder depth with optional same-stem `.txt`
//! captions, read in memory (nothing is extracted, so no entry name can reach the file system), with caps
//! on sizes and pixel counts against hostile archives; each image cropped to the aspect-ratio bucket
//! closest to its shape; and a report of what was used and what was skipped, and why.

use anyhow::{bail, Context, Result};
use image::{imageops::FilterType, DynamicImage, ImageDecoder, RgbImage};
use serde::Serialize;
use std::collections::HashMap;
use std::io::{Cursor, Read, Seek};
use std::path::Path;

/// Entries looked at in one ZIP.
pub const MAX_ENTRIES: usize = 20_000;
/// Images used from one ZIP; the rest are skipped with that reason.
pub const MAX_IMAGES: usize = 2_000;
/// Largest image file (uncompressed bytes).
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// Largest caption file.
pub const MAX_CAPTION_BYTES: u64 = 16 << 10;
/// Everything read out of one ZIP together (uncompressed bytes).
pub const MAX_TOTAL_BYTES: u64 = 8 << 30;
/// Largest decoded image: a small file that claims more pixels (a decompression bomb) is skipped before
/// it is decoded.
pub const MAX_PIXELS: u64 = 64_000_000;
/// Longest caption kept, in characters.
const MAX_CAPTION_CHARS: usize = 2_000;
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
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

fn extension(name: &str) -> Option<String> {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

/// The entry's name without its extension: an image and its caption share it.
fn stem_key(name: &str) -> String {
    match name.rfind('.') {
        Some(dot) if !name[dot..].contains('/') => name[..dot].to_string(),
        _ => name.to_string(),
    }
}

/// Reads an entry fully, refusing more than `cap` bytes whatever its header claims.
fn read_capped(entry: &mut impl Read, cap: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    entry
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be decompressed ({e})"))?;
    if bytes.len() as u64 > cap {
        return Err(format!("larger than the {} MiB limit", cap >> 20));
    }
    Ok(bytes)
}

/// Decodes an image after checking its claimed size, turning it upright per its EXIF orientation.
fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
    let reader = |limits: image::Limits| {
        let mut r = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("unreadable ({e})"))?;
        r.limits(limits);
        Ok::<_, String>(r)
    };
    // The header alone first, so that our limit (not the decoder's) names the problem.
    let (w, h) = reader(image::Limits::no_limits())?
        .into_dimensions()
        .map_err(|e| format!("not a readable png, jpeg or webp image ({e})"))?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!(
            "{w}x{h} pixels is over the {} megapixel limit",
            MAX_PIXELS / 1_000_000
        ));
    }
    if w < 8 || h < 8 {
        return Err(format!("{w}x{h} pixels is too small to train on"));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    let mut decoder = reader(limits)?
        .into_decoder()
        .map_err(|e| format!("not a readable image ({e})"))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| format!("corrupt image data ({e})"))?;
    image.apply_orientation(orientation);
    Ok(image)
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
    let mut zip =
        zip::ZipArchive::new(reader).context("the dataset is not a readable ZIP archive")?;
    let mut skipped = Vec::new();
    let mut skip = |file: &str, reason: String| {
        skipped.push(Skipped {
            file: file.to_string(),
            reason,
        })
    };
    // First the directory: which entries are images, which are captions, by name alone.
    let mut images = Vec::new();
    let mut captions: HashMap<String, usize> = HashMap::new();
    for i in 0..zip.len() {
        let entry = match zip.by_index_raw(i) {
            Ok(e) => e,
            Err(e) => {
                skip(&format!("entry {i}"), format!("damaged ZIP entry ({e})"));
                continue;
            }
        };
        let raw = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if entry.is_dir() {
            continue;
        }
        if i >= MAX_ENTRIES {
            skip(&raw, format!("the ZIP has more than {MAX_ENTRIES} entries"));
            continue;
        }
        // Metadata of other systems: macOS resource forks and hidden files.
        if raw.starts_with("__MACOSX/")
            || raw.rsplit('/').next().is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        let Some(name) = entry
            .enclosed_name()
            .and_then(|p| p.to_str().map(str::to_string))
        else {
            skip(&raw, "unsafe name (absolute or leaving the archive)".into());
            continue;
        };
        let name = name.replace('\\', "/");
        if entry.is_symlink() {
            skip(&name, "a symbolic link".into());
            continue;
        }
        if entry.encrypted() {
            skip(&name, "encrypted".into());
            continue;
        }
        match extension(&name).as_deref() {
            Some(e) if IMAGE_EXTENSIONS.contains(&e) => images.push((i, name)),
            Some("txt") => {
                captions.insert(stem_key(&name), i);
            }
            _ => skip(&name, "not a png, jpg, jpeg or webp image".into()),
        }
    }
    images.sort_by(|a, b| a.1.cmp(&b.1));

    let buckets = buckets(resolution, multiple);
    let mut total = 0u64;
    let mut samples = Vec::new();
    let mut used = Vec::new();
    for (index, name) in images {
        if samples.len() >= MAX_IMAGES {
            skip(&name, format!("over the limit of {MAX_IMAGES} images"));
            continue;
        }
        let mut read_entry = |i: usize, cap: u64| -> Result<Vec<u8>, String> {
            let mut entry = zip.by_index(i).map_err(|e| format!("unreadable ({e})"))?;
            let bytes = read_capped(&mut entry, cap)?;
            total += bytes.len() as u64;
            if total > MAX_TOTAL_BYTES {
                return Err(format!(
                    "the ZIP holds more than {} GiB of data",
                    MAX_TOTAL_BYTES >> 30
                ));
            }
            Ok(bytes)
        };
        let image = match read_entry(index, MAX_IMAGE_BYTES).and_then(|b| decode(&b)) {
            Ok(image) => image,
            Err(reason) => {
                skip(&name, reason);
                continue;
            }
        };
        let own_caption = match captions.get(&stem_key(&name)) {
            Some(&i) => match read_entry(i, MAX_CAPTION_BYTES) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => Some(text.chars().take(MAX_CAPTION_CHARS).collect::<String>()),
                    Err(_) => {
                        skip(
                            &format!("{}.txt", stem_key(&name)),
                            "caption is not UTF-8 text; the image is used without it".into(),
                        );
                        None
                    }
                },
                Err(reason) => {
                    skip(
                        &format!("{}.txt", stem_key(&name)),
                        format!("caption {reason}; the image is used without it"),
                    );
                    None
                }
            },
            None => None,
        };
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
        skipped,
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
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert_eq!(report.used.len(), 2);
        assert!(report.lines()[0]
            .starts_with("dataset: 2 images used (1 with a caption file), 3 files skipped"));
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn a_decompression_bomb_is_skipped_before_decoding() {
        // A tiny PNG whose header claims 20000x20000 pixels.
        let mut bomb = png(16, 16, [0, 0, 0]);
        bomb[16..20].copy_from_slice(&20_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&20_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
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
