//! The figures tables of the README and docs, made from the GPU measurements' records in bench/results/.
//!
//! A table's place in a markdown file is marked `<!-- bench-table NAME -->` ... `<!-- /bench-table -->`;
//! `write` fills every marked place from the records, `check` lists the places whose text differs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The markdown files that hold tables, relative to the workspace root.
pub const DOCS: [&str; 7] = [
    "README.md",
    "docs/performance.md",
    "docs/training.md",
    "docs/memory.md",
    "docs/editing.md",
    "docs/chat.md",
    "docs/formats.md",
];

#[derive(Debug, Deserialize)]
struct Head {
    date: String,
    run: Option<u32>,
    gpu: String,
    command: Option<String>,
    /// What the run changed, for the history tables.
    change: Option<String>,
    what: String,
}

#[derive(Debug, Deserialize)]
struct Generation {
    #[serde(flatten)]
    head: Head,
    reference: String,
    sizes: Vec<GenerationSize>,
    #[serde(default)]
    kernels: Vec<Kernel>,
    /// Several images a request (ours `--batch`, diffusers' `num_images_per_prompt`).
    #[serde(default)]
    batches: Vec<GenerationBatch>,
    /// The first-block step cache against the full run, ours.
    #[serde(default)]
    step_cache: Option<StepCacheFigures>,
}

#[derive(Debug, Deserialize)]
struct GenerationBatch {
    size: u32,
    images: u32,
    ours: Option<BatchFigures>,
    reference: Option<BatchFigures>,
}

#[derive(Debug, Deserialize)]
struct BatchFigures {
    total_s: f64,
    images_per_minute: f64,
    peak_in_use_gib: Option<f64>,
    peak_allocated_gib: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct StepCacheFigures {
    size: u32,
    steps: u32,
    threshold: f64,
    full_total_s: f64,
    cached_total_s: f64,
    skipped_steps: u32,
    /// The largest pixel difference from the full run's image at the same seed, over 255.
    image_error: f64,
}

#[derive(Debug, Deserialize)]
struct GenerationSize {
    size: u32,
    ours: GenerationFigures,
    reference: GenerationFigures,
}

#[derive(Debug, Deserialize)]
struct GenerationFigures {
    total_s: f64,
    step_s: Option<f64>,
    step_tflops: Option<f64>,
    decode_s: Option<f64>,
    peak_in_use_gib: Option<f64>,
    peak_allocated_gib: Option<f64>,
    peak_reserved_gib: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Kernel {
    op: String,
    plain_ms: f64,
    fused_ms: f64,
    fused_rel_l2_vs_f32: f64,
    plain_bf16_rel_l2_vs_f32: f64,
    fused_tflops: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Training {
    #[serde(flatten)]
    head: Head,
    reference: String,
    cases: Vec<TrainingCase>,
}

#[derive(Debug, Deserialize)]
struct TrainingCase {
    size: u32,
    checkpointing: bool,
    ours: TrainingFigures,
    reference: Option<TrainingFigures>,
}

#[derive(Debug, Deserialize)]
struct TrainingFigures {
    step_s: f64,
    peak_in_use_gib: Option<f64>,
    peak_allocated_gib: Option<f64>,
}

/// Weight formats and emulated card sizes (scripts/gpu/small-gpu-bench.sh).
#[derive(Debug, Deserialize)]
struct SmallGpu {
    #[serde(flatten)]
    head: Head,
    reference: String,
    diffusers_bf16_1024_s: Option<f64>,
    #[serde(default)]
    formats: Vec<FormatFigures>,
    #[serde(default)]
    caps: Vec<CapFigures>,
}

#[derive(Debug, Deserialize)]
struct FormatFigures {
    weights: String,
    step_s: f64,
    vs_diffusers_bf16_cosine: f64,
    vs_diffusers_f32_cosine: f64,
    total_s_1024: Option<f64>,
    generate_peak_in_use_gib: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct CapFigures {
    cap_gib: u32,
    ours: Option<CapOurs>,
    #[serde(default)]
    reference: Vec<CapReference>,
    /// LoRA training steps on the card (train-memory-bench.sh's capN/ cases).
    #[serde(default)]
    training: Vec<CapTraining>,
}

#[derive(Debug, Deserialize)]
struct CapTraining {
    size: u32,
    weights: String,
    step_s: Option<f64>,
    peak_in_use_gib: Option<f64>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CapOurs {
    plan: Option<String>,
    total_s: Option<f64>,
    first_total_s: Option<f64>,
    peak_in_use_gib: Option<f64>,
    /// The text encoders' share of `total_s` (a new prompt each run); absent in older records.
    encode_s: Option<f64>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CapReference {
    how: String,
    total_s: Option<f64>,
    peak_allocated_gib: Option<f64>,
    #[serde(default)]
    oom: bool,
    error: Option<String>,
}

/// Image-to-image and an instruction edit (scripts/gpu/edit-bench.sh).
#[derive(Debug, Deserialize)]
struct Edit {
    #[serde(flatten)]
    head: Head,
    reference: String,
    size: u32,
    steps: u32,
    cases: Vec<EditCase>,
}

#[derive(Debug, Deserialize)]
struct EditCase {
    mode: String,
    strength: Option<f64>,
    ours_s: Option<f64>,
    ours_step_s: Option<f64>,
    reference_s: Option<f64>,
}

/// torch.compile, a wide size and the Ampere path beside diffusers (bench/record.py speed).
#[derive(Debug, Deserialize)]
struct Speed {
    #[serde(flatten)]
    head: Head,
    reference: String,
    compile: SpeedCompile,
    wide: SpeedWide,
    ampere: SpeedAmpere,
}

#[derive(Debug, Deserialize)]
struct SpeedCompile {
    ours_s: Option<f64>,
    ours_step_s: Option<f64>,
    diffusers_compile_s: Option<f64>,
    diffusers_first_call_s: Option<f64>,
    /// Why diffusers' compiled run has no time (out of memory, not run).
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SpeedWide {
    width: Option<u32>,
    height: Option<u32>,
    ours_s: Option<f64>,
    ours_step_s: Option<f64>,
    diffusers_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct SpeedAmpere {
    step_s: Option<f64>,
    vs_diffusers_bf16_cosine: Option<f64>,
    total_s_1024: Option<f64>,
}

/// The chat's language model on a GPU beside llama.cpp (scripts/gpu/chat-gpu-bench.sh).
#[derive(Debug, Deserialize)]
struct ChatGpu {
    #[serde(flatten)]
    head: Head,
    reference: String,
    models: Vec<ChatGpuModel>,
}

#[derive(Debug, Deserialize)]
struct ChatGpuModel {
    model: String,
    prompt_tokens: Option<u32>,
    ours_first_token_ms: Option<f64>,
    ours_tokens_per_s: Option<f64>,
    reference_first_token_ms: Option<f64>,
    reference_tokens_per_s: Option<f64>,
}

/// Each weight format's output of one block against diffusers' (scripts/bench/block-accuracy.sh).
#[derive(Debug, Deserialize)]
struct BlockAccuracy {
    #[serde(flatten)]
    head: Head,
    reference: String,
    blocks: Vec<BlockReference>,
}

#[derive(Debug, Deserialize)]
struct BlockReference {
    block: String,
    size: u32,
    diffusers_bf16_vs_f32_cosine: f64,
    diffusers_bf16_vs_f32_max_rel: f64,
    formats: Vec<BlockFormat>,
}

#[derive(Debug, Deserialize)]
struct BlockFormat {
    weights: String,
    dtype: String,
    vs_diffusers_bf16_cosine: f64,
    vs_diffusers_f32_cosine: f64,
    vs_diffusers_f32_max_rel: f64,
}

/// Every record, oldest first.
pub struct Records {
    generation: Vec<Generation>,
    training: Vec<Training>,
    small_gpu: Vec<SmallGpu>,
    edit: Vec<Edit>,
    speed: Vec<Speed>,
    chat_gpu: Vec<ChatGpu>,
    block_accuracy: Vec<BlockAccuracy>,
}

impl Records {
    pub fn read(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "json"));
        let mut records = Records {
            generation: Vec::new(),
            training: Vec::new(),
            small_gpu: Vec::new(),
            edit: Vec::new(),
            speed: Vec::new(),
            chat_gpu: Vec::new(),
            block_accuracy: Vec::new(),
        };
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            let head: Head = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", file.display()))?;
            match head.what.as_str() {
                "generation" => records.generation.push(serde_json::from_str(&text)?),
                "lora-training" => records.training.push(serde_json::from_str(&text)?),
                "small-gpu" => records.small_gpu.push(serde_json::from_str(&text)?),
                "edit" => records.edit.push(serde_json::from_str(&text)?),
                "speed" => records.speed.push(serde_json::from_str(&text)?),
                "chat-gpu" => records.chat_gpu.push(serde_json::from_str(&text)?),
                "block-accuracy" => records.block_accuracy.push(serde_json::from_str(&text)?),
                other => bail!("{}: unknown record kind {other:?}", file.display()),
            }
        }
        records
            .generation
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        records
            .training
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        records
            .small_gpu
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        records
            .edit
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        records
            .speed
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        records
            .chat_gpu
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        records
            .block_accuracy
            .sort_by(|a, b| (&a.head.date, a.head.run).cmp(&(&b.head.date, b.head.run)));
        Ok(records)
    }

    /// The table called `name`, in markdown.
    pub fn table(&self, name: &str) -> Result<String> {
        match name {
            "generation" => self.generation_table(),
            "generation-history" => Ok(self.generation_history()),
            "kernels" => self.kernels_table(),
            "generation-batches" => Ok(self.batches_table()),
            "step-cache" => Ok(self.step_cache_table()),
            "lora-training" => self.training_table(),
            "lora-training-history" => Ok(self.training_history()),
            "weight-formats" => Ok(self.formats_table()),
            "gpu-memory" => Ok(self.gpu_memory_table()),
            "editing" => Ok(self.edit_table()),
            "speed" => Ok(self.speed_table()),
            "chat-gpu" => Ok(self.chat_gpu_table()),
            "block-accuracy" => Ok(self.block_accuracy_table()),
            _ => bail!("no table called {name:?}"),
        }
    }

    fn latest_generation(&self) -> Result<&Generation> {
        self.generation
            .last()
            .context("no generation record in bench/results")
    }

    fn generation_table(&self) -> Result<String> {
        let g = self.latest_generation()?;
        let mut t = String::new();
        t += &format!(
            "{}. Reproduce: `{}`.\n\n",
            source(&g.head, &g.reference),
            command(&g.head)
        );
        t += "|";
        for s in &g.sizes {
            t += &format!(" | ours {0}x{0} | diffusers {0}x{0}", s.size);
        }
        t += " |\n|---|";
        t += &"---|---|".repeat(g.sizes.len());
        t += "\n";
        let row = |name: &str, cell: &dyn Fn(&GenerationFigures, bool) -> String| {
            let mut r = format!("| {name} |");
            for s in &g.sizes {
                r += &format!(" {} | {} |", cell(&s.ours, true), cell(&s.reference, false));
            }
            r + "\n"
        };
        t += &row(
            "28-step generation, end to end (T5-XXL + CLIP, denoise, VAE decode)",
            &|f, _| secs(Some(f.total_s), 2),
        );
        t += &row("one transformer step", &|f, _| secs(f.step_s, 3));
        t += &row("achieved TFLOP/s in a step", &|f, _| {
            f.step_tflops.map(|x| format!("{x:.0}")).unwrap_or_default()
        });
        t += &row("VAE decode", &|f, _| secs(f.decode_s, 3));
        t += &row("peak GPU memory", &|f, ours| {
            if ours {
                f.peak_in_use_gib
                    .map(|x| format!("{x:.1} GiB in use (nvidia-smi)"))
                    .unwrap_or_default()
            } else {
                format!(
                    "{} GiB allocated, {} reserved (torch)",
                    f.peak_allocated_gib
                        .map(|x| format!("{x:.1}"))
                        .unwrap_or_default(),
                    f.peak_reserved_gib
                        .map(|x| format!("{x:.1}"))
                        .unwrap_or_default()
                )
            }
        });
        Ok(t)
    }

    fn generation_history(&self) -> String {
        let mut t = String::from(
            "| date | run | change | ours 1024x1024 | diffusers 1024x1024 | ours step | diffusers step | ours 512x512 | diffusers 512x512 |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for g in &self.generation {
            let at = |size| g.sizes.iter().find(|s| s.size == size);
            let (big, small) = (at(1024), at(512));
            t += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                g.head.date,
                g.head.run.map(|r| r.to_string()).unwrap_or_default(),
                g.head.change.as_deref().unwrap_or(""),
                secs(big.map(|s| s.ours.total_s), 2),
                secs(big.map(|s| s.reference.total_s), 2),
                secs(big.and_then(|s| s.ours.step_s), 3),
                secs(big.and_then(|s| s.reference.step_s), 3),
                secs(small.map(|s| s.ours.total_s), 2),
                secs(small.map(|s| s.reference.total_s), 2),
            );
        }
        t
    }

    fn kernels_table(&self) -> Result<String> {
        // A run that skipped the kernel tests (KERNEL_TESTS=true) leaves the last one that ran them.
        let g = self
            .generation
            .iter()
            .rev()
            .find(|g| !g.kernels.is_empty())
            .context("no generation record in bench/results has kernel figures")?;
        let mut t = format!(
            "{}: `engine/tests/gpu_kernels.rs`.\n\n",
            source(&g.head, "each kernel against the plain candle ops")
        );
        t += "| op | fused | plain candle ops | fused rel. L2 vs f32 | plain bf16 rel. L2 vs f32 |\n|---|---|---|---|---|\n";
        for k in &g.kernels {
            let rate = k
                .fused_tflops
                .map(|x| format!(" ({x:.0} TFLOP/s)"))
                .unwrap_or_default();
            t += &format!(
                "| {} | {:.3} ms{} | {:.3} ms | {:.1e} | {:.1e} |\n",
                k.op,
                k.fused_ms,
                rate,
                k.plain_ms,
                k.fused_rel_l2_vs_f32,
                k.plain_bf16_rel_l2_vs_f32
            );
        }
        Ok(t)
    }

    fn training_table(&self) -> Result<String> {
        // Each case from the newest record that measured both sides in the same call.
        let mut cases: Vec<(&Training, &TrainingCase)> = Vec::new();
        for key in [(512, false), (512, true), (1024, false), (1024, true)] {
            let found = self.training.iter().rev().find_map(|r| {
                r.cases
                    .iter()
                    .find(|c| (c.size, c.checkpointing) == key && c.reference.is_some())
                    .map(|c| (r, c))
            });
            if let Some(f) = found {
                cases.push(f);
            }
        }
        if cases.is_empty() {
            bail!("no LoRA training record with a reference in bench/results");
        }
        let mut t = String::new();
        let mut seen = Vec::new();
        for (r, _) in &cases {
            if !seen.contains(&r.head.run) {
                seen.push(r.head.run);
                t += &format!(
                    "- {}; reproduce: `{}`\n",
                    source(&r.head, &r.reference),
                    command(&r.head)
                );
            }
        }
        t += "\n| | ours | peft | run |\n|---|---|---|---|\n";
        for (r, c) in cases {
            let name = format!(
                "{0}x{0}, {1}",
                c.size,
                if c.checkpointing {
                    "checkpointing"
                } else {
                    "no checkpointing"
                }
            );
            let reference = c.reference.as_ref().expect("filtered above");
            let ours_mem = c
                .ours
                .peak_in_use_gib
                .map(|x| format!(", {x:.1} GiB in use"))
                .unwrap_or_default();
            let ref_mem = reference
                .peak_allocated_gib
                .map(|x| format!(", {x:.1} GiB allocated"))
                .unwrap_or_default();
            t += &format!(
                "| {name} step | **{:.3} s**{ours_mem} | {:.3} s{ref_mem} | {} |\n",
                c.ours.step_s,
                reference.step_s,
                r.head.run.map(|r| r.to_string()).unwrap_or_default()
            );
        }
        Ok(t)
    }
}

impl Records {
    /// Every training record that says what it changed, oldest first: one row each.
    fn training_history(&self) -> String {
        let mut t = String::from(
            "| run | change | 512x512 | 512x512, checkpointing | 1024x1024 | 1024x1024, checkpointing |\n|---|---|---|---|---|---|\n",
        );
        for r in self.training.iter().filter(|r| r.head.change.is_some()) {
            let cell = |size, ckpt| {
                r.cases
                    .iter()
                    .find(|c| (c.size, c.checkpointing) == (size, ckpt))
                    .map(|c| {
                        let mem = c
                            .ours
                            .peak_in_use_gib
                            .map(|m| format!(" ({m:.1} GiB)"))
                            .unwrap_or_default();
                        format!("{:.3} s{mem}", c.ours.step_s)
                    })
                    .unwrap_or_default()
            };
            t += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.head.run.map(|r| r.to_string()).unwrap_or_default(),
                r.head.change.as_deref().unwrap_or(""),
                cell(512, false),
                cell(512, true),
                cell(1024, false),
                cell(1024, true)
            );
        }
        t
    }
}

impl Records {
    /// Images per minute by images a request, from the newest generation record that measured them.
    fn batches_table(&self) -> String {
        let Some(g) = self.generation.iter().rev().find(|g| !g.batches.is_empty()) else {
            return "No GPU run has measured batches yet: `bash scripts/gpu/flux-parity-bench.sh` does \
                    (ours `flux-bench generate --batch N`, diffusers' `num_images_per_prompt`).\n"
                .into();
        };
        let mut t = format!(
            "{}. Reproduce: `{}`.\n\n",
            source(&g.head, &g.reference),
            command(&g.head)
        );
        t += "| images a request | ours | ours images/min | diffusers | diffusers images/min |\n|---|---|---|---|---|\n";
        let cells = |f: &Option<BatchFigures>, memory: &dyn Fn(&BatchFigures) -> Option<String>| {
            f.as_ref().map_or((String::new(), String::new()), |f| {
                let mem = memory(f).map(|m| format!(", {m}")).unwrap_or_default();
                (
                    format!("{:.2} s{mem}", f.total_s),
                    format!("{:.1}", f.images_per_minute),
                )
            })
        };
        for b in &g.batches {
            let (ours, ours_rate) = cells(&b.ours, &|f| {
                f.peak_in_use_gib.map(|x| format!("{x:.1} GiB in use"))
            });
            let (reference, reference_rate) = cells(&b.reference, &|f| {
                f.peak_allocated_gib
                    .map(|x| format!("{x:.1} GiB allocated"))
            });
            t += &format!(
                "| {} at {1}x{1} | {ours} | {ours_rate} | {reference} | {reference_rate} |\n",
                b.images, b.size
            );
        }
        t
    }

    /// The step cache's speed beside its error, from the newest generation record that measured it.
    fn step_cache_table(&self) -> String {
        let Some((g, c)) = self
            .generation
            .iter()
            .rev()
            .find_map(|g| g.step_cache.as_ref().map(|c| (g, c)))
        else {
            return "No GPU run has measured the step cache yet: `bash scripts/gpu/flux-parity-bench.sh` \
                    does (`flux-bench generate --step-cache T`).\n"
                .into();
        };
        format!(
            "{}. Reproduce: `{}`.\n\n\
             | {2}x{2}, {3} steps | end to end | steps skipped | largest pixel difference from the full run |\n\
             |---|---|---|---|\n\
             | full run | {4:.2} s | 0 | 0 |\n\
             | step cache {5} | {6:.2} s | {7} | {8:.3} |\n",
            source(&g.head, "ours"),
            command(&g.head),
            c.size,
            c.steps,
            c.full_total_s,
            c.threshold,
            c.cached_total_s,
            c.skipped_steps,
            c.image_error
        )
    }
}

impl Records {
    /// Each weight format's newest figures, one row a format (the run named in its row).
    fn formats_table(&self) -> String {
        let mut seen = Vec::new();
        let mut rows = String::new();
        for r in self.small_gpu.iter().rev() {
            for f in &r.formats {
                if seen.contains(&f.weights) {
                    continue;
                }
                seen.push(f.weights.clone());
                rows += &format!(
                    "| {} | {:.3} s | {:.4} | {:.4} | {} | {} | {} |\n",
                    f.weights,
                    f.step_s,
                    f.vs_diffusers_bf16_cosine,
                    f.vs_diffusers_f32_cosine,
                    secs(f.total_s_1024, 2),
                    f.generate_peak_in_use_gib
                        .map(|g| format!("{g:.1} GiB"))
                        .unwrap_or_default(),
                    run_name(&r.head),
                );
            }
        }
        // The reference and the command of the newest run that measured formats.
        let newest = self.small_gpu.iter().rev().find(|r| !r.formats.is_empty());
        if let Some((r, t)) = newest.and_then(|r| r.diffusers_bf16_1024_s.map(|t| (r, t))) {
            rows += &format!(
                "| {} bf16 (reference) | | 1 | | {t:.2} s | | {} |\n",
                r.reference,
                run_name(&r.head)
            );
        }
        if rows.is_empty() {
            return "No GPU run has measured the weight formats yet: `bash scripts/gpu/small-gpu-bench.sh` does.\n"
                .into();
        }
        format!(
            "FLUX.1-dev's shape with random weights, one step at 1024x1024 against diffusers' bf16 and f32 \
             outputs on the same inputs (cosine; diffusers' own bf16 against its f32 is the yardstick: random \
             weights make the network very sensitive), and a whole 1024x1024 28-step generation. \
             Reproduce: `{}`.\n\n\
             | weights | step | vs diffusers bf16 | vs diffusers f32 | 1024², end to end | peak in use | run |\n\
             |---|---|---|---|---|---|---|\n{rows}",
            newest.map_or("bash scripts/gpu/small-gpu-bench.sh", |r| command(&r.head))
        )
    }

    /// Each emulated card size's newest figures: our plan and time from the newest run that ran ours at
    /// that size, beside diffusers' configurations under the same cap from the newest run that ran
    /// theirs (the run column names both when they differ).
    fn gpu_memory_table(&self) -> String {
        let mut caps: Vec<u32> = self
            .small_gpu
            .iter()
            .flat_map(|r| r.caps.iter().map(|c| c.cap_gib))
            .collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        caps.dedup();
        let newest = |has: &dyn Fn(&CapFigures) -> bool, cap: u32| {
            self.small_gpu.iter().rev().find_map(|r| {
                r.caps
                    .iter()
                    .find(|c| c.cap_gib == cap && has(c))
                    .map(|c| (r, c))
            })
        };
        let mut rows = String::new();
        let mut used: Vec<&SmallGpu> = Vec::new();
        for cap in caps {
            let ours_run = newest(&|c| c.ours.is_some(), cap);
            let theirs_run = newest(&|c| !c.reference.is_empty(), cap);
            let ours = match ours_run.and_then(|(_, c)| c.ours.as_ref()) {
                Some(CapOurs { error: Some(e), .. }) => {
                    let e = e.trim_start_matches("Error: ");
                    (format!("did not finish: {e}"), String::new(), String::new())
                }
                Some(o) => (
                    o.plan.clone().unwrap_or_default(),
                    match o.encode_s {
                        Some(e) => format!(
                            "{} (encoding the prompt: {}; first run: {})",
                            secs(o.total_s, 2),
                            secs(Some(e), 2),
                            secs(o.first_total_s, 2)
                        ),
                        None => format!(
                            "{} (first, with the prompt's encoding: {})",
                            secs(o.total_s, 2),
                            secs(o.first_total_s, 2)
                        ),
                    },
                    o.peak_in_use_gib
                        .map(|g| format!("{g:.1} GiB"))
                        .unwrap_or_default(),
                ),
                None => Default::default(),
            };
            let theirs = theirs_run
                .map(|(_, c)| {
                    c.reference
                        .iter()
                        .map(|x| match (x.total_s, x.oom, &x.error) {
                            (Some(t), _, _) => format!(
                                "{}: {t:.2} s, {} GiB allocated",
                                x.how,
                                x.peak_allocated_gib
                                    .map_or("?".into(), |g| format!("{g:.1}"))
                            ),
                            (None, true, _) => format!("{}: out of memory", x.how),
                            (None, false, e) => {
                                format!("{}: failed ({})", x.how, e.as_deref().unwrap_or("?"))
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            let training_run = newest(&|c| !c.training.is_empty(), cap);
            let training = training_run
                .map(|(_, c)| {
                    c.training
                        .iter()
                        .map(|t| match (&t.error, t.step_s) {
                            (None, Some(s)) => format!(
                                "{0}x{0} on {1}: {s:.3} s ({2} GiB)",
                                t.size,
                                t.weights,
                                t.peak_in_use_gib.map_or("?".into(), |g| format!("{g:.1}"))
                            ),
                            (e, _) => format!(
                                "{0}x{0} on {1}: {2}",
                                t.size,
                                t.weights,
                                e.as_deref().unwrap_or("no result")
                            ),
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            let run = match (ours_run, theirs_run) {
                (Some((a, _)), Some((b, _))) if !std::ptr::eq(a, b) => format!(
                    "ours: {}; diffusers: {}",
                    run_name(&a.head),
                    run_name(&b.head)
                ),
                (Some((r, _)), _) | (None, Some((r, _))) => run_name(&r.head),
                (None, None) => String::new(),
            };
            for (r, _) in ours_run.into_iter().chain(theirs_run).chain(training_run) {
                if !used.iter().any(|u| std::ptr::eq(*u, r)) {
                    used.push(r);
                }
            }
            rows += &format!(
                "| {cap} GiB | {} | {} | {} | {theirs} | {training} | {run} |\n",
                ours.0, ours.1, ours.2
            );
        }
        if rows.is_empty() {
            return "No GPU run has measured card sizes yet: `bash scripts/gpu/small-gpu-bench.sh` does.\n"
                .into();
        }
        used.sort_by_key(|r| (r.head.date.clone(), r.head.run));
        let reference = used.last().map_or("", |r| r.reference.as_str());
        let commands = used
            .iter()
            .map(|r| format!("run {}: `{}`", r.head.run.unwrap_or(0), command(&r.head)))
            .collect::<Vec<_>>()
            .join("; ");
        format!(
            "Each card size emulated on the GPU machine: another process holds all its memory but the cap \
             before ours starts (so the plan sees the card's size), and diffusers ({reference}) gets the \
             same cap (`anchors_ref.py cap:N:HOW`). FLUX.1-dev's shape with random weights, 1024x1024, 28 \
             steps. Reproduce: {commands}.\n\n\
             LoRA training: rank 16 on the attention layers, gradient checkpointing, the base in the \
             card's format, peak in use beside the step.\n\n\
             | GPU memory | our plan | ours, end to end | our peak | diffusers under the same cap | LoRA training step | run |\n\
             |---|---|---|---|---|---|---|\n{rows}"
        )
    }

    /// Each format's block output against diffusers', from the newest block-accuracy record of each
    /// device (the CPU's products and a GPU's differ: fp8 on FP8 tensor cores rounds activations too).
    fn block_accuracy_table(&self) -> String {
        let mut newest: Vec<&BlockAccuracy> = Vec::new();
        for record in self.block_accuracy.iter().rev() {
            if !newest.iter().any(|n| n.head.gpu == record.head.gpu) {
                newest.push(record);
            }
        }
        if newest.is_empty() {
            return "No run has measured the formats per block yet: `bash scripts/bench/block-accuracy.sh` does.\n"
                .into();
        }
        let mut t = String::new();
        for b in newest.iter().rev() {
            t += &format!(
                "{}. Reproduce: `{}`.\n\n| block | weights (compute) | cosine vs diffusers bf16 | cosine vs diffusers f32 | max error vs f32 |\n|---|---|---|---|---|\n",
                source(&b.head, &b.reference),
                command(&b.head)
            );
            for block in &b.blocks {
                t += &format!(
                    "| {} ({}x{}) | diffusers bf16 (yardstick) | 1 | {:.6} | {:.2e} |\n",
                    block.block,
                    block.size,
                    block.size,
                    block.diffusers_bf16_vs_f32_cosine,
                    block.diffusers_bf16_vs_f32_max_rel
                );
                for f in &block.formats {
                    t += &format!(
                        "| {} | {} ({}) | {:.6} | {:.6} | {:.2e} |\n",
                        block.block,
                        f.weights,
                        f.dtype.to_lowercase(),
                        f.vs_diffusers_bf16_cosine,
                        f.vs_diffusers_f32_cosine,
                        f.vs_diffusers_f32_max_rel
                    );
                }
            }
            t += "\n";
        }
        t
    }

    /// The chat's model on a GPU beside llama.cpp, from the newest chat-gpu record.
    fn chat_gpu_table(&self) -> String {
        let Some(c) = self.chat_gpu.last() else {
            return "No GPU run has timed the chat's model yet: `bash scripts/gpu/chat-gpu-bench.sh` does.\n"
                .into();
        };
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
        let rate = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let mut t = format!(
            "{}. Reproduce: `{}`.\n\n| model (random weights, Q4_K) | prompt | first token, ours | first token, llama.cpp | tokens/s, ours | tokens/s, llama.cpp |\n|---|---|---|---|---|---|\n",
            source(&c.head, &c.reference),
            command(&c.head)
        );
        for m in &c.models {
            t += &format!(
                "| {} | {} tokens | {} | {} | {} | {} |\n",
                m.model,
                m.prompt_tokens.map_or("?".into(), |p| p.to_string()),
                ms(m.ours_first_token_ms),
                ms(m.reference_first_token_ms),
                rate(m.ours_tokens_per_s),
                rate(m.reference_tokens_per_s)
            );
        }
        t
    }

    /// Image-to-image and an instruction edit, from the newest edit record.
    fn edit_table(&self) -> String {
        let Some(e) = self.edit.last() else {
            return "No GPU run has timed editing yet: `bash scripts/gpu/edit-bench.sh` does.\n"
                .into();
        };
        let mut t = format!(
            "{}. Reproduce: `{}`.\n\n| {2}x{2}, {3} steps | ours | step | diffusers |\n|---|---|---|---|\n",
            source(&e.head, &e.reference),
            command(&e.head),
            e.size,
            e.steps
        );
        for c in &e.cases {
            let what = match (c.mode.as_str(), c.strength) {
                ("img2img", Some(s)) => format!("image-to-image, strength {s}"),
                ("kontext", _) => "instruction edit (Kontext)".to_string(),
                (m, _) => m.to_string(),
            };
            t += &format!(
                "| {what} | {} | {} | {} |\n",
                secs(c.ours_s, 2),
                secs(c.ours_step_s, 3),
                secs(c.reference_s, 2)
            );
        }
        t
    }
}

impl Records {
    /// torch.compile, a wide size and the Ampere path, from the newest speed record.
    fn speed_table(&self) -> String {
        let Some(s) = self.speed.last() else {
            return "No GPU run has measured these yet: `bash scripts/gpu/speed-bench.sh` does.\n"
                .into();
        };
        let mut t = format!(
            "{}. Reproduce: `{}`.\n\n| 28 steps, end to end | ours | our step | diffusers |\n|---|---|---|---|\n",
            source(&s.head, &s.reference),
            command(&s.head)
        );
        let c = &s.compile;
        t += &format!(
            "| 1024x1024, diffusers with torch.compile (its first call, compiling: {}) | {} | {} | {} |\n",
            secs(c.diffusers_first_call_s, 0),
            secs(c.ours_s, 2),
            secs(c.ours_step_s, 3),
            match (c.diffusers_compile_s, &c.error) {
                (None, Some(e)) => e.clone(),
                (t, _) => secs(t, 2),
            }
        );
        let w = &s.wide;
        if let (Some(width), Some(height)) = (w.width, w.height) {
            t += &format!(
                "| {width}x{height}, diffusers eager | {} | {} | {} |\n",
                secs(w.ours_s, 2),
                secs(w.ours_step_s, 3),
                secs(w.diffusers_s, 2)
            );
        }
        let a = &s.ampere;
        t += &format!(
            "| 1024x1024 on the Ampere path (`--ampere`: warp-MMA attention), cosine {} against diffusers' bf16 step | {} | {} | |\n",
            a.vs_diffusers_bf16_cosine
                .map_or(String::new(), |c| format!("{c:.4}")),
            secs(a.total_s_1024, 2),
            secs(a.step_s, 3)
        );
        t
    }
}

fn run_name(h: &Head) -> String {
    let run = h.run.map(|r| format!(" run {r}")).unwrap_or_default();
    format!("{} {}{run}", h.gpu, h.date)
}

fn secs(x: Option<f64>, digits: usize) -> String {
    x.map(|x| format!("{x:.digits$} s")).unwrap_or_default()
}

fn source(h: &Head, reference: &str) -> String {
    let run = h.run.map(|r| format!(", run {r}")).unwrap_or_default();
    format!("{} {}{run} ({reference}, same call)", h.gpu, h.date)
}

fn command(h: &Head) -> &str {
    h.command.as_deref().unwrap_or("see docs/performance.md")
}

/// Every marked table of `text` filled from the records.
pub fn fill(records: &Records, text: &str) -> Result<String> {
    const OPEN: &str = "<!-- bench-table ";
    const CLOSE: &str = "<!-- /bench-table -->";
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let head_end = start
            + rest[start..]
                .find("-->")
                .context("an unclosed bench-table marker")?
            + 3;
        let name = rest[start + OPEN.len()..head_end - 3].trim();
        let end = head_end
            + rest[head_end..]
                .find(CLOSE)
                .with_context(|| format!("no {CLOSE} after table {name}"))?;
        out += &rest[..head_end];
        out += "\n";
        out += &records.table(name)?;
        rest = &rest[end..];
    }
    out += rest;
    Ok(out)
}

/// The files (of `DOCS`, under `root`) whose tables are not what the records make.
pub fn stale(root: &Path) -> Result<Vec<String>> {
    let records = Records::read(&root.join("bench/results"))?;
    let mut out = Vec::new();
    for doc in DOCS {
        let text =
            std::fs::read_to_string(root.join(doc)).with_context(|| format!("reading {doc}"))?;
        if fill(&records, &text)? != text {
            out.push(doc.to_string());
        }
    }
    Ok(out)
}

/// Fills every table of `DOCS` under `root` from the records.
pub fn write(root: &Path) -> Result<()> {
    let records = Records::read(&root.join("bench/results"))?;
    for doc in DOCS {
        let path = root.join(doc);
        let text = std::fs::read_to_string(&path)?;
        let filled = fill(&records, &text)?;
        if filled != text {
            std::fs::write(&path, filled)?;
        }
    }
    Ok(())
}
