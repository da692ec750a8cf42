//! Image-to-image, inpainting, FLUX.1-Fill and FLUX.1-Kontext against diffusers' FluxImg2ImgPipeline,
//! FluxInpaintPipeline, FluxFillPipeline and FluxKontextPipeline on tiny random models in the real
//! checkpoint layouts (tests/fixtures/edit, made by scripts/fixtures/make_edit_fixtures.py). Both sides
//! start from the same noise and take the autoencoder's mode. f32 on the CPU; tolerances are relative
//! to each reference's largest magnitude, as in diffusers_parity.rs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use engine::pipeline::{Control, FluxPipeline, GenerateParams, InputImage, LoadOptions};
use engine::sampling::edit::{self, EditModel};
use std::collections::HashMap;
use std::path::Path;

const FORWARD_TOL: f64 = 5e-5;
const PIPELINE_TOL: f64 = 1e-4;

fn edit_fixtures() -> std::path::PathBuf {
    fixtures().join("edit")
}

fn meta() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(edit_fixtures().join("reference.json")).unwrap()).unwrap()
}

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(edit_fixtures().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn options(dir: &Path) -> LoadOptions {
    LoadOptions {
        source: engine::hub::Source::Local(dir.to_path_buf()),
        transformer_file: None,
        t5_max_len: meta()["max_sequence_length"].as_u64().unwrap() as usize,
        text_encoder_dir: engine::classifier::DEFAULT_ENCODER_DIR.into(),
        kernels: engine::ops::Kernels::Plain,
        weights: None,
        memory: Default::default(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A model folder as the hub repository holds it: the fixture's `model_index.json` and transformer,
/// the tiny FLUX.1-dev folder's text encoders, tokenizers, autoencoder and scheduler (the real Fill
/// and Kontext repositories ship FLUX.1-dev's).
fn assembled(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let own = edit_fixtures().join(name);
    std::fs::copy(
        own.join("model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    copy_dir(&own.join("transformer"), &dir.path().join("transformer"));
    for part in [
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "vae",
    ] {
        copy_dir(&tiny_dev().join(part), &dir.path().join(part));
    }
    dir
}

fn input(strength: f64, masked: bool) -> InputImage {
    InputImage {
        image: image::open(edit_fixtures().join("image.png"))
            .unwrap()
            .to_rgb8(),
        strength,
        mask: masked.then(|| {
            image::open(edit_fixtures().join("mask.png"))
                .unwrap()
                .to_luma8()
        }),
    }
}

/// Runs `name`'s edit as diffusers' run did (same noise, steps, guidance) and compares the latents
/// after every step, the final latents and the decoded image.
fn matches_diffusers(pipe: &FluxPipeline, name: &str, masked: bool) {
    let r = references();
    let m = meta();
    let run = &m[name];
    let prompt = m["prompt"].as_str().unwrap();
    let (w, h) = (
        m["width"].as_u64().unwrap() as usize,
        m["height"].as_u64().unwrap() as usize,
    );
    let steps = run["num_inference_steps"].as_u64().unwrap() as usize;
    let strength = run["strength"].as_f64().unwrap_or(1.0);
    let guidance = run["guidance_scale"].as_f64().unwrap();
    let grid = pipe.latent_grid(w, h);
    let noise = &r["noise"];
    let sigmas = pipe.schedule.sigmas(steps, noise.dim(1).unwrap());
    let (start, sigmas, cond) = pipe
        .prepare_edit(&input(strength, masked), noise, &sigmas)
        .unwrap();
    assert_eq!(
        sigmas.len() - 1,
        run["steps_run"].as_u64().unwrap() as usize,
        "{name}: steps run"
    );
    let (txt, pooled) = pipe.encode_prompt(prompt).unwrap();
    let mut steps_seen = Vec::new();
    let out = pipe
        .denoise_edit(
            start,
            grid,
            (&txt, &pooled),
            None,
            &sigmas,
            guidance,
            None,
            &cond,
            &mut |p| {
                steps_seen.push(p.latents.clone());
                Control::Continue
            },
        )
        .unwrap();
    assert_eq!(steps_seen.len(), sigmas.len() - 1);
    for (i, s) in steps_seen.iter().enumerate() {
        let key = format!("{name}.step_{}", i + 1);
        assert_close(&key, s, &r[&key], PIPELINE_TOL);
    }
    assert_close(
        &format!("{name} final latents"),
        &out,
        &r[&format!("{name}.final_latents")],
        PIPELINE_TOL,
    );
    let image = pipe
        .decode(&out, grid)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    assert_close(
        &format!("{name} image"),
        &image,
        &r[&format!("{name}.image")],
        PIPELINE_TOL,
    );
}

fn tiny_dev_pipeline() -> FluxPipeline {
    FluxPipeline::load_dir(&tiny_dev(), &options(&tiny_dev()), &Device::Cpu).unwrap()
}

#[test]
fn the_input_images_latents_are_the_autoencoders_mode_in_model_space() {
    let pipe = tiny_dev_pipeline();
    let pixels = edit::image_tensor(&input(1.0, false).image, &Device::Cpu).unwrap();
    let ours = pipe.encode_image(&pixels).unwrap();
    assert_close(
        "image latents",
        &ours,
        &references()["image_latents"],
        FORWARD_TOL,
    );
}

#[test]
fn image_to_image_matches_flux_img2img_pipeline() {
    let pipe = tiny_dev_pipeline();
    assert_eq!(pipe.edit_model(), EditModel::Latents);
    matches_diffusers(&pipe, "img2img", false);
}

#[test]
fn inpainting_matches_flux_inpaint_pipeline() {
    matches_diffusers(&tiny_dev_pipeline(), "inpaint", true);
}

#[test]
fn a_fill_transformer_matches_flux_fill_pipeline() {
    let dir = assembled("tiny-flux-fill");
    let pipe = FluxPipeline::load_dir(dir.path(), &options(dir.path()), &Device::Cpu).unwrap();
    assert_eq!(pipe.edit_model(), EditModel::Fill);
    matches_diffusers(&pipe, "fill", true);
}

/// The transformer of a diffusers folder as Black Forest Labs' single file (the layout of
/// `flux1-fill-dev.safetensors` and `flux1-kontext-dev.safetensors`): every BFL tensor assembled by the
/// one mapping between the layouts (`FluxWeights::tensor`), saved to `file`.
fn write_bfl_file(transformer: &Path, file: &Path) {
    use engine::models::flux::{FluxConfig, FluxTransformer, FluxWeights};
    let json =
        serde_json::from_slice(&std::fs::read(transformer.join("config.json")).unwrap()).unwrap();
    let cfg = FluxConfig::from_diffusers_json(&json).unwrap();
    let w = FluxWeights::open(transformer, DType::F32, &Device::Cpu).unwrap();
    let model = FluxTransformer::load(
        &w,
        &cfg,
        DType::F32,
        &Device::Cpu,
        engine::ops::Kernels::Plain,
    )
    .unwrap();
    let mut tensors = HashMap::new();
    for l in model.linears() {
        for suffix in ["weight", "bias"] {
            let t = w.tensor(l.name(), suffix).unwrap();
            tensors.insert(format!("{}.{suffix}", l.name()), t);
        }
    }
    let mut norms = Vec::new();
    for i in 0..cfg.depth {
        for stream in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                norms.push(format!("double_blocks.{i}.{stream}_attn.norm.{n}"));
            }
        }
    }
    for i in 0..cfg.depth_single {
        for n in ["query_norm", "key_norm"] {
            norms.push(format!("single_blocks.{i}.norm.{n}"));
        }
    }
    for n in norms {
        tensors.insert(format!("{n}.scale"), w.tensor(&n, "scale").unwrap());
    }
    candle_core::safetensors::save(&tensors, file).unwrap();
}

#[test]
fn fill_and_kontext_from_black_forest_labs_single_files_match_their_pipelines() {
    for (name, reference, masked, model) in [
        ("tiny-flux-fill", "fill", true, EditModel::Fill),
        ("tiny-flux-kontext", "kontext", false, EditModel::Kontext),
    ] {
        let dir = assembled(name);
        let file = dir.path().join("flux1-tiny-single-file.safetensors");
        let transformer = dir.path().join("transformer");
        write_bfl_file(&transformer, &file);
        // As `--transformer-file` runs it: the single file's weights, the preset folder's config (the
        // folder's own weights removed, so only the file can be read).
        for entry in std::fs::read_dir(&transformer).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e != "json") {
                std::fs::remove_file(path).unwrap();
            }
        }
        let opts = LoadOptions {
            transformer_file: Some(file),
            ..options(dir.path())
        };
        let pipe = FluxPipeline::load_dir(dir.path(), &opts, &Device::Cpu).unwrap();
        assert_eq!(pipe.edit_model(), model, "{name}");
        matches_diffusers(&pipe, reference, masked);
    }
}

#[test]
fn a_kontext_transformer_matches_flux_kontext_pipeline() {
    let dir = assembled("tiny-flux-kontext");
    let pipe = FluxPipeline::load_dir(dir.path(), &options(dir.path()), &Device::Cpu).unwrap();
    assert_eq!(pipe.edit_model(), EditModel::Kontext);
    matches_diffusers(&pipe, "kontext", false);
}

fn params(input: Option<InputImage>) -> GenerateParams {
    let m = meta();
    let mut p = GenerateParams::new(
        m["prompt"].as_str().unwrap(),
        (
            m["width"].as_u64().unwrap() as usize,
            m["height"].as_u64().unwrap() as usize,
        ),
        4,
        3.5,
        7,
    );
    p.input = input;
    p
}

fn refusal(pipe: &FluxPipeline, p: &GenerateParams) -> String {
    match pipe.generate(p, &mut |_| Control::Continue) {
        Ok(_) => panic!("expected a refusal"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn generate_edits_each_seed_of_a_batch_as_alone_and_keeps_the_masked_out_cells() {
    let pipe = tiny_dev_pipeline();
    let mut p = params(Some(input(0.7, true)));
    p.num_images = 2;
    let batch = pipe.generate(&p, &mut |_| Control::Continue).unwrap();
    let mut second = params(Some(input(0.7, true)));
    second.seed = 8;
    let alone = pipe.generate(&second, &mut |_| Control::Continue).unwrap();
    let diff = batch.images[1]
        .as_raw()
        .iter()
        .zip(alone.image().as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        diff <= 1,
        "image 2 of a batch differs from seed 8 alone by {diff}"
    );
    // The cells the mask keeps end as the input's own latents, exactly (the last step puts them back
    // noised to sigma 0); the autoencoder's decode then spreads across the mask's edge.
    let noise = pipe.initial_noise(7, p.width, p.height).unwrap();
    let sigmas = pipe.schedule.sigmas(4, noise.dim(1).unwrap());
    let (start, sigmas, cond) = pipe
        .prepare_edit(&input(0.7, true), &noise, &sigmas)
        .unwrap();
    let edit::Conditioning::Inpaint { image, mask, .. } = &cond else {
        panic!("a mask on FLUX.1-dev inpaints");
    };
    let (txt, pooled) = pipe.encode_prompt(&p.prompt).unwrap();
    let out = pipe
        .denoise_edit(
            start,
            pipe.latent_grid(p.width, p.height),
            (&txt, &pooled),
            None,
            &sigmas,
            3.5,
            None,
            &cond,
            &mut |_| Control::Continue,
        )
        .unwrap();
    let keep = mask.affine(-1.0, 1.0).unwrap();
    let kept_diff = ((out - image).unwrap().broadcast_mul(&keep).unwrap())
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(kept_diff, 0.0, "the kept cells end as the image's latents");
    let repainted = mask.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(repainted > 0.0 && repainted < mask.elem_count() as f32);
}

#[test]
fn inputs_of_the_wrong_size_or_strength_and_models_without_what_they_need_are_refused() {
    let pipe = tiny_dev_pipeline();
    let mut small = input(0.5, false);
    small.image = image::imageops::thumbnail(&small.image, 24, 16);
    assert!(refusal(&pipe, &params(Some(small))).contains("resize the image"));
    assert!(refusal(&pipe, &params(Some(input(0.0, false)))).contains("strength"));
    assert!(refusal(&pipe, &params(Some(input(1.5, false)))).contains("strength"));

    let fill_dir = assembled("tiny-flux-fill");
    let fill =
        FluxPipeline::load_dir(fill_dir.path(), &options(fill_dir.path()), &Device::Cpu).unwrap();
    assert!(refusal(&fill, &params(None)).contains("mask"));
    assert!(refusal(&fill, &params(Some(input(1.0, false)))).contains("mask"));

    let kontext_dir = assembled("tiny-flux-kontext");
    let kontext = FluxPipeline::load_dir(
        kontext_dir.path(),
        &options(kontext_dir.path()),
        &Device::Cpu,
    )
    .unwrap();
    assert!(refusal(&kontext, &params(Some(input(1.0, true)))).contains("no mask"));
}

/// An input too large to encode whole on the GPU is encoded in tiles: diffusers' `_tiled_encode` of
/// the tiny autoencoder, tiles of 32 pixels overlapping by a quarter, the last ones cut short.
#[test]
fn the_tiled_encode_equals_diffusers_tiled_encode() {
    let r = candle_core::safetensors::load(
        edit_fixtures().join("vae_tiled_encode.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tiling = &meta()["tiled_encode"];
    let tiling = engine::models::autoencoder::Tiling {
        sample: tiling["tile_sample_min_size"].as_u64().unwrap() as usize,
        overlap: tiling["tile_overlap_factor"].as_f64().unwrap(),
    };
    let vae = engine::models::autoencoder::Autoencoder::load(
        &tiny_dev().join("vae"),
        DType::F32,
        &Device::Cpu,
        engine::ops::Kernels::Plain,
    )
    .unwrap();
    let tiled = vae.tiled_encode(&r["image"], tiling).unwrap().mean;
    assert_close("tiled encode", &tiled, &r["tiled_mean"], FORWARD_TOL);
    let whole = vae.encode(&r["image"]).unwrap().mean;
    assert_close("whole encode", &whole, &r["whole_mean"], FORWARD_TOL);
}

/// `generate` on a Fill and a Kontext model runs the pipeline checked above from its seed's noise:
/// the same pixels as `prepare_edit` and `denoise_edit` on `initial_noise(seed)`.
#[test]
fn generate_on_fill_and_kontext_models_is_the_checked_pipeline_at_the_seeds_noise() {
    for (name, masked, guidance) in [
        ("tiny-flux-fill", true, 30.0),
        ("tiny-flux-kontext", false, 2.5),
    ] {
        let dir = assembled(name);
        let pipe = FluxPipeline::load_dir(dir.path(), &options(dir.path()), &Device::Cpu).unwrap();
        let mut p = params(Some(input(1.0, masked)));
        p.guidance = guidance;
        let made = pipe.generate(&p, &mut |_| Control::Continue).unwrap();

        let noise = pipe.initial_noise(p.seed, p.width, p.height).unwrap();
        let sigmas = pipe.schedule.sigmas(p.steps, noise.dim(1).unwrap());
        let (start, sigmas, cond) = pipe
            .prepare_edit(&input(1.0, masked), &noise, &sigmas)
            .unwrap();
        let (txt, pooled) = pipe.encode_prompt(&p.prompt).unwrap();
        let grid = pipe.latent_grid(p.width, p.height);
        let out = pipe
            .denoise_edit(
                start,
                grid,
                (&txt, &pooled),
                None,
                &sigmas,
                guidance,
                None,
                &cond,
                &mut |_| Control::Continue,
            )
            .unwrap();
        let manual = engine::pipeline::to_rgb(&pipe.decode(&out, grid).unwrap()).unwrap();
        assert_eq!(made.image(), &manual, "{name}");
        assert_eq!(made.image().dimensions(), (p.width as u32, p.height as u32));
    }
}
