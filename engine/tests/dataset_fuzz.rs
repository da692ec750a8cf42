//! Fuzzing the training ZIP reader (`engine::training::dataset::read`), which takes users' uploads as they
//! come: whatever the bytes, it answers `Ok` or `Err` without panicking, uses only images whose names stay
//! inside the archive, and never uses more images than the archive holds.
//!
//! Every file in `tests/fixtures/zip-corpus/` (hostile archives written by hand or kept from failures) is
//! read first; proptest then draws `FUZZ_CASES` (default 64) archives per property: random bytes, and real
//! archives with hostile names and contents, damaged at random bytes. Failures it finds are recorded in
//! `tests/dataset_fuzz.proptest-regressions` and replayed on later runs.

use std::io::{Cursor, Write};
use std::path::Path;

use engine::training::dataset;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("FUZZ_CASES").map_or(64, |c| c.parse().expect("FUZZ_CASES"));
    TestRunner::new(Config {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    })
}

/// Reads `bytes` as an upload and checks what any answer must satisfy.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let keywords = vec!["sks".to_string()];
    let entries = zip::ZipArchive::new(Cursor::new(bytes)).map_or(0, |z| z.len());
    let read = std::panic::catch_unwind(|| dataset::read(Cursor::new(bytes), &keywords, 64, 16));
    let answer = read.map_err(|_| TestCaseError::fail("the reader panicked"))?;
    let Ok((samples, report)) = answer else {
        return Ok(());
    };
    prop_assert!(
        samples.len() <= entries,
        "{} images from {entries} entries",
        samples.len()
    );
    prop_assert_eq!(samples.len(), report.used.len());
    for used in &report.used {
        let path = Path::new(&used.file);
        prop_assert!(
            !path.is_absolute() && !used.file.split('/').any(|part| part == ".."),
            "used an entry named {:?}",
            used.file
        );
        prop_assert!(
            used.caption.to_lowercase().contains("sks"),
            "keywords missing: {:?}",
            used.caption
        );
    }
    for sample in &samples {
        prop_assert!(sample.image.width() >= 16 && sample.image.height() >= 16);
    }
    Ok(())
}

fn png(size: u32, seed: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([x as u8 ^ seed, y as u8, seed.wrapping_mul(3)])
    });
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// A well-formed archive of these entries (stored or deflated; a symlink when the content starts with `@`).
fn zip_of(entries: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, content) in entries {
        // The writer refuses what it cannot write (a repeated name): such an entry is left out; the
        // corpus has archives with repeated names.
        if let Some(target) = content.strip_prefix(b"@") {
            let _ = out.add_symlink(name, String::from_utf8_lossy(target), options);
        } else if out.start_file(name, options).is_ok() {
            out.write_all(content).unwrap();
        }
    }
    out.finish().unwrap().into_inner()
}

fn entry_name() -> impl Strategy<Value = String> {
    let stem = prop_oneof![
        Just("a".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("/abs/x".to_string()),
        Just("dir/../../up".to_string()),
        Just("C:\\win\\x".to_string()),
        Just("__MACOSX/._a".to_string()),
        Just(".hidden".to_string()),
        "[a-z/.]{1,12}",
        any::<String>(),
    ];
    let ext = prop_oneof![
        Just(".png"),
        Just(".txt"),
        Just(".jpg"),
        Just(".webp"),
        Just(".zip"),
        Just(""),
    ];
    (stem, ext).prop_map(|(s, e)| format!("{s}{e}"))
}

fn entry_content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (8u32..40, any::<u8>()).prop_map(|(size, seed)| png(size, seed)),
        proptest::collection::vec(any::<u8>(), 0..256),
        "[ -~]{0,64}".prop_map(String::into_bytes),
        Just(b"@../../etc/passwd".to_vec()),
        // A PNG header claiming 100000x100000 pixels, then nothing.
        Just(
            [
                &png(8, 0)[..16],
                &100_000u32.to_be_bytes(),
                &100_000u32.to_be_bytes(),
            ]
            .concat()
        ),
    ]
}

#[test]
fn the_kept_corpus_reads_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zip-corpus");
    let mut seen = 0;
    for file in std::fs::read_dir(&dir).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "zip") {
            check(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen > 0, "no corpus in {}", dir.display());
}

#[test]
fn random_bytes_never_panic() {
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 0..2048), |bytes| {
            check(&bytes)
        })
        .unwrap();
}

#[test]
fn hostile_archives_damaged_anywhere_never_panic_nor_escape() {
    let archive = (
        proptest::collection::vec((entry_name(), entry_content()), 1..8),
        any::<bool>(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    );
    runner()
        .run(&archive, |(entries, deflate, damage)| {
            let mut bytes = zip_of(&entries, deflate);
            for (at, value) in damage {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            check(&bytes)
        })
        .unwrap();
}
