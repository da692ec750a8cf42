//! Fused attention forward (`kernels/flash_attn.cu`): softmax(q kᵀ · scale) v in one pass over the
//! keys, never writing the (L × L) scores to memory. bf16, head dim 128, no mask, sm_80 or newer.

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute_enum, CUfunction_attribute_enum,
};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// The one head size the kernel is written for (every FLUX model's).
pub const HEAD_DIM: usize = 128;
/// Query rows a block takes (16 a warp): 64 or 128, the kernel's two variants.
pub const ROW_TILES: [usize; 2] = [64, 128];
/// The variant [`flash_attn`] uses.
pub const DEFAULT_ROWS: usize = 64;
const KEYS_PER_TILE: usize = 64;

/// Whether [`flash_attn`] can take these (B, H, L, D) heads: bf16 on a CUDA device with bf16
/// tensor cores (compute capability 8.0 or newer), head dim 128.
pub fn supports(q: &Tensor) -> bool {
    let Device::Cuda(dev) = q.device() else {
        return false;
    };
    let major = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    q.dtype() == DType::BF16
        && q.rank() == 4
        && q.dim(3).ok() == Some(HEAD_DIM)
        && major.is_ok_and(|m| m >= 8)
}

/// softmax(q kᵀ · scale) v for q, k, v of shape (B, H, L, 128), bf16 on CUDA (see [`supports`]).
/// Returns (B, L, H, 128), contiguous: as (B, L, H·128) it is the attention block's output layout.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    flash_attn_rows(q, k, v, scale, DEFAULT_ROWS)
}

/// [`flash_attn`] with the variant taking `rows` (one of [`ROW_TILES`]) query rows a block.
pub fn flash_attn_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    rows: usize,
) -> Result<Tensor> {
    if !ROW_TILES.contains(&rows) {
        bail!("flash attention has variants for {ROW_TILES:?} query rows a block, not {rows}")
    }
    q.apply_op3_no_bwd(k, v, &FlashAttn { scale, rows })
}

struct FlashAttn {
    scale: f32,
    rows: usize,
}

/// Element strides of batch, head and position; the kernel reads 16-byte rows.
fn row_strides(l: &Layout, dims: (usize, usize, usize, usize)) -> Result<[i64; 3]> {
    let s = l.stride();
    if l.dims() != [dims.0, dims.1, dims.2, dims.3]
        || s[3] != 1
        || s[..3].iter().any(|x| x % 8 != 0)
        || l.start_offset() % 8 != 0
    {
        bail!(
            "flash attention needs q, k, v of one shape with unit stride along the head dim and \
             16-byte aligned rows (got {:?} strides {s:?})",
            l.dims()
        )
    }
    Ok([s[0] as i64, s[1] as i64, s[2] as i64])
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flash-attn-bf16-d128"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the fused attention kernel runs on CUDA only; the CPU takes the plain path")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = ql.shape().dims4()?;
        let (b, h, n, d) = dims;
        if d != HEAD_DIM {
            bail!("flash attention is built for head dim {HEAD_DIM}, got {d}")
        }
        let [qsb, qsh, qsn] = row_strides(ql, dims)?;
        let [ksb, ksh, ksn] = row_strides(kl, dims)?;
        let [vsb, vsh, vsn] = row_strides(vl, dims)?;
        let (CudaStorageSlice::BF16(qs), CudaStorageSlice::BF16(ks), CudaStorageSlice::BF16(vs)) =
            (&q.slice, &k.slice, &v.slice)
        else {
            bail!("flash attention takes bf16 only")
        };
        let qv = qs.slice(ql.start_offset()..);
        let kv = ks.slice(kl.start_offset()..);
        let vv = vs.slice(vl.start_offset()..);
        let dev = &q.device;
        let name = format!("flash_attn_fwd_bf16_d128_r{}", self.rows);
        let func = dev.get_or_load_custom_func(&name, "flash_attn", super::ptx::FLASH_ATTN)?;
        // The Q tile, then two K and two V tiles, all bf16 rows of 128.
        let shared_bytes = ((self.rows + 4 * KEYS_PER_TILE) * HEAD_DIM * 2) as u32;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )
        .w()?;
        // SAFETY: every element is written by the kernel (one thread per output pair, rows < n).
        let out = unsafe { dev.alloc(b * n * h * d) }?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(self.rows) as u32, h as u32, b as u32),
            block_dim: (2 * self.rows as u32, 1, 1),
            shared_mem_bytes: shared_bytes,
        };
        let (n_i, h_i) = (n as i32, h as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let mut launch = func.builder();
        launch.arg(&qv).arg(&kv).arg(&vv).arg(&out);
        launch.arg(&n_i).arg(&h_i).arg(&scale_log2);
        for s in [&qsb, &qsh, &qsn, &ksb, &ksh, &ksn, &vsb, &vsh, &vsn] {
            launch.arg(s);
        }
        // SAFETY: argument list matches the kernel's signature; shapes and strides checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, Shape::from((b, n, h, d))))
    }
}
