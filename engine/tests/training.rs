//! LoRA training on the tiny model, on the CPU: the loss falls, the adapter pulls generations toward the
//! training images, a resumed run repeats the uninterrupted one bit for bit, and the saved file gives
//! diffusers' output when diffusers loads it (scripts/fixtures/check_trained_lora.py).

mod common;

use candle_core::{DType, Device, Tensor};
use engine::pipeline::{Control, FluxPipeline, LoadOptions};
use engine::training::lora::LoraSet;
use engine::training::{Report, TrainJob, TrainSettings, Trainer};
use image::{Rgb, RgbImage};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tiny() -> Arc<FluxPipeline> {
    tiny_streaming(None)
}

/// The tiny pipeline, with at least `streamed` bytes of its transformer's blocks in host memory.
fn tiny_streaming(streamed: Option<u64>) -> Arc<FluxPipeline> {
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    let mut opts = LoadOptions::from_preset(preset);
    opts.memory.streamed = streamed;
    Arc::new(FluxPipeline::load(&opts, &Device::Cpu, Arc::new(|_| {})).unwrap())
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// An orange picture with a dark square, placed by `i`.
fn picture(i: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(64, 64, Rgb([230, 120, 20]));
    for y in 8 + 4 * i..28 + 4 * i {
        for x in 2 + 8 * i..26 + 8 * i {
            img.put_pixel(x, y, Rgb([40, 20, 60]));
        }
    }
    img
}

/// Four pictures in nested folders, two with captions, and a file that is no image.
fn dataset(dir: &Path) -> PathBuf {
    let path = dir.join("dataset.zip");
    let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for i in 0..4u32 {
        let name = format!("set/part{}/img{i}.png", i % 2);
        w.start_file(&name, opts).unwrap();
        w.write_all(&png(&picture(i))).unwrap();
        if i < 2 {
            w.start_file(format!("set/part{}/img{i}.txt", i % 2), opts)
                .unwrap();
            w.write_all(b"an orange card with a dark square").unwrap();
        }
    }
    w.start_file("readme.md", opts).unwrap();
    w.write_all(b"not an image").unwrap();
    w.finish().unwrap();
    path
}

fn job(dir: &Path, settings: TrainSettings, resume: bool) -> TrainJob {
    TrainJob {
        dataset: dataset(dir),
        keywords: vec!["zqx style".into()],
        job_dir: dir.to_path_buf(),
        lora_file: dir.join("lora.safetensors"),
        settings,
        base_model: "flux-tiny".into(),
        sample_steps: 4,
        sample_guidance: 3.5,
        resume,
    }
}

fn settings(steps: u32) -> TrainSettings {
    TrainSettings {
        steps,
        learning_rate: 2e-3,
        rank: 8,
        alpha: 8.0,
        targets: engine::training::Targets::AllLinear,
        sample_every: 0,
        checkpoint_every: 0,
        seed: 11,
        ..TrainSettings::defaults(64)
    }
}

fn run(trainer: &mut Trainer, log: &mut Vec<String>) -> Vec<f32> {
    run_sampled(trainer, log, &mut BTreeMap::new())
}

/// Runs to the end, keeping the log and each sample's pixels by step.
fn run_sampled(
    trainer: &mut Trainer,
    log: &mut Vec<String>,
    samples: &mut BTreeMap<u32, Vec<u8>>,
) -> Vec<f32> {
    let mut losses = Vec::new();
    loop {
        let stats = trainer
            .step(&mut |r| match r {
                Report::Log(l) => log.push(l),
                Report::Sample(sample) => {
                    samples.insert(sample.step, sample.image.into_raw());
                }
            })
            .unwrap();
        losses.push(stats.loss);
        if stats.finished {
            return losses;
        }
    }
}

#[test]
fn the_loss_falls_and_generations_move_toward_the_training_images() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = tiny();
    let mut log = Vec::new();
    let s = TrainSettings {
        learning_rate: 5e-3,
        ..settings(60)
    };
    let mut trainer = Trainer::prepare(pipe.clone(), job(dir.path(), s.clone(), false), &mut |r| {
        if let Report::Log(l) = r {
            log.push(l)
        }
    })
    .unwrap();
    let before = trainer.validation_loss(4).unwrap();
    run(&mut trainer, &mut log);
    let after = trainer.validation_loss(4).unwrap();
    eprintln!("validation loss {before} -> {after}");
    assert!(after < 0.7 * before, "validation loss {before} -> {after}");
    assert!(
        log[0].starts_with("dataset: 4 images used (2 with a caption file), 1 files skipped"),
        "{log:?}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("dataset-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["skipped"][0]["file"], "readme.md");
    assert_eq!(
        report["used"][0]["caption"],
        "zqx style, an orange card with a dark square"
    );

    // Generate from the keywords with and without the saved LoRA (read back from its file): the
    // trained one lands nearer the training images' latents.
    let file =
        candle_core::safetensors::load(dir.path().join("lora.safetensors"), &Device::Cpu).unwrap();
    let lora = LoraSet::new(
        &pipe.transformer,
        s.targets,
        s.rank,
        s.alpha,
        0,
        &Device::Cpu,
    )
    .unwrap();
    lora.load_peft_tensors(&file).unwrap();
    let (txt, pooled) = pipe.encode_prompt("zqx style").unwrap();
    let generate = |with_lora: bool| {
        if with_lora {
            lora.attach(&pipe.transformer, false);
        }
        let noise = pipe.initial_noise(5, 64, 64).unwrap();
        let sigmas = pipe.schedule.sigmas(8, noise.dim(1).unwrap());
        let out = pipe
            .denoise(
                noise,
                pipe.latent_grid(64, 64),
                &txt,
                &pooled,
                &sigmas,
                3.5,
                &mut |_| Control::Continue,
            )
            .unwrap();
        LoraSet::detach(&pipe.transformer);
        out
    };
    // The training images' latents (model space, packed), averaged.
    let mut sum: Option<Tensor> = None;
    for i in 0..4u32 {
        let px = Tensor::from_vec(picture(i).into_raw(), (64, 64, 3), &Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let px = ((px / 127.5).unwrap() - 1.0).unwrap();
        let z = pipe
            .codec
            .to_model_space(&pipe.codec.encode(&px).unwrap().mean)
            .unwrap();
        let z = engine::sampling::latents::pack(&z).unwrap();
        sum = Some(match sum {
            Some(s) => (s + z).unwrap(),
            None => z,
        });
    }
    let target = (sum.unwrap() / 4.0).unwrap();
    let dist = |x: &Tensor| -> f32 {
        (x - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    let (base, trained) = (dist(&generate(false)), dist(&generate(true)));
    eprintln!("latent RMS distance to the training images: base {base}, trained {trained}");
    assert!(trained < 0.85 * base, "base {base}, trained {trained}");
    // In pixels too: decoded, the trained generation is nearer the decoded training latents.
    let pixels = |z: &Tensor| pipe.decode(z, pipe.latent_grid(64, 64)).unwrap();
    let want = pixels(&target);
    let pdist = |z: &Tensor| -> f32 {
        (pixels(z) - &want)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (pb, pt) = (pdist(&generate(false)), pdist(&generate(true)));
    eprintln!("mean pixel distance to the decoded training latents: base {pb}, trained {pt}");
    assert!(pt < pb, "base {pb}, trained {pt}");
}

#[test]
fn training_on_a_transformer_streamed_from_host_memory_repeats_the_resident_run() {
    let s = settings(4);
    let losses = |pipe: Arc<FluxPipeline>| {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Vec::new();
        let mut trainer =
            Trainer::prepare(pipe, job(dir.path(), s.clone(), false), &mut |_| {}).unwrap();
        run(&mut trainer, &mut log)
    };
    let streamed = tiny_streaming(Some(u64::MAX));
    assert!(streamed.transformer.streamed_bytes() > 0);
    assert_eq!(losses(streamed), losses(tiny()));
}

/// The tiny pipeline under a GPU memory cap (the plan applies a cap on the CPU too), if the model
/// fits it.
fn tiny_capped(cap: u64) -> Option<Arc<FluxPipeline>> {
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    let mut opts = LoadOptions::from_preset(preset);
    opts.memory.gpu_memory = Some(cap);
    FluxPipeline::load(&opts, &Device::Cpu, Arc::new(|_| {}))
        .ok()
        .map(Arc::new)
}

/// The smallest cap at which a training step at `side` fits beside the tiny model's resident
/// transformer, by bisection.
fn training_threshold(side: usize) -> u64 {
    let fits = |cap: u64| {
        tiny_capped(cap).is_some_and(|p| p.memory_plan().training_streamed(side, side) == Ok(0))
    };
    let (mut lo, mut hi) = (1u64 << 30, 4u64 << 30);
    assert!(!fits(lo) && fits(hi));
    while hi - lo > 1024 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

#[test]
fn a_run_whose_steps_need_more_memory_than_generation_streams_more_while_it_trains() {
    let s = settings(4);
    let side = s.resolution as usize;
    // Just under the threshold generation still runs resident, and training streams a little of
    // the transformer.
    let pipe = tiny_capped(training_threshold(side) - 1024).expect("the model fits");
    assert_eq!(
        pipe.transformer.streamed_bytes(),
        0,
        "generation runs resident"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut log = Vec::new();
    let mut trainer = Trainer::prepare(pipe.clone(), job(dir.path(), s.clone(), false), &mut |r| {
        if let Report::Log(line) = r {
            log.push(line);
        }
    })
    .unwrap();
    assert!(
        pipe.transformer.streamed_bytes() > 0,
        "training streams part of the transformer"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("streamed from host memory while training")),
        "{log:?}"
    );
    let losses = run(&mut trainer, &mut Vec::new());
    drop(trainer);
    assert_eq!(
        pipe.transformer.streamed_bytes(),
        0,
        "the plan's arrangement is back"
    );
    // The same steps as resident.
    let dir = tempfile::tempdir().unwrap();
    let mut resident = Trainer::prepare(tiny(), job(dir.path(), s, false), &mut |_| {}).unwrap();
    assert_eq!(losses, run(&mut resident, &mut Vec::new()));
}

#[test]
fn a_run_whose_step_cannot_fit_even_streamed_is_refused_before_any_work() {
    let s = settings(4);
    // Well under the threshold (the tiny transformer is a few MB: streaming cannot make up for
    // it), where generation still fits.
    let pipe = tiny_capped(training_threshold(s.resolution as usize) - (48 << 20))
        .expect("the model fits");
    let dir = tempfile::tempdir().unwrap();
    let job_dir = dir.path().join("job");
    let mut j = job(dir.path(), s, false);
    j.job_dir = job_dir.clone();
    let err = Trainer::prepare(pipe, j, &mut |_| {})
        .err()
        .expect("refused");
    assert!(err.to_string().contains("lower resolution"), "{err}");
    assert!(!job_dir.exists(), "nothing written");
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one_exactly() {
    let pipe = tiny();
    // With gradient checkpointing, as on a GPU.
    let s = TrainSettings {
        checkpoint_every: 4,
        sample_every: 5,
        gradient_checkpointing: Some(true),
        ..settings(10)
    };
    let whole = tempfile::tempdir().unwrap();
    let mut log = Vec::new();
    let mut trainer = Trainer::prepare(
        pipe.clone(),
        job(whole.path(), s.clone(), false),
        &mut |_| {},
    )
    .unwrap();
    let mut whole_samples = BTreeMap::new();
    let uninterrupted = run_sampled(&mut trainer, &mut log, &mut whole_samples);
    drop(trainer);

    let parts = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::prepare(
        pipe.clone(),
        job(parts.path(), s.clone(), false),
        &mut |_| {},
    )
    .unwrap();
    for _ in 0..6 {
        trainer.step(&mut |_| {}).unwrap();
    }
    // Cancelled at step 6: the checkpoint of step 4 remains.
    drop(trainer);
    let mut samples = Vec::new();
    let mut trainer =
        Trainer::prepare(pipe.clone(), job(parts.path(), s.clone(), true), &mut |r| {
            if let Report::Sample(sample) = r {
                samples.push(sample.step)
            }
        })
        .unwrap();
    assert_eq!(trainer.step_count(), 4);
    let mut resumed_samples = BTreeMap::new();
    let rest = run_sampled(&mut trainer, &mut log, &mut resumed_samples);
    assert_eq!(rest.len(), 6);
    let resumed: Vec<f32> = trainer.losses().to_vec();
    assert_eq!(resumed, uninterrupted, "loss curves differ");
    // The same tensors, bit for bit (the header's metadata order is not fixed).
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("lora.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(whole.path()), load(parts.path()));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(t), bits(&b[name]), "{name} differs");
    }
    // Samples: at 5 and at the end; their pixels match the uninterrupted run's.
    assert_eq!(whole_samples.keys().copied().collect::<Vec<_>>(), [5, 10]);
    assert_eq!(resumed_samples, whole_samples);
}
/// LoRA training's hand-written backward passes, with gradient checkpointing and without, give the loss
/// and every adapter's gradient of candle's autograd over the whole pass (the plain ops, each with candle's
/// own backward), with adapters on every layer (the embedders, modulations and final layer included) and
/// on the attention only (the first block's input then needs no gradient).
#[test]
fn hand_written_gradients_equal_candles_autograd() {
    let pipe = tiny();
    let model = &pipe.transformer;
    let r = common::reference("transformer_dev");
    // Trained adapters: lora_B is not zero, so every adapter has a gradient in both factors.
    let file = candle_core::safetensors::load(fixture_lora(), &Device::Cpu).unwrap();
    let inputs = engine::models::flux::FluxInputs::from_diffusers_names(&r);
    let target = r["hidden_states"].sin().unwrap();
    let mse =
        |pred: &Tensor| -> anyhow::Result<Tensor> { Ok((pred - &target)?.sqr()?.mean_all()?) };
    for targets in [
        engine::training::Targets::AllLinear,
        engine::training::Targets::Attention,
    ] {
        let lora = LoraSet::new(model, targets, 4, 8.0, 0, &Device::Cpu).unwrap();
        lora.load_peft_tensors(&file).unwrap();
        lora.attach(model, true);
        let l = mse(&model.forward(&inputs).unwrap()).unwrap();
        let autograd = l.backward().unwrap();
        let want = l.to_scalar::<f32>().unwrap();
        for checkpointing in [false, true] {
            let (loss, grads) = engine::training::flux_backward::loss_and_grads(
                model,
                &inputs,
                &mse,
                checkpointing,
            )
            .unwrap();
            let case = format!("{targets:?}, checkpointing {checkpointing}");
            let got = loss.to_scalar::<f32>().unwrap();
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "{case}: loss {got} against {want}"
            );
            let mut worst = 0f64;
            for v in lora.vars() {
                let w = autograd.get(v.as_tensor()).expect("a gradient");
                let g = grads.get(v.as_tensor()).expect("a hand-written gradient");
                assert!(
                    w.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                );
                worst = worst.max(common::rel_err(g, w));
            }
            // f32 throughout: the formulas differ (the norm's and GELU's backward written out) and so
            // does the order of additions, nothing else.
            assert!(worst < 1e-5, "{case}: gradients differ by {worst:e}");
            eprintln!("{case}: loss {got}, worst gradient difference {worst:e}");
            assert_eq!(
                grads.get_ids().count(),
                lora.vars().len(),
                "{case}: only the adapters' gradients are returned"
            );
        }
        LoraSet::detach(model);
    }
}

fn fixture_lora() -> PathBuf {
    common::fixtures().join("trained-lora.safetensors")
}

/// The trainer's settings for the committed fixture: every linear layer, rank ≠ alpha (so the folded
/// scale is exercised), a high learning rate so that the adapters change the output clearly.
fn fixture_settings() -> TrainSettings {
    TrainSettings {
        steps: 30,
        learning_rate: 2e-2,
        rank: 4,
        alpha: 8.0,
        targets: engine::training::Targets::AllLinear,
        sample_every: 0,
        checkpoint_every: 0,
        seed: 3,
        ..TrainSettings::defaults(64)
    }
}

/// Rewrites engine/tests/fixtures/trained-lora.safetensors; then run scripts/fixtures/check_trained_lora.py.
#[test]
#[ignore = "writes the committed fixture"]
fn write_trained_lora_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::prepare(
        tiny(),
        job(dir.path(), fixture_settings(), false),
        &mut |_| {},
    )
    .unwrap();
    run(&mut trainer, &mut Vec::new());
    std::fs::copy(dir.path().join("lora.safetensors"), fixture_lora()).unwrap();
}

#[test]
fn trained_lora_matches_diffusers() {
    let pipe = tiny();
    let r = common::reference("transformer_dev");
    let want = common::reference("trained_lora");
    let s = fixture_settings();
    let file = candle_core::safetensors::load(fixture_lora(), &Device::Cpu).unwrap();
    let lora = LoraSet::new(
        &pipe.transformer,
        s.targets,
        s.rank,
        s.alpha,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        file.len(),
        2 * lora.adapters.len(),
        "every adapter, nothing else"
    );
    lora.load_peft_tensors(&file).unwrap();
    let forward = || common::forward_on_reference(&pipe.transformer, &r);
    common::assert_close("base", &forward(), &want["base_out"], 5e-5);
    lora.attach(&pipe.transformer, false);
    let out = forward();
    LoraSet::detach(&pipe.transformer);
    common::assert_close("with the trained LoRA", &out, &want["out"], 5e-5);
}
