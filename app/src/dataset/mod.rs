//! What a training ZIP may hold, and what of it is trained on: the one owner of these rules for the
//! upload check (server), the dataset reader (engine) and the training page (browser), so the three
//! agree on every file. Without features only the names' rules and the limits live here; the feature
//! `dataset` adds [`archive`], which reads a ZIP and checks its images with those rules.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[cfg(feature = "dataset")]
pub mod archive;

/// The image files a training ZIP may hold (lower-case extensions; matched without regard to case).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Entries looked at in one ZIP.
pub const MAX_ENTRIES: usize = 20_000;
/// Images used from one ZIP; the rest are skipped with that reason.
pub const MAX_IMAGES: usize = 2_000;
/// Largest image file (uncompressed bytes), whatever the ZIP's header claims.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// Largest caption file.
pub const MAX_CAPTION_BYTES: u64 = 16 << 10;
/// Everything read out of one ZIP together (uncompressed bytes).
pub const MAX_TOTAL_BYTES: u64 = 8 << 30;
/// Largest decoded image: a small file that claims more pixels (a decompression bomb) is skipped before
/// it is decoded.
pub const MAX_PIXELS: u64 = 64_000_000;
/// Smallest side trained on, in pixels.
pub const MIN_SIDE: u32 = 8;
/// Longest caption kept, in characters.
pub const MAX_CAPTION_CHARS: usize = 2_000;

/// What the archive says of one entry, before anything of it is read.
#[derive(Debug, Clone, Copy)]
pub struct EntryFacts<'a> {
    /// The name as stored (lossy UTF-8).
    pub raw_name: &'a str,
    /// The name when it stays inside the archive (no absolute path, no `..` out of it); `None` otherwise.
    pub safe_name: Option<&'a str>,
    pub is_dir: bool,
    pub is_symlink: bool,
    pub encrypted: bool,
}

/// The role of an entry, judged by its name and kind alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryRole {
    /// Folders are structure, not content.
    Directory,
    /// Trained on (when it decodes); the name with `/` separators.
    Image(String),
    /// A `.txt` caption of the image with the same stem.
    Caption(String),
    Skipped(SkippedFile),
}

/// A file of the dataset that is not trained on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SkippedFile {
    /// Its path inside the ZIP.
    pub file: String,
    /// Why it is not used, for people.
    pub reason: String,
}

impl SkippedFile {
    pub fn new(file: impl Into<String>, reason: impl Into<String>) -> SkippedFile {
        SkippedFile {
            file: file.into(),
            reason: reason.into(),
        }
    }
}

/// Metadata of other systems: macOS resource forks (`__MACOSX/`) and hidden files (`.DS_Store`, `._a.png`).
pub fn is_system_file(name: &str) -> bool {
    name.starts_with("__MACOSX/")
        || name.split(['/', '\\']).any(|part| part == "__MACOSX")
        || name
            .rsplit(['/', '\\'])
            .next()
            .is_some_and(|base| base.starts_with('.'))
}

/// The lower-case extension of the file's own name.
pub fn extension(name: &str) -> Option<String> {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.rsplit_once('.')
        .filter(|(stem, _)| !stem.is_empty())
        .map(|(_, ext)| ext.to_ascii_lowercase())
}

pub fn is_image_name(name: &str) -> bool {
    extension(name).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// The name without its extension: an image and its caption share it.
pub fn stem_key(name: &str) -> &str {
    match name.rfind('.') {
        Some(dot) if !name[dot..].contains('/') => &name[..dot],
        _ => name,
    }
}

pub const NOT_AN_IMAGE: &str = "not a png, jpg, jpeg or webp image";
pub const SYSTEM_FILE: &str = "system file (macOS metadata or hidden), skipped";
pub const ORPHAN_CAPTION: &str = "caption without an image of the same name";

/// Judges one entry by its name and kind. `index` is its position in the archive: entries past
/// [`MAX_ENTRIES`] are not looked at.
pub fn classify(index: usize, facts: EntryFacts<'_>) -> EntryRole {
    if facts.is_dir {
        return EntryRole::Directory;
    }
    let skip = |reason: String| EntryRole::Skipped(SkippedFile::new(facts.raw_name, reason));
    if index >= MAX_ENTRIES {
        return skip(format!("the ZIP has more than {MAX_ENTRIES} entries"));
    }
    if is_system_file(facts.raw_name) {
        return skip(SYSTEM_FILE.into());
    }
    let Some(name) = facts.safe_name else {
        return skip("unsafe name (absolute or leaving the archive)".into());
    };
    let name = name.replace('\\', "/");
    let skip = |reason: &str| EntryRole::Skipped(SkippedFile::new(name.clone(), reason));
    if facts.is_symlink {
        return skip("a symbolic link");
    }
    if facts.encrypted {
        return skip("encrypted");
    }
    match extension(&name).as_deref() {
        Some(e) if IMAGE_EXTENSIONS.contains(&e) => EntryRole::Image(name),
        Some("txt") => EntryRole::Caption(name),
        _ => skip(NOT_AN_IMAGE),
    }
}

/// One image that passed the check: it decodes, within the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckedImage {
    pub file: String,
    pub width: u32,
    pub height: u32,
    /// The same-stem `.txt` file that captions it, if any.
    pub caption_file: Option<String>,
}

/// The verdict on a whole training ZIP, as the upload check and the training page give it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatasetCheck {
    /// The images that will be trained on.
    pub images: Vec<CheckedImage>,
    /// Everything else, each with its reason.
    pub skipped: Vec<SkippedFile>,
}

impl DatasetCheck {
    /// Why the ZIP cannot be trained on and what to do, or `None` when at least one image is usable.
    pub fn refusal(&self) -> Option<String> {
        if !self.images.is_empty() {
            return None;
        }
        if self.skipped.is_empty() {
            return Some(
                "the dataset ZIP is empty: put png, jpg, jpeg or webp images in it (at any folder \
                 depth, each with an optional same-name .txt caption)"
                    .into(),
            );
        }
        let listed: Vec<String> = self
            .skipped
            .iter()
            .take(5)
            .map(|s| format!("{}: {}", s.file, s.reason))
            .collect();
        let more = self.skipped.len().saturating_sub(listed.len());
        Some(format!(
            "the dataset ZIP holds no png, jpg, jpeg or webp image that can be trained on ({}{}); \
             re-export the images as ordinary png or jpeg files of at most {} megapixels and {} MiB \
             each, and zip them without system files",
            listed.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            },
            MAX_PIXELS / 1_000_000,
            MAX_IMAGE_BYTES >> 20,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str) -> EntryFacts<'_> {
        EntryFacts {
            raw_name: name,
            safe_name: (!name.starts_with('/') && !name.contains("..")).then_some(name),
            is_dir: name.ends_with('/'),
            is_symlink: false,
            encrypted: false,
        }
    }

    #[test]
    fn entries_are_judged_by_name_and_kind() {
        let role = |name| classify(0, facts(name));
        assert_eq!(role("a/b/red.PNG"), EntryRole::Image("a/b/red.PNG".into()));
        assert_eq!(
            role("a/b/red.txt"),
            EntryRole::Caption("a/b/red.txt".into())
        );
        assert_eq!(role("photos/"), EntryRole::Directory);
        for (name, why) in [
            ("__MACOSX/._a.png", SYSTEM_FILE),
            ("set/.DS_Store", SYSTEM_FILE),
            ("set/._a.png", SYSTEM_FILE),
            ("notes.md", NOT_AN_IMAGE),
            (".png", SYSTEM_FILE),
        ] {
            assert_eq!(role(name), EntryRole::Skipped(SkippedFile::new(name, why)));
        }
        assert!(matches!(role("../up.png"), EntryRole::Skipped(s) if s.reason.contains("unsafe")));
        let link = EntryFacts {
            is_symlink: true,
            ..facts("link.png")
        };
        assert!(matches!(classify(0, link), EntryRole::Skipped(s) if s.reason.contains("link")));
        assert!(
            matches!(classify(MAX_ENTRIES, facts("a.png")), EntryRole::Skipped(s) if s.reason.contains("entries"))
        );
    }

    #[test]
    fn an_image_and_its_caption_share_a_stem() {
        assert_eq!(stem_key("a/b/red.PNG"), "a/b/red");
        assert_eq!(stem_key("a.b/red"), "a.b/red");
        assert_eq!(extension("a.b/red"), None);
    }

    #[test]
    fn a_refusal_names_the_files_and_what_to_do() {
        let check = DatasetCheck {
            images: Vec::new(),
            skipped: vec![SkippedFile::new("__MACOSX/._a.png", SYSTEM_FILE)],
        };
        let why = check.refusal().unwrap();
        assert!(
            why.contains("__MACOSX/._a.png") && why.contains("re-export"),
            "{why}"
        );
        assert!(DatasetCheck::default().refusal().unwrap().contains("empty"));
    }
}
