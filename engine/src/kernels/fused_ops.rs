//! Launchers for `kernels/fused_ops.cu`: single-pass bf16 versions of a FLUX block's memory-bound
//! ops (see the .cu file for each formula). Callers check the layouts' fit through [`supports`].

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

const MODULE: &str = "fused_ops";
const HEAD_DIM: usize = 128;

/// bf16 on CUDA: the kernels' one dtype.
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::BF16
}

/// The bf16 device memory of a storage from its layout's start.
macro_rules! bf16_view {
    ($s:expr, $l:expr) => {
        match &$s.slice {
            CudaStorageSlice::BF16(x) => x.slice($l.start_offset()..),
            _ => bail!("fused ops take bf16 only"),
        }
    };
}

/// The f32 device memory of a storage from its layout's start: the RoPE tables, which stay f32 as
/// the references keep them.
macro_rules! f32_view {
    ($s:expr, $l:expr, $what:expr) => {
        match &$s.slice {
            CudaStorageSlice::F32(x) => x.slice($l.start_offset()..),
            _ => bail!("{} must be f32", $what),
        }
    };
}

fn contiguous_rows(l: &Layout, what: &str) -> Result<()> {
    if !l.is_contiguous()
        || !l.start_offset().is_multiple_of(8)
        || l.dims().last().is_none_or(|c| c % 8 != 0)
    {
        bail!(
            "{what} must be contiguous, 16-byte aligned, with a multiple of 8 columns ({:?})",
            l.dims()
        )
    }
    Ok(())
}

/// A (B, 1, C) modulation vector: unit stride along C, aligned; returns its batch stride.
fn vector_stride(l: &Layout, batch: usize, cols: usize, what: &str) -> Result<i64> {
    let (s, d) = (l.stride(), l.dims());
    if d != [batch, 1, cols]
        || s[2] != 1
        || !l.start_offset().is_multiple_of(8)
        || (batch > 1 && s[0] % 8 != 0)
    {
        bail!("{what} must be ({batch}, 1, {cols}) with unit stride along the last dim (got {d:?} {s:?})")
    }
    Ok(s[0] as i64)
}

fn grid_stride_config(vectors: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (vectors.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn out_storage(dev: &CudaDevice, len: usize) -> Result<CudaStorage> {
    // SAFETY: each kernel writes every element of its output.
    let out = unsafe { dev.alloc(len) }?;
    Ok(CudaStorage {
        slice: CudaStorageSlice::BF16(out),
        device: dev.clone(),
    })
}

/// LayerNorm(x) (no affine, `eps`) · (1 + scale) + shift, for x (B, L, C) and (B, 1, C) vectors.
pub fn norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op3_no_bwd(shift, scale, &NormModulate { eps })
}

struct NormModulate {
    eps: f32,
}

impl CustomOp3 for NormModulate {
    fn name(&self) -> &'static str {
        "norm-modulate-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        sh: &CudaStorage,
        shl: &Layout,
        sc: &CudaStorage,
        scl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous_rows(xl, "norm_modulate input")?;
        let (b, l, c) = xl.shape().dims3()?;
        let bs = vector_stride(shl, b, c, "shift")?;
        if vector_stride(scl, b, c, "scale")? != bs {
            bail!("shift and scale must share a layout")
        }
        let dev = &x.device;
        let out = out_storage(dev, b * l * c)?;
        let CudaStorageSlice::BF16(o) = &out.slice else {
            unreachable!()
        };
        let (xv, shv, scv) = (bf16_view!(x, xl), bf16_view!(sh, shl), bf16_view!(sc, scl));
        let (cols, per_batch) = (c as i32, l as i32);
        let func =
            dev.get_or_load_custom_func("norm_modulate_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch.arg(&xv).arg(&shv).arg(&scv).arg(o);
        launch.arg(&cols).arg(&per_batch).arg(&bs).arg(&self.eps);
        let cfg = LaunchConfig {
            grid_dim: ((b * l) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((out, xl.shape().clone()))
    }
}

/// r + x · gate for r, x (B, L, C) and a (B, 1, C) gate.
pub fn gated_add(r: &Tensor, x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    r.apply_op3_no_bwd(x, gate, &GatedAdd)
}

struct GatedAdd;

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "gated-add-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        r: &CudaStorage,
        rl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous_rows(rl, "residual")?;
        contiguous_rows(xl, "gated input")?;
        if rl.dims() != xl.dims() {
            bail!("residual {:?} and input {:?} differ", rl.dims(), xl.dims())
        }
        let (b, l, c) = xl.shape().dims3()?;
        let gs = vector_stride(gl, b, c, "gate")?;
        let dev = &x.device;
        let n = b * l * c;
        let out = out_storage(dev, n)?;
        let CudaStorageSlice::BF16(o) = &out.slice else {
            unreachable!()
        };
        let (rv, xv, gv) = (bf16_view!(r, rl), bf16_view!(x, xl), bf16_view!(g, gl));
        let (rows, cols, per_batch) = ((b * l) as i64, c as i32, l as i32);
        let func = dev.get_or_load_custom_func("gated_add_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch.arg(&rv).arg(&xv).arg(&gv).arg(o);
        launch.arg(&rows).arg(&cols).arg(&per_batch).arg(&gs);
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(grid_stride_config(n / 8)) }.w()?;
        Ok((out, xl.shape().clone()))
    }
}

/// q, k, v heads (3, B, H, L, 128) from fused q|k|v rows (B, L, ≥ 3·H·128, unit stride along the
/// last dim): q and k RMS-normed by `scales` (2, 128) = [q; k] and rotated in f32 by `rope` (L, 128)
/// = [cos | sin] of FLUX's interleaved RoPE, f32.
pub fn qkv_heads(
    qkv: &Tensor,
    scales: &Tensor,
    rope: &Tensor,
    heads: usize,
    eps: f32,
) -> Result<Tensor> {
    qkv.apply_op3_no_bwd(scales, rope, &QkvHeads { heads, eps })
}

struct QkvHeads {
    heads: usize,
    eps: f32,
}

impl CustomOp3 for QkvHeads {
    fn name(&self) -> &'static str {
        "qkv-heads-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        qkv: &CudaStorage,
        ql: &Layout,
        sc: &CudaStorage,
        scl: &Layout,
        rope: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, l, w) = ql.shape().dims3()?;
        let h = self.heads;
        let s = ql.stride();
        if w < 3 * h * HEAD_DIM
            || s[2] != 1
            || !s[1].is_multiple_of(4)
            || !s[0].is_multiple_of(4)
            || !ql.start_offset().is_multiple_of(4)
        {
            bail!(
                "qkv rows {:?} (strides {s:?}) do not hold {h} heads of q, k and v, 8-byte aligned",
                ql.dims()
            )
        }
        if scl.dims() != [2, HEAD_DIM] || !scl.is_contiguous() {
            bail!("q/k norm scales must be a contiguous (2, {HEAD_DIM})")
        }
        if rl.dims() != [l, HEAD_DIM] || !rl.is_contiguous() || !rl.start_offset().is_multiple_of(2)
        {
            bail!(
                "rope table must be a contiguous f32 ({l}, {HEAD_DIM}) [cos | sin], got {:?}",
                rl.dims()
            )
        }
        let dev = &qkv.device;
        let out = out_storage(dev, 3 * b * h * l * HEAD_DIM)?;
        let CudaStorageSlice::BF16(o) = &out.slice else {
            unreachable!()
        };
        let (qv, scv, rv) = (
            bf16_view!(qkv, ql),
            bf16_view!(sc, scl),
            f32_view!(rope, rl, "the rope table"),
        );
        let (bi, li, hi) = (b as i32, l as i32, h as i32);
        let (row_stride, batch_stride) = (s[1] as i64, s[0] as i64);
        let func = dev.get_or_load_custom_func("qkv_heads_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch.arg(&qv).arg(&scv).arg(&rv).arg(o);
        launch
            .arg(&bi)
            .arg(&li)
            .arg(&hi)
            .arg(&row_stride)
            .arg(&batch_stride)
            .arg(&self.eps);
        let warps = b * l * h;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((out, Shape::from((3, b, h, l, HEAD_DIM))))
    }
}

/// [a | gelu(m)] along the last dim, for a (B, L, Ca) contiguous and m (B, L, Cm) with unit stride
/// along its last dim (a slice of a wider tensor).
pub fn gelu_cat(a: &Tensor, m: &Tensor) -> Result<Tensor> {
    a.apply_op2_no_bwd(m, &GeluCat)
}

struct GeluCat;

impl CustomOp2 for GeluCat {
    fn name(&self) -> &'static str {
        "gelu-cat-bf16"
    }
    super::cuda_only!(2);
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        m: &CudaStorage,
        ml: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous_rows(al, "gelu_cat's first input")?;
        let (b, l, ca) = al.shape().dims3()?;
        let (mb, ml_len, cm) = ml.shape().dims3()?;
        let s = ml.stride();
        let rows = b * l;
        if (mb, ml_len) != (b, l)
            || s[2] != 1
            || cm % 8 != 0
            || !s[1].is_multiple_of(8)
            || !ml.start_offset().is_multiple_of(8)
            || (b > 1 && s[0] != l * s[1])
        {
            bail!(
                "gelu_cat's second input {:?} (strides {s:?}) does not fit {:?}",
                ml.dims(),
                al.dims()
            )
        }
        let dev = &a.device;
        let out = out_storage(dev, rows * (ca + cm))?;
        let CudaStorageSlice::BF16(o) = &out.slice else {
            unreachable!()
        };
        let (av, mv) = (bf16_view!(a, al), bf16_view!(m, ml));
        let (rows_i, ca_i, cm_i, ms) = (rows as i64, ca as i32, cm as i32, s[1] as i64);
        let func = dev.get_or_load_custom_func("gelu_cat_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch
            .arg(&av)
            .arg(&mv)
            .arg(o)
            .arg(&rows_i)
            .arg(&ca_i)
            .arg(&cm_i)
            .arg(&ms);
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(grid_stride_config(rows * (ca + cm) / 8)) }.w()?;
        Ok((out, Shape::from((b, l, ca + cm))))
    }
}

/// A layout read as rows of its last dimension, each a unit-stride run, the rows evenly spaced (a
/// contiguous tensor, or a slice of a contiguous tensor's columns): (rows, columns, row stride), 16-byte
/// aligned.
fn strided_rows(l: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let Some((&cols, outer)) = dims.split_last() else {
        bail!("{what} has no columns")
    };
    let row = if outer.is_empty() {
        cols
    } else {
        strides[outer.len() - 1]
    };
    // The outer dimensions collapse into one run of rows `row` apart.
    let evenly = (0..outer.len().saturating_sub(1))
        .all(|i| dims[i] == 1 || strides[i] == strides[i + 1] * dims[i + 1]);
    if strides[dims.len() - 1] != 1
        || !evenly
        || !cols.is_multiple_of(8)
        || !row.is_multiple_of(8)
        || !l.start_offset().is_multiple_of(8)
    {
        bail!(
            "{what} must be rows of unit stride, evenly spaced, 16-byte aligned, a multiple of 8 columns \
             ({:?}, strides {strides:?})",
            dims
        )
    }
    Ok((outer.iter().product(), cols, row))
}

/// Launches `gelu_backward_bf16`: g · gelu′(x) over x's and g's rows (one shape) into `dx` from element
/// `at`, rows `dx_row` apart.
fn launch_gelu_backward(
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    dx: &mut CudaStorage,
    at: usize,
    dx_row: usize,
) -> Result<()> {
    let (rows, cols, x_row) = strided_rows(xl, "gelu_backward's input")?;
    let (g_rows, g_cols, g_row) = strided_rows(gl, "gelu_backward's gradient")?;
    if (rows, cols) != (g_rows, g_cols) || xl.dims() != gl.dims() {
        bail!(
            "gelu_backward: input {:?} and gradient {:?} differ",
            xl.dims(),
            gl.dims()
        )
    }
    let dev = x.device.clone();
    let (xv, gv) = (bf16_view!(x, xl), bf16_view!(g, gl));
    let CudaStorageSlice::BF16(d) = &mut dx.slice else {
        bail!("fused ops take bf16 only")
    };
    let mut dv = d.slice_mut(at..);
    let (x_row, g_row, dx_row, rows_i, cols_i) = (
        x_row as i64,
        g_row as i64,
        dx_row as i64,
        rows as i64,
        cols as i32,
    );
    let func = dev.get_or_load_custom_func("gelu_backward_bf16", MODULE, super::ptx::FUSED_OPS)?;
    let mut launch = func.builder();
    launch.arg(&xv).arg(&x_row).arg(&gv).arg(&g_row);
    launch.arg(&mut dv).arg(&dx_row).arg(&rows_i).arg(&cols_i);
    // SAFETY: arguments match the kernel; the rows of x, g and dx were checked by the callers and above.
    unsafe { launch.launch(grid_stride_config(rows * cols / 8)) }.w()?;
    Ok(())
}

/// `g · gelu′(x)` (tanh-approximated GELU) for bf16 `x` and `g` of one shape, each rows of unit stride
/// (contiguous, or a slice of columns): GELU's backward, as a new contiguous tensor.
pub fn gelu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(g, &GeluBackward)
}

/// [`gelu_backward`] written into the columns `at ..` of the contiguous (rows, width) `dst`, in place.
pub fn gelu_backward_into(dst: &Tensor, at: usize, x: &Tensor, g: &Tensor) -> Result<()> {
    dst.inplace_op3(x, g, &GeluBackwardInto { at })
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-backward-bf16"
    }
    super::cuda_only!(2);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let cols = *xl.dims().last().unwrap_or(&0);
        let mut out = out_storage(&x.device, n)?;
        launch_gelu_backward((x, xl), (g, gl), &mut out, 0, cols)?;
        Ok((out, xl.shape().clone()))
    }
}

struct GeluBackwardInto {
    at: usize,
}

impl candle_core::InplaceOp3 for GeluBackwardInto {
    fn name(&self) -> &'static str {
        "gelu-backward-into-bf16"
    }
    super::cuda_only!(inplace 3);
    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        contiguous_rows(dl, "gelu_backward_into's destination")?;
        let width = *dl.dims().last().unwrap_or(&0);
        let (rows, cols, _) = strided_rows(xl, "gelu_backward's input")?;
        if rows * width != dl.shape().elem_count()
            || !self.at.is_multiple_of(8)
            || self.at + cols > width
        {
            bail!(
                "gelu_backward_into: {:?} from column {} does not take {:?}",
                dl.dims(),
                self.at,
                xl.dims()
            )
        }
        launch_gelu_backward((x, xl), (g, gl), dst, dl.start_offset() + self.at, width)
    }
}

/// `Σ a·b` in f32 over each head's 128 columns of bf16 `a` and `b` (B, L, H·128), each of evenly
/// spaced rows (a narrow of wider rows will do), as (B, H, L): the attention backward's `rowsum(dO ⊙ O)`.
pub fn head_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op2_no_bwd(b, &HeadDot)
}

struct HeadDot;

impl CustomOp2 for HeadDot {
    fn name(&self) -> &'static str {
        "head-dot-d128-bf16"
    }
    super::cuda_only!(2);
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, len, width) = al.shape().dims3()?;
        let (rows, cols, a_row) = strided_rows(al, "head_dot's a")?;
        let (_, _, b_row) = strided_rows(bl, "head_dot's b")?;
        if al.dims() != bl.dims() || !cols.is_multiple_of(128) {
            bail!(
                "head_dot: a {:?} and b {:?} must be one shape of heads of 128",
                al.dims(),
                bl.dims()
            )
        }
        let heads = width / 128;
        let dev = &a.device;
        // SAFETY: the kernel writes every (row, head)'s sum.
        let out = unsafe { dev.alloc::<f32>(rows * heads) }?;
        let (av, bv) = (bf16_view!(a, al), bf16_view!(b, bl));
        let (a_row, b_row, rows_i) = (a_row as i64, b_row as i64, rows as i64);
        let (len_i, heads_i) = (len as i32, heads as i32);
        let func =
            dev.get_or_load_custom_func("head_dot_d128_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch.arg(&av).arg(&bv).arg(&out);
        launch
            .arg(&a_row)
            .arg(&b_row)
            .arg(&rows_i)
            .arg(&len_i)
            .arg(&heads_i);
        // Eight warps a block, one (row, head) each.
        let cfg = LaunchConfig {
            grid_dim: ((rows * heads).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; a and b hold `rows` rows of `heads` heads of 128 at
        // their row strides, out rows·heads floats.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice: CudaStorageSlice::F32(out),
                device: dev.clone(),
            },
            Shape::from((batch, heads, len)),
        ))
    }
}

/// Rows a block of the backward kernels takes (`BWD_ROWS` in the .cu file).
const BACKWARD_ROWS: usize = 8;

/// The launch of a backward kernel over (B, L, C) rows: blocks of [`BACKWARD_ROWS`] rows of one batch,
/// one thread per 8 columns.
fn backward_config(b: usize, l: usize, c: usize) -> Result<LaunchConfig> {
    let threads = (c / 8).next_multiple_of(32);
    if threads > 1024 {
        bail!("the backward kernels take at most 8192 columns, not {c}")
    }
    Ok(LaunchConfig {
        grid_dim: (l.div_ceil(BACKWARD_ROWS) as u32, b as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Adds up the backward kernels' per-block column sums `partial` (B, blocks, parts, C) into `out`
/// from element `at`: (parts, B, C) bf16.
fn column_sums<T>(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    out: &CudaSlice<T>,
    at: usize,
    [b, blocks, parts, c]: [usize; 4],
) -> Result<()> {
    let func = dev.get_or_load_custom_func("column_sums_bf16", MODULE, super::ptx::FUSED_OPS)?;
    let mut launch = func.builder();
    let out = out.slice(at..);
    let (bi, blocks_i, parts_i, ci) = (b as i32, blocks as i32, parts as i32, c as i32);
    launch
        .arg(partial)
        .arg(&out)
        .arg(&bi)
        .arg(&blocks_i)
        .arg(&parts_i)
        .arg(&ci);
    // 32 columns a block, 8 rows of threads (`COLUMN_SUM_ROWS` in the .cu file).
    let cfg = LaunchConfig {
        grid_dim: ((b * parts * c).div_ceil(32) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel; partial holds b·blocks·parts·c values, out parts·b·c.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// [`norm_modulate`]'s gradients from its output's `g`: (dx (B, L, C), d_shift (B, 1, C), d_scale
/// (B, 1, C)), bf16. x and g contiguous rows; scale a (B, 1, C) vector.
pub fn norm_modulate_backward(
    x: &Tensor,
    scale: &Tensor,
    g: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, c) = x.dims3()?;
    let out = x.apply_op3_no_bwd(scale, g, &NormModulateBackward { eps })?;
    let n = b * l * c;
    Ok((
        out.narrow(0, 0, n)?.reshape((b, l, c))?,
        out.narrow(0, n, b * c)?.reshape((b, 1, c))?,
        out.narrow(0, n + b * c, b * c)?.reshape((b, 1, c))?,
    ))
}

struct NormModulateBackward {
    eps: f32,
}

impl CustomOp3 for NormModulateBackward {
    fn name(&self) -> &'static str {
        "norm-modulate-backward-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        sc: &CudaStorage,
        scl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous_rows(xl, "norm_modulate_backward's input")?;
        contiguous_rows(gl, "norm_modulate_backward's gradient")?;
        if xl.dims() != gl.dims() {
            bail!(
                "norm_modulate_backward: input {:?} and gradient {:?} differ",
                xl.dims(),
                gl.dims()
            )
        }
        let (b, l, c) = xl.shape().dims3()?;
        let vs = vector_stride(scl, b, c, "scale")?;
        let cfg = backward_config(b, l, c)?;
        let blocks = cfg.grid_dim.0 as usize;
        let dev = &x.device;
        let n = b * l * c;
        let out = out_storage(dev, n + 2 * b * c)?;
        let CudaStorageSlice::BF16(o) = &out.slice else {
            unreachable!()
        };
        // SAFETY: the kernel writes every partial sum (each block its rows' columns).
        let partial = unsafe { dev.alloc::<f32>(b * blocks * 2 * c) }?;
        let (xv, scv, gv) = (bf16_view!(x, xl), bf16_view!(sc, scl), bf16_view!(g, gl));
        let (cols, per_batch) = (c as i32, l as i32);
        let func = dev.get_or_load_custom_func(
            "norm_modulate_backward_bf16",
            MODULE,
            super::ptx::FUSED_OPS,
        )?;
        let mut launch = func.builder();
        launch.arg(&xv).arg(&scv).arg(&gv).arg(o).arg(&partial);
        launch.arg(&cols).arg(&per_batch).arg(&vs).arg(&self.eps);
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        column_sums(dev, &partial, o, n, [b, blocks, 2, c])?;
        Ok((out, Shape::from(n + 2 * b * c)))
    }
}

/// [`gated_add`]'s gradients of x and of the gate from its output's `g`: (g·gate (B, L, C),
/// Σ g·x over the tokens (B, 1, C)), bf16. (r's is g itself.)
pub fn gated_add_backward(x: &Tensor, gate: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, l, c) = x.dims3()?;
    let out = x.apply_op3_no_bwd(gate, g, &GatedAddBackward)?;
    let n = b * l * c;
    Ok((
        out.narrow(0, 0, n)?.reshape((b, l, c))?,
        out.narrow(0, n, b * c)?.reshape((b, 1, c))?,
    ))
}

struct GatedAddBackward;

impl CustomOp3 for GatedAddBackward {
    fn name(&self) -> &'static str {
        "gated-add-backward-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        gate: &CudaStorage,
        gatel: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous_rows(xl, "gated_add_backward's input")?;
        contiguous_rows(gl, "gated_add_backward's gradient")?;
        if xl.dims() != gl.dims() {
            bail!(
                "gated_add_backward: input {:?} and gradient {:?} differ",
                xl.dims(),
                gl.dims()
            )
        }
        let (b, l, c) = xl.shape().dims3()?;
        let vs = vector_stride(gatel, b, c, "gate")?;
        let cfg = backward_config(b, l, c)?;
        let blocks = cfg.grid_dim.0 as usize;
        let dev = &x.device;
        let n = b * l * c;
        let out = out_storage(dev, n + b * c)?;
        let CudaStorageSlice::BF16(o) = &out.slice else {
            unreachable!()
        };
        // SAFETY: the kernel writes every partial sum (each block its rows' columns).
        let partial = unsafe { dev.alloc::<f32>(b * blocks * c) }?;
        let (xv, gatev, gv) = (
            bf16_view!(x, xl),
            bf16_view!(gate, gatel),
            bf16_view!(g, gl),
        );
        let (cols, per_batch) = (c as i32, l as i32);
        let func =
            dev.get_or_load_custom_func("gated_add_backward_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch.arg(&xv).arg(&gatev).arg(&gv).arg(o).arg(&partial);
        launch.arg(&cols).arg(&per_batch).arg(&vs);
        // SAFETY: arguments match the kernel; sizes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        column_sums(dev, &partial, o, n, [b, blocks, 1, c])?;
        Ok((out, Shape::from(n + b * c)))
    }
}

/// [`qkv_heads`]' gradient of its q|k|v rows from those of its heads, `dq`, `dk`, `dv` (each a
/// contiguous (B, H, L', 128)) at the tokens `at .. at + L` (all of them for a single block; a double
/// block's text or image part of the joint attention): (B, L, width) like `qkv`, zero past 3·H·128.
/// `scales` (2, 128) = [q; k] and `rope` (L, 128) = [cos | sin] in f32 are the forward's.
pub fn qkv_heads_backward(
    qkv: &Tensor,
    [dq, dk, dv]: [&Tensor; 3],
    at: usize,
    scales: &Tensor,
    rope: &Tensor,
    heads: usize,
    eps: f32,
) -> Result<Tensor> {
    qkv.apply_op3_no_bwd(
        dq,
        rope,
        &QkvHeadsBackward {
            heads,
            eps,
            at,
            dk: dk.clone(),
            dv: dv.clone(),
            scales: scales.clone(),
        },
    )
}

struct QkvHeadsBackward {
    heads: usize,
    eps: f32,
    at: usize,
    dk: Tensor,
    dv: Tensor,
    scales: Tensor,
}

impl CustomOp3 for QkvHeadsBackward {
    fn name(&self) -> &'static str {
        "qkv-heads-backward-bf16"
    }
    super::cuda_only!(3);
    fn cuda_fwd(
        &self,
        qkv: &CudaStorage,
        ql: &Layout,
        gq: &CudaStorage,
        gql: &Layout,
        rope: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, l, w) = ql.shape().dims3()?;
        let h = self.heads;
        let s = ql.stride();
        if w < 3 * h * HEAD_DIM
            || s[2] != 1
            || !s[1].is_multiple_of(4)
            || !s[0].is_multiple_of(4)
            || !ql.start_offset().is_multiple_of(4)
        {
            bail!(
                "qkv rows {:?} (strides {s:?}) do not hold {h} heads of q, k and v, 8-byte aligned",
                ql.dims()
            )
        }
        // The op lends one of the three heads' gradients; the other two and the norm scales are read
        // under their own locks.
        let (gks, gkl) = self.dk.storage_and_layout();
        let (gvs, gvl) = self.dv.storage_and_layout();
        let (scs, scl) = self.scales.storage_and_layout();
        let (Storage::Cuda(gks), Storage::Cuda(gvs), Storage::Cuda(scs)) = (&*gks, &*gvs, &*scs)
        else {
            bail!("qkv_heads_backward: the heads' gradients and the norm scales must be on the GPU")
        };
        let g_len = gql.dims().get(2).copied().unwrap_or(0);
        for gl in [gql, gkl, gvl] {
            if gl.dims() != [b, h, g_len, HEAD_DIM]
                || !gl.is_contiguous()
                || !gl.start_offset().is_multiple_of(4)
                || self.at + l > g_len
            {
                bail!(
                    "qkv_heads_backward: the heads' gradients must be contiguous ({b}, {h}, L, {HEAD_DIM}) \
                     with tokens {} .. {} (got {:?})",
                    self.at,
                    self.at + l,
                    gl.dims()
                )
            }
        }
        if scl.dims() != [2, HEAD_DIM] || !scl.is_contiguous() {
            bail!("qkv_heads_backward: q/k norm scales must be a contiguous (2, {HEAD_DIM})")
        }
        if rl.dims() != [l, HEAD_DIM] || !rl.is_contiguous() || !rl.start_offset().is_multiple_of(2)
        {
            bail!(
                "qkv_heads_backward: rope table must be a contiguous f32 ({l}, {HEAD_DIM}) [cos | sin], got {:?}",
                rl.dims()
            )
        }
        let dev = &qkv.device;
        // SAFETY: the kernel writes the q, k and v columns; the rest is zeroed here.
        let mut out = unsafe { dev.alloc(b * l * w) }?;
        if w > 3 * h * HEAD_DIM {
            dev.cuda_stream().memset_zeros(&mut out).w()?;
        }
        let (qv, scv, rv) = (
            bf16_view!(qkv, ql),
            bf16_view!(scs, scl),
            f32_view!(rope, rl, "qkv_heads_backward: the rope table"),
        );
        let (gqv, gkv, gvv) = (
            bf16_view!(gq, gql),
            bf16_view!(gks, gkl),
            bf16_view!(gvs, gvl),
        );
        let (bi, li, hi) = (b as i32, l as i32, h as i32);
        let (g_len, g_at) = (g_len as i32, self.at as i32);
        let (row_stride, batch_stride, out_row) = (s[1] as i64, s[0] as i64, w as i64);
        let func =
            dev.get_or_load_custom_func("qkv_heads_backward_bf16", MODULE, super::ptx::FUSED_OPS)?;
        let mut launch = func.builder();
        launch
            .arg(&qv)
            .arg(&gqv)
            .arg(&gkv)
            .arg(&gvv)
            .arg(&scv)
            .arg(&rv)
            .arg(&out);
        launch.arg(&bi).arg(&li).arg(&hi).arg(&g_len).arg(&g_at);
        launch
            .arg(&row_stride)
            .arg(&batch_stride)
            .arg(&out_row)
            .arg(&self.eps);
        let cfg = LaunchConfig {
            grid_dim: ((b * l * h).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; shapes checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let out = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((out, Shape::from((b, l, w))))
    }
}
