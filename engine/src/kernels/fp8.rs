//! Launchers for `kernels/fp8.cu` and the FP8 tensor-core product: `float8_e4m3fn` weights on CUDA,
//! where candle 0.11.1 has no fp8 cast kernel. The CPU, and every caller off CUDA, take candle's casts
//! (`ops::linear`).
//! - [`dequantize`]: fp8 → bf16 with the weight's per-tensor scale, for products in bf16.
//! - [`quantize`]: f32 → fp8 with a given scale, for fp8 made from wider weights at load.
//! - [`linear`]: `x Wᵀ + b` on FP8 tensor cores (Ada and Hopper): the activations are quantized to fp8
//!   with a scale from their own maximum, cuBLASLt multiplies in f32 and writes bf16 with the bias
//!   added, scaled by the weight's scale (α) and the activations' (the B scale pointer).

use super::gemm::lt_handle;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys, MatmulShared};
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{bail, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use float8::F8E4M3;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{LazyLock, Mutex};

const MODULE: &str = "fp8";

/// Whether `dev` has FP8 tensor cores that cuBLASLt multiplies with: compute capability 8.9 (Ada) and
/// 9.0 (Hopper) on.
pub fn has_fp8_tensor_cores(dev: &CudaDevice) -> bool {
    let cap = |a| dev.cuda_stream().context().attribute(a).unwrap_or(0);
    let major = cap(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    let minor = cap(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
    (major, minor) >= (8, 9)
}

fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn contiguous(l: &Layout, what: &str) -> Result<()> {
    if !l.is_contiguous() {
        bail!("{what} must be contiguous ({:?})", l.dims())
    }
    Ok(())
}

/// `w · scale` in bf16 for an fp8 `w` on CUDA.
pub fn dequantize(w: &Tensor, scale: f32) -> Result<Tensor> {
    w.apply_op1_no_bwd(&Dequantize { scale })
}

struct Dequantize {
    scale: f32,
}

impl CustomOp1 for Dequantize {
    fn name(&self) -> &'static str {
        "fp8-to-bf16"
    }
    super::cuda_only!(1);
    fn cuda_fwd(&self, w: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(l, "an fp8 weight")?;
        let CudaStorageSlice::F8E4M3(wv) = &w.slice else {
            bail!("fp8 dequantize takes float8_e4m3fn")
        };
        let wv = wv.slice(l.start_offset()..);
        let n = l.shape().elem_count();
        let dev = &w.device;
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<half::bf16>(n) }?;
        let func = dev.get_or_load_custom_func("fp8_to_bf16", MODULE, super::ptx::FP8)?;
        let mut launch = func.builder();
        launch.arg(&wv).arg(&out).arg(&self.scale).arg(&n);
        // SAFETY: the arguments match the kernel's signature and n bounds both buffers.
        unsafe { launch.launch(elementwise_config(n)) }.w()?;
        Ok((
            CudaStorage {
                slice: CudaStorageSlice::BF16(out),
                device: dev.clone(),
            },
            l.shape().clone(),
        ))
    }
}

/// `w / scale` in fp8 (nearest even) for an f32 `w` on CUDA.
pub fn quantize(w: &Tensor, scale: f32) -> Result<Tensor> {
    w.apply_op1_no_bwd(&Quantize { scale })
}

struct Quantize {
    scale: f32,
}

impl CustomOp1 for Quantize {
    fn name(&self) -> &'static str {
        "f32-to-fp8"
    }
    super::cuda_only!(1);
    fn cuda_fwd(&self, w: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(l, "a weight to quantize")?;
        let CudaStorageSlice::F32(wv) = &w.slice else {
            bail!("fp8 quantize takes f32")
        };
        let wv = wv.slice(l.start_offset()..);
        let n = l.shape().elem_count();
        let dev = &w.device;
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<F8E4M3>(n) }?;
        let func = dev.get_or_load_custom_func("f32_to_fp8", MODULE, super::ptx::FP8)?;
        let mut launch = func.builder();
        launch.arg(&wv).arg(&out).arg(&self.scale).arg(&n);
        // SAFETY: the arguments match the kernel's signature and n bounds both buffers.
        unsafe { launch.launch(elementwise_config(n)) }.w()?;
        Ok((
            CudaStorage {
                slice: CudaStorageSlice::F8E4M3(out),
                device: dev.clone(),
            },
            l.shape().clone(),
        ))
    }
}

/// Whether [`linear`] multiplies these on FP8 tensor cores: bf16 activations and an fp8 weight on a
/// GPU that has them, with the sizes cuBLASLt's FP8 kernels take (every dimension a multiple of 16).
pub fn supports_linear(x: &Tensor, weight: &Tensor) -> bool {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return false;
    };
    let dims = x.dims();
    let (Some(&k), Ok((n, wk))) = (dims.last(), weight.dims2()) else {
        return false;
    };
    let rows = x.elem_count() / k.max(1);
    x.dtype() == DType::BF16
        && weight.dtype() == DType::F8E4M3
        && k == wk
        && [rows, k, n].iter().all(|d| d % 16 == 0)
        && has_fp8_tensor_cores(dev)
}

/// `x Wᵀ · scale + b` for bf16 `x` (rows, k), an fp8 weight `W` (n, k) and a bf16 bias (n), all
/// contiguous on CUDA: the activations are quantized to fp8 per tensor, then one cuBLASLt FP8 product
/// writes bf16 with the bias epilogue. Returns (rows, n).
pub fn linear(x: &Tensor, weight: &Tensor, scale: f32, bias: &Tensor) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &Fp8Linear { scale })
}

struct Fp8Linear {
    scale: f32,
}

/// cuBLASLt's workspace for the FP8 products, one per device (the size NVIDIA advises for Hopper).
static WORKSPACES: LazyLock<Mutex<HashMap<DeviceId, CudaSlice<u8>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const WORKSPACE_BYTES: usize = 32 << 20;

fn lt_error(e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt FP8 product: {e:?}"))
}

/// Frees cuBLASLt's descriptors however the product ends.
struct Descriptors {
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    desc: Option<sys::cublasLtMatmulDesc_t>,
    pref: Option<sys::cublasLtMatmulPreference_t>,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each handle was created once and is destroyed once, here.
        unsafe {
            for l in self.layouts.drain(..) {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc.take() {
                let _ = lt::destroy_matmul_desc(d);
            }
            if let Some(p) = self.pref.take() {
                let _ = lt::destroy_matmul_pref(p);
            }
        }
    }
}

/// Sets one attribute of a matmul descriptor from a value.
///
/// # Safety
/// `desc` must be live and `T` the attribute's type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        value as *const T as *const c_void,
        size_of::<T>(),
    )
    .map_err(lt_error)
}

impl CustomOp3 for Fp8Linear {
    fn name(&self) -> &'static str {
        "fp8-linear"
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
        let (rows, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        contiguous(xl, "x")?;
        contiguous(wl, "the fp8 weight")?;
        if wk != k || bl.dims() != [n] || !bl.is_contiguous() {
            bail!(
                "fp8 linear: x {:?}, weight {:?} and bias {:?} do not fit",
                xl.dims(),
                wl.dims(),
                bl.dims()
            )
        }
        let (CudaStorageSlice::BF16(xv), CudaStorageSlice::F8E4M3(wv), CudaStorageSlice::BF16(bv)) =
            (&x.slice, &w.slice, &b.slice)
        else {
            bail!("fp8 linear takes bf16 activations and bias and a float8_e4m3fn weight")
        };
        let (xv, wv, bv) = (
            xv.slice(xl.start_offset()..),
            wv.slice(wl.start_offset()..),
            bv.slice(bl.start_offset()..),
        );
        if !xl.start_offset().is_multiple_of(8) {
            bail!(
                "fp8 linear: x must start 16-byte aligned (offset {})",
                xl.start_offset()
            )
        }
        let dev = &x.device;
        let len = rows * k;

        // The activations in fp8, scaled by their own maximum.
        let absmax = dev.alloc_zeros::<f32>(1)?;
        // SAFETY: the quantize kernel writes every element of both.
        let (xq, x_scale) = unsafe { (dev.alloc::<F8E4M3>(len)?, dev.alloc::<f32>(1)?) };
        let func = dev.get_or_load_custom_func("absmax_bf16", MODULE, super::ptx::FP8)?;
        let mut launch = func.builder();
        launch.arg(&xv).arg(&absmax).arg(&len);
        // SAFETY: the arguments match the kernel's signature; len bounds x.
        unsafe { launch.launch(elementwise_config(len / 8)) }.w()?;
        let func = dev.get_or_load_custom_func("bf16_to_fp8_dynamic", MODULE, super::ptx::FP8)?;
        let mut launch = func.builder();
        launch
            .arg(&xv)
            .arg(&xq)
            .arg(&absmax)
            .arg(&x_scale)
            .arg(&len);
        // SAFETY: as above; len bounds x and xq.
        unsafe { launch.launch(elementwise_config(len / 8)) }.w()?;

        // SAFETY: cuBLASLt writes all rows·n elements (β = 0).
        let mut y = unsafe { dev.alloc::<half::bf16>(rows * n) }?;
        let handle = lt_handle(dev)?;
        let stream = dev.cuda_stream();
        let mut workspaces = WORKSPACES.lock().expect("FP8 workspaces lock poisoned");
        let workspace = match workspaces.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(dev.alloc_zeros::<u8>(WORKSPACE_BYTES)?)
            }
        };
        // Column-major, as gemm::linear: yᵀ (n, rows) = W (n, k) · xᵀ (k, rows), W read transposed:
        // the "TN" layout cuBLASLt's FP8 products require.
        let fp8 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let mut d = Descriptors {
            layouts: Vec::new(),
            desc: None,
            pref: None,
        };
        let layout = |d: &mut Descriptors, t, r: usize, c: usize, ld: usize| -> Result<_> {
            let l = lt::create_matrix_layout(t, r as u64, c as u64, ld as i64).map_err(lt_error)?;
            d.layouts.push(l);
            Ok(l)
        };
        let a_layout = layout(&mut d, fp8, k, n, k)?;
        let b_layout = layout(&mut d, fp8, k, rows, k)?;
        let c_layout = layout(&mut d, bf16, n, rows, n)?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_error)?;
        d.desc = Some(desc);
        let (bias_ptr, _bias_rec) = bv.device_ptr(&stream);
        let (x_scale_ptr, _scale_rec) = x_scale.device_ptr(&stream);
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: each value has its attribute's type; the pointers outlive the product (the records
        // above keep the stream ordered).
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale_ptr)?;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16)?;
        }
        let pref = lt::create_matmul_pref().map_err(lt_error)?;
        d.pref = Some(pref);
        // SAFETY: the attribute is a usize.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &WORKSPACE_BYTES as *const usize as *const c_void,
                size_of::<usize>(),
            )
            .map_err(lt_error)?;
        }
        // SAFETY: the descriptors are live; the layouts describe the buffers checked above.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(
                *handle.handle(),
                desc,
                a_layout,
                b_layout,
                c_layout,
                c_layout,
                pref,
            )
        }
        .map_err(lt_error)?;
        let (alpha, beta) = (self.scale, 0f32);
        {
            let (a_ptr, _a) = wv.device_ptr(&stream);
            let (b_ptr, _b) = xq.device_ptr(&stream);
            let (y_ptr, _y) = y.device_ptr_mut(&stream);
            let (ws_ptr, _ws) = workspace.device_ptr_mut(&stream);
            // SAFETY: every pointer is a live device buffer of the size its layout says.
            unsafe {
                lt::matmul(
                    *handle.handle(),
                    desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    a_ptr as *const c_void,
                    a_layout,
                    b_ptr as *const c_void,
                    b_layout,
                    y_ptr as *const c_void,
                    c_layout,
                    y_ptr as *mut c_void,
                    c_layout,
                    &heuristic.algo,
                    ws_ptr as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as *mut _,
                )
            }
            .map_err(lt_error)?;
        }
        Ok((
            CudaStorage {
                slice: CudaStorageSlice::BF16(y),
                device: dev.clone(),
            },
            Shape::from((rows, n)),
        ))
    }
}
