//! Image to image, inpainting and edits through `/generate/` with a stand-in generator: what is refused
//! before anything is queued, how the input reaches the generation, and the recipe every PNG carries
//! (also read back by `POST /recipe/`).

mod common;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use app::Recipe;
use base64::Engine as _;
use common::{config, Api, FakeGeneration, FakeTraining};
use image::{ImageFormat, RgbImage};
use serde_json::json;
use server::jobs::capability::Capabilities;

struct Studio {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    api: Api,
}

impl std::ops::Deref for Studio {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

async fn studio() -> Studio {
    let dir = tempfile::tempdir().unwrap();
    let caps = Capabilities {
        generation: Some(Arc::new(FakeGeneration::new(Duration::ZERO))),
        training: Some(Arc::new(FakeTraining {
            steps: 2,
            step_time: Duration::ZERO,
        })),
        ..Capabilities::default()
    };
    let running = server::start(&config(dir.path()), caps).await.unwrap();
    Studio {
        data: dir.path().to_path_buf(),
        _dir: dir,
        api: Api::new(format!("http://{}", running.addr)),
    }
}

impl Studio {
    fn image_files(&self) -> usize {
        std::fs::read_dir(self.data.join("images")).unwrap().count()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn encoded(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// Left half black, right half white.
fn halves(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, _| {
        image::Rgb(if x < w / 2 { [0; 3] } else { [255; 3] })
    })
}

#[tokio::test]
async fn every_bad_input_image_is_refused_with_422_and_nothing_is_queued_or_written() {
    let s = studio().await;
    let png = b64(&encoded(&halves(64, 64), ImageFormat::Png));
    let other_size = b64(&encoded(&halves(32, 64), ImageFormat::Png));
    let gif = b64(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
    let too_wide = b64(&encoded(&RgbImage::new(8193, 1), ImageFormat::Png));
    let truncated = b64(&encoded(&halves(64, 64), ImageFormat::Png)[..60]);
    let unknown = uuid_like();
    let cases = [
        (json!({"image": "%%% not base64"}), "base64"),
        (json!({"image": b64(b"hello, not an image")}), "PNG or JPEG"),
        (json!({"image": gif}), "PNG or JPEG"),
        (json!({"image": truncated}), "decoded"),
        (json!({"image": too_wide}), "8192x8192"),
        (json!({"image": "data:image/png,abc"}), "data URL"),
        (json!({"mask": png}), "mask needs"),
        (json!({"strength": 0.5}), "strength needs"),
        (json!({"image": png, "strength": 0}), "strength must"),
        (json!({"image": png, "strength": 1.5}), "strength must"),
        (json!({"image": png, "mask": other_size}), "mask is 32x64"),
        (json!({"image": png, "mask": "@@"}), "mask is not base64"),
        (json!({"image": png, "image_job": unknown}), "not both"),
        (json!({"image_index": 1}), "image_index"),
        (json!({"image_job": unknown}), "not a completed generation"),
        (
            json!({"image_job": "../images/x"}),
            "not a completed generation",
        ),
    ];
    for (fields, expected) in cases {
        let mut body = json!({"prompt": "make it night"});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let (status, answer) = s.post("/generate/", &body).await;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("validation")),
            "{fields}: {answer}"
        );
        assert!(message.contains(expected), "{fields}: {message}");
    }
    // A training job's id is not an image, nor is an image the job does not have.
    let zip = common::zip_of(&[
        ("a.png", &common::tiny_png(64, 64)),
        ("b.png", &common::tiny_png(64, 64)),
    ]);
    let (status, training) = s.upload(zip, r#"["k"]"#, &[]).await;
    assert_eq!(status, 202, "{training}");
    let model_id = training["model_id"].as_str().unwrap().to_owned();
    let jobs_before = s.job_count().await;
    let (status, answer) = s
        .post("/generate/", &json!({"prompt": "x", "image_job": model_id}))
        .await;
    assert_eq!(status, 422, "{answer}");
    let (_, done) = s.post("/generate/", &json!({"prompt": "a fox"})).await;
    let (status, answer) = s
        .post(
            "/generate/",
            &json!({"prompt": "x", "image_job": done["job_id"], "image_index": 1}),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    // Nothing was queued or written for any refused request: one job (the fox) and its one image.
    assert_eq!(s.job_count().await, jobs_before + 1);
    assert_eq!(s.image_files(), 1);
}

/// A well-formed id that no job has.
fn uuid_like() -> String {
    "0b5c9a3e-3f59-4d8e-9a53-4a3f1d2c7e10".into()
}

#[tokio::test]
async fn an_input_image_reaches_the_generation_fitted_to_its_size_and_its_png_carries_the_recipe() {
    let s = studio().await;
    // 200x100, no size asked: the input's own size, rounded to multiples of 16 (208x96 would be the
    // nearest for 200: 12.5 -> 13 sixteenths), and the picture centre-cropped into it.
    let input = b64(&encoded(&halves(200, 100), ImageFormat::Jpeg));
    let (status, answer) = s
        .post(
            "/generate/",
            &json!({"prompt": "a fox at night", "image": format!("data:image/jpeg;base64,{input}"), "seed": 5}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["width"].as_u64(), answer["height"].as_u64()),
        (Some(208), Some(96))
    );
    let recipe: Recipe = serde_json::from_value(answer["recipe"].clone()).unwrap();
    let input_info = recipe.input.clone().expect("the recipe names its input");
    assert_eq!(input_info.strength, app::limits::DEFAULT_STRENGTH);
    assert_eq!((input_info.job_id, input_info.masked), (None, false));
    assert_eq!((recipe.seed, recipe.width, recipe.height), (5, 208, 96));
    assert_eq!(recipe.prompt, "a fox at night");
    assert_eq!(recipe.model, "tiny");
    assert!(recipe
        .studio
        .as_deref()
        .is_some_and(|v| v.starts_with("flux-studio ")));
    // The stand-in returns the input as it reached it: black on the left, white on the right.
    let job = answer["job_id"].as_str().unwrap();
    let png = s.bytes(&format!("/images/{job}")).await;
    let pixels = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(pixels.dimensions(), (208, 96));
    assert!(pixels.get_pixel(3, 48).0[0] < 20 && pixels.get_pixel(204, 48).0[0] > 235);
    // The file carries the same recipe, in both chunks.
    let (read, found) = server::recipe::read_png(&png).unwrap().unwrap();
    assert_eq!(
        (read, found),
        (recipe.clone(), server::recipe::Found::Studio)
    );
    let line = server::recipe::parameters_line(&recipe);
    assert!(
        line.ends_with(&format!(
            "Denoising strength: 0.75, Version: {}",
            server::recipe::studio_version()
        )),
        "{line}"
    );
    // The job's record keeps the settings, not the pixels.
    let (_, record) = s.get(&format!("/jobs/{job}")).await;
    assert!(
        record["params"].get("image").is_none(),
        "{}",
        record["params"]
    );
    assert_eq!(record["params"]["strength"], json!(0.75));
    assert_eq!(record["params"]["width"], json!(208));
}

#[tokio::test]
async fn an_earlier_generation_is_an_input_by_its_job_id_and_a_mask_is_fitted_with_it() {
    let s = studio().await;
    let (status, first) = s
        .post(
            "/generate/",
            &json!({"prompt": "a fox", "seed": 7, "num_images": 2, "width": 64, "height": 80}),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let job = first["job_id"].as_str().unwrap();
    let mask = b64(&encoded(&halves(64, 80), ImageFormat::Png));
    let (status, edit) = s
        .post(
            "/generate/",
            &json!({"prompt": "a fox with a hat", "image_job": job, "image_index": 1,
                    "mask": mask, "strength": 0.6, "seed": 9}),
        )
        .await;
    assert_eq!(status, 200, "{edit}");
    // The size is the earlier image's.
    assert_eq!(
        (edit["width"].as_u64(), edit["height"].as_u64()),
        (Some(64), Some(80))
    );
    let recipe: Recipe = serde_json::from_value(edit["recipe"].clone()).unwrap();
    let input = recipe.input.unwrap();
    assert_eq!(input.job_id.as_deref(), Some(job));
    assert_eq!(
        (input.index, input.strength, input.masked),
        (Some(1), 0.6, true)
    );
    // The stand-in returned the input: the first job's second image (seed 8's shade).
    let png = s
        .bytes(&format!("/images/{}", edit["job_id"].as_str().unwrap()))
        .await;
    assert_eq!(
        image::load_from_memory(&png)
            .unwrap()
            .to_rgb8()
            .get_pixel(0, 0)
            .0,
        [8, 0, 0]
    );
    let (read, _) = server::recipe::read_png(&png).unwrap().unwrap();
    assert_eq!(read.input.unwrap().job_id.as_deref(), Some(job));
    // Each image of a batch carries its own seed.
    let second = s.bytes(&format!("/images/{job}/1")).await;
    assert_eq!(
        server::recipe::read_png(&second).unwrap().unwrap().0.seed,
        8
    );
}

#[tokio::test]
async fn the_recipe_route_reads_the_settings_back_from_a_dropped_png() {
    let s = studio().await;
    let (_, made) = s
        .post(
            "/generate/",
            &json!({"prompt": "a lighthouse", "seed": 3, "steps": 4, "guidance": 2.5}),
        )
        .await;
    let png = s
        .bytes(&format!("/images/{}", made["job_id"].as_str().unwrap()))
        .await;
    let (status, answer) = s.post("/recipe/", &json!({"image": b64(&png)})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["source"], "flux-studio");
    assert_eq!(answer["recipe"], made["recipe"]);
    assert_eq!(answer["recipe"]["steps"], 4);
    assert_eq!(answer["recipe"]["guidance"], 2.5);
    // Another tool's PNG: its `parameters` line.
    let mut other = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut other, 8, 8);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .add_text_chunk(
                "parameters".into(),
                "a cat\nSteps: 20, Sampler: Euler, CFG scale: 1, Seed: 42, Size: 896x1152, Model: flux1-dev".into(),
            )
            .unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 8 * 8 * 3]).unwrap();
    }
    let (status, answer) = s.post("/recipe/", &json!({"image": b64(&other)})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["source"], "parameters");
    assert_eq!(answer["recipe"]["seed"], 42);
    assert_eq!(answer["recipe"]["prompt"], "a cat");
    // A PNG or JPEG without a recipe: just its size, to be used as an input image.
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let plain = encoded(&halves(40, 24), format);
        let (status, answer) = s.post("/recipe/", &json!({"image": b64(&plain)})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, json!({"width": 40, "height": 24}));
    }
    let (status, answer) = s.post("/recipe/", &json!({"image": b64(b"GIF89a")})).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("validation"))
    );
}
