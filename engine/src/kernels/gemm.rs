//! LoRA training's products that candle's matmul would need copies for, through cuBLAS (bf16 in and
//! out, f32 accumulation). The CPU, and `Kernels::Plain`, take candle ops (`models::linear`).
//! - [`add_matmul`]: `c[.., at .. at + n] += a · b` in place, with β = 1: each adapter's update
//!   `(A x)·(sB)ᵀ` goes into its rows of a layer's output, and its part `(dy·sB)·A` of the input
//!   gradient into the frozen weight's, with no full-size temporary and no separate add over the output.
//! - [`matmul`]: `a · b` for matrices of any leading dimension, transposed or not: an adapter's rows of
//!   the output's gradient are read as a column slice of it (candle would copy them first, once per
//!   adapter and step).
//! - [`linear`]: `x Wᵀ + b` with the bias added by cuBLASLt's epilogue as the product's tiles are
//!   written, not by a pass of its own over the output of every layer.

use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul as LtMatmul, MatmulConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::CustomOp3;
use candle_core::{bail, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Tensor, WithDType};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

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

    super::cuda_only!(inplace 3);

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

/// Whether [`matmul`] takes `a` and `b`: 2-D bf16 on CUDA whose rows or columns have unit stride.
pub fn supports_matmul(a: &Tensor, b: &Tensor) -> bool {
    [a, b]
        .iter()
        .all(|t| t.device().is_cuda() && t.dtype() == DType::BF16 && operand(t.layout()).is_ok())
}

/// `alpha · a · b` for 2-D bf16 `a` (m, k) and `b` (k, n) on CUDA, each a row-major matrix of any
/// leading dimension or the transpose of one (a column slice, a `.t()`): cuBLAS reads them where they
/// lie. Returns a contiguous (m, n) in `out` (bf16, or f32 straight from the f32 accumulators: an
/// adapter's gradient for its f32 factor, with its scale as `alpha`, is then one kernel, not three).
pub fn matmul(a: &Tensor, b: &Tensor, alpha: f64, out: DType) -> Result<Tensor> {
    if !matches!(out, DType::BF16 | DType::F32) {
        bail!("matmul writes bf16 or f32, not {out:?}")
    }
    a.apply_op2_no_bwd(b, &Matmul { alpha, out })
}

struct Matmul {
    alpha: f64,
    out: DType,
}

/// A 2-D layout as cuBLAS reads it: (rows, cols, leading dimension, whether it is the transpose of a
/// row-major matrix).
fn operand(l: &Layout) -> Result<(usize, usize, usize, bool)> {
    let (&[rows, cols], &[s0, s1]) = (l.dims(), l.stride()) else {
        bail!("matmul takes matrices (got {:?})", l.dims())
    };
    if s1 == 1 && s0 >= cols.max(1) {
        Ok((rows, cols, s0, false))
    } else if s0 == 1 && s1 >= rows.max(1) {
        Ok((rows, cols, s1, true))
    } else {
        bail!(
            "matmul needs rows or columns of unit stride (got {:?} strides {:?})",
            l.dims(),
            l.stride()
        )
    }
}

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "strided-matmul"
    }

    super::cuda_only!(2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let (m, k, lda, a_t) = operand(al)?;
        let (bk, n, ldb, b_t) = operand(bl)?;
        if bk != k {
            bail!("matmul: a {:?} · b {:?} do not chain", al.dims(), bl.dims())
        }
        // Row-major c = a·b is column-major cᵀ = bᵀ·aᵀ: cuBLAS's first operand is b, its second a. A
        // row-major matrix read column-major is its transpose already; a transposed one needs op T.
        let op = |t| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (CudaStorageSlice::BF16(av), CudaStorageSlice::BF16(bv)) = (&a.slice, &b.slice) else {
            bail!("matmul takes bf16 only")
        };
        let (av, bv) = (av.slice(al.start_offset()..), bv.slice(bl.start_offset()..));
        let dev = &a.device;
        let stream = dev.cuda_stream();
        let (alpha, beta) = (self.alpha as f32, 0f32);
        let blas = dev.cublas_handle();
        let gemm = |c: *mut std::ffi::c_void, c_type| {
            let (ap, _a_rec) = av.device_ptr(&stream);
            let (bp, _b_rec) = bv.device_ptr(&stream);
            // SAFETY: the shapes and leading dimensions were checked against both layouts above; c
            // holds m·n elements of c_type; α and β are host f32 (the handle's pointer mode).
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    op(b_t),
                    op(a_t),
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    bp as *const _,
                    sys::cudaDataType_t::CUDA_R_16BF,
                    ldb as i32,
                    ap as *const _,
                    sys::cudaDataType_t::CUDA_R_16BF,
                    lda as i32,
                    &beta as *const f32 as *const _,
                    c,
                    c_type,
                    n as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))
        };
        // SAFETY (both allocations): cuBLAS writes all m·n elements (β = 0).
        let slice = if self.out == DType::F32 {
            let mut c = unsafe { dev.alloc::<f32>(m * n) }?;
            {
                let (cp, _c_rec) = c.device_ptr_mut(&stream);
                gemm(cp as *mut _, sys::cudaDataType_t::CUDA_R_32F)?;
            }
            CudaStorageSlice::F32(c)
        } else {
            let mut c = unsafe { dev.alloc::<half::bf16>(m * n) }?;
            {
                let (cp, _c_rec) = c.device_ptr_mut(&stream);
                gemm(cp as *mut _, sys::cudaDataType_t::CUDA_R_16BF)?;
            }
            CudaStorageSlice::BF16(c)
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((m, n)),
        ))
    }
}

/// `x Wᵀ + b` for bf16 `x` (rows, k) contiguous, the weight `W` (n, k) contiguous and the bias `b` (n)
/// on CUDA: one cuBLASLt product with the bias epilogue. Returns a contiguous (rows, n).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &Linear)
}

struct Linear;

/// One cuBLASLt handle (and its workspace) per device, made on first use.
static LT: LazyLock<Mutex<HashMap<DeviceId, Arc<CudaBlasLT>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn lt_error(
    e: candle_core::cuda_backend::cudarc::cublaslt::result::CublasError,
) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

pub(super) fn lt_handle(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
    let mut handles = LT.lock().expect("cuBLASLt handles lock poisoned");
    if let Some(h) = handles.get(&dev.id()) {
        return Ok(h.clone());
    }
    let h = Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(lt_error)?);
    handles.insert(dev.id(), h.clone());
    Ok(h)
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear-bias-epilogue"
    }

    super::cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, k) = matrix(xl, "x")?;
        let (n, wk) = matrix(wl, "the weight")?;
        if wk != k || wl.dims().len() != 2 || bl.dims() != [n] || !bl.is_contiguous() {
            bail!(
                "linear: x {:?}, weight {:?} and bias {:?} do not fit",
                xl.dims(),
                wl.dims(),
                bl.dims()
            )
        }
        let (CudaStorageSlice::BF16(xv), CudaStorageSlice::BF16(wv), CudaStorageSlice::BF16(bv)) =
            (&x.slice, &w.slice, &b.slice)
        else {
            bail!("linear takes bf16 only")
        };
        let (xv, wv, bv) = (
            xv.slice(xl.start_offset()..),
            wv.slice(wl.start_offset()..),
            bv.slice(bl.start_offset()..),
        );
        let dev = &x.device;
        // Column-major: yᵀ (n, rows) = W (n, k) · xᵀ (k, rows); W's rows are its columns, so it is read
        // transposed. The epilogue adds the bias down each of yᵀ's columns.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: rows as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: cuBLASLt writes all rows·n elements (β = 0).
        let mut y = unsafe { dev.alloc::<half::bf16>(rows * n) }?;
        let lt = lt_handle(dev)?;
        // SAFETY: the shapes and leading dimensions were checked against the three layouts above.
        unsafe { lt.matmul(cfg, &wv, &xv, &mut y, Some(&bv), None) }.map_err(lt_error)?;
        Ok((
            CudaStorage {
                slice: CudaStorageSlice::BF16(y),
                device: dev.clone(),
            },
            Shape::from((rows, n)),
        ))
    }
}
