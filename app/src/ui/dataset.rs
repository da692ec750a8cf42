//! The training page's dataset: what the user dropped (a ZIP or a set of images), judged file by file the way
//! the server will judge it (images by extension, same-stem `.txt` captions), with thumbnails, and turned into
//! the ZIP that `POST /train/` takes.

use std::collections::HashSet;
use std::io::{Cursor, Read, Write};

use crate::IMAGE_EXTENSIONS;

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
    Rejected(&'static str),
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
}

impl Preview {
    pub fn used(&self) -> usize {
        self.files
            .iter()
            .filter(|f| matches!(f.verdict, Verdict::Used { .. }))
            .count()
    }
}

fn extension(name: &str) -> Option<String> {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
}

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(stem, _)| stem)
}

fn is_image(name: &str) -> bool {
    extension(name).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Judges each file by its path within the set, as the trainer reads a ZIP.
pub fn judge(files: &[(String, u64)]) -> Vec<Verdict> {
    let image_stems: HashSet<&str> = files
        .iter()
        .filter(|(name, _)| is_image(name))
        .map(|(name, _)| stem(name))
        .collect();
    let caption_stems: HashSet<&str> = files
        .iter()
        .filter(|(name, _)| extension(name).as_deref() == Some("txt"))
        .map(|(name, _)| stem(name))
        .collect();
    files
        .iter()
        .map(|(name, size)| {
            let base = name.rsplit('/').next().unwrap_or(name);
            if name.starts_with("__MACOSX/") || base.starts_with('.') {
                Verdict::Rejected("system file (macOS metadata or hidden), skipped")
            } else if *size == 0 {
                Verdict::Rejected("empty file")
            } else if is_image(name) {
                Verdict::Used {
                    captioned: caption_stems.contains(stem(name)),
                }
            } else if extension(name).as_deref() == Some("txt") {
                if image_stems.contains(stem(name)) {
                    Verdict::Caption
                } else {
                    Verdict::Rejected("caption without an image of the same name")
                }
            } else {
                Verdict::Rejected("not a png, jpg, jpeg or webp image")
            }
        })
        .collect()
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

/// Lists a dropped ZIP (names from its directory, thumbnails from the first images).
pub async fn preview_zip(file: &web_sys::File) -> Preview {
    if file.size() > MAX_PREVIEW_BYTES {
        return Preview {
            files: Vec::new(),
            note: Some(
                "This ZIP is too large to preview here; the server checks it on upload.".into(),
            ),
        };
    }
    let bytes = match file_bytes(file).await {
        Ok(bytes) => bytes,
        Err(message) => {
            return Preview {
                files: Vec::new(),
                note: Some(message),
            }
        }
    };
    let mut archive = match zip::ZipArchive::new(Cursor::new(bytes)) {
        Ok(archive) => archive,
        Err(e) => {
            return Preview {
                files: Vec::new(),
                note: Some(format!(
                    "This is not a readable ZIP ({e}); the server will refuse it."
                )),
            }
        }
    };
    // (index in the archive, name, size) of every file.
    let mut entries = Vec::new();
    for i in 0..archive.len() {
        if let Ok(entry) = archive.by_index_raw(i) {
            if let (true, Ok(name)) = (entry.is_file(), entry.name()) {
                entries.push((i, name.into_owned(), entry.size()));
            }
        }
    }
    let listed: Vec<(String, u64)> = entries.iter().map(|(_, n, s)| (n.clone(), *s)).collect();
    let verdicts = judge(&listed);
    let mut thumbnails = 0;
    let files = entries
        .into_iter()
        .zip(verdicts)
        .map(|((index, name, _), verdict)| {
            let mut thumbnail = None;
            if matches!(verdict, Verdict::Used { .. }) && thumbnails < MAX_THUMBNAILS {
                thumbnails += 1;
                let mut bytes = Vec::new();
                if let Ok(mut entry) = archive.by_index(index) {
                    if entry.read_to_end(&mut bytes).is_ok() {
                        thumbnail = object_url(&bytes, mime(&name));
                    }
                }
            }
            DatasetFile {
                name,
                verdict,
                thumbnail,
            }
        })
        .collect();
    Preview { files, note: None }
}

/// Previews a set of dropped images: thumbnails straight from the files.
pub fn preview_files(files: &[web_sys::File]) -> Preview {
    let listed: Vec<(String, u64)> = files.iter().map(|f| (f.name(), f.size() as u64)).collect();
    let verdicts = judge(&listed);
    let files = files
        .iter()
        .zip(verdicts)
        .enumerate()
        .map(|(i, (file, verdict))| DatasetFile {
            name: file.name(),
            thumbnail: (matches!(verdict, Verdict::Used { .. }) && i < MAX_THUMBNAILS)
                .then(|| web_sys::Url::create_object_url_with_blob(file).ok())
                .flatten(),
            verdict,
        })
        .collect();
    Preview { files, note: None }
}

/// Packs dropped images (and captions) into an uncompressed ZIP: images are compressed already.
pub async fn zip_files(files: &[web_sys::File]) -> Result<web_sys::Blob, String> {
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
    let bytes = writer
        .finish()
        .map_err(|e| format!("packing the images: {e}"))?
        .into_inner();
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

    #[test]
    fn judges_files_as_the_trainer_reads_them() {
        let files: Vec<(String, u64)> = [
            ("set/a.PNG", 10),
            ("set/a.txt", 5),
            ("b.jpeg", 10),
            ("orphan.txt", 5),
            ("notes.pdf", 10),
            ("__MACOSX/set/._a.PNG", 10),
            ("set/.DS_Store", 10),
            ("c.webp", 0),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        let verdicts = judge(&files);
        assert_eq!(verdicts[0], Verdict::Used { captioned: true });
        assert_eq!(verdicts[1], Verdict::Caption);
        assert_eq!(verdicts[2], Verdict::Used { captioned: false });
        assert!(matches!(verdicts[3], Verdict::Rejected(r) if r.contains("caption")));
        assert!(matches!(verdicts[4], Verdict::Rejected(r) if r.contains("not a png")));
        assert!(matches!(verdicts[5], Verdict::Rejected(r) if r.contains("system")));
        assert!(matches!(verdicts[6], Verdict::Rejected(r) if r.contains("system")));
        assert_eq!(verdicts[7], Verdict::Rejected("empty file"));
    }
}
