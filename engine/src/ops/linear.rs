//! Linear layers' products: `x Wᵀ + b`, and the products of training's adapters (added into their rows,
//! read from strided views): cuBLASLt and cuBLAS on CUDA (`kernels::gemm`), candle's matmul otherwise.

use super::Kernels;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

/// A linear layer's `x Wᵀ + b`: on the fused path one cuBLASLt product adds the bias as it writes its
/// output, instead of a broadcasting add over the whole output after it (a pass over memory per layer,
/// and candle's broadcasting add runs well below memory speed).
pub fn linear(
    kernels: Kernels,
    base: &candle_nn::Linear,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Some(bias)) = (kernels.fused(&[x]), base.bias()) {
        // cuBLASLt reads the weight and bias as they are stored: row-major, contiguous (as loaded and
        // as merged); another layout takes candle's path.
        if !(base.weight().is_contiguous() && bias.is_contiguous()) {
            return base.forward(x);
        }
        let x = x.contiguous()?;
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        let mut out_dims = dims.to_vec();
        let y = crate::kernels::gemm::linear(&x.reshape((rows, k))?, base.weight(), bias)?;
        *out_dims.last_mut().expect("rank >= 1") = y.dim(1)?;
        return y.reshape(out_dims);
    }
    base.forward(x)
}

/// An fp8 (`float8_e4m3fn`) weight times its per-tensor `scale`, in `dtype`: widened exactly, then
/// scaled in `dtype` as ComfyUI dequantizes scaled fp8 (our kernel on CUDA, where candle has no fp8
/// cast; candle's casts elsewhere).
pub fn fp8_dequantize(weight: &Tensor, scale: f32, dtype: DType) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if weight.device().is_cuda() {
        let weight = weight.contiguous()?;
        if dtype == DType::BF16 {
            return crate::kernels::fp8::dequantize(&weight, scale);
        }
        let w = crate::kernels::fp8::dequantize(&weight, 1.0)?.to_dtype(dtype)?;
        return scaled(w, scale);
    }
    scaled(weight.to_dtype(dtype)?, scale)
}

fn scaled(w: Tensor, scale: f32) -> candle_core::Result<Tensor> {
    if scale == 1.0 {
        return Ok(w);
    }
    w.broadcast_mul(&Tensor::new(scale, w.device())?.to_dtype(w.dtype())?)
}

/// `w / scale` in fp8 (`float8_e4m3fn`, nearest even) for an f32 `w`: how fp8 is made from wider
/// weights at load.
pub fn fp8_quantize(w: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        return crate::kernels::fp8::quantize(&w.to_dtype(DType::F32)?.contiguous()?, scale);
    }
    let divisor = Tensor::new(scale, w.device())?;
    w.to_dtype(DType::F32)?
        .broadcast_div(&divisor)?
        .to_dtype(DType::F8E4M3)
}

/// `x (W · scale)ᵀ + b` for an fp8 weight `W`: on the fused path, on a GPU with FP8 tensor cores
/// (Ada, Hopper) and sizes they take, one cuBLASLt FP8 product with the activations quantized to fp8
/// by their own maximum (faster, and the activations' rounding is the price); otherwise the weight
/// is dequantized to the activations' dtype for the product, so only the fp8 bytes stay resident.
pub fn fp8_linear(
    kernels: Kernels,
    weight: &Tensor,
    scale: f32,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Some(bias)) = (kernels.fused(&[x]), bias) {
        if kernels.newest_instructions() && crate::kernels::fp8::supports_linear(x, weight) {
            // The activation kernels read 16-byte vectors.
            let x = if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
                x.clone()
            } else {
                x.force_contiguous()?
            };
            let dims = x.dims();
            let k = dims[dims.len() - 1];
            let rows = x.elem_count() / k;
            let y = crate::kernels::fp8::linear(
                &x.reshape((rows, k))?,
                &weight.contiguous()?,
                scale,
                &bias.to_dtype(DType::BF16)?.contiguous()?,
            )?;
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("rank >= 1") = y.dim(1)?;
            return y.reshape(out_dims);
        }
    }
    let w = fp8_dequantize(weight, scale, x.dtype())?;
    linear(kernels, &candle_nn::Linear::new(w, bias.cloned()), x)
}

/// `x Wᵀ + b` for a GGUF weight. On a GPU, an input of many rows (a FLUX step's thousands of
/// tokens) takes the weight dequantized for the product (candle's kernel, through f16) and the
/// tensor cores of the activations' dtype, as ComfyUI-GGUF computes: candle's integer kernels are
/// several times slower at that size and round the input to 8 bits too. A few rows (the modulation
/// vectors, a language model's next token), and the CPU, take candle's quantized product.
pub fn gguf_linear(
    kernels: Kernels,
    weight: &Arc<QTensor>,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    if x.device().is_cuda() && rows >= 16 {
        let w = match x.dtype() {
            DType::F32 => weight.dequantize(&weight.device())?,
            dtype => weight.dequantize_f16(&weight.device())?.to_dtype(dtype)?,
        };
        return linear(kernels, &candle_nn::Linear::new(w, bias.cloned()), x);
    }
    // As rows: every backend's quantized product takes a matrix.
    let flat = x.contiguous()?.reshape((rows, k))?;
    let y = QMatMul::QTensor(weight.clone()).forward(&flat)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = y.dim(1)?;
    let y = y.reshape(out)?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

/// `y[.., at .. at + n] += a · b` in place, for `a` (.., k) and `b` (k, n): one cuBLAS product with
/// β = 1 on the fused path, a product, an add and a copy into the slice otherwise.
pub fn add_product(
    kernels: Kernels,
    y: &Tensor,
    at: usize,
    a: &Tensor,
    b: &Tensor,
) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if kernels.is_fused() && crate::kernels::gemm::supports(y) {
        // `b` is a transposed view of a contiguous (n, k) factor or a contiguous (k, n) one.
        let (b, transposed) = if b.t()?.is_contiguous() {
            (b.t()?, true)
        } else {
            (b.contiguous()?, false)
        };
        return crate::kernels::gemm::add_matmul(y, at, &a.contiguous()?, &b, transposed);
    }
    let p = a.broadcast_matmul(b)?;
    let last = y.rank() - 1;
    let sum = (y.narrow(last, at, p.dim(last)?)? + p)?;
    y.slice_set(&sum, last, at)
}

/// `alpha · a · b` in `out` of two matrices, either of which may be a column slice or a transpose:
/// cuBLAS reads them in place and writes `out` from its f32 accumulators on the fused path; candle's
/// matmul, which needs them contiguous, copies them otherwise.
pub fn strided_matmul(
    kernels: Kernels,
    a: &Tensor,
    b: &Tensor,
    alpha: f64,
    out: candle_core::DType,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.is_fused() && crate::kernels::gemm::supports_matmul(a, b) {
        return crate::kernels::gemm::matmul(a, b, alpha, out);
    }
    let p = a.contiguous()?.matmul(&b.contiguous()?)?;
    let p = if alpha == 1.0 { p } else { (p * alpha)? };
    p.to_dtype(out)
}
