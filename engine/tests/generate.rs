//! End-to-end generation with the small preset on the CPU: the same code path the server runs.

use candle_core::Device;
use engine::pipeline::{Cancelled, Control, FluxPipeline, GenerateParams, LoadOptions};
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
    GenerateParams {
        prompt: "a fox reading under a tree".into(),
        width: 48,
        height: 32,
        steps: 3,
        guidance: 3.5,
        seed,
    }
}

#[test]
fn generates_the_requested_size_with_a_preview_each_step() {
    let pipe = tiny();
    let mut previews = Vec::new();
    let out = pipe
        .generate(&params(1), &mut |p| {
            previews.push((p.step, p.total, p.preview().unwrap().dimensions()));
            Control::Continue
        })
        .unwrap();
    assert_eq!(out.image.dimensions(), (48, 32));
    // One pixel per latent cell: the tiny autoencoder halves each side.
    assert_eq!(
        previews,
        [(1, 3, (24, 16)), (2, 3, (24, 16)), (3, 3, (24, 16))]
    );
    let distinct: std::collections::HashSet<_> = out.image.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 100, "a real picture, not a flat fill");
}

#[test]
fn same_seed_same_image_other_seed_other_image() {
    let pipe = tiny();
    let run = |seed| {
        pipe.generate(&params(seed), &mut |_| Control::Continue)
            .unwrap()
            .image
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
