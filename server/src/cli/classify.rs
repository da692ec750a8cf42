//! `studio classify`: prompts from stdin to one JSON line each, with the classifier the server uses.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use app::ClassifyResponse;
use engine::classifier::PromptClassifier;
use serde::Serialize;

use crate::capabilities::classification;
use crate::config::ClassifierConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    classifier: ClassifierConfig,
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
    let classifier = classification::load(&args.classifier)?;
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
    // Each line is a message judged alone, as `/classify/` judges one sent without context.
    let probabilities =
        classifier.image_request_probabilities(&prompts, &vec![None; prompts.len()])?;
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
