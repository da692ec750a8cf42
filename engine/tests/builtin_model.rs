//! The built-in model on the CPU (docs/builtin-model.md): the full fine-tune mode trains a small pixel
//! FLUX from seeded weights and writes a model that loads back; the committed model draws pictures on
//! white that depend on the prompt; and a LoRA trained on a few images of a new style changes what it draws.
//! Needs MiniLM (`scripts/fetch-models`), as the classifier's tests do.

mod common;

use candle_core::Device;
use engine::builtin;
use engine::models::flux::FluxConfig;
use engine::pipeline::{Control, FluxPipeline, GenerateParams, InputImage, LoadOptions};
use engine::training::{full, Report, Schedule, TrainJob, TrainSettings, Trainer};
use image::{Rgb, RgbImage};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn options(dir: &Path) -> LoadOptions {
    LoadOptions {
        source: engine::hub::Source::Local(dir.to_path_buf()),
        transformer_file: None,
        t5_max_len: builtin::TEXT_TOKENS,
        text_encoder_dir: repo_root().join(engine::classifier::DEFAULT_ENCODER_DIR),
        kernels: engine::ops::Kernels::Plain,
        weights: None,
        memory: Default::default(),
    }
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A ZIP of captioned 64x64 pictures.
fn dataset(path: &Path, pictures: &[(RgbImage, &str)]) -> PathBuf {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for (i, (img, caption)) in pictures.iter().enumerate() {
        w.start_file(format!("img{i}.png"), opts).unwrap();
        w.write_all(&png(img)).unwrap();
        w.start_file(format!("img{i}.txt"), opts).unwrap();
        w.write_all(caption.as_bytes()).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

/// A disc of `colour` on white, as the emoji are.
fn disc(colour: [u8; 3], radius: f32) -> RgbImage {
    RgbImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as f32 - 31.5, y as f32 - 31.5);
        if dx * dx + dy * dy < radius * radius {
            Rgb(colour)
        } else {
            Rgb([255, 255, 255])
        }
    })
}

fn job(dir: &Path, dataset: PathBuf, file: PathBuf, settings: TrainSettings) -> TrainJob {
    TrainJob {
        dataset,
        keywords: vec![],
        job_dir: dir.join("run"),
        lora_file: file,
        settings,
        base_model: "test".into(),
        sample_steps: 4,
        sample_guidance: 2.0,
        resume: false,
    }
}

fn train_to_end(trainer: &mut Trainer) -> Vec<f32> {
    let mut losses = Vec::new();
    loop {
        let stats = trainer.step(&mut |_| {}).unwrap();
        losses.push(stats.loss);
        if stats.finished {
            return losses;
        }
    }
}

fn mean(xs: &[f32]) -> f32 {
    xs.iter().sum::<f32>() / xs.len() as f32
}

/// Mean of each channel over the image, in [0, 1].
fn mean_rgb(img: &RgbImage) -> [f32; 3] {
    let mut sum = [0f32; 3];
    for p in img.pixels() {
        for (s, v) in sum.iter_mut().zip(p.0) {
            *s += f32::from(v) / 255.0;
        }
    }
    sum.map(|s| s / (64.0 * 64.0))
}

fn generate(pipe: &FluxPipeline, prompt: &str, steps: usize, guidance: f64) -> RgbImage {
    pipe.generate(
        &GenerateParams::new(prompt, (64, 64), steps, guidance, 7),
        &mut |_| Control::Continue,
    )
    .unwrap()
    .images
    .remove(0)
}

/// Full fine-tune of a pixel FLUX far smaller than the built-in one, batches of 4 with caption
/// dropout: the loss falls, every weight moves, and the written model loads as an ordinary one and
/// computes what the trained variables compute.
#[test]
fn full_fine_tune_trains_every_weight_and_writes_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FluxConfig {
        hidden_size: 32,
        num_heads: 2,
        depth: 1,
        depth_single: 1,
        axes_dims: vec![4, 6, 6],
        ..builtin::model_config()
    };
    let model = dir.path().join("model");
    builtin::write_model_folder(&model, &cfg, &full::initial_weights(&cfg, 1).unwrap()).unwrap();
    let pipe =
        Arc::new(FluxPipeline::load_dir_trainable(&model, &options(&model), &Device::Cpu).unwrap());
    let before: Vec<candle_core::Tensor> = pipe
        .weights()
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let data = dataset(
        &dir.path().join("data.zip"),
        &[
            (disc([220, 30, 30], 24.0), "red circle"),
            (disc([30, 30, 220], 24.0), "blue circle"),
            (disc([220, 30, 30], 12.0), "small red circle"),
            (disc([30, 30, 220], 12.0), "small blue circle"),
        ],
    );
    let file = model.join("transformer/diffusion_pytorch_model.safetensors");
    let settings = TrainSettings {
        steps: 40,
        learning_rate: 3e-3,
        batch_size: 4,
        lr_schedule: Schedule::Constant,
        sample_every: 0,
        checkpoint_every: 0,
        caption_dropout: 0.25,
        seed: 5,
        ..TrainSettings::defaults(64)
    };
    let mut log = Vec::new();
    let mut trainer = Trainer::prepare(
        pipe.clone(),
        job(dir.path(), data, file, settings),
        &mut |r| {
            if let Report::Log(l) = r {
                log.push(l)
            }
        },
    )
    .unwrap();
    assert!(
        log.iter()
            .any(|l| l.starts_with("training every transformer weight")),
        "{log:?}"
    );
    let losses = train_to_end(&mut trainer);
    let (first, last) = (mean(&losses[..10]), mean(&losses[30..]));
    assert!(last < 0.85 * first, "loss {first} -> {last}");
    for ((name, var), was) in pipe.weights().iter().zip(&before) {
        let moved = (var.as_tensor() - was)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 0.0, "{name} did not change");
    }
    // The written file (f16) loads as a plain model and draws what the trained variables draw.
    let trained = generate(&pipe, "red circle", 4, 2.0);
    let loaded = FluxPipeline::load_dir(&model, &options(&model), &Device::Cpu).unwrap();
    let reloaded = generate(&loaded, "red circle", 4, 2.0);
    let diff = trained
        .pixels()
        .zip(reloaded.pixels())
        .map(|(a, b)| (0..3).map(|c| a.0[c].abs_diff(b.0[c])).max().unwrap())
        .max()
        .unwrap();
    assert!(
        diff <= 3,
        "pixels differ by {diff} after the f16 round trip"
    );
}

fn builtin_pipeline() -> Arc<FluxPipeline> {
    let preset = engine::presets::find(engine::presets::BUILTIN_EMOJI).unwrap();
    let mut opts = LoadOptions::from_preset(preset);
    opts.text_encoder_dir = repo_root().join(engine::classifier::DEFAULT_ENCODER_DIR);
    Arc::new(FluxPipeline::load(&opts, &Device::Cpu, Arc::new(|_| {})).unwrap())
}

/// The committed model draws what it was trained on, a picture on a white ground (random weights draw
/// noise over the whole square), and what it draws depends on the prompt.
#[test]
fn the_builtin_model_draws_emoji_on_white() {
    let pipe = builtin_pipeline();
    let preset = engine::presets::find(engine::presets::BUILTIN_EMOJI).unwrap();
    let brightness = |img: &RgbImage, inner: bool| {
        let mut sum = 0f32;
        let mut n = 0f32;
        for (x, y, p) in img.enumerate_pixels() {
            let border = x < 4 || y < 4 || x >= 60 || y >= 60;
            let centre = (20..44).contains(&x) && (20..44).contains(&y);
            if (inner && centre) || (!inner && border) {
                sum += p.0.iter().map(|&v| f32::from(v) / 255.0).sum::<f32>() / 3.0;
                n += 1.0;
            }
        }
        sum / n
    };
    let face = generate(&pipe, "grinning face", preset.steps, preset.guidance);
    let heart = generate(&pipe, "red heart", preset.steps, preset.guidance);
    for img in [&face, &heart] {
        assert!(
            brightness(img, false) > 0.85,
            "border {}",
            brightness(img, false)
        );
        assert!(
            brightness(img, true) < 0.8,
            "centre {}",
            brightness(img, true)
        );
    }
    let (f, h) = (mean_rgb(&face), mean_rgb(&heart));
    let apart: f32 = f.iter().zip(h).map(|(a, b)| (a - b).abs()).sum();
    assert!(apart > 0.05, "{f:?} vs {h:?}");
}

/// LoRA training works on the built-in model: six images of a new style (green discs on black) for
/// a few steps pull its drawing of the style's keyword toward them.
#[test]
fn a_lora_on_the_builtin_model_changes_what_it_draws() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = builtin_pipeline();
    let style = |r: f32| {
        RgbImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as f32 - 31.5, y as f32 - 31.5);
            if dx * dx + dy * dy < r * r {
                Rgb([40, 230, 60])
            } else {
                Rgb([10, 10, 10])
            }
        })
    };
    let pictures: Vec<(RgbImage, &str)> = [10.0, 14.0, 18.0, 22.0, 26.0, 30.0]
        .iter()
        .map(|&r| (style(r), "zqx style"))
        .collect();
    let data = dataset(&dir.path().join("style.zip"), &pictures);
    let prompt = "zqx style";
    let before = generate(&pipe, prompt, 10, 4.0);
    let settings = TrainSettings {
        steps: 40,
        learning_rate: 2e-3,
        rank: 8,
        alpha: 8.0,
        targets: engine::training::Targets::AllLinear,
        sample_every: 0,
        checkpoint_every: 0,
        seed: 2,
        ..TrainSettings::defaults(64)
    };
    let lora = dir.path().join("style.safetensors");
    let mut trainer = Trainer::prepare(
        pipe.clone(),
        job(dir.path(), data, lora.clone(), settings),
        &mut |_| {},
    )
    .unwrap();
    train_to_end(&mut trainer);
    let file = engine::lora::LoraFile::load(&lora, pipe.dtype(), pipe.device()).unwrap();
    pipe.set_loras(&[(&file, 1.0)]).unwrap();
    let after = generate(&pipe, prompt, 10, 4.0);
    pipe.set_loras(&[]).unwrap();
    let (b, a) = (mean_rgb(&before), mean_rgb(&after));
    let brightness = |c: [f32; 3]| (c[0] + c[1] + c[2]) / 3.0;
    // Emoji sit on white; the style's black ground darkens the picture and its green shows.
    assert!(brightness(a) < brightness(b) - 0.2, "{b:?} -> {a:?}");
    assert!(a[1] > a[0] && a[1] > a[2], "not green: {a:?}");
}

/// `num_images` on the built-in model, whose classifier-free guidance makes each step a batch of
/// twice the images: image i is the single generation at seed + i (within one level of rounding:
/// batched f32 products may sum in another order on the CPU).
#[test]
fn three_images_from_the_builtin_model_are_the_single_ones_at_seed_plus_i() {
    let pipe = builtin_pipeline();
    let preset = engine::presets::find(engine::presets::BUILTIN_EMOJI).unwrap();
    let single = |seed| GenerateParams::new("red heart", (64, 64), 8, preset.guidance, seed);
    let batch = pipe
        .generate(
            &GenerateParams {
                num_images: 3,
                ..single(20)
            },
            &mut |_| Control::Continue,
        )
        .unwrap();
    assert_eq!(batch.images.len(), 3);
    for (i, image) in batch.images.iter().enumerate() {
        let alone = generate_at(&pipe, &single(20 + i as u64));
        let diff = image
            .pixels()
            .zip(alone.pixels())
            .map(|(a, b)| (0..3).map(|c| a.0[c].abs_diff(b.0[c])).max().unwrap())
            .max()
            .unwrap();
        assert!(
            diff <= 1,
            "image {i} differs from seed {} alone by {diff}",
            20 + i
        );
    }
    assert_ne!(
        batch.images[0], batch.images[1],
        "other seeds, other pictures"
    );
}

fn generate_at(pipe: &FluxPipeline, p: &GenerateParams) -> RgbImage {
    pipe.generate(p, &mut |_| Control::Continue)
        .unwrap()
        .images
        .remove(0)
}

/// Mean absolute difference of two images' channels, in [0, 1], over the pixels `within` selects.
fn mean_diff(a: &RgbImage, b: &RgbImage, within: impl Fn(u32, u32) -> bool) -> f32 {
    let (mut sum, mut n) = (0f32, 0f32);
    for ((x, y, p), q) in a.enumerate_pixels().zip(b.pixels()) {
        if within(x, y) {
            for c in 0..3 {
                sum += f32::from(p.0[c].abs_diff(q.0[c])) / 255.0;
                n += 1.0;
            }
        }
    }
    sum / n
}

fn edit(pipe: &FluxPipeline, prompt: &str, input: InputImage) -> RgbImage {
    let preset = engine::presets::find(engine::presets::BUILTIN_EMOJI).unwrap();
    let p = GenerateParams {
        input: Some(input),
        ..GenerateParams::new(prompt, (64, 64), preset.steps, preset.guidance, 5)
    };
    generate_at(pipe, &p)
}

/// Image-to-image on the built-in model: a small strength reruns only the schedule's end and stays
/// close to the input (a blue disc, not what the prompt asks for); strength 1 starts from noise and
/// draws the prompt.
#[test]
fn image_to_image_on_the_builtin_model_stays_close_at_a_small_strength() {
    let pipe = builtin_pipeline();
    let blue = disc([40, 60, 220], 20.0);
    let at = |strength| {
        edit(
            &pipe,
            "red heart",
            InputImage {
                image: blue.clone(),
                strength,
                mask: None,
            },
        )
    };
    let (light, full) = (at(0.2), at(1.0));
    let everywhere = |_, _| true;
    let (near, far) = (
        mean_diff(&light, &blue, everywhere),
        mean_diff(&full, &blue, everywhere),
    );
    eprintln!("mean change from the input: {near} at strength 0.2, {far} at 1");
    assert!(
        near < far / 2.0,
        "strength 0.2 moved {near} from the input, strength 1 {far}"
    );
}

/// Inpainting on the built-in model: outside the mask the input comes back as it was (a pixel model's
/// cells are its pixels), inside it the model draws anew.
#[test]
fn inpainting_on_the_builtin_model_keeps_what_the_mask_leaves_out() {
    let pipe = builtin_pipeline();
    let blue = disc([40, 60, 220], 20.0);
    let inside = |x: u32, y: u32| (16..48).contains(&x) && (16..48).contains(&y);
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if inside(x, y) { 255 } else { 0 }])
    });
    let out = edit(
        &pipe,
        "red heart",
        InputImage {
            image: blue.clone(),
            strength: 1.0,
            mask: Some(mask),
        },
    );
    let kept = mean_diff(&out, &blue, |x, y| !inside(x, y));
    let repainted = mean_diff(&out, &blue, inside);
    let kept_max = out
        .enumerate_pixels()
        .zip(blue.pixels())
        .filter(|((x, y, _), _)| !inside(*x, *y))
        .map(|((_, _, a), b)| (0..3).map(|c| a.0[c].abs_diff(b.0[c])).max().unwrap())
        .max()
        .unwrap();
    eprintln!("mean change: {kept} outside the mask (at most {kept_max}/255), {repainted} inside");
    assert!(kept_max <= 1, "a kept pixel changed by {kept_max}");
    assert!(
        repainted > 10.0 * kept.max(1.0 / 255.0),
        "the masked square changed by {repainted} only (kept part {kept})"
    );
}
