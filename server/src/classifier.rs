//! The engine's prompt classifier behind the server's `Classification` seam, and `studio classify`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use app::ClassifyResponse;
use candle_core::Device;
use engine::classifier::{EncoderSource, PromptClassifier, DEFAULT_ENCODER_DIR, DEFAULT_HEAD_PATH};
use serde::Serialize;

use crate::jobs::capability::Classification;

/// Where the classifier's two parts come from. The defaults are relative to the working directory, the
/// repository root when started by `scripts/run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClassifierArgs {
    /// The sentence encoder: a local folder or a hub id (owner/name[@revision]); `scripts/fetch-models`
    /// installs the default.
    #[arg(long, env = "STUDIO_CLASSIFIER_MODEL", default_value = DEFAULT_ENCODER_DIR)]
    pub classifier_model: String,
    /// The classifier head trained for that encoder (safetensors, from `train-classifier`).
    #[arg(long, env = "STUDIO_CLASSIFIER_HEAD", default_value = DEFAULT_HEAD_PATH)]
    pub classifier_head: PathBuf,
}

impl ClassifierArgs {
    /// Always on the CPU: it is small and fast there, and GPU memory is left to FLUX.
    pub fn load(&self) -> Result<PromptClassifier> {
        let encoder = EncoderSource::parse(&self.classifier_model)?;
        PromptClassifier::load(&encoder, &self.classifier_head, &Device::Cpu).with_context(|| {
            format!(
                "loading the prompt classifier (encoder {}, head {}; relative paths are taken from the \
                 working directory, the repository root under scripts/run)",
                self.classifier_model,
                self.classifier_head.display()
            )
        })
    }
}

impl Classification for PromptClassifier {
    fn image_request_probability(&self, prompt: &str) -> Result<f32> {
        PromptClassifier::image_request_probability(self, prompt)
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    classifier: ClassifierArgs,
}

/// One output line: the `/classify/` answer with the prompt it is about.
#[derive(Serialize)]
struct Line<'a> {
    prompt: &'a str,
    #[serde(flatten)]
    response: ClassifyResponse,
}

/// Prompts per batch: enough for the encoder's batching to pay off; answers are written after each batch, so a
/// long input streams out instead of waiting for its end.
const CHUNK: usize = 64;

/// Reads prompts from stdin, one a line, and writes one JSON object a line. Blank lines are skipped, as
/// `/classify/` refuses empty prompts; each answer carries its prompt, so lines stay matched.
pub fn run(args: Args) -> Result<()> {
    let classifier = args.classifier.load()?;
    let mut out = std::io::stdout().lock();
    let mut chunk: Vec<String> = Vec::with_capacity(CHUNK);
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading prompts from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        chunk.push(line);
        if chunk.len() == CHUNK {
            write_answers(&classifier, &chunk, &mut out)?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        write_answers(&classifier, &chunk, &mut out)?;
    }
    Ok(())
}

fn write_answers(
    classifier: &PromptClassifier,
    prompts: &[String],
    out: &mut impl Write,
) -> Result<()> {
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let probabilities = classifier.image_request_probabilities(&prompts)?;
    for (prompt, p) in prompts.into_iter().zip(probabilities) {
        let line = Line {
            prompt,
            response: ClassifyResponse::from_image_request_probability(p),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush().context("writing to stdout")
}
