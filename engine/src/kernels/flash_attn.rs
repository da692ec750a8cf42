//! Fused attention forward: softmax(q kᵀ · scale) v in one pass over the keys, never writing the
//! (L × L) scores to memory. bf16, head dim 128, no mask. Two kernels: `kernels/flash_attn.cu` on warp
//! MMAs (sm_80 and newer) and `kernels/flash_attn_sm90.cu` on Hopper's warpgroup MMAs (sm_90a builds
//! running on compute capability 9.0), which [`flash_attn`] prefers where it can run.

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute_enum, CUfunction_attribute_enum,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

/// Whether the warpgroup kernels were compiled (the PTX targets sm_90a; elsewhere they are empty).
static SM90A_BUILD: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| super::ptx::FLASH_ATTN_SM90.contains(".target sm_90a"));

/// The one head size the kernels are written for (every FLUX model's).
pub const HEAD_DIM: usize = 128;
const KEYS_PER_TILE: usize = 64;

/// One kernel of the fused attention: which instructions it multiplies with and how many query rows
/// a block takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Warpgroup MMAs (`flash_attn_sm90.cu`, 64 rows a warpgroup) or warp MMAs (16 rows a warp).
    pub wgmma: bool,
    pub rows: usize,
}

impl Variant {
    /// Every variant, for benchmarks; [`flash_attn`] picks the first that [`Variant::runs_on`] the device.
    /// Fastest first at FLUX's sequence lengths (4608 and 1536 tokens) on Hopper, as measured
    /// (docs/performance.md's kernels table).
    pub const ALL: [Variant; 4] = [
        Variant {
            wgmma: true,
            rows: 192,
        },
        Variant {
            wgmma: true,
            rows: 128,
        },
        Variant {
            wgmma: false,
            rows: 64,
        },
        Variant {
            wgmma: false,
            rows: 128,
        },
    ];

    pub fn name(&self) -> String {
        format!("{}{}", if self.wgmma { "wg" } else { "r" }, self.rows)
    }

    /// Whether this build's kernel runs on `dev`: warp MMAs from compute capability 8.0; warpgroup MMAs
    /// only where the PTX was built for sm_90a (`CUDA_COMPUTE_CAP=90`) and the GPU is a 9.0 (H100, H200).
    pub fn runs_on(&self, dev: &CudaDevice) -> bool {
        let cap = |a| dev.cuda_stream().context().attribute(a).unwrap_or(0);
        let major = cap(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        let minor = cap(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        if self.wgmma {
            (major, minor) == (9, 0) && *SM90A_BUILD
        } else {
            major >= 8
        }
    }

    fn kernel(&self) -> (String, &'static str, &'static str) {
        if self.wgmma {
            let name = format!("flash_attn_wgmma_bf16_d128_r{}", self.rows);
            (name, "flash_attn_sm90", super::ptx::FLASH_ATTN_SM90)
        } else {
            let name = format!("flash_attn_fwd_bf16_d128_r{}", self.rows);
            (name, "flash_attn", super::ptx::FLASH_ATTN)
        }
    }

    /// Threads a block: 128 a warpgroup of 64 rows, or 32 a warp of 16 rows.
    fn threads(&self) -> u32 {
        2 * self.rows as u32
    }

    /// The Q tile, then two K and two V tiles, all bf16 rows of 128; the warpgroup kernels align their
    /// tiles to 1024 bytes themselves (the swizzle is a function of the address), hence the slack.
    fn shared_bytes(&self) -> u32 {
        let tiles = ((self.rows + 4 * KEYS_PER_TILE) * HEAD_DIM * 2) as u32;
        tiles + if self.wgmma { 1024 } else { 0 }
    }
}

/// Whether [`flash_attn`] can take these (B, H, L, D) heads: bf16 on a CUDA device with bf16
/// tensor cores (compute capability 8.0 or newer), head dim 128.
pub fn supports(q: &Tensor) -> bool {
    let Device::Cuda(dev) = q.device() else {
        return false;
    };
    q.dtype() == DType::BF16
        && q.rank() == 4
        && q.dim(3).ok() == Some(HEAD_DIM)
        && Variant::ALL.iter().any(|v| v.runs_on(dev))
}

/// The first of [`Variant::ALL`] that runs on `q`'s device; of the warp-MMA ones unless `hopper`.
fn variant_for(q: &Tensor, hopper: bool) -> Result<Variant> {
    let Device::Cuda(dev) = q.device() else {
        bail!("the fused attention kernel runs on CUDA only")
    };
    let Some(variant) = Variant::ALL
        .into_iter()
        .find(|v| v.runs_on(dev) && (hopper || !v.wgmma))
    else {
        bail!("no fused attention kernel runs on this GPU (needs compute capability 8.0 or newer)")
    };
    Ok(variant)
}

/// softmax(q kᵀ · scale) v for q, k, v of shape (B, H, L, 128), bf16 on CUDA (see [`supports`]), with
/// the first of [`Variant::ALL`] that runs on the device (with `hopper` false, the first on warp MMAs, as
/// on an Ampere GPU). Returns (B, L, H, 128), contiguous: as (B, L, H·128) it is the attention block's
/// output layout.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, hopper: bool) -> Result<Tensor> {
    flash_attn_variant(q, k, v, scale, variant_for(q, hopper)?)
}

/// [`flash_attn`] with the given kernel.
pub fn flash_attn_variant(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    variant: Variant,
) -> Result<Tensor> {
    q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttn {
            scale,
            variant,
            lse: None,
        },
    )
}

/// [`flash_attn`] and each row's log-sum-exp of its scaled scores in log2 units, (B, H, L) f32: what
/// the backward ([`backward`]) reads to compute the probabilities again without a softmax pass.
pub fn flash_attn_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    hopper: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, h, l, _) = q.dims4()?;
    let lse = Tensor::zeros((b, h, l), DType::F32, q.device())?;
    let out = q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttn {
            scale,
            variant: variant_for(q, hopper)?,
            lse: Some(lse.clone()),
        },
    )?;
    Ok((out, lse))
}

struct FlashAttn {
    scale: f32,
    variant: Variant,
    /// Where the kernel writes the rows' log-sum-exp, if anywhere.
    lse: Option<Tensor>,
}

/// Element strides of batch, head and position; the kernel reads 16-byte rows.
fn row_strides(l: &Layout, dims: (usize, usize, usize, usize)) -> Result<[i64; 3]> {
    let s = l.stride();
    if l.dims() != [dims.0, dims.1, dims.2, dims.3]
        || s[3] != 1
        || s[..3].iter().any(|x| x % 8 != 0)
        || !l.start_offset().is_multiple_of(8)
    {
        bail!(
            "flash attention needs q, k, v of one shape with unit stride along the head dim and \
             16-byte aligned rows (got {:?} strides {s:?})",
            l.dims()
        )
    }
    Ok([s[0] as i64, s[1] as i64, s[2] as i64])
}

/// A bf16 (B, H, L, 128) operand: its storage from `start_offset` and its [`row_strides`].
fn heads_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    dims: (usize, usize, usize, usize),
) -> Result<(CudaView<'a, bf16>, [i64; 3])> {
    if dims.3 != HEAD_DIM {
        bail!(
            "flash attention is built for head dim {HEAD_DIM}, got {}",
            dims.3
        )
    }
    let strides = row_strides(l, dims)?;
    let CudaStorageSlice::BF16(x) = &s.slice else {
        bail!("flash attention takes bf16 only")
    };
    Ok((x.slice(l.start_offset()..), strides))
}

/// The output's gradient as [`heads_view`] reads it: (B, H, L, D) heads, or (B, L, H·D) rows of any
/// 16-byte aligned row stride (a single block's attention columns of its wider rows).
fn grad_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    dims: (usize, usize, usize, usize),
) -> Result<(CudaView<'a, bf16>, [i64; 3])> {
    let (b, h, n, d) = dims;
    if l.dims().len() != 3 {
        return heads_view(s, l, dims);
    }
    let st = l.stride();
    if l.dims() != [b, n, h * d]
        || st[2] != 1
        || st[..2].iter().any(|x| x % 8 != 0)
        || !l.start_offset().is_multiple_of(8)
    {
        bail!(
            "the attention backward needs the output's gradient as ({b}, {n}, {}) rows of unit stride,              16-byte aligned (got {:?} strides {st:?})",
            h * d,
            l.dims()
        )
    }
    let CudaStorageSlice::BF16(x) = &s.slice else {
        bail!("flash attention takes bf16 only")
    };
    Ok((
        x.slice(l.start_offset()..),
        [st[0] as i64, d as i64, st[1] as i64],
    ))
}

/// A contiguous f32 (B, H, L) tensor's storage: the rows' log-sum-exp or delta.
fn row_values<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    dims: (usize, usize, usize),
) -> Result<CudaView<'a, f32>> {
    let CudaStorageSlice::F32(x) = &s.slice else {
        bail!("the rows' values are f32")
    };
    if !l.is_contiguous() || l.shape().elem_count() != dims.0 * dims.1 * dims.2 {
        bail!(
            "the rows' values must be contiguous {dims:?} (got {:?})",
            l.dims()
        )
    }
    Ok(x.slice(l.start_offset()..))
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flash-attn-bf16-d128"
    }

    super::cuda_only!(3);

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
        let (qv, [qsb, qsh, qsn]) = heads_view(q, ql, dims)?;
        let (kv, [ksb, ksh, ksn]) = heads_view(k, kl, dims)?;
        let (vv, [vsb, vsh, vsn]) = heads_view(v, vl, dims)?;
        let dev = &q.device;
        if !self.variant.runs_on(dev) {
            bail!(
                "the {} attention kernel does not run on this GPU or build",
                self.variant.name()
            )
        }
        let (name, module, ptx) = self.variant.kernel();
        let shared_bytes = self.variant.shared_bytes();
        let func = dev.get_or_load_custom_func(&name, module, ptx)?;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )
        .w()?;
        // SAFETY: every element is written by the kernel (one thread per output pair, rows < n).
        let out = unsafe { dev.alloc::<bf16>(b * n * h * d) }?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(self.variant.rows) as u32, h as u32, b as u32),
            block_dim: (self.variant.threads(), 1, 1),
            shared_mem_bytes: shared_bytes,
        };
        let (n_i, h_i) = (n as i32, h as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let run = |lse: Option<&mut CudaViewMut<f32>>| -> Result<()> {
            let mut launch = func.builder();
            launch.arg(&qv).arg(&kv).arg(&vv).arg(&out);
            let null = 0u64;
            match lse {
                Some(lse) => launch.arg(lse),
                None => launch.arg(&null),
            };
            launch.arg(&n_i).arg(&h_i).arg(&scale_log2);
            for s in [&qsb, &qsh, &qsn, &ksb, &ksh, &ksn, &vsb, &vsh, &vsn] {
                launch.arg(s);
            }
            // SAFETY: argument list matches the kernel's signature; shapes and strides checked
            // above, lse (when given) holds B·H·L floats.
            unsafe { launch.launch(cfg) }.w()?;
            Ok(())
        };
        match &self.lse {
            None => run(None)?,
            Some(lse) => super::with_storage_mut(lse, |s, l| {
                let lse = s.as_cuda_slice_mut::<f32>()?;
                if !l.is_contiguous() || l.dims() != [b, h, n] {
                    bail!("the log-sum-exp must be contiguous ({b}, {h}, {n})")
                }
                run(Some(&mut lse.slice_mut(l.start_offset()..)))
            })?,
        }
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, Shape::from((b, n, h, d))))
    }
}

/// One kernel of attention's backward. Both compute the scores S = q kᵀ and their gradients
/// dP = g vᵀ in registers from the forward's log-sum-exp, so neither is written to memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// dK, dV and dSᵀ, 128 keys a block on Hopper's warpgroup MMAs (`flash_attn_bwd_kv_wgmma` in
    /// `kernels/flash_attn_sm90.cu`); cuBLAS then takes dQ = dS k.
    Kv,
    /// P and dS of 64 query rows a block on warp MMAs (`flash_attn_bwd_probs` in
    /// `kernels/flash_attn.cu`, sm_80 and newer); cuBLAS then takes dV = Pᵀ g, dQ = dS k, dK = dSᵀ q.
    Probs,
}

impl Backward {
    /// Every kernel, fastest first: [`backward`] takes the first that runs on the device (the
    /// warpgroup kernel keeps K, V and their gradients on chip, so it moves far less memory).
    pub const ALL: [Backward; 2] = [Backward::Kv, Backward::Probs];

    pub fn name(&self) -> &'static str {
        match self {
            Backward::Kv => "kv_wg128",
            Backward::Probs => "probs_r64",
        }
    }

    fn variant(&self) -> Variant {
        match self {
            Backward::Kv => Variant {
                wgmma: true,
                rows: 128,
            },
            Backward::Probs => Variant {
                wgmma: false,
                rows: 64,
            },
        }
    }

    /// Whether this build's kernel runs on `dev` (as the forward's of the same instructions).
    pub fn runs_on(&self, dev: &CudaDevice) -> bool {
        self.variant().runs_on(dev)
    }

    fn kernel(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            Backward::Kv => (
                "flash_attn_bwd_kv_wgmma_bf16_d128_r128",
                "flash_attn_sm90",
                super::ptx::FLASH_ATTN_SM90,
            ),
            Backward::Probs => (
                "flash_attn_bwd_probs_bf16_d128_r64",
                "flash_attn",
                super::ptx::FLASH_ATTN,
            ),
        }
    }

    /// Kv: 1024 bytes of alignment slack, the block's K and V tiles, two stages of Q and dO tiles
    /// and of their rows' lse and delta, and a staging of 16 rows of 72 bf16 a warp. Probs: its Q and
    /// dO tiles (which also take the staging) and two K and two V tiles.
    fn shared_bytes(&self) -> u32 {
        let rows = self.variant().rows;
        let bytes = match self {
            Backward::Kv => {
                1024 + 2 * rows * HEAD_DIM * 2
                    + 2 * 2 * KEYS_PER_TILE * HEAD_DIM * 2
                    + rows / 16 * 16 * (KEYS_PER_TILE + 8) * 2
                    + 2 * 2 * KEYS_PER_TILE * 4
            }
            Backward::Probs => (2 * rows + 4 * KEYS_PER_TILE) * HEAD_DIM * 2,
        };
        bytes as u32
    }

    /// The lengths of the kernel's outputs, in one buffer: Kv's dK, dV (B, H, L, D) and dSᵀ (B, H, L, L);
    /// Probs' P and dS (B, H, L, L).
    fn outputs(&self, (b, h, n, d): (usize, usize, usize, usize)) -> Vec<usize> {
        match self {
            Backward::Kv => vec![b * h * n * d, b * h * n * d, b * h * n * n],
            Backward::Probs => vec![b * h * n * n, b * h * n * n],
        }
    }
}

/// The gradients [dq, dk, dv] of `softmax(q kᵀ · scale) v` for q, k, v (B, H, L, 128) and the
/// output's gradient `g`, as (B, H, L, 128) heads or (B, L, H·128) rows, all bf16 on CUDA with any
/// 16-byte aligned row strides (cuBLAS's products copy what they need contiguous), from the forward's `lse`
/// ([`flash_attn_lse`]) and `delta = rowsum(g ⊙ o)` ((B, H, L) f32), with the first of
/// [`Backward::ALL`] that runs on the device (of the warp-MMA ones unless `hopper`).
pub fn backward(
    qkv: [&Tensor; 3],
    g: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f32,
    hopper: bool,
) -> Result<[Tensor; 3]> {
    let Device::Cuda(dev) = qkv[0].device() else {
        bail!("the attention backward's kernels run on CUDA only")
    };
    let Some(kernel) = Backward::ALL
        .into_iter()
        .find(|k| k.runs_on(dev) && (hopper || !k.variant().wgmma))
    else {
        bail!("the attention backward's kernels need compute capability 8.0 or newer")
    };
    backward_with(kernel, qkv, g, lse, delta, scale)
}

/// [`backward`] with the given kernel.
pub fn backward_with(
    kernel: Backward,
    [q, k, v]: [&Tensor; 3],
    g: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f32,
) -> Result<[Tensor; 3]> {
    let dims = q.dims4()?;
    let (b, h, n, d) = dims;
    let flat = q.apply_op3_no_bwd(
        k,
        v,
        &BackwardOp {
            g: g.clone(),
            lse: lse.clone(),
            delta: delta.clone(),
            scale,
            kernel,
        },
    )?;
    let mut at = 0;
    let mut parts = Vec::new();
    for len in kernel.outputs(dims) {
        parts.push(flat.narrow(0, at, len)?);
        at += len;
    }
    let heads = |t: &Tensor| t.reshape((b, h, n, d));
    let scores = |t: &Tensor| t.reshape((b, h, n, n));
    match kernel {
        Backward::Kv => {
            let ds_t = scores(&parts[2])?;
            let dq = ds_t.t()?.matmul(&k.contiguous()?)?;
            Ok([dq, heads(&parts[0])?, heads(&parts[1])?])
        }
        Backward::Probs => {
            let (p, ds) = (scores(&parts[0])?, scores(&parts[1])?);
            let g = match g.rank() {
                3 => g.contiguous()?.reshape((b, n, h, d))?.transpose(1, 2)?,
                _ => g.clone(),
            };
            let dv = p.t()?.matmul(&g.contiguous()?)?;
            drop(p);
            // ds comes scaled: the two products need no pass of their own for it.
            Ok([
                ds.matmul(&k.contiguous()?)?,
                ds.t()?.matmul(&q.contiguous()?)?,
                dv,
            ])
        }
    }
}

struct BackwardOp {
    g: Tensor,
    lse: Tensor,
    delta: Tensor,
    scale: f32,
    kernel: Backward,
}

impl CustomOp3 for BackwardOp {
    fn name(&self) -> &'static str {
        "flash-attn-bwd-bf16-d128"
    }

    super::cuda_only!(3);

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
        let (b, h, n, _) = dims;
        let (qv, [qsb, qsh, qsn]) = heads_view(q, ql, dims)?;
        let (kv, [ksb, ksh, ksn]) = heads_view(k, kl, dims)?;
        let (vv, [vsb, vsh, vsn]) = heads_view(v, vl, dims)?;
        // The op lends three storages; the other inputs are read under their own read locks.
        let (gs, gl) = self.g.storage_and_layout();
        let (ls, ll) = self.lse.storage_and_layout();
        let (ds, dl) = self.delta.storage_and_layout();
        let (Storage::Cuda(gs), Storage::Cuda(ls), Storage::Cuda(ds)) = (&*gs, &*ls, &*ds) else {
            bail!("the attention backward's inputs must all be on the GPU")
        };
        let (gv, [gsb, gsh, gsn]) = grad_view(gs, gl, dims)?;
        let lv = row_values(ls, ll, (b, h, n))?;
        let dv = row_values(ds, dl, (b, h, n))?;
        let dev = &q.device;
        if !self.kernel.runs_on(dev) {
            bail!(
                "the {} attention backward kernel does not run on this GPU or build",
                self.kernel.name()
            )
        }
        let (name, module, ptx) = self.kernel.kernel();
        let shared_bytes = self.kernel.shared_bytes();
        let func = dev.get_or_load_custom_func(name, module, ptx)?;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )
        .w()?;
        let lens = self.kernel.outputs(dims);
        let total = lens.iter().sum();
        // SAFETY: the kernel writes every element of each output.
        let out = unsafe { dev.alloc::<bf16>(total) }?;
        let variant = self.kernel.variant();
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(variant.rows) as u32, h as u32, b as u32),
            block_dim: (variant.threads(), 1, 1),
            shared_mem_bytes: shared_bytes,
        };
        let (n_i, h_i) = (n as i32, h as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        {
            let mut at = 0;
            let parts: Vec<_> = lens
                .iter()
                .map(|len| {
                    at += len;
                    out.slice(at - len..at)
                })
                .collect();
            let mut launch = func.builder();
            launch.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&dv);
            for part in &parts {
                launch.arg(part);
            }
            launch.arg(&n_i).arg(&h_i).arg(&scale_log2).arg(&self.scale);
            for s in [
                &qsb, &qsh, &qsn, &ksb, &ksh, &ksn, &vsb, &vsh, &vsn, &gsb, &gsh, &gsn,
            ] {
                launch.arg(s);
            }
            // SAFETY: argument list matches the kernel's signature; shapes, strides and the row
            // values' lengths checked above.
            unsafe { launch.launch(cfg) }.w()?;
        }
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, Shape::from(total)))
    }
}
