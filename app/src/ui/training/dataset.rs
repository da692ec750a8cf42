//! The training page's dataset: what the user dropped (a ZIP or a set of images), judged by the same code
//! the server's upload check runs (`crate::dataset::archive::check`: names, sizes, headers, a bounded
//! decode of every image), with thumbnails, and turned into the ZIP that `POST /train/` takes.

use std::io::{Cursor, Read, Write};

use crate::dataset::{archive, extension};
use crate::DatasetCheck;

/// Thumbnails are made for this many images at most; the rest are listed by name.
const MAX_THUMBNAILS: usize = 48;
/// A ZIP larger than this is uploaded without a preview: reading it would hold it all in the tab's memory.
const MAX_PREVIEW_BYTES: f64 = 256.0 * 1024.0 * 1024.0;

/// What will happen to one file of the dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Trained on; `captioned` when a same-stem `.txt` file gives its caption.
    Used {
        captioned: bool,
    },
    /// A caption of an image in the set.
    Caption,
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFile {
    pub name: String,
    pub verdict: Verdict,
    /// An object URL of the image, for the preview grid.
    pub thumbnail: Option<String>,
}

/// The preview of everything dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub files: Vec<DatasetFile>,
    /// Why the contents could not be listed (the server will still check the upload).
    pub note: Option<String>,
    /// Why the server will refuse this set and what to do: the upload check's own words.
    pub refusal: Option<String>,
}

impl Preview {
    pub fn used(&self) -> usize {
        self.files
            .iter()
            .filter(|f| matches!(f.verdict, Verdict::Used { .. }))
            .count()
    }

    fn noted(note: String) -> Preview {
        Preview {
            files: Vec::new(),
            note: Some(note),
            refusal: None,
        }
    }

    /// The check's verdict file by file: images (with their captions) first, then what is left out.
    fn from_check(check: DatasetCheck) -> Preview {
        let refusal = check.refusal();
        let mut files = Vec::new();
        for image in check.images {
            files.push(DatasetFile {
                name: image.file,
                verdict: Verdict::Used {
                    captioned: image.caption_file.is_some(),
                },
                thumbnail: None,
            });
            if let Some(caption) = image.caption_file {
                files.push(DatasetFile {
                    name: caption,
                    verdict: Verdict::Caption,
                    thumbnail: None,
                });
            }
        }
        files.extend(check.skipped.into_iter().map(|s| DatasetFile {
            name: s.file,
            verdict: Verdict::Rejected(s.reason),
            thumbnail: None,
        }));
        Preview {
            files,
            note: None,
            refusal,
        }
    }

    /// Adds thumbnails of the first used images, their bytes read from `zip`.
    fn with_thumbnails(mut self, zip: &[u8]) -> Preview {
        let Ok(mut archive) = zip::ZipArchive::new(Cursor::new(zip)) else {
            return self;
        };
        for file in self
            .files
            .iter_mut()
            .filter(|f| matches!(f.verdict, Verdict::Used { .. }))
            .take(MAX_THUMBNAILS)
        {
            let mut bytes = Vec::new();
            if let Ok(mut entry) = archive.by_name(&file.name) {
                if entry.read_to_end(&mut bytes).is_ok() {
                    file.thumbnail = object_url(&bytes, mime(&file.name));
                }
            }
        }
        self
    }
}

/// Judges a ZIP held in memory, as the server will on upload.
pub fn judge(zip: &[u8]) -> Preview {
    match archive::check(Cursor::new(zip)) {
        Ok(check) => Preview::from_check(check).with_thumbnails(zip),
        Err(message) => Preview {
            files: Vec::new(),
            note: None,
            refusal: Some(format!("{message}; the server will refuse it.")),
        },
    }
}

fn object_url(bytes: &[u8], mime: &str) -> Option<String> {
    let array = js_sys::Uint8Array::from(bytes);
    let parts = js_sys::Array::of1(&array);
    let options = web_sys::BlobPropertyBag::new();
    options.set_type(mime);
    let blob = web_sys::Blob::new_with_u8_array_sequence_and_options(&parts, &options).ok()?;
    web_sys::Url::create_object_url_with_blob(&blob).ok()
}

fn mime(name: &str) -> &'static str {
    match extension(name).as_deref() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        _ => "image/jpeg",
    }
}

pub async fn file_bytes(file: &web_sys::File) -> Result<Vec<u8>, String> {
    let buffer = wasm_bindgen_futures::JsFuture::from(file.array_buffer())
        .await
        .map_err(|_| format!("the browser could not read {}", file.name()))?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

/// Judges a dropped ZIP (every image read and checked, thumbnails from the first ones).
pub async fn preview_zip(file: &web_sys::File) -> Preview {
    if file.size() > MAX_PREVIEW_BYTES {
        return Preview::noted(
            "This ZIP is too large to preview here; the server checks it on upload.".into(),
        );
    }
    match file_bytes(file).await {
        Ok(bytes) => judge(&bytes),
        Err(message) => Preview::noted(message),
    }
}

/// Judges a set of dropped images (and captions) packed as they will be uploaded.
pub async fn preview_files(files: &[web_sys::File]) -> Preview {
    match pack(files).await {
        Ok(zip) => judge(&zip),
        Err(message) => Preview::noted(message),
    }
}

/// Dropped images (and captions) in an uncompressed ZIP: images are compressed already.
async fn pack(files: &[web_sys::File]) -> Result<Vec<u8>, String> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for file in files {
        let bytes = file_bytes(file).await?;
        writer
            .start_file(file.name(), options)
            .and_then(|()| writer.write_all(&bytes).map_err(Into::into))
            .map_err(|e| format!("packing {}: {e}", file.name()))?;
    }
    Ok(writer
        .finish()
        .map_err(|e| format!("packing the images: {e}"))?
        .into_inner())
}

/// Packs dropped images (and captions) into the ZIP that is uploaded.
pub async fn zip_files(files: &[web_sys::File]) -> Result<web_sys::Blob, String> {
    let bytes = pack(files).await?;
    let array = js_sys::Uint8Array::from(bytes.as_slice());
    let options = web_sys::BlobPropertyBag::new();
    options.set_type("application/zip");
    web_sys::Blob::new_with_u8_array_sequence_and_options(&js_sys::Array::of1(&array), &options)
        .map_err(|_| "the browser could not hold the packed images".to_string())
}

/// The files of a drop or a file input.
pub fn files_of(list: Option<web_sys::FileList>) -> Vec<web_sys::File> {
    let Some(list) = list else {
        return Vec::new();
    };
    (0..list.length()).filter_map(|i| list.get(i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(w, h)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, bytes) in entries {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(bytes).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    #[test]
    fn judges_files_as_the_upload_check_does() {
        let ok = png(16, 16);
        let preview = Preview::from_check(
            archive::check(Cursor::new(zip_of(&[
                ("set/a.PNG", &ok),
                ("set/a.txt", b"a caption"),
                ("b.jpeg", &ok),
                ("orphan.txt", b"x"),
                ("notes.pdf", b"x"),
                ("__MACOSX/set/._a.PNG", b"x"),
                ("set/.DS_Store", b"x"),
                ("c.webp", b""),
            ])))
            .unwrap(),
        );
        let verdict = |name: &str| {
            preview
                .files
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name} missing from {preview:?}"))
                .verdict
                .clone()
        };
        assert_eq!(verdict("set/a.PNG"), Verdict::Used { captioned: true });
        assert_eq!(verdict("set/a.txt"), Verdict::Caption);
        assert_eq!(verdict("b.jpeg"), Verdict::Used { captioned: false });
        let rejected = |name: &str, word: &str| {
            assert!(
                matches!(verdict(name), Verdict::Rejected(r) if r.contains(word)),
                "{name}: {:?}",
                verdict(name)
            )
        };
        rejected("orphan.txt", "caption");
        rejected("notes.pdf", "not a png");
        rejected("__MACOSX/set/._a.PNG", "system");
        rejected("set/.DS_Store", "system");
        rejected("c.webp", "not a readable");
        assert_eq!(preview.used(), 2);
        assert!(preview.refusal.is_none());
    }

    #[test]
    fn a_set_of_only_system_files_shows_the_servers_refusal() {
        let preview = Preview::from_check(
            archive::check(Cursor::new(zip_of(&[("__MACOSX/._a.png", b"x")]))).unwrap(),
        );
        assert_eq!(preview.used(), 0);
        let refusal = preview.refusal.unwrap();
        assert!(refusal.contains("__MACOSX/._a.png"), "{refusal}");
    }
}
