//! The recipe every PNG of the studio carries (the server's images and `studio generate`'s files): the one
//! place that writes it into a PNG's text chunks and reads it back. Two chunks, before the pixels:
//!
//! - `flux-studio`: the [`Recipe`] as JSON, all of it, read back exactly;
//! - `parameters`: the line AUTOMATIC1111, Forge, ComfyUI's readers and Civitai show, e.g.
//!   `a red fox\nSteps: 28, Sampler: Euler, CFG scale: 1, Seed: 7, Size: 1024x1024, Model: flux-dev,
//!   Guidance: 3.5, Distilled CFG Scale: 3.5, Lora hashes: "name: 0.8", Denoising strength: 0.75,
//!   Version: flux-studio 0.1.0`. Read back too (prompt, steps, seed, size, model, guidance, LoRAs,
//!   strength), for PNGs of other tools.
//!
//! Each chunk is tEXt when its text is Latin-1 (what those tools read best), iTXt (UTF-8) otherwise.

use std::io::Cursor;

use anyhow::{Context, Result};
use app::{Recipe, RecipeInput, RecipeLora};
use image::RgbImage;

/// The keyword of the JSON chunk.
pub const JSON_KEYWORD: &str = "flux-studio";
/// The keyword other tools write their settings line under.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// The studio's version, as recipes name it.
pub fn studio_version() -> String {
    format!("flux-studio {}", env!("CARGO_PKG_VERSION"))
}

/// The image as PNG with the recipe's two text chunks.
pub fn encode_png(image: &RgbImage, recipe: &Recipe) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let json = serde_json::to_string(recipe)?;
    for (keyword, text) in [
        (JSON_KEYWORD, json),
        (PARAMETERS_KEYWORD, parameters_line(recipe)),
    ] {
        if text.chars().all(|c| u32::from(c) <= 0xff) {
            encoder.add_text_chunk(keyword.into(), text)?;
        } else {
            encoder.add_itxt_chunk(keyword.into(), text)?;
        }
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(out)
}

/// Where a recipe was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The studio's JSON chunk.
    Studio,
    /// Another tool's (or the studio's) `parameters` line, when there is no JSON chunk.
    Parameters,
}

impl Found {
    pub fn as_str(self) -> &'static str {
        match self {
            Found::Studio => JSON_KEYWORD,
            Found::Parameters => PARAMETERS_KEYWORD,
        }
    }
}

/// The recipe a PNG carries: the JSON chunk when it has one, else its `parameters` line; `None` for a
/// PNG with neither (or a JSON chunk that is not a recipe and no line). Errors only for a file that is
/// not a readable PNG.
pub fn read_png(bytes: &[u8]) -> Result<Option<(Recipe, Found)>> {
    let reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .context("reading the PNG's header")?;
    let info = reader.info();
    let mut texts: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.utf8_text {
        if let Ok(text) = chunk.get_text() {
            texts.push((chunk.keyword.clone(), text));
        }
    }
    for chunk in &info.compressed_latin1_text {
        if let Ok(text) = chunk.get_text() {
            texts.push((chunk.keyword.clone(), text));
        }
    }
    let text = |keyword: &str| {
        texts
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, t)| t.as_str())
    };
    if let Some(recipe) = text(JSON_KEYWORD).and_then(|j| serde_json::from_str(j).ok()) {
        return Ok(Some((recipe, Found::Studio)));
    }
    Ok(text(PARAMETERS_KEYWORD)
        .and_then(parse_parameters)
        .map(|r| (r, Found::Parameters)))
}

/// The `parameters` line: the prompt, then `Key: value` pairs as AUTOMATIC1111 writes them. FLUX has no
/// classifier-free guidance (CFG scale 1) and takes its guidance as an input, which Forge calls
/// `Distilled CFG Scale`; the built-in model's classifier-free guidance is `CFG scale` as well.
pub fn parameters_line(r: &Recipe) -> String {
    let mut pairs = vec![
        ("Steps", r.steps.to_string()),
        ("Sampler", "Euler".into()),
        ("CFG scale", "1".into()),
        ("Seed", r.seed.to_string()),
        ("Size", format!("{}x{}", r.width, r.height)),
        ("Model", r.model.clone()),
        ("Guidance", r.guidance.to_string()),
        ("Distilled CFG Scale", r.guidance.to_string()),
    ];
    if !r.loras.is_empty() {
        let list: Vec<String> = r
            .loras
            .iter()
            .map(|l| format!("{}: {}", l.name.replace([',', ':', '"'], "_"), l.scale))
            .collect();
        pairs.push(("Lora hashes", format!("\"{}\"", list.join(", "))));
    }
    if let Some(input) = &r.input {
        pairs.push(("Denoising strength", input.strength.to_string()));
        if let Some(job) = &input.job_id {
            pairs.push(("Input image", job.clone()));
        }
        if input.masked {
            pairs.push(("Mask", "yes".into()));
        }
    }
    if let Some(version) = &r.studio {
        pairs.push(("Version", version.clone()));
    }
    let settings: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{}\n{}", r.prompt, settings.join(", "))
}

/// Reads a `parameters` line back: its last line holds the settings (`Key: value` pairs, quoted values
/// may hold commas), the lines before it the prompt (a `Negative prompt:` line is dropped: FLUX has
/// none). `None` when there is no `Steps:` setting, as in a text that is not such a line.
pub fn parse_parameters(text: &str) -> Option<Recipe> {
    let (prompt, settings) = text.trim_end().rsplit_once('\n')?;
    let pairs = split_settings(settings);
    let get = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    };
    let steps = get("Steps")?.parse().ok()?;
    let prompt: Vec<&str> = prompt
        .lines()
        .take_while(|l| !l.starts_with("Negative prompt:"))
        .collect();
    let (width, height) = get("Size")
        .and_then(|s| s.split_once('x'))
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
        .unwrap_or((0, 0));
    let guidance = ["Guidance", "Distilled CFG Scale", "CFG scale"]
        .iter()
        .find_map(|k| get(k).and_then(|v| v.parse().ok()))
        .unwrap_or(1.0);
    let loras = get("Lora hashes")
        .map(|list| {
            list.trim_matches('"')
                .split(',')
                .filter_map(|entry| {
                    let (name, scale) = entry.rsplit_once(':')?;
                    Some(RecipeLora {
                        name: name.trim().to_string(),
                        // A1111 writes a hash here; the studio writes the scale.
                        scale: scale.trim().parse().unwrap_or(1.0),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let input = get("Denoising strength")
        .and_then(|s| s.parse().ok())
        .map(|strength| RecipeInput {
            job_id: get("Input image").map(str::to_owned),
            index: None,
            strength,
            masked: get("Mask").is_some(),
        });
    Some(Recipe {
        prompt: prompt.join("\n"),
        seed: get("Seed").and_then(|s| s.parse().ok()).unwrap_or(0),
        model: get("Model").unwrap_or_default().to_string(),
        loras,
        steps,
        guidance,
        width,
        height,
        input,
        studio: get("Version").map(str::to_owned),
    })
}

/// `Key: value, Key: "a, b", ...` into pairs.
fn split_settings(line: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let (mut current, mut quoted) = (String::new(), false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
        .iter()
        .filter_map(|p| {
            let (k, v) = p.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            prompt: "a red fox, in the snow".into(),
            seed: 7,
            model: "flux-dev".into(),
            loras: vec![
                RecipeLora {
                    name: "strangerzonehf/Flux-Super-Realism-LoRA:super-realism.safetensors".into(),
                    scale: 0.8,
                },
                RecipeLora {
                    name: "mine".into(),
                    scale: 1.0,
                },
            ],
            steps: 28,
            guidance: 3.5,
            width: 48,
            height: 32,
            input: Some(RecipeInput {
                job_id: Some("1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b".into()),
                index: Some(1),
                strength: 0.75,
                masked: true,
            }),
            studio: Some(studio_version()),
        }
    }

    #[test]
    fn a_png_carries_its_recipe_as_json_and_as_a_parameters_line() {
        let image = RgbImage::from_fn(48, 32, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let png = encode_png(&image, &recipe()).unwrap();
        // The pixels are the image's.
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded, image);
        assert_eq!(read_png(&png).unwrap(), Some((recipe(), Found::Studio)));
        let reader = png::Decoder::new(Cursor::new(&png)).read_info().unwrap();
        let line = &reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEYWORD)
            .unwrap()
            .text;
        assert_eq!(
            line.lines().nth(1).unwrap(),
            format!(
                "Steps: 28, Sampler: Euler, CFG scale: 1, Seed: 7, Size: 48x32, Model: flux-dev, \
                 Guidance: 3.5, Distilled CFG Scale: 3.5, Lora hashes: \"strangerzonehf/Flux-Super-Realism-LoRA_super-realism.safetensors: 0.8, mine: 1\", \
                 Denoising strength: 0.75, Input image: 1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b, Mask: yes, Version: {}",
                studio_version()
            )
        );
    }

    #[test]
    fn the_parameters_line_alone_gives_the_settings_back() {
        let mut expected = recipe();
        let line = parameters_line(&expected);
        // What the line cannot say: the image index, and LoRA names' commas and colons.
        expected.input.as_mut().unwrap().index = None;
        expected.loras[0].name =
            "strangerzonehf/Flux-Super-Realism-LoRA_super-realism.safetensors".into();
        assert_eq!(parse_parameters(&line), Some(expected));
    }

    #[test]
    fn another_tools_parameters_are_read_and_a_png_without_any_has_no_recipe() {
        let a1111 = "a cat on a sofa,\nwarm light\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, \
                     Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 42, Size: 896x1152, \
                     Model hash: abc, Model: flux1-dev-bnb-nf4, Lora hashes: \"ghibli: 1a2b3c\", Version: f2.0.1";
        let r = parse_parameters(a1111).unwrap();
        assert_eq!(r.prompt, "a cat on a sofa,\nwarm light");
        assert_eq!((r.steps, r.seed, r.width, r.height), (20, 42, 896, 1152));
        assert_eq!((r.model.as_str(), r.guidance), ("flux1-dev-bnb-nf4", 3.5));
        assert_eq!(r.loras[0].name, "ghibli");
        assert_eq!(r.input, None);
        assert_eq!(parse_parameters("just a caption"), None);
        let mut plain = Vec::new();
        RgbImage::new(8, 8)
            .write_to(&mut Cursor::new(&mut plain), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(read_png(&plain).unwrap(), None);
        assert!(read_png(b"not a png").is_err());
    }

    #[test]
    fn a_prompt_beyond_latin1_is_kept_in_utf8() {
        let r = Recipe {
            prompt: "一只红狐狸 🦊".into(),
            input: None,
            ..recipe()
        };
        let png = encode_png(&RgbImage::new(16, 16), &r).unwrap();
        assert_eq!(read_png(&png).unwrap(), Some((r.clone(), Found::Studio)));
        let reader = png::Decoder::new(Cursor::new(&png)).read_info().unwrap();
        let line = reader
            .info()
            .utf8_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEYWORD)
            .unwrap()
            .get_text()
            .unwrap();
        assert_eq!(parse_parameters(&line).unwrap().prompt, r.prompt);
    }
}
