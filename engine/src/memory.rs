//! The memory plan: where each part of a model lives and in which weight format, chosen when the
//! model loads from the GPU memory it may use (the GPU's free memory, or the cap the user set), so
//! that the fastest arrangement that fits is the one that runs. Pure arithmetic on parameter counts
//! and image sizes: the pipeline gathers the inputs and applies the result.
//!
//! The weights' bytes are exact (parameter counts from the checkpoints' headers times
//! [`WeightFormat::bytes`]); the activations' are estimates, scaled from the one peak measured on the
//! GPU (docs/memory.md says which figures are still to be measured per part).

use crate::weights::WeightFormat;
use app::Precision;
use candle_core::quantized::GgmlDType;

const GIB: f64 = (1u64 << 30) as f64;

/// A part of a model that takes memory of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Transformer,
    /// T5-XXL's encoder (FLUX's token states).
    T5,
    /// CLIP-L's text model (FLUX's pooled vector).
    Clip,
    /// MiniLM (the built-in model's text encoder).
    MiniLm,
    /// The autoencoder.
    Vae,
}

impl Part {
    pub fn is_text_encoder(self) -> bool {
        matches!(self, Self::T5 | Self::Clip | Self::MiniLm)
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Transformer => "transformer",
            Self::T5 => "T5",
            Self::Clip => "CLIP",
            Self::MiniLm => "MiniLM",
            Self::Vae => "autoencoder",
        })
    }
}

/// Where a part lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the GPU all the time.
    Resident,
    /// On the GPU only while it runs, freed after (text encoders: loaded for a prompt not in the
    /// prompt cache, released once it is encoded).
    WhileRunning,
    /// In host memory, computed by the CPU: text encoders that cannot sit beside the transformer
    /// even for a moment. Slow for a new prompt; the prompt cache makes a new seed free.
    Cpu,
    /// Blocks kept in host memory ([`PartPlan::streamed`] bytes of them, page-locked) and each of their
    /// layers copied to the GPU when it runs. The transformer, when even its smallest format does not
    /// fit resident: some of its blocks, copied every step. T5, when it cannot sit beside the
    /// transformer even for a moment: all its weights, the blocks copied once per new prompt (the
    /// token embeddings are looked up on the host; CLIP, small, stays resident beside it). The copies
    /// cost time in proportion to those bytes and the PCIe link, far less than computing on the CPU.
    Streamed,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Resident => "resident",
            Self::WhileRunning => "on the GPU while it runs",
            Self::Cpu => "on the CPU",
            Self::Streamed => "streamed from host memory",
        })
    }
}

/// The shapes that set a model's activations.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationShape {
    /// The transformer's hidden size.
    pub hidden: usize,
    /// Pixels per latent cell along a side (the autoencoder's downscale, or the pixel-unshuffle factor).
    pub downscale: usize,
    /// Text tokens the transformer sees beside the image's.
    pub text_tokens: usize,
    /// Images per transformer call: 2 under classifier-free guidance (the prompt and the empty one).
    pub batch: usize,
    /// Image-sized token sequences in each transformer call: 2 for FLUX.1-Kontext (the noise's and
    /// the input image's tokens), else 1.
    pub image_sequences: usize,
    /// The autoencoder decoder's `block_out_channels` (diffusers' order), or none for a pixel model.
    pub vae_channels: Option<Vec<usize>>,
    /// Bytes of an activation element and of a weight kept in the compute dtype (2 for bf16, 4 for f32).
    pub compute_bytes: u64,
}

/// What the plan is chosen from: the model's parts with their parameter counts, and its shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMemory {
    pub parts: Vec<(Part, u64)>,
    pub shape: ActivationShape,
}

/// The transformer formats the plan tries, fastest first: bf16 is today's exact path; fp8 halves
/// the bytes at one rounding of each weight; the GGUF types trade accuracy for bytes below that.
pub const TRANSFORMER_FORMATS: [WeightFormat; 7] = [
    WeightFormat::Bf16,
    WeightFormat::Fp8,
    WeightFormat::Gguf(GgmlDType::Q8_0),
    WeightFormat::Gguf(GgmlDType::Q6K),
    WeightFormat::Gguf(GgmlDType::Q5K),
    WeightFormat::Gguf(GgmlDType::Q4K),
    WeightFormat::Gguf(GgmlDType::Q4_0),
];

/// The share of the budget the plan leaves unplanned: the allocator's fragmentation, cuBLAS's
/// workspace, the LoRAs' and the previews' small tensors.
pub const HEADROOM: f64 = 0.05;

/// Live activations of a transformer block, in units of (tokens × hidden) elements: the residual
/// stream, the fused QKV/MLP projection (7 hidden wide in a single-stream block), the attention
/// output, the MLP's activation and the concatenation before the output projection.
const TRANSFORMER_LIVE: u64 = 24;
/// Attention scores held at once where no fused attention kernel runs (`ops::attention`'s chunks).
const SCORES_CHUNK_BYTES: u64 = 256 << 20;
/// Live activations of the decoder, in units of its largest feature map: a resnet's input, its
/// normalised and convolved intermediates, the skip, the upsampled copy. Chosen so that the estimates
/// of FLUX.1-dev's bf16, all-resident arrangement meet its peaks measured at 1024x1024 and 512x512
/// (the test `the_estimate_of_todays_arrangement_meets_the_measured_peaks`).
const DECODER_LIVE: u64 = 5;
/// What every arrangement takes beyond weights and activations: cuBLAS's workspaces, the prompt's
/// states, the previews, the pool's rounding of each allocation.
pub const FIXED_OVERHEAD: u64 = 1 << 30;

/// Live memory of a LoRA training step with gradient checkpointing, in units of (tokens × hidden)
/// elements: every block's saved input, one block recomputed with what its backward keeps, the f32
/// gradients flowing back. With [`TRAINING_FIXED`], fitted over the peaks measured on an H100 at
/// 512x512 and 1024x1024 over bf16, fp8 and Q4_K bases (docs/memory.md, run 10): the estimate meets
/// the bf16 ones and is above the others by up to 0.7 GiB.
const TRAINING_LIVE: u64 = 176;
/// What a training step takes beyond its per-token memory: the adapters, their gradients and the
/// optimizer's moments (a few hundred MiB at rank 16), cuBLAS's workspaces, the CUDA context.
const TRAINING_FIXED: u64 = 3 << 29;

/// The share of the transformer's weights in its blocks, the part that can be streamed: FLUX.1's
/// embedders and final layer are well under 1% of it.
const BLOCK_SHARE: f64 = 0.98;
/// The largest linear layer of a transformer block in units of hidden²: a single-stream block's fused
/// QKV and MLP input projection (3 + 4 hidden wide). A streamed layer is on the GPU as stored and,
/// where its product dequantizes, once more in the compute dtype.
const LARGEST_LAYER: u64 = 7;
/// The linear weights of the largest block in units of hidden²: a double block's two streams, each
/// with its modulation (6), QKV (3), output (1) and MLP (4 + 4) layers. While a streamed block runs,
/// the next one is copied in beside it.
const LARGEST_BLOCK: u64 = 36;

/// What a streamed T5 adds while it encodes, as a share of its bytes: the block computing and the
/// next one copied in beside it (2 of its 24 blocks), the attention scores of all its heads in f32
/// and the token states around them (for T5-XXL over 512 tokens: 2 x 368 MiB of blocks and 64 MiB of
/// scores, under 1/10 of its 8.9 GiB).
const T5_STREAMING_SHARE: u64 = 10;

/// The tiles of a tiled decode, in pixels along a side, and how much neighbours overlap (diffusers'
/// AutoencoderKL default). Small tiles cost little: the decoder redoes only the overlaps, and a decode
/// is a small share of a generation's work.
pub const TILE_PIXELS: usize = 256;
pub const TILE_OVERLAP: f64 = 0.25;

/// One part's place in the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PartPlan {
    pub part: Part,
    pub placement: Placement,
    pub format: WeightFormat,
    pub params: u64,
    /// Its weights' bytes, on the GPU (or in host memory for [`Placement::Cpu`]).
    pub bytes: u64,
    /// Of those, the bytes kept in host memory and copied to the GPU at every step
    /// ([`Placement::Streamed`]; 0 for every other placement).
    pub streamed: u64,
}

/// How a request of one size runs under the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeFit {
    /// The whole decode does not fit: decode in overlapping tiles.
    pub tiled_decode: bool,
    /// The estimated GPU peak of the request.
    pub peak: u64,
}

/// Why a model or a request does not fit, and what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoFit(pub String);

/// Where each part lives, in which format, what it takes, and the sizes that fit.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The bytes the plan may use; `None`: no limit known (the CPU, with no cap set).
    pub budget: Option<u64>,
    pub parts: Vec<PartPlan>,
    /// The size the plan was chosen for (the preset's default) and its fit there.
    pub reference: (usize, usize),
    pub at_reference: SizeFit,
    /// The largest square image side that fits (up to [`MAX_SIDE`]).
    pub max_side: usize,
    shape: ActivationShape,
}

/// The largest side the plan looks for.
pub const MAX_SIDE: usize = 4096;

impl MemoryPlan {
    /// The fastest arrangement of `model` that fits `budget` at `reference` (width, height): text
    /// encoders on the GPU (resident, else while they run) with the fastest transformer format that
    /// allows it (or the `forced` one), else encoders on the CPU with the fastest format. When none
    /// fits at `reference`, the smallest arrangement, if a smaller image fits it. `size_multiple`:
    /// image sides are multiples of it.
    pub fn choose(
        model: &ModelMemory,
        budget: Option<u64>,
        reference: (usize, usize),
        size_multiple: usize,
        forced: Option<WeightFormat>,
    ) -> Result<MemoryPlan, NoFit> {
        let formats: Vec<WeightFormat> = match forced {
            Some(f) => vec![f],
            None => TRANSFORMER_FORMATS.to_vec(),
        };
        Self::choose_among(model, budget, reference, size_multiple, &formats)
    }

    /// [`Self::choose`] among `formats` only, fastest first: those the device can compute.
    pub fn choose_among(
        model: &ModelMemory,
        budget: Option<u64>,
        reference: (usize, usize),
        size_multiple: usize,
        formats: &[WeightFormat],
    ) -> Result<MemoryPlan, NoFit> {
        let has_text = model.parts.iter().any(|(p, _)| p.is_text_encoder());
        let has_t5 = model.parts.iter().any(|(p, _)| *p == Part::T5);
        // Text encoders on the CPU make every new prompt slow: any transformer format that keeps
        // them on the GPU comes first. Resident, else T5 streamed from page-locked host memory (a
        // new prompt copies its blocks over the link), else both loaded from disk for each new
        // prompt and freed after (no host memory kept, but a reload per prompt).
        let on_gpu: &[Placement] = match (has_text, has_t5) {
            (_, true) => &[
                Placement::Resident,
                Placement::Streamed,
                Placement::WhileRunning,
            ],
            (true, false) => &[Placement::Resident, Placement::WhileRunning],
            (false, false) => &[Placement::Resident],
        };
        let on_cpu: &[Placement] = if has_text { &[Placement::Cpu] } else { &[] };
        let mut smallest = None;
        for group in [on_gpu, on_cpu] {
            for &format in formats {
                for &text in group {
                    let plan =
                        Self::arrange(model, budget, reference, size_multiple, format, text, 0);
                    if plan.fit(reference.0, reference.1).is_ok() {
                        return Ok(plan);
                    }
                    smallest = Some(plan);
                }
            }
        }
        let Some(plan) = smallest else {
            return Err(NoFit("no transformer format to choose from".into()));
        };
        // Nothing resident fits: the fastest format whose blocks can be streamed in part, with T5
        // streamed too (else the text encoders on the CPU). fp8 first (half bf16's bytes to copy each
        // step), bf16 only when it is the one format allowed.
        let texts: &[Placement] = match (has_text, has_t5) {
            (_, true) => &[Placement::Streamed, Placement::Cpu],
            (true, false) => &[Placement::Cpu],
            (false, false) => &[Placement::Resident],
        };
        let streamable = formats
            .iter()
            .filter(|&&f| f != WeightFormat::Bf16 || formats.len() == 1);
        for &format in streamable {
            for &text in texts {
                if let Some(plan) =
                    Self::streaming(model, budget, reference, size_multiple, format, text)
                {
                    return Ok(plan);
                }
            }
        }
        if plan.max_side >= size_multiple {
            return Ok(plan);
        }
        let need = plan.fit_peak(size_multiple, size_multiple);
        Err(NoFit(format!(
            "the model does not fit in {} of GPU memory ({} after headroom): even its smallest arrangement ({}) needs {} for a {s}x{s} image. Raise --gpu-memory (STUDIO_GPU_MEMORY) if the GPU has more free memory, free the GPU of other programs, or use a GPU with more memory",
            gib(budget.unwrap_or(0)),
            gib(plan.usable().unwrap_or(0)),
            plan.arrangement(),
            gib(need),
            s = size_multiple,
        )))
    }

    /// The arrangement of `format` that streams the fewest of the transformer's bytes and fits at
    /// `reference`, if streaming can make it fit.
    fn streaming(
        model: &ModelMemory,
        budget: Option<u64>,
        reference: (usize, usize),
        size_multiple: usize,
        format: WeightFormat,
        text: Placement,
    ) -> Option<MemoryPlan> {
        let resident = Self::arrange(model, budget, reference, size_multiple, format, text, 0);
        let usable = resident.usable()?;
        let transformer = resident
            .parts
            .iter()
            .find(|p| p.part == Part::Transformer)?;
        let most = (transformer.bytes as f64 * BLOCK_SHARE) as u64;
        // Streaming adds two blocks' transient copies to a step's peak and takes its bytes off the
        // resident weights.
        let over = (resident.fit_peak(reference.0, reference.1) + resident.streaming_bytes())
            .checked_sub(usable)?;
        if over > most {
            return None;
        }
        // A few MiB over the estimate: the blocks are streamed whole, never a part of one.
        let streamed = (over + (64 << 20)).min(most);
        let plan = Self::arrange(
            model,
            budget,
            reference,
            size_multiple,
            format,
            text,
            streamed,
        );
        plan.fit(reference.0, reference.1).ok().map(|_| plan)
    }

    #[allow(clippy::too_many_arguments)]
    fn arrange(
        model: &ModelMemory,
        budget: Option<u64>,
        reference: (usize, usize),
        size_multiple: usize,
        format: WeightFormat,
        text: Placement,
        streamed: u64,
    ) -> MemoryPlan {
        let cb = model.shape.compute_bytes;
        let parts = model
            .parts
            .iter()
            .map(|&(part, params)| {
                let (placement, format) = match part {
                    Part::Transformer if streamed > 0 => (Placement::Streamed, format),
                    Part::Transformer => (Placement::Resident, format),
                    // Only T5 streams; CLIP (or MiniLM) beside a streamed T5 is small enough to stay.
                    p if p.is_text_encoder() && text == Placement::Streamed && p != Part::T5 => {
                        (Placement::Resident, WeightFormat::Bf16)
                    }
                    p if p.is_text_encoder() => (text, WeightFormat::Bf16),
                    _ => (Placement::Resident, WeightFormat::Bf16),
                };
                let bytes = match format {
                    // bf16 means the compute dtype (f32 on a CPU).
                    WeightFormat::Bf16 => params * cb,
                    f => f.bytes(params),
                };
                PartPlan {
                    part,
                    placement,
                    format,
                    params,
                    bytes,
                    streamed: match (placement, part) {
                        (Placement::Streamed, Part::Transformer) => streamed.min(bytes),
                        (Placement::Streamed, _) => bytes,
                        _ => 0,
                    },
                }
            })
            .collect();
        let mut plan = MemoryPlan {
            budget,
            parts,
            reference,
            at_reference: SizeFit {
                tiled_decode: false,
                peak: 0,
            },
            max_side: MAX_SIDE,
            shape: model.shape.clone(),
        };
        plan.at_reference = SizeFit {
            tiled_decode: plan.decode_is_tiled(reference.0, reference.1),
            peak: plan.fit_peak(reference.0, reference.1),
        };
        plan.max_side = plan.largest_side(size_multiple);
        plan
    }

    /// The bytes the plan may fill: the budget less [`HEADROOM`].
    pub fn usable(&self) -> Option<u64> {
        self.budget.map(|b| (b as f64 * (1.0 - HEADROOM)) as u64)
    }

    fn bytes_where(&self, f: impl Fn(&PartPlan) -> bool) -> u64 {
        self.parts.iter().filter(|p| f(p)).map(|p| p.bytes).sum()
    }

    /// Weights on the GPU at all times (a streamed transformer's blocks that are not streamed).
    pub fn resident_bytes(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| match p.placement {
                Placement::Resident => p.bytes,
                Placement::Streamed => p.bytes - p.streamed,
                Placement::WhileRunning | Placement::Cpu => 0,
            })
            .sum()
    }

    /// The transformer's bytes kept in host memory and copied to the GPU at every step (0 when it
    /// is resident). A step under classifier-free guidance runs the transformer once for both
    /// prompts, so this is also the bytes a step moves.
    pub fn streamed_bytes(&self) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.part == Part::Transformer)
            .map(|p| p.streamed)
            .sum()
    }

    /// Whether T5's blocks stay in host memory and are copied to the GPU for each new prompt.
    pub fn t5_streamed(&self) -> bool {
        self.streamed_t5().is_some()
    }

    fn streamed_t5(&self) -> Option<&PartPlan> {
        self.parts
            .iter()
            .find(|p| p.part == Part::T5 && p.placement == Placement::Streamed)
    }

    /// What streaming adds to a step while it runs: the block computing and the next one being
    /// copied in, as stored, and the largest layer once more in the compute dtype.
    fn streaming_bytes(&self) -> u64 {
        let h = self.shape.hidden as u64;
        let stored = |params: u64| match self.transformer_format() {
            WeightFormat::Bf16 => params * self.shape.compute_bytes,
            f => f.bytes(params),
        };
        2 * stored(LARGEST_BLOCK * h * h) + LARGEST_LAYER * h * h * self.shape.compute_bytes
    }

    /// Whether the text encoders leave the GPU once a prompt is encoded.
    pub fn text_encoders_leave(&self) -> bool {
        self.parts
            .iter()
            .any(|p| p.part.is_text_encoder() && p.placement == Placement::WhileRunning)
    }

    /// Whether the text encoders run on the CPU.
    pub fn text_encoders_on_cpu(&self) -> bool {
        self.parts
            .iter()
            .any(|p| p.part.is_text_encoder() && p.placement == Placement::Cpu)
    }

    /// The transformer's weight format.
    pub fn transformer_format(&self) -> WeightFormat {
        self.parts
            .iter()
            .find(|p| p.part == Part::Transformer)
            .map_or(WeightFormat::Bf16, |p| p.format)
    }

    /// The transformer's activations for one step at (width, height).
    fn denoise_activations(&self, width: usize, height: usize) -> u64 {
        let s = &self.shape;
        let cell = 2 * s.downscale;
        let tokens = s.image_sequences * (width / cell) * (height / cell) + s.text_tokens;
        let live = (s.batch * tokens * s.hidden) as u64 * s.compute_bytes * TRANSFORMER_LIVE;
        live + SCORES_CHUNK_BYTES
    }

    /// The decoder's activations for a whole (width, height) image: its largest feature map times
    /// [`DECODER_LIVE`], plus the mid block's attention scores.
    fn decode_activations(&self, width: usize, height: usize) -> u64 {
        let Some(channels) = &self.shape.vae_channels else {
            // Pixels: decoding is a reshape.
            return (3 * width * height) as u64 * 4;
        };
        let n = channels.len();
        let latent = (width / self.shape.downscale) * (height / self.shape.downscale);
        // Up block i runs at 2^i times the latent side with channels[n-1-i] and, but for the last,
        // upsamples once more before the next block.
        let largest = (0..n)
            .map(|i| {
                let scale = if i + 1 < n { i + 1 } else { i };
                channels[n - 1 - i] * latent * (1 << (2 * scale))
            })
            .max()
            .unwrap_or(0) as u64;
        let scores = ((latent * latent) as u64 * 4).min(SCORES_CHUNK_BYTES);
        largest * self.shape.compute_bytes * DECODER_LIVE + scores
    }

    /// The encoder's activations for a whole (width, height) image (an edit's input): its largest
    /// feature map times [`DECODER_LIVE`] (its resnets are the decoder's), plus the mid block's
    /// attention scores. Down block i runs at 2^-i times the image's side with channels[i].
    fn encode_activations(&self, width: usize, height: usize) -> u64 {
        let Some(channels) = &self.shape.vae_channels else {
            // Pixels: encoding is a reshape.
            return (3 * width * height) as u64 * 4;
        };
        let pixels = width * height;
        let largest = channels
            .iter()
            .enumerate()
            .map(|(i, c)| (c * pixels) >> (2 * i))
            .max()
            .unwrap_or(0) as u64;
        let latent = pixels / (self.shape.downscale * self.shape.downscale);
        let scores = ((latent * latent) as u64 * 4).min(SCORES_CHUNK_BYTES);
        largest * self.shape.compute_bytes * DECODER_LIVE + scores
    }

    fn decode_is_tiled(&self, width: usize, height: usize) -> bool {
        self.shape.vae_channels.is_some()
            && self.usable().is_some_and(|usable| {
                self.resident_bytes() + FIXED_OVERHEAD + self.decode_activations(width, height)
                    > usable
            })
    }

    /// The estimated GPU peak at (width, height): the larger of encoding (resident weights and the
    /// encoders that come in to run), one denoising step, and the decode (in tiles when whole does
    /// not fit).
    fn fit_peak(&self, width: usize, height: usize) -> u64 {
        self.fit_peak_with(width, height, 0)
    }

    /// [`Self::fit_peak`] with `copy` more bytes held while the transformer runs (an fp8 copy of it).
    fn fit_peak_with(&self, width: usize, height: usize, copy: u64) -> u64 {
        let resident = self.resident_bytes() + FIXED_OVERHEAD;
        let encode = resident
            + self.bytes_where(|p| p.placement == Placement::WhileRunning)
            + self
                .streamed_t5()
                .map_or(0, |t5| t5.bytes / T5_STREAMING_SHARE);
        let streaming = if self.streamed_bytes() > 0 {
            self.streaming_bytes()
        } else {
            0
        };
        let denoise = resident + self.denoise_activations(width, height) + streaming + copy;
        let decode = resident
            + if self.decode_is_tiled(width, height) {
                let side = TILE_PIXELS.min(width.max(height));
                self.decode_activations(side.min(width), side.min(height))
            } else {
                self.decode_activations(width, height)
            };
        encode.max(denoise).max(decode)
    }

    /// How a (width, height) request runs, or why it cannot and what to change.
    pub fn fit(&self, width: usize, height: usize) -> Result<SizeFit, NoFit> {
        self.fit_at(width, height, None)
    }

    /// [`Self::fit`] at `precision` (`None`: the weights as loaded), with the fp8 copy that
    /// [`Self::precision_copy`] says it makes.
    pub fn fit_at(
        &self,
        width: usize,
        height: usize,
        precision: Option<Precision>,
    ) -> Result<SizeFit, NoFit> {
        let copy = self.precision_copy(precision)?;
        let peak = self.fit_peak_with(width, height, copy);
        let fit = SizeFit {
            tiled_decode: self.decode_is_tiled(width, height),
            peak,
        };
        match self.usable() {
            Some(usable) if peak > usable && copy > 0 => Err(NoFit(format!(
                "fp8 precision on this bf16 transformer makes an fp8 copy of its layers ({}) for the run, and {width}x{height} then needs about {} of GPU memory where {} is available: load the model in fp8 (--weights fp8, STUDIO_WEIGHTS), where every request runs in fp8 without a copy, or leave precision out",
                gib(copy),
                gib(peak),
                gib(usable),
            ))),
            Some(usable) if peak > usable => Err(NoFit(format!(
                "{width}x{height} needs about {} of GPU memory under this model's memory plan ({}), and {} is available: choose a smaller size (up to {m}x{m} fits), or raise --gpu-memory (STUDIO_GPU_MEMORY) if the GPU has more free memory",
                gib(peak),
                self.arrangement(),
                gib(usable),
                m = self.max_side,
            ))),
            _ => Ok(fit),
        }
    }

    /// The bytes of the fp8 copy of the transformer that a generation at `precision` makes for its
    /// denoising (0 when it runs on the weights as loaded), or why this plan cannot run at it: exact
    /// needs a bf16 transformer; fp8 a bf16 one wholly on the GPU (the copy) or an fp8 one; a GGUF
    /// transformer runs only as it is.
    pub fn precision_copy(&self, precision: Option<Precision>) -> Result<u64, NoFit> {
        let Some(precision) = precision else {
            return Ok(0);
        };
        let Some(transformer) = self.parts.iter().find(|p| p.part == Part::Transformer) else {
            return Ok(0);
        };
        let format = transformer.format;
        match (precision, format) {
            (Precision::Exact, WeightFormat::Bf16) | (Precision::Fp8, WeightFormat::Fp8) => Ok(0),
            (Precision::Fp8, WeightFormat::Bf16) if transformer.streamed > 0 => Err(NoFit(format!(
                "fp8 precision on a bf16 transformer makes an fp8 copy of its layers for the run, and this model's memory plan streams part of it from host memory ({}): load the model in fp8 (--weights fp8, STUDIO_WEIGHTS), where every request runs in fp8, or leave precision out",
                self.arrangement()
            ))),
            (Precision::Fp8, WeightFormat::Bf16) => Ok(WeightFormat::Fp8.bytes(transformer.params)),
            (Precision::Exact, WeightFormat::Fp8) => Err(NoFit(format!(
                "exact precision needs the transformer in bf16, and this model is loaded with it in fp8 ({}): send \"precision\": \"fp8\" or leave precision out, or load the model in bf16 (--weights bf16, with --gpu-memory room for it)",
                self.arrangement()
            ))),
            (_, WeightFormat::Gguf(_)) => Err(NoFit(format!(
                "this model's transformer is loaded as {format} ({}), which runs only as it is: leave precision out, or load the model in bf16 or fp8 (--weights, STUDIO_WEIGHTS) to choose a precision per request",
                self.arrangement()
            ))),
        }
    }

    /// How many bytes of the transformer's blocks a LoRA training step at (width, height) streams
    /// from host memory: 0 when the step fits beside the plan's resident weights (the text encoders
    /// are freed before training), else enough whole blocks that it does, more than the plan itself
    /// streams. An error, with what to change, when even the whole transformer streamed leaves too
    /// little.
    pub fn training_streamed(&self, width: usize, height: usize) -> Result<u64, NoFit> {
        let Some(usable) = self.usable() else {
            return Ok(0);
        };
        let s = &self.shape;
        let cell = 2 * s.downscale;
        let tokens = ((width / cell) * (height / cell) + s.text_tokens) as u64;
        let step = TRAINING_LIVE * tokens * s.hidden as u64 * s.compute_bytes + TRAINING_FIXED;
        let weights: u64 = self
            .parts
            .iter()
            .filter(|p| !p.part.is_text_encoder())
            .map(|p| match p.placement {
                Placement::Resident => p.bytes,
                Placement::Streamed => p.bytes - p.streamed,
                Placement::WhileRunning | Placement::Cpu => 0,
            })
            .sum();
        let transformer = self.parts.iter().find(|p| p.part == Part::Transformer);
        let already = transformer.map_or(0, |t| t.streamed);
        let Some(over) = (weights + step).checked_sub(usable) else {
            return Ok(already);
        };
        // Streaming adds the blocks in flight (the placement rounds up to whole blocks).
        let streamed = already + over + self.streaming_bytes();
        let most = transformer.map_or(0, |t| (t.bytes as f64 * BLOCK_SHARE) as u64);
        if streamed > most {
            return Err(NoFit(format!(
                "training at {width}x{height} needs about {} of GPU memory beside the model's weights even with the transformer streamed from host memory, and {} is available: train at a lower resolution, or raise --gpu-memory (STUDIO_GPU_MEMORY) if the GPU has more free memory",
                gib(step),
                gib(usable),
            )));
        }
        Ok(streamed)
    }

    /// Whether an edit's input image of (width, height) is encoded in tiles: the autoencoder's encoder
    /// runs on the whole image beside the resident weights when that fits, else on tiles of
    /// [`TILE_PIXELS`] (`Ok(true)`); an error when not even a tile fits. The denoising and the decode
    /// are [`Self::fit`]'s.
    pub fn fit_edit(&self, width: usize, height: usize) -> Result<bool, NoFit> {
        let base = self.resident_bytes() + FIXED_OVERHEAD;
        let Some(usable) = self.usable() else {
            return Ok(false);
        };
        if base + self.encode_activations(width, height) <= usable {
            return Ok(false);
        }
        let tile = TILE_PIXELS.min(width.max(height));
        let need = base + self.encode_activations(tile.min(width), tile.min(height));
        if need > usable {
            return Err(NoFit(format!(
                "encoding the input image needs about {} of GPU memory even in tiles under this model's memory plan ({}), and {} is available: raise --gpu-memory (STUDIO_GPU_MEMORY) if the GPU has more free memory, or free the GPU of other programs",
                gib(need),
                self.arrangement(),
                gib(usable),
            )));
        }
        Ok(true)
    }

    fn largest_side(&self, multiple: usize) -> usize {
        let Some(usable) = self.usable() else {
            return MAX_SIDE;
        };
        let fits = |side: usize| self.fit_peak(side, side) <= usable;
        let (mut lo, mut hi) = (0, MAX_SIDE / multiple);
        // The peak grows with the side: the largest fitting multiple by bisection.
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid * multiple) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo * multiple
    }

    /// The parts in a few words: `transformer fp8 resident, T5 bf16 on the CPU, ...`.
    pub fn arrangement(&self) -> String {
        self.parts
            .iter()
            .map(|p| format!("{} {} {}", p.part, p.format, p.placement))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One line for the log and the UI.
    pub fn summary(&self) -> String {
        let parts = self
            .parts
            .iter()
            .map(|p| {
                let streamed = match (p.streamed, p.part) {
                    (0, _) => String::new(),
                    (n, Part::Transformer) => format!(" ({} of it streamed per step)", gib(n)),
                    (n, _) => format!(" ({} of it streamed per new prompt)", gib(n)),
                };
                format!(
                    "{} {} {} {}{streamed}",
                    p.part,
                    p.format,
                    p.placement,
                    gib(p.bytes)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let (w, h) = self.reference;
        let tiled = if self.at_reference.tiled_decode {
            ", tiled decode"
        } else {
            ""
        };
        match self.budget {
            Some(b) => format!(
                "{parts}; peak {} of {} at {w}x{h}{tiled}; up to {m}x{m}",
                gib(self.at_reference.peak),
                gib(b),
                m = self.max_side
            ),
            None => format!(
                "{parts}; peak {} at {w}x{h}; no memory limit",
                gib(self.at_reference.peak)
            ),
        }
    }
}

/// Bytes as GiB with one decimal (MiB below 1 GiB).
pub fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", bytes as f64 / GIB)
    }
}

/// `16G`, `16GiB`, `12000M`, `8g`: a memory size (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: f64 = digits
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| format!("{t:?} is not a memory size like 16G, 12GiB or 8000M"))?;
    Ok((n * (1u64 << shift) as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    // FLUX.1-dev's parts, counted from its checkpoints' headers (the sums of their tensors' shapes).
    const TRANSFORMER: u64 = 11_901_408_320;
    const T5_XXL_ENCODER: u64 = 4_762_310_656;
    const CLIP_L_TEXT: u64 = 123_060_480;
    const VAE: u64 = 83_819_683;

    fn flux_dev() -> ModelMemory {
        ModelMemory {
            parts: vec![
                (Part::Transformer, TRANSFORMER),
                (Part::T5, T5_XXL_ENCODER),
                (Part::Clip, CLIP_L_TEXT),
                (Part::Vae, VAE),
            ],
            shape: ActivationShape {
                hidden: 3072,
                downscale: 8,
                text_tokens: 512,
                batch: 1,
                image_sequences: 1,
                vae_channels: Some(vec![128, 256, 512, 512]),
                compute_bytes: 2,
            },
        }
    }

    fn plan(gib: u64) -> Result<MemoryPlan, NoFit> {
        MemoryPlan::choose(&flux_dev(), Some(gib << 30), (1024, 1024), 16, None)
    }

    fn placement(plan: &MemoryPlan, part: Part) -> Placement {
        plan.parts
            .iter()
            .find(|p| p.part == part)
            .unwrap()
            .placement
    }

    /// Exact runs on a bf16 transformer only; fp8 on an fp8 one as it is, or on a bf16 one wholly on
    /// the GPU with room for its fp8 copy; a GGUF one takes neither. Each refusal says what to change.
    #[test]
    fn a_precision_runs_where_the_transformer_can_take_it_and_is_refused_with_what_to_change() {
        let roomy = plan(80).unwrap();
        assert_eq!(roomy.transformer_format(), WeightFormat::Bf16);
        assert_eq!(roomy.precision_copy(None), Ok(0));
        assert_eq!(roomy.precision_copy(Some(Precision::Exact)), Ok(0));
        assert_eq!(roomy.precision_copy(Some(Precision::Fp8)), Ok(TRANSFORMER));
        let exact = roomy.fit_at(1024, 1024, Some(Precision::Exact)).unwrap();
        let fp8 = roomy.fit_at(1024, 1024, Some(Precision::Fp8)).unwrap();
        // The copy lives while the transformer runs: on top of the step's peak, not the encoders'.
        assert!(fp8.peak > exact.peak && fp8.peak <= exact.peak + TRANSFORMER);

        // bf16 fits 40 GiB, its fp8 copy beside it does not.
        let tight = plan(40).unwrap();
        assert_eq!(tight.transformer_format(), WeightFormat::Bf16);
        assert!(tight.fit_at(1024, 1024, Some(Precision::Exact)).is_ok());
        let refused = tight.fit_at(1024, 1024, Some(Precision::Fp8)).unwrap_err();
        assert!(refused.0.contains("--weights fp8"), "{refused}");

        let card = plan(24).unwrap();
        assert_eq!(card.transformer_format(), WeightFormat::Fp8);
        assert_eq!(card.precision_copy(Some(Precision::Fp8)), Ok(0));
        let refused = card.precision_copy(Some(Precision::Exact)).unwrap_err();
        assert!(
            refused.0.contains("needs the transformer in bf16"),
            "{refused}"
        );

        let streamed = MemoryPlan::choose(
            &flux_dev(),
            Some(24 << 30),
            (1024, 1024),
            16,
            Some(WeightFormat::Bf16),
        )
        .unwrap();
        assert!(streamed.streamed_bytes() > 0);
        let refused = streamed.precision_copy(Some(Precision::Fp8)).unwrap_err();
        assert!(refused.0.contains("streams part of it"), "{refused}");
        assert_eq!(streamed.precision_copy(Some(Precision::Exact)), Ok(0));

        let small = plan(12).unwrap();
        assert!(matches!(small.transformer_format(), WeightFormat::Gguf(_)));
        for precision in [Precision::Exact, Precision::Fp8] {
            let refused = small.precision_copy(Some(precision)).unwrap_err();
            assert!(refused.0.contains("runs only as it is"), "{refused}");
        }
        assert_eq!(small.precision_copy(None), Ok(0));
    }

    #[test]
    fn the_estimate_of_todays_arrangement_meets_the_measured_peaks() {
        // Everything bf16 and resident, as the studio ran before plans: 35.5 GiB at 1024x1024 and 34.3
        // at 512x512 in use by nvidia-smi's count (docs/performance.md), which includes the CUDA
        // context (about 0.5 GiB) that a budget read as free memory has already lost.
        let plan = MemoryPlan::choose(&flux_dev(), None, (1024, 1024), 16, None).unwrap();
        assert_eq!(plan.transformer_format(), WeightFormat::Bf16);
        assert!(plan
            .parts
            .iter()
            .all(|p| p.placement == Placement::Resident));
        for (side, measured) in [(1024, 35.5), (512, 34.3)] {
            let peak = plan.fit(side, side).unwrap().peak as f64 / GIB;
            assert!(
                (peak - (measured - 0.5)).abs() < 1.0,
                "{side}: estimated peak {peak:.2} GiB"
            );
        }
    }

    #[test]
    fn training_streams_more_of_the_transformer_only_where_its_step_does_not_fit() {
        // The measured cases (run 10, H100): 24 GiB trains 1024x1024 over its resident fp8
        // transformer, 16 GiB 512x512 but not 1024x1024 (16.5 GiB in use).
        let p24 = plan(24).unwrap();
        assert_eq!(p24.training_streamed(1024, 1024), Ok(0));
        let p16 = plan(16).unwrap();
        assert_eq!(p16.transformer_format(), WeightFormat::Fp8);
        assert_eq!(p16.training_streamed(512, 512), Ok(0));
        let streamed = p16.training_streamed(1024, 1024).unwrap();
        let transformer = p16
            .parts
            .iter()
            .find(|p| p.part == Part::Transformer)
            .unwrap()
            .bytes;
        assert!(
            streamed > 2 << 30 && streamed < transformer / 3,
            "16 GiB streams {} of {} to train at 1024x1024",
            gib(streamed),
            gib(transformer)
        );
        // 12 GiB: a 6-bit transformer (9.1 GiB) that streams a little to train at 512x512 and more
        // at 1024x1024.
        let p12 = plan(12).unwrap();
        let (small, large) = (
            p12.training_streamed(512, 512).unwrap(),
            p12.training_streamed(1024, 1024).unwrap(),
        );
        assert!(small < large, "{} then {}", gib(small), gib(large));
        // A plan that streams already keeps at least its own streaming.
        let p8 = plan(8).unwrap();
        assert!(p8.training_streamed(512, 512).unwrap() >= p8.streamed_bytes());
        // Unconstrained: nothing streams.
        let free = MemoryPlan::choose(&flux_dev(), None, (1024, 1024), 16, None).unwrap();
        assert_eq!(free.training_streamed(2048, 2048), Ok(0));
    }

    #[test]
    fn a_training_step_too_large_even_with_everything_streamed_is_refused_with_what_to_change() {
        let err = plan(8).unwrap().training_streamed(2048, 2048).unwrap_err();
        assert!(err.0.contains("training at 2048x2048"), "{err}");
        assert!(err.0.contains("lower resolution"), "{err}");
    }

    #[test]
    fn kontexts_input_tokens_raise_the_step_peak_and_lower_the_largest_side() {
        let mut kontext = flux_dev();
        kontext.shape.image_sequences = 2;
        let budget = Some(40 << 30);
        let dev = MemoryPlan::choose(&flux_dev(), budget, (1024, 1024), 16, None).unwrap();
        let edit = MemoryPlan::choose(&kontext, budget, (1024, 1024), 16, None).unwrap();
        // 4096 more tokens of 24 live hidden-wide activations in bf16.
        let more = edit.denoise_activations(1024, 1024) - dev.denoise_activations(1024, 1024);
        assert_eq!(more, 4096 * 3072 * 2 * TRANSFORMER_LIVE);
        assert!(
            edit.max_side < dev.max_side,
            "{} vs {}",
            edit.max_side,
            dev.max_side
        );
    }

    #[test]
    fn an_input_image_too_large_to_encode_whole_is_encoded_in_tiles() {
        assert_eq!(plan(80).unwrap().fit_edit(1024, 1024), Ok(false));
        // 24 GiB: the resident encoders leave no room for the whole encoder at 1024x1024.
        let plan = plan(24).unwrap();
        assert_eq!(plan.fit_edit(512, 512), Ok(false));
        assert_eq!(plan.fit_edit(1024, 1024), Ok(true));
        let err = MemoryPlan {
            budget: Some(21 << 30),
            ..plan
        }
        .fit_edit(1024, 1024)
        .unwrap_err()
        .to_string();
        assert!(err.contains("even in tiles"), "{err}");
    }

    #[test]
    fn an_unconstrained_gpu_keeps_everything_resident_in_bf16() {
        let plan = plan(80).unwrap();
        assert_eq!(plan.transformer_format(), WeightFormat::Bf16);
        assert!(plan
            .parts
            .iter()
            .all(|p| p.placement == Placement::Resident));
        assert!(!plan.at_reference.tiled_decode);
        assert!(plan.max_side >= 2048, "{}", plan.max_side);
    }

    #[test]
    fn a_24_gib_card_gets_an_fp8_transformer_beside_its_encoders_and_a_tiled_decode() {
        // bf16: 23.8 GB = 22.2 GiB of transformer alone, with T5's 8.9 GiB: over 24 GiB.
        assert!(
            WeightFormat::Bf16.bytes(TRANSFORMER) + WeightFormat::Bf16.bytes(T5_XXL_ENCODER)
                > 24 << 30
        );
        let plan = plan(24).unwrap();
        assert_eq!(plan.transformer_format(), WeightFormat::Fp8);
        // fp8 11.1 GiB + T5 8.9 GiB + CLIP and VAE 0.4 GiB stay; the whole decode's 4 GiB would not.
        assert_eq!(placement(&plan, Part::T5), Placement::Resident);
        assert_eq!(placement(&plan, Part::Clip), Placement::Resident);
        assert_eq!(placement(&plan, Part::Vae), Placement::Resident);
        assert!(plan.at_reference.tiled_decode);
        assert!(plan.fit(1024, 1024).is_ok());
    }

    #[test]
    fn a_23_gib_budget_streams_t5_and_decodes_whole() {
        // Resident T5 no longer fits beside the fp8 transformer: streaming its blocks for each new
        // prompt (a copy from page-locked memory) is chosen over loading it from disk each time.
        let plan = MemoryPlan::choose(&flux_dev(), Some(23 << 30), (1024, 1024), 16, None).unwrap();
        assert_eq!(plan.transformer_format(), WeightFormat::Fp8);
        assert_eq!(placement(&plan, Part::T5), Placement::Streamed);
        assert!(!plan.text_encoders_leave());
        assert!(!plan.at_reference.tiled_decode);
    }

    #[test]
    fn a_16_gib_card_gets_an_fp8_transformer_with_t5_streamed_beside_it() {
        let plan = plan(16).unwrap();
        assert_eq!(plan.transformer_format(), WeightFormat::Fp8);
        // Even 4-bit weights (6.2 GiB) and T5 (8.9 GiB) do not fit together in 16 GiB less headroom:
        // T5's blocks come from host memory for each new prompt, CLIP stays.
        assert!(
            WeightFormat::Gguf(GgmlDType::Q4_0).bytes(TRANSFORMER) + 2 * T5_XXL_ENCODER > 15 << 30
        );
        assert_eq!(placement(&plan, Part::T5), Placement::Streamed);
        assert_eq!(placement(&plan, Part::Clip), Placement::Resident);
        assert_eq!(placement(&plan, Part::Transformer), Placement::Resident);
        assert!(plan.t5_streamed() && !plan.text_encoders_on_cpu());
        assert_eq!(
            plan.streamed_bytes(),
            0,
            "no transformer bytes move per step"
        );
        assert!(
            plan.summary().contains("streamed per new prompt"),
            "{}",
            plan.summary()
        );
        assert!(plan.at_reference.peak <= plan.usable().unwrap());
    }

    #[test]
    fn a_model_without_t5_never_streams_its_text_encoder() {
        // A model without T5 (the built-in one reads prompts with MiniLM) has no streamed encoder.
        let mut minilm = flux_dev();
        minilm.parts.retain(|(p, _)| !p.is_text_encoder());
        minilm.parts.push((Part::MiniLm, 22_000_000));
        let plan = MemoryPlan::choose(&minilm, Some(6 << 30), (1024, 1024), 16, None).unwrap();
        assert_ne!(placement(&plan, Part::MiniLm), Placement::Streamed);
        assert!(!plan.t5_streamed());
    }

    #[test]
    fn a_12_gib_card_gets_a_6_bit_transformer_and_a_tiled_decode() {
        let plan = plan(12).unwrap();
        // Q8_0 (11.8 GiB) leaves nothing for a step.
        assert_eq!(
            plan.transformer_format(),
            WeightFormat::Gguf(GgmlDType::Q6K)
        );
        assert_eq!(placement(&plan, Part::T5), Placement::Streamed);
        assert!(plan.at_reference.tiled_decode);
        assert!(plan.fit(1024, 1024).is_ok());
    }

    #[test]
    fn a_10_gib_card_gets_a_4_bit_transformer() {
        let plan = plan(10).unwrap();
        assert_eq!(
            plan.transformer_format(),
            WeightFormat::Gguf(GgmlDType::Q4K)
        );
        assert!(plan.fit(1024, 1024).is_ok());
        let refused = plan.fit(2048, 2048).unwrap_err().to_string();
        assert!(refused.contains("--gpu-memory"), "{refused}");
        assert!(
            refused.contains(&format!("up to {0}x{0}", plan.max_side)),
            "{refused}"
        );
    }

    #[test]
    fn a_card_too_small_for_any_resident_format_streams_part_of_an_fp8_transformer() {
        // 8 GiB holds the 4-bit weights (6.2 GiB) but not them and a 1024x1024 step with the overhead:
        // fp8 blocks are streamed from host memory, as few as make it fit, and T5's too.
        let eight = plan(8).unwrap();
        assert_eq!(placement(&eight, Part::Transformer), Placement::Streamed);
        assert_eq!(eight.transformer_format(), WeightFormat::Fp8);
        assert_eq!(placement(&eight, Part::T5), Placement::Streamed);
        let transformer = WeightFormat::Fp8.bytes(TRANSFORMER);
        let streamed = eight.streamed_bytes();
        assert!(
            streamed > transformer / 4 && streamed < transformer,
            "{}",
            gib(streamed)
        );
        assert!(eight.fit(1024, 1024).is_ok());
        assert!(eight.at_reference.peak <= eight.usable().unwrap());
        assert!(
            eight.summary().contains("streamed per step"),
            "{}",
            eight.summary()
        );
        // More memory, fewer bytes to stream; a 4-bit format forced streams fewer still.
        let roomier =
            MemoryPlan::choose(&flux_dev(), Some(17 << 29), (1024, 1024), 16, None).unwrap();
        assert_eq!(placement(&roomier, Part::Transformer), Placement::Streamed);
        assert!(roomier.streamed_bytes() < streamed);
        let q4 = MemoryPlan::choose(
            &flux_dev(),
            Some(8 << 30),
            (1024, 1024),
            16,
            Some(WeightFormat::Gguf(GgmlDType::Q4_0)),
        )
        .unwrap();
        assert_eq!(placement(&q4, Part::Transformer), Placement::Streamed);
        assert!(q4.streamed_bytes() < streamed);
        // Streaming is the last resort: a card that holds a 4-bit transformer keeps it resident.
        assert_eq!(
            placement(&plan(10).unwrap(), Part::Transformer),
            Placement::Resident
        );
    }

    #[test]
    fn a_card_that_cannot_hold_one_step_beside_the_overhead_is_refused_with_the_reason() {
        let none = plan(2).unwrap_err().to_string();
        assert!(none.contains("smallest arrangement"), "{none}");
        assert!(none.contains("STUDIO_GPU_MEMORY"), "{none}");
    }

    #[test]
    fn a_forced_format_is_the_only_one_tried() {
        let plan = MemoryPlan::choose(
            &flux_dev(),
            Some(80 << 30),
            (1024, 1024),
            16,
            Some(WeightFormat::Fp8),
        )
        .unwrap();
        assert_eq!(plan.transformer_format(), WeightFormat::Fp8);
        assert_eq!(placement(&plan, Part::T5), Placement::Resident);
    }

    #[test]
    fn larger_images_need_more_and_the_largest_side_is_the_boundary() {
        let plan = plan(16).unwrap();
        let m = plan.max_side;
        assert!(plan.fit(m, m).is_ok());
        assert!(plan.fit(m + 16, m + 16).is_err());
        let whole =
            MemoryPlan::choose(&flux_dev(), Some(80 << 30), (1024, 1024), 16, None).unwrap();
        assert!(whole.fit(512, 512).unwrap().peak < whole.fit(1024, 1024).unwrap().peak);
    }

    #[test]
    fn memory_sizes_parse_with_binary_units() {
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("12000m"), Ok(12000 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
