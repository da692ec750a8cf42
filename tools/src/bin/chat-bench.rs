//! Speed of the chat's language model on this machine: first-token latency (prompt read and first
//! token sampled) and decoding speed (tokens a second after the first), over a few greedy answers.
//! `cargo run --release -p tools --bin chat-bench -- --model smollm2-135m`

use std::ops::ControlFlow;
use std::time::Instant;

use clap::Parser;
use engine::chat::{GgufChat, LanguageModel, Role, SamplingSettings, Turn};

#[derive(Parser)]
struct Args {
    /// A chat preset, a .gguf file or owner/repo:file.gguf.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Where it runs: auto, cpu, cuda.
    #[arg(long, default_value = "auto")]
    device: engine::device::DeviceChoice,
    /// New tokens per answer.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Answers measured (after one warm-up answer).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const PROMPT: &str = "Tell me about the history of the bicycle.";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = args.device.select()?;
    let path = engine::chat::presets::resolve(
        &args.model,
        &engine::hub::Hub::from_env(),
        std::sync::Arc::new(|_| {}),
    )?;
    let mut model = GgufChat::load(&path, &args.model, &device)?;
    let turns = [
        Turn::new(Role::System, "You are a helpful assistant."),
        Turn::new(Role::User, PROMPT),
    ];
    let settings = SamplingSettings {
        max_tokens: args.tokens,
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..SamplingSettings::default()
    };
    let mut firsts = Vec::new();
    let mut rates = Vec::new();
    for run in 0..=args.runs {
        let start = Instant::now();
        let mut first = None;
        let answer = model.answer(&turns, &settings, &mut |_| {
            first.get_or_insert_with(|| start.elapsed());
            ControlFlow::Continue(())
        })?;
        let total = start.elapsed();
        let first = first.unwrap_or(total);
        let rate = (answer.tokens.saturating_sub(1)) as f64 / (total - first).as_secs_f64();
        println!(
            "{} prompt {} tokens, answer {} tokens: first token {:.1} ms, {:.1} tokens/s after it",
            if run == 0 { "warm-up" } else { "run" },
            answer.prompt_tokens,
            answer.tokens,
            first.as_secs_f64() * 1e3,
            rate
        );
        if run > 0 {
            firsts.push(first.as_secs_f64() * 1e3);
            rates.push(rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{} on {:?}: median first token {:.1} ms, median {:.1} tokens/s",
        args.model,
        device,
        median(&mut firsts),
        median(&mut rates)
    );
    Ok(())
}
