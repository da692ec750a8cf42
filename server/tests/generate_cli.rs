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
fn num_images_writes_one_png_per_seed_beside_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let run = |extra: &[&str], out: &std::path::Path| {
        let status = Command::new(env!("CARGO_BIN_EXE_studio"))
            .args([
                "generate",
                "a fox",
                "--preset",
                "flux-tiny",
                "--device",
                "cpu",
            ])
            .args(["--width", "32", "--height", "32"])
            .args(extra)
            .arg("-o")
            .arg(out)
            .status()
            .unwrap();
        assert!(status.success());
    };
    run(&["--seed", "3", "--num-images", "3"], &out);
    let alone = dir.path().join("alone.png");
    run(&["--seed", "5"], &alone);
    for name in ["fox.png", "fox-1.png", "fox-2.png"] {
        assert!(dir.path().join(name).is_file(), "{name} missing");
    }
    // The third image is seed 3 + 2: the single generation at seed 5 (on the CPU, the same pixels).
    let (third, single) = (
        image::open(dir.path().join("fox-2.png")).unwrap().to_rgb8(),
        image::open(&alone).unwrap().to_rgb8(),
    );
    let diff = third
        .pixels()
        .zip(single.pixels())
        .map(|(a, b)| (0..3).map(|c| a.0[c].abs_diff(b.0[c])).max().unwrap())
        .max()
        .unwrap();
    assert!(diff <= 1, "differs by {diff}");
    let refused = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(["generate", "a fox", "--num-images", "5"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("num-images"));
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
