//! The memory plan applied by the pipeline, on the tiny model on the CPU: the prompt cache, requests
//! refused before any work, models refused at load, and the tiled decode.

use candle_core::Device;
use engine::memory::{Part, Placement, HEADROOM};
use engine::pipeline::{Control, FluxPipeline, GenerateParams, LoadOptions, MemoryOptions};
use image::RgbImage;
use std::sync::Arc;

fn tiny_with(memory: MemoryOptions) -> anyhow::Result<FluxPipeline> {
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    let opts = LoadOptions {
        memory,
        ..LoadOptions::from_preset(preset)
    };
    FluxPipeline::load(&opts, &Device::Cpu, Arc::new(|_| {}))
}

fn tiny() -> FluxPipeline {
    tiny_with(MemoryOptions::default()).unwrap()
}

fn params(prompt: &str, seed: u64) -> GenerateParams {
    GenerateParams::new(prompt, (64, 48), 2, 3.5, seed)
}

fn run(pipe: &FluxPipeline, p: &GenerateParams) -> RgbImage {
    pipe.generate(p, &mut |_| Control::Continue)
        .unwrap()
        .image()
        .clone()
}

#[test]
fn a_regeneration_or_a_new_seed_skips_the_text_encoders_and_gives_the_same_image() {
    let pipe = tiny();
    let first = run(&pipe, &params("a fox", 7));
    assert_eq!(pipe.prompt_encodings(), 1);
    let again = run(&pipe, &params("a fox", 7));
    let other_seed = run(&pipe, &params("a fox", 8));
    assert_eq!(pipe.prompt_encodings(), 1, "the cache answered both");
    assert_eq!(first, again);
    assert_ne!(first, other_seed);
    // The cached encodings are the encoder's: a fresh pipeline encodes and draws the same image.
    let fresh = tiny();
    assert_eq!(run(&fresh, &params("a fox", 7)), first);
    run(&pipe, &params("a hen", 7));
    assert_eq!(pipe.prompt_encodings(), 2);
}

#[test]
fn a_budget_short_of_resident_encoders_loads_them_for_each_new_prompt_and_frees_them() {
    // At this size a step, not the decode, sets the peak, so no tiling closes the gap.
    let size = (64, 48);
    let whole = tiny_with(MemoryOptions {
        size,
        ..MemoryOptions::default()
    })
    .unwrap();
    assert!(whole.text_encoders_loaded());
    let plan = whole.memory_plan();
    assert!(plan
        .parts
        .iter()
        .all(|p| p.placement == Placement::Resident));
    // Half the text encoders' bytes short of what everything resident needs at that size.
    let encoders: u64 = plan
        .parts
        .iter()
        .filter(|p| p.part.is_text_encoder())
        .map(|p| p.bytes)
        .sum();
    let usable = plan.at_reference.peak - encoders / 2;
    let budget = (usable as f64 / (1.0 - HEADROOM)).ceil() as u64;
    let pipe = tiny_with(MemoryOptions {
        gpu_memory: Some(budget),
        size,
        ..MemoryOptions::default()
    })
    .unwrap();
    assert!(
        pipe.memory_plan().text_encoders_leave(),
        "{}",
        pipe.memory_plan().summary()
    );
    assert!(
        !pipe.text_encoders_loaded(),
        "they come with the first prompt"
    );
    let image = run(&pipe, &params("a fox", 7));
    assert!(!pipe.text_encoders_loaded(), "and leave after it");
    assert_eq!(pipe.prompt_encodings(), 1);
    assert_eq!(image, run(&whole, &params("a fox", 7)));
}

#[test]
fn a_size_that_exceeds_the_plan_is_refused_before_any_work() {
    let pipe = tiny_with(MemoryOptions {
        gpu_memory: Some(1400 << 20),
        ..MemoryOptions::default()
    })
    .unwrap();
    let plan = pipe.memory_plan();
    assert!(
        plan.max_side >= 64 && plan.max_side < 2048,
        "{}",
        plan.max_side
    );
    let err = pipe
        .generate(
            &GenerateParams {
                width: 2048,
                height: 2048,
                ..params("a fox", 1)
            },
            &mut |_| Control::Continue,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--gpu-memory"), "{err}");
    assert!(
        err.contains(&format!("up to {0}x{0}", plan.max_side)),
        "{err}"
    );
    assert_eq!(pipe.prompt_encodings(), 0, "nothing ran");
    run(&pipe, &params("a fox", 1));
}

#[test]
fn a_model_larger_than_the_cap_is_refused_at_load_with_the_setting_to_change() {
    let err = tiny_with(MemoryOptions {
        gpu_memory: Some(1 << 20),
        ..MemoryOptions::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("smallest arrangement"), "{err}");
    assert!(err.contains("STUDIO_GPU_MEMORY"), "{err}");
}

#[test]
fn a_forced_tiled_decode_stays_near_the_whole_decode() {
    let tiled = |on: bool| {
        tiny_with(MemoryOptions {
            tiled_decode: Some(on),
            tile_pixels: 32,
            ..MemoryOptions::default()
        })
        .unwrap()
    };
    let p = params("a fox", 3);
    let (a, b) = (run(&tiled(true), &p), run(&tiled(false), &p));
    assert_ne!(a, b, "64x48 in 32-pixel tiles is not one tile");
    let diff: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.as_raw().len() as f64;
    eprintln!("mean |tiled - whole| = {diff:.2} of 255");
    assert!(diff < 10.0, "{diff}");
}

#[test]
fn a_transformer_streamed_from_host_memory_draws_what_the_resident_one_draws() {
    let resident = tiny();
    assert_eq!(resident.transformer.streamed_bytes(), 0);
    // Every block streamed: each of their layers is copied in for each product (on a CPU the copy
    // is the host's own memory, so this runs the streaming path's code, not a PCIe transfer).
    let streamed = tiny_with(MemoryOptions {
        streamed: Some(u64::MAX),
        ..MemoryOptions::default()
    })
    .unwrap();
    let moved = streamed.transformer.streamed_bytes();
    let blocks: u64 = streamed
        .transformer
        .linears()
        .iter()
        .filter(|l| l.name().contains("blocks."))
        .map(|l| l.bytes() as u64)
        .sum();
    assert_eq!(moved, blocks, "every block's layers, and only theirs");
    let p = params("a fox", 7);
    assert_eq!(run(&streamed, &p), run(&resident, &p));
    // Some bytes asked for: whole blocks from the first until they are covered.
    let part = tiny_with(MemoryOptions {
        streamed: Some(1),
        ..MemoryOptions::default()
    })
    .unwrap();
    let first_block: u64 = part
        .transformer
        .linears()
        .iter()
        .filter(|l| l.name().starts_with("double_blocks.0."))
        .map(|l| l.bytes() as u64)
        .sum();
    assert_eq!(part.transformer.streamed_bytes(), first_block);
    assert_eq!(run(&part, &p), run(&resident, &p));
}

#[test]
fn a_transformer_placed_after_it_loaded_streams_the_same_layers_and_draws_the_same() {
    // How a GPU load of fp8 or GGUF weights goes: every layer loaded onto the host, then placed.
    let mut placed = tiny();
    placed.transformer.place(&Device::Cpu, 1).unwrap();
    let loaded = tiny_with(MemoryOptions {
        streamed: Some(1),
        ..MemoryOptions::default()
    })
    .unwrap();
    let streamed = |pipe: &FluxPipeline| -> Vec<String> {
        let linears = pipe.transformer.linears();
        let streamed = linears.iter().filter(|l| l.is_streamed());
        streamed.map(|l| l.name().to_owned()).collect()
    };
    assert!(!streamed(&loaded).is_empty());
    assert_eq!(streamed(&placed), streamed(&loaded));
    let p = params("a fox", 7);
    assert_eq!(run(&placed, &p), run(&loaded, &p));
    placed.transformer.place(&Device::Cpu, 0).unwrap();
    assert_eq!(placed.transformer.streamed_bytes(), 0);
}

#[test]
fn a_budget_that_holds_t5_only_layer_by_layer_streams_it_and_draws_the_same_image() {
    let size = (64, 48);
    let whole = tiny_with(MemoryOptions {
        size,
        ..MemoryOptions::default()
    })
    .unwrap();
    let resident_peak = whole.memory_plan().at_reference.peak;
    // Budgets below what everything resident needs, 64 KiB at a time, until the plan streams T5: the
    // first budget too small for T5 even while it runs.
    let streaming = (1..4096u64)
        .map(|step| {
            let usable = resident_peak - step * (64 << 10);
            let budget = (usable as f64 / (1.0 - HEADROOM)).ceil() as u64;
            tiny_with(MemoryOptions {
                gpu_memory: Some(budget),
                size,
                ..MemoryOptions::default()
            })
            .unwrap()
        })
        .find(|pipe| pipe.memory_plan().t5_streamed())
        .expect("a budget that streams T5");
    let plan = streaming.memory_plan();
    assert!(!plan.text_encoders_on_cpu() && !plan.text_encoders_leave());
    let clip = plan.parts.iter().find(|p| p.part == Part::Clip).unwrap();
    assert_eq!(clip.placement, Placement::Resident, "{}", plan.summary());
    assert!(streaming.text_encoders_loaded(), "loaded once, kept");
    let image = run(&streaming, &params("a fox", 7));
    run(&streaming, &params("a hen", 7));
    assert_eq!(streaming.prompt_encodings(), 2);
    assert!(streaming.text_encoders_loaded());
    assert_eq!(image, run(&whole, &params("a fox", 7)));
}
