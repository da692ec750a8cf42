//! Reading a training ZIP with the rules of [`crate::dataset`]: nothing is extracted (no entry name can
//! reach a file system), every read is bounded whatever the ZIP's headers claim, and every image's header
//! is checked before it is decoded.

use std::collections::HashMap;
use std::io::{Cursor, Read, Seek};

use image::{DynamicImage, ImageDecoder};

use super::{
    classify, stem_key, CheckedImage, DatasetCheck, EntryFacts, EntryRole, SkippedFile,
    MAX_CAPTION_BYTES, MAX_CAPTION_CHARS, MAX_IMAGES, MAX_IMAGE_BYTES, MAX_PIXELS, MAX_TOTAL_BYTES,
    MIN_SIDE, ORPHAN_CAPTION,
};

/// An opened training ZIP: its images and captions sorted out, the rest skipped with reasons.
pub struct Archive<R> {
    zip: zip::ZipArchive<R>,
    /// (index in the archive, name) of every image, sorted by name.
    images: Vec<(usize, String)>,
    /// Caption entries by their stem.
    captions: HashMap<String, (usize, String)>,
    skipped: Vec<SkippedFile>,
    /// Uncompressed bytes read so far, against [`MAX_TOTAL_BYTES`].
    total: u64,
}

impl<R: Read + Seek> Archive<R> {
    /// Reads the ZIP's directory (not its contents). Fails only when it is no readable ZIP.
    pub fn open(reader: R) -> Result<Archive<R>, String> {
        let mut zip = zip::ZipArchive::new(reader)
            .map_err(|e| format!("the dataset is not a readable ZIP archive ({e})"))?;
        let mut images = Vec::new();
        let mut captions = HashMap::new();
        let mut skipped = Vec::new();
        for i in 0..zip.len() {
            let entry = match zip.by_index_raw(i) {
                Ok(entry) => entry,
                Err(e) => {
                    skipped.push(SkippedFile::new(
                        format!("entry {i}"),
                        format!("damaged ZIP entry ({e})"),
                    ));
                    continue;
                }
            };
            let raw_name = String::from_utf8_lossy(entry.name_raw()).into_owned();
            let safe_name = entry
                .enclosed_name()
                .and_then(|p| p.to_str().map(str::to_owned));
            let facts = EntryFacts {
                raw_name: &raw_name,
                safe_name: safe_name.as_deref(),
                is_dir: entry.is_dir(),
                is_symlink: entry.is_symlink(),
                encrypted: entry.encrypted(),
            };
            match classify(i, facts) {
                EntryRole::Directory => {}
                EntryRole::Image(name) => images.push((i, name)),
                EntryRole::Caption(name) => {
                    captions.insert(stem_key(&name).to_owned(), (i, name));
                }
                EntryRole::Skipped(file) => skipped.push(file),
            }
        }
        images.sort_by(|a, b| a.1.cmp(&b.1));
        let image_stems: std::collections::HashSet<&str> =
            images.iter().map(|(_, name)| stem_key(name)).collect();
        let mut orphans: Vec<&String> = captions
            .iter()
            .filter(|(stem, _)| !image_stems.contains(stem.as_str()))
            .map(|(_, (_, name))| name)
            .collect();
        orphans.sort();
        skipped.extend(
            orphans
                .into_iter()
                .map(|name| SkippedFile::new(name.clone(), ORPHAN_CAPTION)),
        );
        Ok(Archive {
            zip,
            images,
            captions,
            skipped,
            total: 0,
        })
    }

    /// (index, name) of the images, sorted by name.
    pub fn images(&self) -> Vec<(usize, String)> {
        self.images.clone()
    }

    /// The files skipped so far, with reasons.
    pub fn skipped(&self) -> &[SkippedFile] {
        &self.skipped
    }

    pub fn skip(&mut self, file: impl Into<String>, reason: impl Into<String>) {
        self.skipped.push(SkippedFile::new(file, reason));
    }

    /// The name of the caption file of an image, if it has one.
    pub fn caption_file(&self, image: &str) -> Option<&str> {
        self.captions
            .get(stem_key(image))
            .map(|(_, name)| name.as_str())
    }

    /// An entry's bytes, refused past `cap` whatever its header claims, and counted against the ZIP's
    /// [`MAX_TOTAL_BYTES`].
    pub fn read(&mut self, index: usize, cap: u64) -> Result<Vec<u8>, String> {
        let mut entry = self
            .zip
            .by_index(index)
            .map_err(|e| format!("unreadable ({e})"))?;
        let mut bytes = Vec::new();
        (&mut entry)
            .take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot be decompressed ({e})"))?;
        if bytes.len() as u64 > cap {
            return Err(format!(
                "inflates to more than the {} limit; keep each file smaller",
                size_text(cap)
            ));
        }
        self.total += bytes.len() as u64;
        if self.total > MAX_TOTAL_BYTES {
            return Err(format!(
                "the ZIP holds more than {} of data",
                size_text(MAX_TOTAL_BYTES)
            ));
        }
        Ok(bytes)
    }

    /// The image at `index`, decoded and upright.
    pub fn image(&mut self, index: usize) -> Result<DynamicImage, String> {
        self.read(index, MAX_IMAGE_BYTES).and_then(|b| decode(&b))
    }

    /// The text of an image's caption file: `Ok(None)` when it has none; `Err` (with the caption's
    /// name and why) when it cannot be used, the image then being used without it.
    pub fn caption(&mut self, image: &str) -> Result<Option<String>, SkippedFile> {
        let Some((index, name)) = self.captions.get(stem_key(image)).cloned() else {
            return Ok(None);
        };
        let bytes = self.read(index, MAX_CAPTION_BYTES).map_err(|reason| {
            SkippedFile::new(
                name.clone(),
                format!("caption {reason}; the image is used without it"),
            )
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            SkippedFile::new(
                name.clone(),
                "caption is not UTF-8 text; the image is used without it",
            )
        })?;
        Ok(Some(text.chars().take(MAX_CAPTION_CHARS).collect()))
    }
}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// An image's size from its header alone, refused past [`MAX_PIXELS`] or under [`MIN_SIDE`].
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    let (w, h) = reader(bytes, image::Limits::no_limits())?
        .into_dimensions()
        .map_err(|e| format!("not a readable png, jpeg or webp image ({e})"))?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!(
            "{w}x{h} pixels is over the {} megapixel limit",
            MAX_PIXELS / 1_000_000
        ));
    }
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(format!("{w}x{h} pixels is too small to train on"));
    }
    Ok((w, h))
}

fn reader(
    bytes: &[u8],
    limits: image::Limits,
) -> Result<image::ImageReader<Cursor<&[u8]>>, String> {
    let mut r = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable ({e})"))?;
    r.limits(limits);
    Ok(r)
}

/// Decodes an image after checking its header (so that our limit, not the decoder's, names the
/// problem), with the decoder's allocations bounded too, turning it upright per its EXIF orientation.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
    dimensions(bytes)?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    let mut decoder = reader(bytes, limits)?
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

/// Judges a whole training ZIP as the trainer will read it: every image is read (bounded) and decoded
/// (bounded), every caption paired. Fails only when it is no readable ZIP.
pub fn check(reader: impl Read + Seek) -> Result<DatasetCheck, String> {
    let mut archive = Archive::open(reader)?;
    let mut images = Vec::new();
    for (index, name) in archive.images() {
        if images.len() >= MAX_IMAGES {
            archive.skip(name, format!("over the limit of {MAX_IMAGES} images"));
            continue;
        }
        match archive.image(index) {
            Ok(image) => {
                let caption_file = match archive.caption(&name) {
                    Ok(Some(_)) => archive.caption_file(&name).map(str::to_owned),
                    Ok(None) => None,
                    Err(skipped) => {
                        archive.skipped.push(skipped);
                        None
                    }
                };
                images.push(CheckedImage {
                    file: name,
                    width: image.width(),
                    height: image.height(),
                    caption_file,
                });
            }
            Err(reason) => archive.skip(name, reason),
        }
    }
    Ok(DatasetCheck {
        images,
        skipped: archive.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]))
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
    fn the_check_uses_decodable_images_and_names_every_other_file() {
        let ok = png(16, 12);
        let check = check(zip_of(&[
            ("set/a.png", &ok),
            ("set/a.txt", b"a red card"),
            ("broken.jpg", b"not a jpeg"),
            ("__MACOSX/set/._a.png", b"x"),
            ("lonely.txt", b"no image"),
        ]))
        .unwrap();
        assert_eq!(
            check.images,
            [CheckedImage {
                file: "set/a.png".into(),
                width: 16,
                height: 12,
                caption_file: Some("set/a.txt".into()),
            }]
        );
        let files: Vec<&str> = check.skipped.iter().map(|s| s.file.as_str()).collect();
        // Judged by name first (in the archive's order, captions without an image last), then by content.
        assert_eq!(files, ["__MACOSX/set/._a.png", "lonely.txt", "broken.jpg"]);
        assert!(check.refusal().is_none());
    }

    #[test]
    fn an_entry_that_inflates_past_the_cap_is_refused_without_trusting_its_header() {
        let zeros = vec![0u8; (MAX_IMAGE_BYTES + 1) as usize];
        let check = check(zip_of(&[("bomb.png", &zeros)])).unwrap();
        assert!(check.images.is_empty());
        assert!(check.skipped[0].reason.contains("inflates"), "{check:?}");
        assert!(check.refusal().unwrap().contains("bomb.png"));
    }
}
