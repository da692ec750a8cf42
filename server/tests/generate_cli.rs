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

/// Run in the repository root, as `scripts/run` runs the studio (the built-in model's MiniLM is there).
fn studio_generate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_studio"))
        .current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .arg("generate")
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .unwrap()
}

#[test]
fn a_png_written_by_the_cli_carries_its_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let run = studio_generate(&[
        "a fox",
        "--preset",
        "flux-tiny",
        "--width",
        "48",
        "--height",
        "32",
        "--seed",
        "3",
        "--steps",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (recipe, found) = server::recipe::read_png(&std::fs::read(&out).unwrap())
        .unwrap()
        .expect("a recipe in the PNG");
    assert_eq!(found, server::recipe::Found::Studio);
    assert_eq!(
        (recipe.prompt.as_str(), recipe.model.as_str(), recipe.seed),
        ("a fox", "flux-tiny", 3)
    );
    assert_eq!((recipe.width, recipe.height, recipe.steps), (48, 32, 2));
    assert_eq!(recipe.input, None);
    assert_eq!(recipe.studio, Some(server::recipe::studio_version()));
}

#[test]
fn bad_input_files_and_strengths_are_refused_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    image::RgbImage::new(64, 64).save(path("in.png")).unwrap();
    image::RgbImage::new(32, 64)
        .save(path("small.png"))
        .unwrap();
    std::fs::write(path("text.png"), b"not an image").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--mask", &path("in.png")], "--image"),
        (&["--strength", "0.5"], "--image"),
        (
            &["--image", &path("in.png"), "--strength", "1.5"],
            "strength must be",
        ),
        (&["--image", &path("text.png")], "not a PNG or JPEG"),
        (
            &["--image", &path("in.png"), "--mask", &path("small.png")],
            "mask is 32x64",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["x", "--preset", "flux-tiny", "-o"];
        let out = path("out.png");
        args.push(&out);
        args.extend_from_slice(extra);
        let run = studio_generate(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{extra:?}");
        assert!(err.contains(expected), "{extra:?}: {err}");
        assert!(
            !err.contains("loading"),
            "{extra:?} loaded the model: {err}"
        );
        assert!(!dir.path().join("out.png").exists());
    }
}

/// Needs the engine's image-to-image and inpainting (issue 22's engine half).
#[test]
fn the_builtin_model_redraws_an_input_image_and_keeps_what_the_mask_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    // A blue picture, and a mask that repaints its right half.
    let blue = image::RgbImage::from_pixel(64, 64, image::Rgb([20, 40, 230]));
    blue.save(path("in.png")).unwrap();
    image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 0 } else { 255 }]))
        .save(path("mask.png"))
        .unwrap();
    let run = |extra: &[&str], out: &str| {
        let mut args = vec![
            "red heart",
            "--preset",
            "builtin-emoji",
            "--seed",
            "1",
            "-o",
            out,
        ];
        args.extend_from_slice(extra);
        let run = studio_generate(&args);
        assert!(
            run.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        image::open(out).unwrap().to_rgb8()
    };
    let redrawn = run(
        &["--image", &path("in.png"), "--strength", "0.5"],
        &path("img2img.png"),
    );
    assert_eq!(redrawn.dimensions(), (64, 64));
    let (recipe, _) = server::recipe::read_png(&std::fs::read(path("img2img.png")).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        recipe.input.map(|i| (i.strength, i.masked)),
        Some((0.5, false))
    );
    let inpainted = run(
        &["--image", &path("in.png"), "--mask", &path("mask.png")],
        &path("inpaint.png"),
    );
    // Mean distance from the input on each half: the kept half stays near the blue, the repainted half
    // does not.
    let distance = |xs: std::ops::Range<u32>| {
        let mut sum = 0.0;
        for x in xs.clone() {
            for y in 0..64 {
                let (a, b) = (inpainted.get_pixel(x, y).0, blue.get_pixel(x, y).0);
                sum += (0..3).map(|c| f64::from(a[c].abs_diff(b[c]))).sum::<f64>();
            }
        }
        sum / f64::from(64 * xs.len() as u32 * 3)
    };
    let (kept, repainted) = (distance(0..28), distance(36..64));
    assert!(
        kept < 30.0 && repainted > kept * 2.0,
        "kept {kept}, repainted {repainted}"
    );
}
