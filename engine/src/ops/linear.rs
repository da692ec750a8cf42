//! Linear layers' products: `x Wᵀ + b`, and the products of training's adapters (added into their rows,
//! read from strided views): cuBLASLt and cuBLAS on CUDA (`kernels::gemm`), candle's matmul otherwise.

use super::Kernels;
use candle_core::{Module, Tensor};

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
    if kernels == Kernels::Fused && crate::kernels::gemm::supports(y) {
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
    if kernels == Kernels::Fused && crate::kernels::gemm::supports_matmul(a, b) {
        return crate::kernels::gemm::matmul(a, b, alpha, out);
    }
    let p = a.contiguous()?.matmul(&b.contiguous()?)?;
    let p = if alpha == 1.0 { p } else { (p * alpha)? };
    p.to_dtype(out)
}
