//! The one linear layer type of every model the studio trains or adapts: a frozen base weight
//! plus any number of low-rank adapters, `y = W x + b + Σ sᵢ Bᵢ(Aᵢ x)`.
//! Generation swaps adapters per request on one resident base model and multiplies by a merged
//! weight `W + Σ sᵢ BᵢAᵢ` (one product instead of a rebuilt output per adapted layer), keeping the
//! original rows it replaced on the host to put back exactly. Training makes the adapters'
//! tensors `Var`s, which are applied unmerged, and leaves the base alone.
//!
//! The base weight may also be stored quantized ([`QuantizedWeight`]: fp8 with a per-tensor scale,
//! or GGUF blocks). Adapters on such a base are always applied unmerged: merging would requantize
//! the weight, losing the adapters' small updates in its rounding and the original bytes with them.

use crate::ops::{self, autodiff, Kernels};
use crate::weights::WeightFormat;
use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, TensorId};
use std::sync::{Arc, RwLock};

/// A low-rank update: `down` is (rank, in), `up` is (out, rank). `up` may cover only a slice of
/// the output rows (a LoRA trained on `to_q` placed on a fused `qkv` layer): `out_offset` says
/// where that slice starts.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
    pub out_offset: usize,
}

/// `down`'s and `up`'s ids, the scale's bits and the offset: see [`Adapter::key`].
type AdapterKey = (TensorId, TensorId, u64, usize);

impl Adapter {
    /// What a merge of this adapter depends on. Tensor ids are never reused and a tensor that is
    /// not a `Var` is not written in place, so equal keys mean an equal update: the same LoRA files
    /// placed again for the next generation find their merge still there.
    fn key(&self) -> AdapterKey {
        (
            self.down.id(),
            self.up.id(),
            self.scale.to_bits(),
            self.out_offset,
        )
    }

    /// `A` and `s·B` detached, in `dtype`: the product runs in the base's precision, as peft's under
    /// autocast, with the scale folded into the small `B`.
    fn factors(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((
            self.down.detach().to_dtype(dtype)?,
            (self.up.detach() * self.scale)?.to_dtype(dtype)?,
        ))
    }

    fn rows(&self) -> Result<std::ops::Range<usize>> {
        Ok(self.out_offset..self.out_offset + self.up.dim(0)?)
    }
}

/// The largest finite `float8_e4m3fn` value: an fp8 weight made from a wider one is scaled so that
/// its largest magnitude lands here, as torch's and ComfyUI's per-tensor fp8 quantization does.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// A base weight held in fewer bits than the compute dtype, (out, in) as a dense one.
#[derive(Clone, Debug)]
pub enum QuantizedWeight {
    /// `float8_e4m3fn` values; the weight is `weight · scale`.
    Fp8 { weight: Tensor, scale: f32 },
    /// GGUF blocks, multiplied by candle's quantized kernels (CUDA ones on a GPU).
    Gguf(Arc<QTensor>),
}

impl QuantizedWeight {
    /// `w` in `format`, or `None` for bf16 or when `w`'s rows do not split into the format's
    /// blocks (GGUF quantizes each row in blocks of 32 or 256 values).
    pub fn from_dense(w: &Tensor, format: WeightFormat) -> Result<Option<Self>> {
        match format {
            WeightFormat::Bf16 => Ok(None),
            WeightFormat::Fp8 => {
                // torch's and ComfyUI's per-tensor scale: the largest magnitude maps onto fp8's
                // largest value; the division is an exact f32 one, then fp8's nearest-even rounding.
                let w = w.to_dtype(DType::F32)?;
                let absmax = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let scale = if absmax > 0.0 {
                    absmax / FP8_E4M3_MAX
                } else {
                    1.0
                };
                let weight = ops::linear::fp8_quantize(&w, scale)?;
                Ok(Some(Self::Fp8 { weight, scale }))
            }
            WeightFormat::Gguf(dtype) => {
                if w.rank() != 2 || w.dim(1)? % dtype.block_size() != 0 {
                    return Ok(None);
                }
                // candle quantizes on the host (its CUDA storage does so too), then places the
                // blocks on the weight's device.
                let host = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                let q = quantize_rows_on_all_cores(&host, dtype, w.device())?;
                Ok(Some(Self::Gguf(Arc::new(q))))
            }
        }
    }

    pub fn format(&self) -> WeightFormat {
        match self {
            Self::Fp8 { .. } => WeightFormat::Fp8,
            Self::Gguf(q) => WeightFormat::Gguf(q.dtype()),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Fp8 { weight, .. } => weight.dims2(),
            Self::Gguf(q) => q.shape().dims2(),
        }
    }

    /// The same weight on `device` (itself when it is there already).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            Self::Fp8 { weight, scale } => Self::Fp8 {
                weight: weight.to_device(device)?,
                scale: *scale,
            },
            Self::Gguf(q) if q.device().same_device(device) => Self::Gguf(q.clone()),
            Self::Gguf(q) => {
                let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
                Self::Gguf(Arc::new(QTensor::new(storage, q.shape())?))
            }
        })
    }

    /// The bytes it takes.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Fp8 { weight, .. } => weight.elem_count(),
            Self::Gguf(q) => q.storage_size_in_bytes(),
        }
    }

    /// The weight in `dtype`: fp8 widened to `dtype` (exactly: every fp8 value is a bf16 one) and
    /// scaled there, as ComfyUI dequantizes scaled fp8; GGUF blocks dequantized by candle as
    /// llama.cpp does.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Fp8 { weight, scale } => ops::linear::fp8_dequantize(weight, *scale, dtype),
            Self::Gguf(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }
}

/// `host` (rows, cols) quantized to GGUF blocks of `dtype` on `device`. candle quantizes on one
/// thread, which takes minutes for a full-size transformer in the k-quants; blocks never cross a row,
/// so chunks of rows are quantized on every core and their bytes joined in row order are the whole
/// tensor's.
fn quantize_rows_on_all_cores(host: &Tensor, dtype: GgmlDType, device: &Device) -> Result<QTensor> {
    let rows = host.dim(0)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = rows.div_ceil(threads.clamp(1, rows.max(1)));
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows)
            .step_by(per.max(1))
            .map(|start| {
                let chunk = host.narrow(0, start, per.min(rows - start));
                scope.spawn(move || -> Result<Vec<u8>> {
                    // Storage of its own: candle's quantize reads the whole storage, not the view.
                    let chunk = chunk?;
                    let chunk = Tensor::from_vec(
                        chunk.flatten_all()?.to_vec1::<f32>()?,
                        chunk.shape(),
                        &Device::Cpu,
                    )?;
                    Ok(QTensor::quantize(&chunk, dtype)?.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a quantizing thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let storage = QStorage::from_data(std::borrow::Cow::Owned(parts.concat()), device, dtype)?;
    QTensor::new(storage, host.shape())
}

/// A frozen quantized base: `x Wᵀ + b` with `W` dequantized inside the product.
#[derive(Clone, Debug)]
struct QuantizedBase {
    weight: QuantizedWeight,
    bias: Option<Tensor>,
}

impl QuantizedBase {
    fn forward(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            QuantizedWeight::Fp8 { weight, scale } => {
                ops::linear::fp8_linear(kernels, weight, *scale, self.bias.as_ref(), x)
            }
            QuantizedWeight::Gguf(q) => ops::linear::gguf_linear(kernels, q, self.bias.as_ref(), x),
        }
    }
}

/// The weight a layer multiplies by: dense (mergeable, trainable) or quantized (frozen).
#[derive(Clone, Debug)]
enum Base {
    Dense(candle_nn::Linear),
    Quantized(QuantizedBase),
}

impl Base {
    fn dense(&self) -> Option<&candle_nn::Linear> {
        match self {
            Self::Dense(l) => Some(l),
            Self::Quantized(_) => None,
        }
    }

    fn is_variable(&self) -> bool {
        self.dense().is_some_and(|l| l.weight().is_variable())
    }

    fn forward(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => ops::linear::linear(kernels, l, x),
            Self::Quantized(q) => q.forward(kernels, x),
        }
    }

    /// Training's product: `x · dequant(W)ᵀ + b` exactly, so that the backward pass's
    /// `dy · dequant(W)` is the gradient of what the forward computed. (GGUF's quantized kernels
    /// also round the input to 8 bits per block, a different function than the one differentiated.)
    fn forward_exact(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => ops::linear::linear(kernels, l, x),
            Self::Quantized(q) => {
                let w = q.weight.dequantize(x.dtype())?;
                ops::linear::linear(kernels, &candle_nn::Linear::new(w, q.bias.clone()), x)
            }
        }
    }

    /// The weight in `dtype`, for the input's gradient `dy W`.
    fn weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.weight().to_dtype(dtype),
            Self::Quantized(q) => q.weight.dequantize(dtype),
        }
    }

    /// The same weight and bias on `device`.
    fn to_device(&self, device: &Device) -> Result<Base> {
        self.to_devices(device, device)
    }

    /// The same weight on `weight`'s device and bias on `bias`'s.
    fn to_devices(&self, weight: &Device, bias: &Device) -> Result<Base> {
        let bias = |b: Option<&Tensor>| b.map(|b| b.to_device(bias)).transpose();
        Ok(match self {
            Self::Dense(l) => Self::Dense(candle_nn::Linear::new(
                l.weight().to_device(weight)?,
                bias(l.bias())?,
            )),
            Self::Quantized(q) => Self::Quantized(QuantizedBase {
                weight: q.weight.to_device(weight)?,
                bias: bias(q.bias.as_ref())?,
            }),
        })
    }

    /// The same base with its weight copied from `pinned` (its page-locked host memory) to the GPU
    /// on the copy stream; the bias is already there (a streamed layer keeps it resident).
    #[cfg(feature = "cuda")]
    fn upload(
        &self,
        pinned: &crate::kernels::pinned::PinnedHost,
    ) -> Result<(Base, crate::kernels::pinned::Upload)> {
        Ok(match self {
            Self::Dense(l) => {
                let (weight, upload) = pinned.upload_tensor(l.weight())?;
                let base = candle_nn::Linear::new(weight, l.bias().cloned());
                (Self::Dense(base), upload)
            }
            Self::Quantized(q) => {
                let (weight, upload) = match &q.weight {
                    QuantizedWeight::Fp8 { weight, scale } => {
                        let (weight, upload) = pinned.upload_tensor(weight)?;
                        let scale = *scale;
                        (QuantizedWeight::Fp8 { weight, scale }, upload)
                    }
                    QuantizedWeight::Gguf(blocks) => {
                        let (blocks, upload) = pinned.upload_blocks(blocks)?;
                        (QuantizedWeight::Gguf(Arc::new(blocks)), upload)
                    }
                };
                let bias = q.bias.clone();
                (Self::Quantized(QuantizedBase { weight, bias }), upload)
            }
        })
    }

    /// Its weight's host memory page-locked for copies to `device` (the bias is too small to matter).
    #[cfg(feature = "cuda")]
    fn pin(&self, device: &candle_core::CudaDevice) -> Result<crate::kernels::pinned::PinnedHost> {
        use crate::kernels::pinned::PinnedHost;
        match self {
            Self::Dense(l) => PinnedHost::tensor(l.weight(), device),
            Self::Quantized(QuantizedBase {
                weight: QuantizedWeight::Fp8 { weight, .. },
                ..
            }) => PinnedHost::tensor(weight, device),
            Self::Quantized(QuantizedBase {
                weight: QuantizedWeight::Gguf(blocks),
                ..
            }) => PinnedHost::blocks(blocks, device),
        }
    }

    /// The bytes its weight and bias take.
    fn bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Dense(l) => tensor(l.weight()) + l.bias().map_or(0, tensor),
            Self::Quantized(q) => q.weight.bytes() + q.bias.as_ref().map_or(0, tensor),
        }
    }
}

/// Rows of a weight merged at a time: bounds the f32 temporaries of a merge to a few MB per
/// chunk (a whole fused FLUX layer in f32 would be 264 MB of GPU memory at once).
const MERGE_CHUNK_ROWS: usize = 1024;

#[derive(Debug)]
pub struct Linear {
    name: String,
    in_features: usize,
    out_features: usize,
    state: RwLock<State>,
    /// The path of its products ([`ops::linear`]).
    kernels: Kernels,
}

/// The weight a forward multiplies by and the adapters set on the layer, changed together under
/// one lock.
#[derive(Debug)]
struct State {
    /// The original weight and bias, or while `merged` is set the weight with those adapters added.
    /// Only one of the two weights is on the device at a time. A quantized base is never merged.
    base: Base,
    adapters: Vec<Arc<Adapter>>,
    merged: Option<Merged>,
    /// Set when the base lives in host memory and is copied to this device for each product
    /// ([`Linear::place`]): a streamed layer. Its adapters stay unmerged.
    compute: Option<Device>,
    /// A streamed base's host memory, page-locked for fast copies while it is streamed.
    #[cfg(feature = "cuda")]
    pinned: Option<crate::kernels::pinned::PinnedHost>,
    /// A streamed base's next copy on the GPU, started ahead of the forward that takes it
    /// ([`Linear::prefetch`]).
    #[cfg(feature = "cuda")]
    prefetched: std::sync::Mutex<Option<Prefetched>>,
    /// Whether generations multiply by an fp8 copy of the dense base ([`Linear::set_fp8_products`]).
    fp8: Fp8Products,
}

/// A dense layer's fp8 products: off, or on with the copy of the weight they use once made.
#[derive(Debug, Default)]
enum Fp8Products {
    #[default]
    Off,
    /// `None` until the next forward makes the copy (again after the weight is merged or restored).
    On(Option<QuantizedWeight>),
}

/// A streamed base on its way to the GPU. The upload drops first: a copy never used is waited for
/// before its memory is freed.
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct Prefetched {
    upload: crate::kernels::pinned::Upload,
    base: Base,
}

#[derive(Debug)]
struct Merged {
    /// The [`Adapter::key`]s of the adapters in the weight, in order.
    keys: Vec<AdapterKey>,
    /// The original weight's rows that the merge replaced, on the host: (first row, rows).
    original: Vec<(usize, Tensor)>,
}

impl Linear {
    pub fn new(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        kernels: Kernels,
    ) -> Self {
        Self {
            name: name.into(),
            in_features: weight.dim(1).unwrap_or(0),
            out_features: weight.dim(0).unwrap_or(0),
            state: RwLock::new(State {
                base: Base::Dense(candle_nn::Linear::new(weight, bias)),
                adapters: Vec::new(),
                merged: None,
                compute: None,
                #[cfg(feature = "cuda")]
                pinned: None,
                #[cfg(feature = "cuda")]
                prefetched: Default::default(),
                fp8: Fp8Products::Off,
            }),
            kernels,
        }
    }

    /// A frozen layer whose weight is stored quantized; the bias stays dense.
    pub fn quantized(
        name: impl Into<String>,
        weight: QuantizedWeight,
        bias: Option<Tensor>,
        kernels: Kernels,
    ) -> Result<Self> {
        let (out_features, in_features) = weight.dims()?;
        Ok(Self {
            name: name.into(),
            in_features,
            out_features,
            state: RwLock::new(State {
                base: Base::Quantized(QuantizedBase { weight, bias }),
                adapters: Vec::new(),
                merged: None,
                compute: None,
                #[cfg(feature = "cuda")]
                pinned: None,
                #[cfg(feature = "cuda")]
                prefetched: Default::default(),
                fp8: Fp8Products::Off,
            }),
            kernels,
        })
    }

    /// The base weight in `dtype`, dequantized if it is held quantized (the adapters' merge, if
    /// any, included): what the layer's products multiply by, on the device they run on.
    pub fn base_weight(&self, dtype: DType) -> Result<Tensor> {
        self.state
            .read()
            .expect("adapter lock poisoned")
            .working_base()?
            .weight(dtype)
    }

    /// Where the base weight lives: on `device` for good, or (`streamed`) in host memory, copied to
    /// `device` for each product and dropped after it, so that a model larger than the GPU's memory
    /// runs with only its resident layers and the streamed layers of a block or two there
    /// (docs/memory.md). A streamed layer's bias stays on `device`. A weight being trained is not
    /// streamed; adapters merged into a layer about to stream are taken out first (a streamed layer
    /// applies them unmerged).
    pub fn place(&self, device: &Device, streamed: bool) -> Result<()> {
        let mut state = self.state.write().expect("adapter lock poisoned");
        // Already streamed to this device: its host memory stays locked as it is (locking gigabytes
        // again takes seconds), as when a training run streams more of a partly streamed model.
        if streamed
            && state
                .compute
                .as_ref()
                .is_some_and(|d| d.same_device(device))
        {
            return Ok(());
        }
        if streamed && state.base.is_variable() {
            candle_core::bail!("layer {}: only a frozen weight is streamed", self.name);
        }
        if streamed {
            state.restore()?;
        }
        let home = if streamed {
            Device::Cpu
        } else {
            device.clone()
        };
        #[cfg(feature = "cuda")]
        {
            // A copy still reading the locked memory finishes before the pages are unlocked.
            let prefetched = state.prefetched.get_mut().expect("prefetch lock poisoned");
            if let Some(p) = prefetched.take() {
                p.upload.finish()?;
            }
            state.pinned = None;
        }
        state.base = state.base.to_devices(&home, device)?;
        state.compute = streamed.then(|| device.clone());
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(cuda)) = (streamed, device) {
            // Pageable memory still streams, at the staged rate: a slower step, not a failure.
            match state.base.pin(cuda) {
                Ok(pinned) => state.pinned = Some(pinned),
                Err(e) => tracing::warn!("layer {}: streamed from pageable memory: {e}", self.name),
            }
        }
        Ok(())
    }

    /// Starts copying a streamed base to the GPU ahead of its next forward, on the device's copy
    /// stream, so that the copy runs while the GPU computes what comes before: a model calls it for
    /// the next block's layers as a block starts. Nothing to do for a resident layer, one whose copy
    /// is already under way, or one in pageable memory (copied as it runs).
    pub fn prefetch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            let state = self.state.read().expect("adapter lock poisoned");
            let (Some(Device::Cuda(_)), Some(pinned)) = (&state.compute, &state.pinned) else {
                return Ok(());
            };
            let mut slot = state.prefetched.lock().expect("prefetch lock poisoned");
            if slot.is_none() {
                let (base, upload) = state.base.upload(pinned)?;
                *slot = Some(Prefetched { upload, base });
            }
        }
        Ok(())
    }

    /// Whether the base weight is streamed from host memory ([`Self::place`]).
    pub fn is_streamed(&self) -> bool {
        self.state
            .read()
            .expect("adapter lock poisoned")
            .compute
            .is_some()
    }

    /// Whether a streamed base's host memory is page-locked (copied at the link's DMA rate).
    #[cfg(feature = "cuda")]
    pub fn is_page_locked(&self) -> bool {
        self.state
            .read()
            .expect("adapter lock poisoned")
            .pinned
            .is_some()
    }

    /// The bytes its base weight and bias take, in the format they are held in.
    pub fn bytes(&self) -> usize {
        self.state
            .read()
            .expect("adapter lock poisoned")
            .base
            .bytes()
    }

    /// The format the base weight is held in: bf16 (the compute dtype) for a dense one.
    pub fn format(&self) -> WeightFormat {
        match &self.state.read().expect("adapter lock poisoned").base {
            Base::Dense(_) => WeightFormat::Bf16,
            Base::Quantized(q) => q.weight.format(),
        }
    }

    /// The checkpoint name of this layer (BFL layout for FLUX), which LoRA keys are mapped to.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Sets exactly these adapters. The weight follows at the next forward: merged with them, or
    /// the original again.
    pub fn set_adapters(&self, adapters: Vec<Arc<Adapter>>) {
        self.state.write().expect("adapter lock poisoned").adapters = adapters;
    }

    pub fn clear_adapters(&self) {
        self.set_adapters(Vec::new());
    }

    /// Multiplies by an fp8 copy of the dense weight (`on`): made at the next forward from the weight
    /// as products use it (adapters merged in) with torch's per-tensor scale, as an fp8 checkpoint made
    /// from it would hold, and made again when the weight changes. `false` drops the copy: products take
    /// the weight itself again. A quantized, streamed or trained weight, and a forward that takes a
    /// gradient, keep their own product.
    pub fn set_fp8_products(&self, on: bool) {
        let mut state = self.state.write().expect("adapter lock poisoned");
        state.fp8 = match (on, std::mem::take(&mut state.fp8)) {
            (false, _) => Fp8Products::Off,
            (true, Fp8Products::On(copy)) => Fp8Products::On(copy),
            (true, Fp8Products::Off) => Fp8Products::On(None),
        };
    }

    /// The ids of the adapters' factors, `down` and `up` of each.
    pub fn adapter_ids(&self) -> Vec<TensorId> {
        let state = self.state.read().expect("adapter lock poisoned");
        state
            .adapters
            .iter()
            .flat_map(|a| [a.down.id(), a.up.id()])
            .collect()
    }

    /// Whether the base weight itself is trained (a full fine-tune's variable).
    pub fn trains_weight(&self) -> bool {
        self.state
            .read()
            .expect("adapter lock poisoned")
            .base
            .is_variable()
    }

    pub fn adapter_count(&self) -> usize {
        self.state
            .read()
            .expect("adapter lock poisoned")
            .adapters
            .len()
    }

    /// The weight to multiply `x` by (on the device it runs on) and the adapters left to apply
    /// unmerged, the weight first merged or restored if this forward needs the other one.
    fn prepare(&self, x: &Tensor) -> Result<(Base, Vec<Arc<Adapter>>)> {
        let ready = self.state.read().expect("adapter lock poisoned").ready(x);
        let (base, adapters) = match ready {
            Some(ready) => ready,
            None => self
                .state
                .write()
                .expect("adapter lock poisoned")
                .prepare(x)?,
        };
        let state = self.state.read().expect("adapter lock poisoned");
        match &state.compute {
            Some(device) => Ok((state.streamed_in(device)?, adapters)),
            // Exact products decided here, under the lock already held: `fp8_base` would take it again.
            None if matches!(state.fp8, Fp8Products::Off) => Ok((base, adapters)),
            None => {
                drop(state);
                Ok((self.fp8_base(base, x)?, adapters))
            }
        }
    }

    /// A resident dense `base` as a forward of `x` multiplies by it: its fp8 copy while fp8 products
    /// are on (made here the first time), else itself.
    fn fp8_base(&self, base: Base, x: &Tensor) -> Result<Base> {
        let Base::Dense(dense) = &base else {
            return Ok(base);
        };
        if x.track_op() || dense.weight().is_variable() {
            return Ok(base);
        }
        let quantized = |weight: QuantizedWeight| {
            Base::Quantized(QuantizedBase {
                weight,
                bias: dense.bias().cloned(),
            })
        };
        match &self.state.read().expect("adapter lock poisoned").fp8 {
            Fp8Products::Off => return Ok(base),
            Fp8Products::On(Some(copy)) => return Ok(quantized(copy.clone())),
            Fp8Products::On(None) => {}
        }
        let mut state = self.state.write().expect("adapter lock poisoned");
        let Fp8Products::On(copy) = &mut state.fp8 else {
            return Ok(base);
        };
        let made = match copy {
            Some(made) => made.clone(),
            None => {
                let made = QuantizedWeight::from_dense(dense.weight(), WeightFormat::Fp8)?
                    .ok_or_else(|| candle_core::Error::Msg("fp8 takes every weight".into()))?;
                *copy = Some(made.clone());
                made
            }
        };
        Ok(quantized(made))
    }
}

impl State {
    /// The base as products use it: copied to the compute device when it is streamed.
    fn working_base(&self) -> Result<Base> {
        match &self.compute {
            Some(device) => self.streamed_in(device),
            None => Ok(self.base.clone()),
        }
    }

    /// A streamed base on `device` for the next product: its prefetched copy, else one made now.
    /// From page-locked memory the compute stream waits for the copy stream rather than the host
    /// for the copy (a plain copy to the GPU stops the host until the GPU has caught up).
    fn streamed_in(&self, device: &Device) -> Result<Base> {
        #[cfg(feature = "cuda")]
        if let Some(pinned) = &self.pinned {
            let prefetched = self
                .prefetched
                .lock()
                .expect("prefetch lock poisoned")
                .take();
            let Prefetched { upload, base } = match prefetched {
                Some(p) => p,
                None => {
                    let (base, upload) = self.base.upload(pinned)?;
                    Prefetched { upload, base }
                }
            };
            upload.join()?;
            return Ok(base);
        }
        self.base.to_device(device)
    }

    /// Whether a forward of `x` uses the adapters merged: when nothing takes a gradient. A training
    /// step's adapters are `Var`s (unmerged); its samples use detached copies, merged like a
    /// generation's. A quantized or streamed base keeps its adapters unmerged.
    fn merges_for(&self, x: &Tensor) -> bool {
        !self.adapters.is_empty()
            && !x.track_op()
            && self.compute.is_none()
            && self.base.dense().is_some_and(|l| !l.weight().is_variable())
            && self
                .adapters
                .iter()
                .all(|a| !a.down.is_variable() && !a.up.is_variable())
    }

    /// What [`Self::prepare`] returns, if the weight is already the one a forward of `x` needs.
    fn ready(&self, x: &Tensor) -> Option<(Base, Vec<Arc<Adapter>>)> {
        let merges = self.merges_for(x);
        match &self.merged {
            None if !merges => Some((self.base.clone(), self.adapters.clone())),
            Some(m)
                if merges
                    && m.keys
                        .iter()
                        .copied()
                        .eq(self.adapters.iter().map(|a| a.key())) =>
            {
                Some((self.base.clone(), Vec::new()))
            }
            _ => None,
        }
    }

    /// Makes the weight the one a forward of `x` needs: the original when the adapters are applied
    /// unmerged (or there are none), these adapters merged otherwise, a merge for other adapters
    /// undone first. Only forwards read the weight, so it changes here rather than when the
    /// adapters are set: the server clears them after each generation and places the same files
    /// again for the next, which then finds its merge in place.
    fn prepare(&mut self, x: &Tensor) -> Result<(Base, Vec<Arc<Adapter>>)> {
        // Another forward may have prepared it while this one waited for the lock.
        if let Some(ready) = self.ready(x) {
            return Ok(ready);
        }
        self.restore()?;
        if !self.merges_for(x) {
            return Ok((self.base.clone(), self.adapters.clone()));
        }
        self.merge()?;
        Ok((self.base.clone(), Vec::new()))
    }

    /// Puts the original rows back: the weight is the original's bytes again. Nothing changes on error.
    fn restore(&mut self) -> Result<()> {
        let (Some(merged), Base::Dense(base)) = (&self.merged, &self.base) else {
            return Ok(());
        };
        let w = base.weight();
        let rows = merged
            .original
            .iter()
            .map(|(at, rows)| Ok((*at, rows.to_device(w.device())?)))
            .collect::<Result<Vec<_>>>()?;
        let weight = splice(w, 0, &rows)?;
        self.base = Base::Dense(candle_nn::Linear::new(weight, base.bias().cloned()));
        self.merged = None;
        self.weight_changed();
        Ok(())
    }

    /// `W + Σ sᵢ BᵢAᵢ` in f32, cast to the weight's dtype, as a new weight; the rows it replaces
    /// are copied to the host and the original dropped, so the device holds one weight as before.
    /// Nothing changes on error.
    fn merge(&mut self) -> Result<()> {
        let Base::Dense(base) = &self.base else {
            return Err(candle_core::Error::Msg(
                "a quantized base weight is never merged".into(),
            ));
        };
        let w = base.weight();
        let mut spans = self
            .adapters
            .iter()
            .map(|a| a.rows())
            .collect::<Result<Vec<_>>>()?;
        spans.sort_by_key(|r| r.start);
        // The union of the adapters' rows: adapters on the same rows (two LoRAs, or one LoRA's
        // fused qkv adapter beside another's q) are summed into one copy of them.
        let mut touched: Vec<std::ops::Range<usize>> = Vec::new();
        for r in spans {
            match touched.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => touched.push(r),
            }
        }
        let (mut original, mut merged) = (Vec::new(), Vec::new());
        for span in touched {
            for start in span.clone().step_by(MERGE_CHUNK_ROWS) {
                let chunk = start..(start + MERGE_CHUNK_ROWS).min(span.end);
                let rows = w.narrow(0, start, chunk.len())?;
                let mut sum = rows.to_dtype(DType::F32)?;
                for a in &self.adapters {
                    let own = a.rows()?;
                    let (from, to) = (own.start.max(chunk.start), own.end.min(chunk.end));
                    if from >= to {
                        continue;
                    }
                    let up = a.up.narrow(0, from - own.start, to - from)?;
                    let delta = (up.to_dtype(DType::F32)? * a.scale)?
                        .matmul(&a.down.to_dtype(DType::F32)?)?;
                    sum = add_rows(&sum, 0, from - start, &delta)?;
                }
                merged.push((start, sum.to_dtype(w.dtype())?));
                // A copy of these rows alone: `to_device` of a view copies its whole storage.
                original.push((start, rows.force_contiguous()?.to_device(&Device::Cpu)?));
            }
        }
        let weight = splice(w, 0, &merged)?;
        self.merged = Some(Merged {
            keys: self.adapters.iter().map(|a| a.key()).collect(),
            original,
        });
        self.base = Base::Dense(candle_nn::Linear::new(weight, base.bias().cloned()));
        self.weight_changed();
        Ok(())
    }

    /// The base's weight is another one now: an fp8 copy of the old one is made again.
    fn weight_changed(&mut self) {
        if let Fp8Products::On(copy) = &mut self.fp8 {
            *copy = None;
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (base, adapters) = self.prepare(x)?;
        let y = match &base {
            // A full fine-tune trains the weight itself: candle's matmul gives it its gradient.
            Base::Dense(l) if l.weight().is_variable() => l.forward(x)?,
            _ if x.track_op() => frozen_base(self.kernels, base, x)?,
            // Trained adapters on an input without a gradient (the first layers): the product that
            // their gradients are taken through, as in `frozen_base`.
            _ if adapters
                .iter()
                .any(|a| a.down.is_variable() || a.up.is_variable()) =>
            {
                base.forward_exact(self.kernels, x)?
            }
            _ => base.forward(self.kernels, x)?,
        };
        if adapters.is_empty() {
            return Ok(y);
        }
        let last = y.rank() - 1;
        // The updates summed per output slice (offset, update), each slice then added once.
        let mut slices: Vec<(usize, Tensor)> = Vec::new();
        for a in adapters.iter() {
            // Adapters may be f32 (training) over a bf16 base: the product runs in the base's precision,
            // as peft's under autocast, with the scale folded into the small `up` (no full-size f32
            // copies of the input or the update; their gradients reach the f32 factors through the casts).
            let down = a.down.to_dtype(x.dtype())?;
            let up = (&a.up * a.scale)?.to_dtype(x.dtype())?;
            let delta = x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?;
            let rows = delta.dim(last)?;
            match slices
                .iter_mut()
                .find(|(o, d)| *o == a.out_offset && d.dim(last).ok() == Some(rows))
            {
                Some((_, d)) => *d = (&*d + delta)?,
                None => slices.push((a.out_offset, delta)),
            }
        }
        slices.sort_by_key(|(o, _)| *o);
        let disjoint = slices
            .windows(2)
            .all(|w| w[0].1.dim(last).is_ok_and(|rows| w[0].0 + rows <= w[1].0));
        if !disjoint {
            return slices
                .iter()
                .try_fold(y, |y, (offset, delta)| add_rows(&y, last, *offset, delta));
        }
        // Disjoint slices (a fused layer's q, k and v adapters): one concatenation for all of them.
        let sums = slices
            .iter()
            .map(|(offset, delta)| {
                Ok((
                    *offset,
                    (y.narrow(last, *offset, delta.dim(last)?)? + delta)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        splice(&y, last, &sums)
    }
}

/// What [`Linear::backward`] reads of a training forward ([`Linear::forward_saved`]): the adapters it
/// applied, the layer's input (kept only when there are adapters: the input gradient needs the weight alone)
/// and each adapter's `A x` and factors in the input's dtype.
pub struct Saved {
    adapters: Vec<Arc<Adapter>>,
    x: Option<Tensor>,
    down_x: Vec<Tensor>,
    factors: Vec<(Tensor, Tensor)>,
}

impl Linear {
    /// Training's forward of a frozen layer with trained adapters, recording no graph: `W x + b` through
    /// the fused path, then each adapter's `s·B(A x)` added into its rows in place (no rebuilt output), with
    /// what [`Linear::backward`] needs. `x` carries no gradient.
    pub fn forward_saved(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let (base, adapters) = self.prepare(x)?;
        let y = base.forward_exact(self.kernels, x)?;
        let mut down_x = Vec::with_capacity(adapters.len());
        let mut factors = Vec::with_capacity(adapters.len());
        for a in &adapters {
            let (down, up) = a.factors(x.dtype())?;
            let ax = x.broadcast_matmul(&down.t()?)?;
            ops::linear::add_product(self.kernels, &y, a.out_offset, &ax, &up.t()?)?;
            down_x.push(ax);
            factors.push((down, up));
        }
        let x = (!adapters.is_empty()).then(|| x.clone());
        Ok((
            y,
            Saved {
                adapters,
                x,
                down_x,
                factors,
            },
        ))
    }

    /// The backward pass of [`Linear::forward_saved`] from the output's gradient `dy`: the adapters' factors'
    /// gradients added into `grads` (in their own dtype, as candle's autograd gives a `Var`), and the input's
    /// gradient `dy W + Σ s (dy B) A` when `input_grad` is set.
    pub fn backward(
        &self,
        saved: Saved,
        dy: &Tensor,
        grads: &mut GradStore,
        input_grad: bool,
    ) -> Result<Option<Tensor>> {
        let base = self
            .state
            .read()
            .expect("adapter lock poisoned")
            .working_base()?;
        let dims = dy.dims();
        let out = dims[dims.len() - 1];
        let n = dy.elem_count() / out;
        let dy = dy.contiguous()?.reshape((n, out))?;
        let dx = if input_grad {
            // A quantized base is dequantized for this product only.
            Some(dy.matmul(&base.weight(dy.dtype())?)?)
        } else {
            None
        };
        let adapters = saved.adapters.iter().zip(saved.down_x).zip(saved.factors);
        for ((a, ax), (down, up)) in adapters {
            let rows = a.rows()?;
            // The adapter's rows of dy, read in place where the strided product can.
            let dy_a = dy.narrow(1, rows.start, rows.len())?;
            let ax = ax.reshape((n, a.down.dim(0)?))?;
            let x = saved.x.as_ref().expect("inputs are saved with adapters");
            let x = x.reshape((n, x.elem_count() / n))?;
            // d(s·B) = dyᵀ (A x); the scale is folded into `up` as in the forward. The factors'
            // gradients come in the factors' own dtype.
            let k = self.kernels;
            let d_up = ops::linear::strided_matmul(k, &dy_a.t()?, &ax, a.scale, a.up.dtype())?;
            let dy_up = ops::linear::strided_matmul(k, &dy_a, &up, 1.0, dy.dtype())?;
            let d_down = ops::linear::strided_matmul(k, &dy_up.t()?, &x, 1.0, a.down.dtype())?;
            if let Some(dx) = &dx {
                ops::linear::add_product(k, dx, 0, &dy_up, &down)?;
            }
            accumulate(grads, &a.up, d_up)?;
            accumulate(grads, &a.down, d_down)?;
        }
        let mut in_dims = dims.to_vec();
        in_dims[dims.len() - 1] = self.in_features;
        dx.map(|dx| dx.reshape(in_dims)).transpose()
    }
}

/// Adds `g` to `t`'s gradient in `grads`.
fn accumulate(grads: &mut GradStore, t: &Tensor, g: Tensor) -> Result<()> {
    let sum = match grads.remove(t) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert(t, sum);
    Ok(())
}

/// `y` with `delta` added to its entries `offset ..` along `dim`.
fn add_rows(y: &Tensor, dim: usize, offset: usize, delta: &Tensor) -> Result<Tensor> {
    let rows = delta.dim(dim)?;
    let sum = (y.narrow(dim, offset, rows)? + delta)?;
    splice(y, dim, &[(offset, sum)])
}

/// `y` with its entries along `dim` from each `(first, part)` replaced by `part`, in one copy.
/// The parts are sorted and disjoint.
fn splice(y: &Tensor, dim: usize, parts: &[(usize, Tensor)]) -> Result<Tensor> {
    let mut pieces = Vec::with_capacity(2 * parts.len() + 1);
    let mut at = 0;
    for (first, part) in parts {
        if *first > at {
            pieces.push(y.narrow(dim, at, first - at)?);
        }
        pieces.push(part.clone());
        at = first + part.dim(dim)?;
    }
    let end = y.dim(dim)?;
    if at < end {
        pieces.push(y.narrow(dim, at, end - at)?);
    }
    Tensor::cat(&pieces, dim)
}

/// `W x + b` for an input that carries a gradient, passing the gradient to `x` only. Through candle's
/// matmul the backward pass would also compute the weight's gradient: wasted work on a frozen layer,
/// and a weight-sized buffer per layer kept until the optimizer step (24 GB for FLUX.1-dev in bf16).
/// A quantized base is dequantized again in the backward pass rather than kept dense between the two.
fn frozen_base(kernels: Kernels, base: Base, x: &Tensor) -> Result<Tensor> {
    let y = base.forward_exact(kernels, &x.detach())?;
    autodiff::with_gradient(x, y, move |_, _, grad| {
        grad.broadcast_matmul(&base.weight(grad.dtype())?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn merged(linear: &Linear) -> bool {
        linear.state.read().unwrap().merged.is_some()
    }

    /// The weight the layer multiplies by now.
    fn weight(linear: &Linear) -> Tensor {
        let state = linear.state.read().unwrap();
        state.base.dense().expect("a dense base").weight().clone()
    }

    /// The values' bits, through f32 (which holds a bf16 exactly).
    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.into_iter().map(f32::to_bits).collect())
    }

    /// The largest difference relative to the largest value of `want`.
    fn relative(got: &Tensor, want: &Tensor) -> Result<f32> {
        relative_to(got, want, want)
    }

    /// The largest difference relative to the largest value of `size`.
    fn relative_to(got: &Tensor, want: &Tensor, size: &Tensor) -> Result<f32> {
        let (got, want) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
        let diff = (&got - &want)?.abs()?.flatten_all()?.max(0)?;
        let size = size.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?;
        (diff / size)?.to_scalar::<f32>()
    }

    /// The formula on every operand's magnitude: what bf16's rounding of each product is relative
    /// to. An output that cancels to near zero still carries the rounding of its large terms, so
    /// the error is judged against this bound, not against the output.
    fn magnitude(w: &Tensor, b: &Tensor, adapters: &[Arc<Adapter>], x: &Tensor) -> Result<Tensor> {
        let adapters = adapters
            .iter()
            .map(|a| {
                Ok(Arc::new(Adapter {
                    down: a.down.abs()?,
                    up: a.up.abs()?,
                    scale: a.scale.abs(),
                    out_offset: a.out_offset,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        formula(&w.abs()?, &b.abs()?, &adapters, &x.abs()?)
    }

    fn random(shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// An adapter of rank 2 on `rows` output rows from `offset`.
    fn adapter(offset: usize, rows: usize, inputs: usize, dtype: DType) -> Result<Arc<Adapter>> {
        Ok(Arc::new(Adapter {
            down: random(&[2, inputs], dtype)?,
            up: random(&[rows, 2], dtype)?,
            scale: 0.75,
            out_offset: offset,
        }))
    }

    /// `x Wᵀ + b + Σ s (x Aᵀ) Bᵀ` on each adapter's rows, written out in f32 with each `B` padded
    /// by zero rows to the full output.
    fn formula(w: &Tensor, b: &Tensor, adapters: &[Arc<Adapter>], x: &Tensor) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let x = f32(x)?;
        let mut y = x.broadcast_matmul(&f32(w)?.t()?)?.broadcast_add(&f32(b)?)?;
        for a in adapters {
            let rank = a.up.dim(1)?;
            let up = Tensor::zeros((w.dim(0)?, rank), DType::F32, &Device::Cpu)?
                .slice_scatter0(&f32(&a.up)?, a.out_offset)?;
            let delta = x
                .broadcast_matmul(&f32(&a.down)?.t()?)?
                .broadcast_matmul(&up.t()?)?;
            y = (y + (delta * a.scale)?)?;
        }
        Ok(y)
    }

    /// A generation's forward merges the adapters into the weight, once, and computes the unmerged
    /// formula: one adapter on every row, a fused layer's q, k and v slices, two adapters on the
    /// same slice, overlapping ones, and a slice longer than a merge chunk; in f32 and in bf16.
    #[test]
    fn merged_forward_matches_the_unmerged_formula() -> Result<()> {
        // (case, output rows, each adapter's (first row, rows)); 6 inputs.
        type Case = (&'static str, usize, &'static [(usize, usize)]);
        let cases: [Case; 5] = [
            ("full width", 8, &[(0, 8)]),
            ("q, k and v of linear1", 17, &[(0, 4), (4, 4), (8, 4)]),
            ("two on one slice", 12, &[(4, 4), (4, 4)]),
            ("overlapping", 12, &[(0, 12), (4, 4), (10, 2)]),
            (
                "across chunks",
                2600,
                &[(500, 2000), (1000, 30), (2590, 10)],
            ),
        ];
        for dtype in [DType::F32, DType::BF16] {
            for (case, out, slices) in cases {
                let inputs = 6;
                let (w, b) = (random(&[out, inputs], dtype)?, random(&[out], dtype)?);
                let linear = Linear::new("l", w.clone(), Some(b.clone()), Kernels::Plain);
                let adapters = slices
                    .iter()
                    .map(|&(offset, rows)| adapter(offset, rows, inputs, dtype))
                    .collect::<Result<Vec<_>>>()?;
                linear.set_adapters(adapters.clone());
                let x = random(&[2, 3, inputs], dtype)?;
                let y = linear.forward(&x)?;
                assert!(merged(&linear), "{case}");
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                let want = formula(&w, &b, &adapters, &x)?;
                let err = relative_to(&y, &want, &magnitude(&w, &b, &adapters, &x)?)?;
                assert!(err < tolerance, "{case} {dtype:?}: {err}");
                // The next forward (the next step) multiplies by the same merged weight.
                let merged_weight = weight(&linear).id();
                let again = linear.forward(&x)?;
                assert_eq!(weight(&linear).id(), merged_weight, "{case}");
                assert_eq!(bits(&again)?, bits(&y)?, "{case}");
            }
        }
        Ok(())
    }

    /// Clearing the adapters, or setting others, puts the original weight back byte for byte before
    /// the next forward: a bare forward is the bare layer's, and other adapters merge onto the original.
    #[test]
    fn restoring_gives_back_the_original_bytes() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let (out, inputs) = (20, 6);
            let (w, b) = (random(&[out, inputs], dtype)?, random(&[out], dtype)?);
            let original = bits(&w)?;
            let linear = Linear::new("l", w.clone(), Some(b.clone()), Kernels::Plain);
            let x = random(&[2, 3, inputs], dtype)?;
            let bare =
                Linear::new("bare", w.clone(), Some(b.clone()), Kernels::Plain).forward(&x)?;

            let qkv = vec![
                adapter(0, 4, inputs, dtype)?,
                adapter(4, 4, inputs, dtype)?,
                adapter(8, 4, inputs, dtype)?,
            ];
            linear.set_adapters(qkv);
            linear.forward(&x)?;
            assert!(merged(&linear));
            assert_ne!(bits(&weight(&linear))?, original);

            let other = vec![
                adapter(0, out, inputs, dtype)?,
                adapter(2, 3, inputs, dtype)?,
            ];
            linear.set_adapters(other.clone());
            let y = linear.forward(&x)?;
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let (want, size) = (formula(&w, &b, &other, &x)?, magnitude(&w, &b, &other, &x)?);
            assert!(relative_to(&y, &want, &size)? < tolerance);

            linear.clear_adapters();
            let y = linear.forward(&x)?;
            assert!(!merged(&linear));
            assert_eq!(bits(&weight(&linear))?, original, "{dtype:?}");
            assert_eq!(weight(&linear).dtype(), dtype);
            assert_eq!(bits(&y)?, bits(&bare)?, "{dtype:?}");
        }
        Ok(())
    }

    /// The same LoRA files placed again (new `Adapter`s of the same tensors, as `lora::apply` makes
    /// for every generation) find their merge in place, even after the adapters were cleared in
    /// between; another scale is another merge.
    #[test]
    fn the_same_adapters_placed_again_keep_their_merge() -> Result<()> {
        let (w, b) = (random(&[12, 6], DType::F32)?, random(&[12], DType::F32)?);
        let linear = Linear::new("l", w.clone(), Some(b.clone()), Kernels::Plain);
        let x = random(&[1, 3, 6], DType::F32)?;
        let first = adapter(4, 4, 6, DType::F32)?;
        let placed = |scale: f64| {
            Arc::new(Adapter {
                scale,
                ..(*first).clone()
            })
        };
        linear.set_adapters(vec![placed(0.75)]);
        linear.forward(&x)?;
        let merged_weight = weight(&linear).id();
        linear.clear_adapters();
        linear.set_adapters(vec![placed(0.75)]);
        linear.forward(&x)?;
        assert_eq!(weight(&linear).id(), merged_weight);

        let half = vec![placed(0.5)];
        linear.set_adapters(half.clone());
        let y = linear.forward(&x)?;
        assert_ne!(weight(&linear).id(), merged_weight);
        assert!(relative(&y, &formula(&w, &b, &half, &x)?)? < 1e-5);
        Ok(())
    }

    /// Training's `Var` adapters and a trained (`Var`) base weight are applied unmerged; a merge made for
    /// sampling (detached copies) is undone first; the adapters get their gradients, and training's
    /// hand-written backward gives the same gradients as candle's autograd.
    #[test]
    fn training_adapters_are_not_merged() -> Result<()> {
        let (w, b) = (random(&[12, 6], DType::F32)?, random(&[12], DType::F32)?);
        let original = bits(&w)?;
        let linear = Linear::new("l", w.clone(), Some(b.clone()), Kernels::Plain);
        let down = Var::from_tensor(&random(&[2, 6], DType::F32)?)?;
        let up = Var::from_tensor(&random(&[4, 2], DType::F32)?)?;
        let placed = |down: Tensor, up: Tensor| {
            vec![Arc::new(Adapter {
                down,
                up,
                scale: 0.5,
                out_offset: 4,
            })]
        };
        let x = random(&[1, 3, 6], DType::F32)?;
        let sampling = placed(down.as_tensor().detach(), up.as_tensor().detach());
        linear.set_adapters(sampling.clone());
        let sampled = linear.forward(&x)?;
        assert!(merged(&linear));

        let training = placed(down.as_tensor().clone(), up.as_tensor().clone());
        linear.set_adapters(training);
        let (trained, saved) = linear.forward_saved(&x)?;
        assert!(!merged(&linear));
        assert_eq!(bits(&weight(&linear))?, original);
        assert!(relative(&trained, &sampled)? < 1e-5);

        let xv = Var::from_tensor(&x)?;
        let dy = random(&[1, 3, 12], DType::F32)?;
        let grads = (linear.forward(xv.as_tensor())? * &dy)?
            .sum_all()?
            .backward()?;
        assert!(!merged(&linear));
        let mut by_hand = GradStore::default();
        let dx = linear
            .backward(saved, &dy, &mut by_hand, true)?
            .expect("asked for");
        assert!(relative(&dx, grads.get(xv.as_tensor()).expect("x's gradient"))? < 1e-5);
        for factor in [down.as_tensor(), up.as_tensor()] {
            let want = grads.get(factor).expect("a gradient");
            assert!(relative(by_hand.get(factor).expect("a gradient by hand"), want)? < 1e-5);
        }

        let trained = Var::from_tensor(&w)?;
        let full = Linear::new("full", trained.as_tensor().clone(), Some(b), Kernels::Plain);
        full.set_adapters(sampling);
        full.forward(&x)?;
        assert!(!merged(&full));
        Ok(())
    }

    /// The frozen path gives the same value and input gradient as candle's own matmul, gives the
    /// adapter its gradient, and gives the weight none.
    #[test]
    fn gradients_reach_the_input_and_the_adapter_not_the_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 6, &dev)?;
        let linear = Linear::new("l", w.clone(), Some(b.clone()), Kernels::Plain);
        let down = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4), &dev)?)?;
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2), &dev)?)?;
        linear.set_adapters(vec![Arc::new(Adapter {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: 0.5,
            out_offset: 2,
        })]);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev)?;
        let ours = linear.forward(x.as_tensor())?;
        assert!(!merged(&linear), "Var adapters are applied unmerged");
        let grads = (&ours * &weights)?.sum_all()?.backward()?;

        let plain = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let delta = (x
            .as_tensor()
            .broadcast_matmul(&down.as_tensor().t()?)?
            .broadcast_matmul(&up.as_tensor().t()?)?
            * 0.5)?;
        let want = Tensor::cat(
            &[
                plain.narrow(2, 0, 2)?,
                (plain.narrow(2, 2, 3)? + delta)?,
                plain.narrow(2, 5, 1)?,
            ],
            2,
        )?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(&ours, &want)? < 1e-5);
        let reference = (&want * &weights)?.sum_all()?.backward()?;
        for v in [&x, &down, &up] {
            let (g, r) = (grads.get(v.as_tensor()), reference.get(v.as_tensor()));
            assert!(diff(g.expect("a gradient"), r.expect("a gradient"))? < 1e-4);
        }
        // No weight-shaped gradient was computed (candle's matmul backward would have made one).
        let shapes: Vec<Vec<usize>> = grads
            .get_ids()
            .filter_map(|id| grads.get_id(*id))
            .map(|g| g.dims().to_vec())
            .collect();
        assert!(
            !shapes.iter().any(|d| d == &[4, 6] || d == &[6, 4]),
            "{shapes:?}"
        );
        Ok(())
    }

    /// Normal values from a fixed seed: the quantized products' tolerances hold for these inputs.
    fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.sample(rand_distr::StandardNormal))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// A rank-2 adapter on 8 rows from `offset`, from a fixed seed.
    fn seeded_adapter(offset: usize, inputs: usize, seed: u64) -> Result<Arc<Adapter>> {
        Ok(Arc::new(Adapter {
            down: seeded(&[2, inputs], seed)?,
            up: seeded(&[8, 2], seed + 100)?,
            scale: 0.75,
            out_offset: offset,
        }))
    }

    /// Adapters on an fp8 or GGUF base are applied unmerged, q, k and v slices of a fused layer
    /// included, and give what they give on the dequantized weight as a dense base; a training
    /// forward and the hand-written backward give the adapters the dense base's gradients.
    #[test]
    fn adapters_on_quantized_bases_match_the_dequantized_dense_base() -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let (out, inputs) = (24, 64);
        let w = seeded(&[out, inputs], 1)?;
        let b = seeded(&[out], 2)?;
        let x = seeded(&[2, 3, inputs], 3)?;
        // GGUF's CPU product quantizes the input to 8 bits per block as llama.cpp does: its
        // products differ from the dequantized weight's by that rounding.
        for (format, tolerance) in [
            (WeightFormat::Fp8, 1e-5),
            (WeightFormat::Gguf(GgmlDType::Q8_0), 1e-2),
            (WeightFormat::Gguf(GgmlDType::Q4_0), 1e-2),
        ] {
            let q = QuantizedWeight::from_dense(&w, format)?.expect("quantizable");
            let dense_w = q.dequantize(DType::F32)?;
            let linear = Linear::quantized("l", q, Some(b.clone()), Kernels::Plain)?;
            assert_eq!(linear.format(), format);
            let dense = Linear::new("d", dense_w.clone(), Some(b.clone()), Kernels::Plain);
            let adapters = vec![
                seeded_adapter(0, inputs, 10)?,
                seeded_adapter(8, inputs, 11)?,
                seeded_adapter(16, inputs, 12)?,
            ];
            linear.set_adapters(adapters.clone());
            dense.set_adapters(adapters.clone());
            let y = linear.forward(&x)?;
            assert!(!merged(&linear), "{format}");
            let want = formula(&dense_w, &b, &adapters, &x)?;
            let size = magnitude(&dense_w, &b, &adapters, &x)?;
            let err = relative_to(&y, &want, &size)?;
            assert!(err < tolerance, "{format}: {err}");
            assert!(relative_to(&y, &dense.forward(&x)?, &size)? < tolerance);

            // Training: Var adapters, the hand-written backward against candle's autograd on the
            // dense base.
            let down = Var::from_tensor(&seeded(&[2, inputs], 4)?)?;
            let up = Var::from_tensor(&seeded(&[8, 2], 5)?)?;
            let training = vec![Arc::new(Adapter {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                scale: 0.5,
                out_offset: 8,
            })];
            linear.set_adapters(training.clone());
            dense.set_adapters(training);
            let dy = seeded(&[2, 3, out], 6)?;
            let (_, saved) = linear.forward_saved(&x)?;
            let mut by_hand = GradStore::default();
            let dx = linear
                .backward(saved, &dy, &mut by_hand, true)?
                .expect("asked for");
            let xv = Var::from_tensor(&x)?;
            let grads = (dense.forward(xv.as_tensor())? * &dy)?
                .sum_all()?
                .backward()?;
            let want_dx = grads.get(xv.as_tensor()).expect("x's gradient");
            assert!(relative(&dx, want_dx)? < 1e-5, "{format}");
            for factor in [down.as_tensor(), up.as_tensor()] {
                let want = grads.get(factor).expect("a gradient");
                let got = by_hand.get(factor).expect("a gradient by hand");
                let err = relative(got, want)?;
                assert!(err < tolerance, "{format}: {err}");
            }
            // Through candle's autograd too (the quantized base passes the input its gradient).
            let quantized_grads = (linear.forward(xv.as_tensor())? * &dy)?
                .sum_all()?
                .backward()?;
            let dx = quantized_grads.get(xv.as_tensor()).expect("x's gradient");
            assert!(relative(dx, want_dx)? < 1e-5, "{format}");
        }
        Ok(())
    }

    /// fp8 products multiply by what an fp8 checkpoint made from the weight would hold, bit for bit:
    /// the original weight's, or with adapters merged the merged weight's (made again when the
    /// adapters change); off again, the layer gives its exact products; a training forward keeps them.
    #[test]
    fn fp8_products_multiply_by_the_fp8_weight_made_from_the_merged_weight() -> Result<()> {
        let (out, inputs) = (24, 64);
        let w = seeded(&[out, inputs], 1)?;
        let b = seeded(&[out], 2)?;
        let x = seeded(&[2, 3, inputs], 3)?;
        let fp8_of = |w: &Tensor| -> Result<Linear> {
            let q = QuantizedWeight::from_dense(w, WeightFormat::Fp8)?.expect("quantizable");
            Linear::quantized("q", q, Some(b.clone()), Kernels::Plain)
        };
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        let linear = Linear::new("l", w.clone(), Some(b.clone()), Kernels::Plain);
        let exact = linear.forward(&x)?;
        linear.set_fp8_products(true);
        let fast = linear.forward(&x)?;
        assert_eq!(bits(&fast)?, bits(&fp8_of(&w)?.forward(&x)?)?);
        assert_ne!(bits(&fast)?, bits(&exact)?, "fp8 products rounded nothing");

        for adapters in [
            vec![seeded_adapter(0, inputs, 10)?],
            vec![
                seeded_adapter(8, inputs, 11)?,
                seeded_adapter(16, inputs, 12)?,
            ],
        ] {
            let reference = Linear::new("r", w.clone(), Some(b.clone()), Kernels::Plain);
            reference.set_adapters(adapters.clone());
            let exact = reference.forward(&x)?;
            let merged_weight = reference.base_weight(DType::F32)?;
            linear.set_adapters(adapters);
            let fast = linear.forward(&x)?;
            assert!(merged(&linear));
            assert_eq!(bits(&fast)?, bits(&fp8_of(&merged_weight)?.forward(&x)?)?);
            assert!(relative(&fast, &exact)? < 0.1);
            assert_ne!(bits(&fast)?, bits(&exact)?);
        }

        // A forward that takes a gradient multiplies by the weight itself (its adapters unmerged).
        let xv = Var::from_tensor(&x)?;
        let reference = Linear::new("r", w.clone(), Some(b.clone()), Kernels::Plain);
        reference.set_adapters(vec![seeded_adapter(0, inputs, 10)?]);
        linear.set_adapters(vec![seeded_adapter(0, inputs, 10)?]);
        let tracked = linear.forward(xv.as_tensor())?;
        assert_eq!(bits(&tracked)?, bits(&reference.forward(xv.as_tensor())?)?);
        linear.set_fp8_products(false);
        assert_eq!(bits(&linear.forward(&x)?)?, bits(&reference.forward(&x)?)?);
        linear.clear_adapters();
        assert_eq!(bits(&linear.forward(&x)?)?, bits(&exact)?);
        Ok(())
    }
}
