//! `c[.., at .. at + n] += a · b` in place, through cuBLAS with β = 1 (bf16 in and out, f32
//! accumulation): LoRA training adds each adapter's update `(A x)·(sB)ᵀ` into its rows of a layer's
//! output, and its part `(dy·sB)·A` of the input gradient into the frozen weight's, with no full-size
//! temporary and no separate add over the output (scripts/gpu/PREDICTIONS.md, run 31). The CPU, and
//! `--plain`, take candle ops (`models::linear`).

use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, DType, InplaceOp3, Layout, Result, Tensor, WithDType};

/// Whether [`add_matmul`] can write into `c`: contiguous bf16 on CUDA.
pub fn supports(c: &Tensor) -> bool {
    c.device().is_cuda() && c.dtype() == DType::BF16 && c.is_contiguous()
}

/// Adds `a · b` to the columns `at ..` of `c`, all read as matrices of their last dimension's width:
/// `c` (rows, width), `a` (rows, k), and `b` (k, n), or (n, k) when `b_transposed`. Contiguous bf16 on
/// CUDA.
pub fn add_matmul(c: &Tensor, at: usize, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<()> {
    c.inplace_op3(a, b, &AddMatmul { at, b_transposed })
}

struct AddMatmul {
    at: usize,
    b_transposed: bool,
}

/// A contiguous layout as (rows, width) over its last dimension.
fn matrix(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let width = *l.dims().last().unwrap_or(&0);
    if !l.is_contiguous() || width == 0 {
        bail!(
            "add_matmul: {what} must be contiguous and not empty (got {:?})",
            l.dims()
        )
    }
    Ok((l.shape().elem_count() / width, width))
}

impl InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "add-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("add_matmul runs on CUDA only; the CPU takes candle ops")
    }

    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        cl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        let (rows, width) = matrix(cl, "c")?;
        let (a_rows, k) = matrix(al, "a")?;
        let (b_rows, b_cols) = matrix(bl, "b")?;
        let (bk, n) = if self.b_transposed {
            (b_cols, b_rows)
        } else {
            (b_rows, b_cols)
        };
        if a_rows != rows || bk != k || self.at + n > width {
            bail!(
                "add_matmul: c {:?} at column {} cannot take a {:?} · b {:?}{}",
                cl.dims(),
                self.at,
                al.dims(),
                bl.dims(),
                if self.b_transposed { "ᵀ" } else { "" }
            )
        }
        // Row-major c = a·b is column-major cᵀ = bᵀ·aᵀ: cuBLAS's first operand is b, its second a, and
        // c's rows (of `width`) are its columns.
        let one = WithDType::from_f64(1.0);
        let cfg = GemmConfig {
            transa: if self.b_transposed {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            },
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: rows as i32,
            k: k as i32,
            alpha: one,
            lda: if self.b_transposed { k } else { n } as i32,
            ldb: k as i32,
            beta: one,
            ldc: width as i32,
        };
        let blas = c.device.cublas_handle();
        let (CudaStorageSlice::BF16(av), CudaStorageSlice::BF16(bv)) = (&a.slice, &b.slice) else {
            bail!("add_matmul takes bf16 only")
        };
        let (av, bv) = (av.slice(al.start_offset()..), bv.slice(bl.start_offset()..));
        let CudaStorageSlice::BF16(cv) = &mut c.slice else {
            bail!("add_matmul takes bf16 only")
        };
        let mut cv = cv.slice_mut(cl.start_offset() + self.at..);
        // SAFETY: the shapes and leading dimensions were checked against the three layouts above.
        unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.w()?;
        Ok(())
    }
}
