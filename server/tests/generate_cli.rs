//! `studio generate`: prompt to PNG from the command line.

use std::process::Command;

#[test]
fn writes_a_png_of_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let status = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args([
            "generate",
            "a fox reading under a tree",
            "--preset",
            "flux-tiny",
            "--device",
            "cpu",
        ])
        .args(["--width", "48", "--height", "32", "--seed", "3", "-o"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
}

#[test]
fn an_unknown_preset_is_an_error_naming_the_choices() {
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(["generate", "x", "--preset", "flux-huge"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flux-dev") && err.contains("flux-tiny"),
        "{err}"
    );
}
