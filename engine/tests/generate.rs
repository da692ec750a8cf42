//! End-to-end generation with the small preset on the CPU: the same code path the server runs.

use candle_core::Device;
use candle_core::Tensor;
use engine::pipeline::{Cancelled, Control, FluxPipeline, GenerateParams, LoadOptions};
use engine::sampling::step_cache::StepCache;
use std::sync::Arc;

fn tiny() -> FluxPipeline {
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    FluxPipeline::load(
        &LoadOptions::from_preset(preset),
        &Device::Cpu,
        Arc::new(|_| {}),
    )
    .unwrap()
}

fn params(seed: u64) -> GenerateParams {
    GenerateParams::new("a fox reading under a tree", (48, 32), 3, 3.5, seed)
}

#[test]
fn generates_the_requested_size_with_a_preview_each_step() {
    let pipe = tiny();
    let mut previews = Vec::new();
    let out = pipe
        .generate(&params(1), &mut |p| {
            previews.push((p.step, p.total, p.preview(0).unwrap().dimensions()));
            Control::Continue
        })
        .unwrap();
    assert_eq!(out.image().dimensions(), (48, 32));
    // One pixel per latent cell: the tiny autoencoder halves each side.
    assert_eq!(
        previews,
        [(1, 3, (24, 16)), (2, 3, (24, 16)), (3, 3, (24, 16))]
    );
    let distinct: std::collections::HashSet<_> = out.image().pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 100, "a real picture, not a flat fill");
}

#[test]
fn same_seed_same_image_other_seed_other_image() {
    let pipe = tiny();
    let run = |seed| {
        pipe.generate(&params(seed), &mut |_| Control::Continue)
            .unwrap()
            .images
            .remove(0)
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn cancelling_stops_between_steps() {
    let pipe = tiny();
    let mut seen = 0;
    let err = pipe
        .generate(&params(1), &mut |p| {
            seen = p.step;
            if p.step == 2 {
                Control::Cancel
            } else {
                Control::Continue
            }
        })
        .err()
        .expect("cancelled");
    assert!(err.downcast_ref::<Cancelled>().is_some(), "{err}");
    assert_eq!(seen, 2);
}

#[test]
fn sizes_that_do_not_fit_the_latent_grid_are_refused() {
    let pipe = tiny();
    let err = pipe
        .generate(
            &GenerateParams {
                width: 50,
                ..params(1)
            },
            &mut |_| Control::Continue,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("multiples of 4"), "{err}");
}

/// The largest difference of any channel of any pixel.
fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.pixels()
        .zip(b.pixels())
        .map(|(x, y)| (0..3).map(|c| x.0[c].abs_diff(y.0[c])).max().unwrap())
        .max()
        .unwrap()
}

/// Denoised latents of `p` (before decoding), through the step cache when one is given; with the
/// number of steps it skipped.
fn latents(pipe: &FluxPipeline, p: &GenerateParams, cache: Option<f64>) -> (Tensor, usize) {
    let (txt, pooled) = pipe.encode_prompt(&p.prompt).unwrap();
    let noise = pipe.batch_noise(p.seeds(), p.width, p.height).unwrap();
    let sigmas = pipe.schedule.sigmas(p.steps, noise.dim(1).unwrap());
    let mut cache = cache.map(StepCache::new);
    let x = pipe
        .denoise_batch(
            noise,
            pipe.latent_grid(p.width, p.height),
            (&txt, &pooled),
            None,
            &sigmas,
            p.guidance,
            cache.as_mut(),
            &mut |_| Control::Continue,
        )
        .unwrap();
    (x, cache.map_or(0, |c| c.skipped()))
}

/// max |a - b| / max |b|.
fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let size = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / size.to_scalar::<f32>().unwrap()
}

/// Image i of a batch starts from seed + i's noise and goes through the transformer beside the
/// others: it must come out as the single generation at that seed. On the CPU in f32 the batched
/// matrix products may sum in another order than a batch of one; the bound allows for that
/// rounding and nothing more.
#[test]
fn a_batch_of_three_is_three_single_generations_at_consecutive_seeds() {
    let pipe = tiny();
    let mut previews = Vec::new();
    let batch = GenerateParams {
        num_images: 3,
        ..params(41)
    };
    let out = pipe
        .generate(&batch, &mut |p| {
            let each: Vec<_> = (0..p.images())
                .map(|i| p.preview(i).unwrap().dimensions())
                .collect();
            previews.push(each);
            Control::Continue
        })
        .unwrap();
    assert_eq!(out.images.len(), 3);
    assert_eq!(out.seed, 41);
    assert_eq!(
        previews,
        vec![vec![(24, 16); 3]; 3],
        "a preview of each image at each step"
    );
    let (batched, _) = latents(&pipe, &batch, None);
    for (i, seed) in batch.seeds().enumerate() {
        let single = pipe
            .generate(&params(seed), &mut |_| Control::Continue)
            .unwrap();
        let diff = max_pixel_diff(&out.images[i], single.image());
        assert!(
            diff <= 1,
            "image {i} (seed {seed}) differs by {diff} levels"
        );
        let (alone, _) = latents(&pipe, &params(seed), None);
        let err = relative_error(&batched.narrow(0, i, 1).unwrap(), &alone);
        assert!(err <= 1e-5, "image {i}: latents' relative error {err:e}");
    }
    assert_ne!(out.images[0], out.images[1]);
}

/// At threshold 0 the cache never skips, and running the first block apart from the rest changes
/// nothing: the same image, bit for bit.
#[test]
fn the_step_cache_at_threshold_zero_is_the_full_run_exactly() {
    let pipe = tiny();
    let full = pipe
        .generate(&params(9), &mut |_| Control::Continue)
        .unwrap();
    let cached = pipe
        .generate(
            &GenerateParams {
                step_cache: Some(0.0),
                ..params(9)
            },
            &mut |_| Control::Continue,
        )
        .unwrap();
    assert_eq!(cached.timings.skipped_steps, 0);
    assert_eq!(cached.images, full.images);
}

/// With a threshold the random tiny model's first-block residual moves by less than, the cache
/// skips steps, and the latents stay within a stated distance of the full run's. The tiny model's
/// residual changes far more between steps than a trained model's, hence its high threshold.
#[test]
fn the_step_cache_skips_steps_and_stays_near_the_full_run() {
    let pipe = tiny();
    let p = GenerateParams {
        steps: 20,
        ..params(3)
    };
    let (full, none) = latents(&pipe, &p, None);
    let (cached, skipped) = latents(&pipe, &p, Some(0.5));
    assert_eq!(none, 0);
    let err = relative_error(&cached, &full);
    eprintln!("step cache 0.5: {skipped} of 20 steps skipped, latents' relative error {err:.4}");
    assert!((2..=10).contains(&skipped), "{skipped} steps skipped");
    assert!(err > 0.0 && err < 0.02, "relative error {err}");
    let out = pipe
        .generate(
            &GenerateParams {
                step_cache: Some(0.5),
                ..p.clone()
            },
            &mut |_| Control::Continue,
        )
        .unwrap();
    assert_eq!(
        out.timings.skipped_steps, skipped,
        "the generation reports its skips"
    );
}

/// fp8 precision on a bf16 load makes, bit for bit, the image that the same model loaded in fp8 makes
/// (the copy is the checkpoint an fp8 load would make), differs from the exact image, and leaves
/// nothing behind: the next request on the weights as loaded is exact again. Exact on the fp8 load is
/// refused with what to change.
#[test]
fn fp8_precision_makes_the_image_of_an_fp8_load_and_exact_needs_bf16() {
    use app::Precision;
    use engine::weights::WeightFormat;
    let bf16 = tiny();
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    let fp8 = FluxPipeline::load(
        &LoadOptions {
            weights: Some(WeightFormat::Fp8),
            ..LoadOptions::from_preset(preset)
        },
        &Device::Cpu,
        Arc::new(|_| {}),
    )
    .unwrap();
    let run = |pipe: &FluxPipeline, precision| {
        let p = GenerateParams {
            precision,
            ..params(5)
        };
        pipe.generate(&p, &mut |_| Control::Continue)
            .map(|mut out| out.images.remove(0))
    };
    let exact = run(&bf16, None).unwrap();
    assert_eq!(run(&bf16, Some(Precision::Exact)).unwrap(), exact);
    let fast = run(&bf16, Some(Precision::Fp8)).unwrap();
    assert_ne!(fast, exact, "fp8 products changed nothing");
    assert_eq!(fast, run(&fp8, None).unwrap());
    assert_eq!(fast, run(&fp8, Some(Precision::Fp8)).unwrap());
    assert_eq!(run(&bf16, None).unwrap(), exact);

    let refused = run(&fp8, Some(Precision::Exact)).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("needs the transformer in bf16"),
        "{refused}"
    );
}
