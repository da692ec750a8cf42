// Memory-bound ops of a FLUX block fused into single passes over bf16 tensors (f32 arithmetic inside):
// candle runs each as several kernels, and its broadcasting kernels index every element through
// divisions, which made a bias add 15x slower than the memory allows.
//   norm_modulate:  y = LayerNorm(x) * (1 + scale) + shift   (no affine; per-batch modulation vectors)
//   gated_add:      y = r + x * gate                    (per-batch gate vector)
//   qkv_heads:      fused q|k|v rows -> (B, H, L, D) heads, RMS-normed q and k, RoPE on q and k
//   gelu_cat:       [a | gelu(m)]; gelu_backward: g * gelu'(x) (row-strided)
//   head_dot_d128:  Σ a·b per head of 128 columns (attention backward's delta)
//   training backward passes: norm_modulate_backward, gated_add_backward (+ column_sums),
//                   qkv_heads_backward
// Rows are contiguous with `cols` a multiple of 8 (16-byte vectors).
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

struct alignas(16) bf16x8 {
    __nv_bfloat162 v[4];
};

__device__ __forceinline__ void unpack(const bf16x8& p, float (&f)[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __bfloat1622float2(p.v[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ bf16x8 pack(const float (&f)[8]) {
    bf16x8 p;
#pragma unroll
    for (int i = 0; i < 4; ++i) p.v[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return p;
}

__device__ __forceinline__ bf16x8 load8(const __nv_bfloat16* p) { return *reinterpret_cast<const bf16x8*>(p); }
__device__ __forceinline__ void store8(__nv_bfloat16* p, const bf16x8& v) { *reinterpret_cast<bf16x8*>(p) = v; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
    return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float x, float* shared32) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_sum(x);
    __syncthreads();  // shared32 may still be read from a previous call
    if (lane == 0) shared32[warp] = x;
    __syncthreads();
    x = lane < warps ? shared32[lane] : 0.f;
    return warp_sum(x);
}

}  // namespace

// One block per row. shift/scale: per-batch vectors, `vec_bstride` elements apart; batch = row / rows_per_batch.
extern "C" __global__ void norm_modulate_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ shift,
                                              const __nv_bfloat16* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                              int cols, int rows_per_batch, int64_t vec_bstride, float eps) {
    __shared__ float shared32[32];
    const int64_t row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * cols;
    const int64_t vb = (row / rows_per_batch) * vec_bstride;
    float s = 0.f, ss = 0.f;
    for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
        float a[8];
        unpack(load8(xr + c), a);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s += a[j];
            ss += a[j] * a[j];
        }
    }
    const float mean = block_sum(s, shared32) / cols;
    const float var = fmaxf(block_sum(ss, shared32) / cols - mean * mean, 0.f);
    const float rstd = rsqrtf(var + eps);
    for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
        float a[8], sh[8], sc[8];
        unpack(load8(xr + c), a);
        unpack(load8(shift + vb + c), sh);
        unpack(load8(scale + vb + c), sc);
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = (a[j] - mean) * rstd * (1.f + sc[j]) + sh[j];
        store8(y + row * cols + c, pack(a));
    }
}

extern "C" __global__ void gated_add_bf16(const __nv_bfloat16* __restrict__ r, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ gate, __nv_bfloat16* __restrict__ y,
                                          int64_t rows, int cols, int rows_per_batch, int64_t vec_bstride) {
    const int c8 = cols / 8;
    const int64_t n = rows * c8;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / c8;
        float a[8], b[8], g[8];
        unpack(load8(r + i * 8), a);
        unpack(load8(x + i * 8), b);
        unpack(load8(gate + (row / rows_per_batch) * vec_bstride + (i % c8) * 8), g);
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] += b[j] * g[j];
        store8(y + i * 8, pack(a));
    }
}

// qkv: (B, L, >= 3·H·128) rows of q|k|v, `row_stride` elements from token to token and `batch_stride`
// from batch to batch. norm_scales: (2, 128) = [q scale; k scale]. rope: (L, 128) = [cos(64) | sin(64)]
// per position (FLUX's interleaved pairs), f32 as the references keep it. out: (3, B, H, L, 128) = q, k, v.
// One warp per (batch, token, head), 4 consecutive elements a lane (two RoPE pairs).
extern "C" __global__ void qkv_heads_bf16(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ norm_scales,
                                          const float* __restrict__ rope, __nv_bfloat16* __restrict__ out,
                                          int batch, int len, int heads, int64_t row_stride, int64_t batch_stride,
                                          float eps) {
    constexpr int D = 128;
    const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= (int64_t)batch * len * heads) return;
    const int h = warp % heads;
    const int l = (warp / heads) % len;
    const int b = warp / ((int64_t)heads * len);
    const __nv_bfloat16* src = qkv + b * batch_stride + l * row_stride + h * D + lane * 4;
    const int64_t hd = (int64_t)heads * D;
    const int64_t plane = (int64_t)batch * heads * len * D;
    __nv_bfloat16* dst = out + (((int64_t)b * heads + h) * len + l) * D + lane * 4;

    const float2 cs = *reinterpret_cast<const float2*>(rope + (int64_t)l * D + lane * 2);
    const float2 sn = *reinterpret_cast<const float2*>(rope + (int64_t)l * D + 64 + lane * 2);
#pragma unroll
    for (int which = 0; which < 2; ++which) {
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(src + which * hd);
        float2 x0 = __bfloat1622float2(p[0]), x1 = __bfloat1622float2(p[1]);
        const float rms = rsqrtf(warp_sum(x0.x * x0.x + x0.y * x0.y + x1.x * x1.x + x1.y * x1.y) / D + eps);
        const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(norm_scales + which * D + lane * 4);
        const float2 w0 = __bfloat1622float2(w[0]), w1 = __bfloat1622float2(w[1]);
        // RMS norm rounded to bf16 as the plain path stores it, then RoPE on each (even, odd) pair in f32.
        float2 n0 = __bfloat1622float2(__floats2bfloat162_rn(x0.x * rms * w0.x, x0.y * rms * w0.y));
        float2 n1 = __bfloat1622float2(__floats2bfloat162_rn(x1.x * rms * w1.x, x1.y * rms * w1.y));
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(dst + which * plane);
        o[0] = __floats2bfloat162_rn(n0.x * cs.x - n0.y * sn.x, n0.x * sn.x + n0.y * cs.x);
        o[1] = __floats2bfloat162_rn(n1.x * cs.y - n1.y * sn.y, n1.x * sn.y + n1.y * cs.y);
    }
    *reinterpret_cast<uint2*>(dst + 2 * plane) = *reinterpret_cast<const uint2*>(src + 2 * hd);
}

// y (rows x (a_cols + m_cols)) = [a | gelu_tanh(m)]: the single block's attention output beside its MLP
// activation, read from linear1's output in place (`m_row_stride` elements from row to row).
extern "C" __global__ void gelu_cat_bf16(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ m,
                                         __nv_bfloat16* __restrict__ y, int64_t rows, int a_cols, int m_cols,
                                         int64_t m_row_stride) {
    const int c8 = (a_cols + m_cols) / 8;
    const int64_t n = rows * c8;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / c8;
        const int c = (int)(i % c8) * 8;
        if (c < a_cols) {
            store8(y + i * 8, load8(a + row * a_cols + c));
        } else {
            float v[8];
            unpack(load8(m + row * m_row_stride + (c - a_cols)), v);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float x = v[j];
                v[j] = 0.5f * x * (1.f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
            }
            store8(y + i * 8, pack(v));
        }
    }
}

// dx = g * gelu_tanh'(x) over `rows` rows of `cols` (a multiple of 8) columns, x, g and dx each with its own
// row stride: the backward pass of every GELU of a training step (candle composes it of a dozen elementwise
// kernels); the single block's reads its columns of linear1's output and of linear2's input gradient in
// place and writes straight into its columns of linear1's output gradient.
extern "C" __global__ void gelu_backward_bf16(const __nv_bfloat16* __restrict__ x, int64_t x_row,
                                              const __nv_bfloat16* __restrict__ g, int64_t g_row,
                                              __nv_bfloat16* __restrict__ dx, int64_t dx_row, int64_t rows,
                                              int cols) {
    const int c8 = cols / 8;
    const int64_t n = rows * c8;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / c8;
        const int c = (int)(i % c8) * 8;
        float xv[8], gv[8];
        unpack(load8(x + row * x_row + c), xv);
        unpack(load8(g + row * g_row + c), gv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float v = xv[j];
            const float t = tanhf(0.7978845608f * (v + 0.044715f * v * v * v));
            const float d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * 0.7978845608f * (1.f + 0.134145f * v * v);
            xv[j] = gv[j] * d;
        }
        store8(dx + row * dx_row + c, pack(xv));
    }
}

// Σ a·b in f32 over each head's 128 columns of `rows` = B·len rows of a and b (a_row and b_row
// elements apart), into out as (B, heads, len): the attention backward's delta = rowsum(dO ⊙ O), read
// from the (B, L, H·128) rows where they lie (candle took a product, a cast to f32 and a sum, 0.3 ms at
// 4608 tokens, after two copies into heads). One warp a (row, head).
extern "C" __global__ void head_dot_d128_bf16(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                                              float* __restrict__ out, int64_t a_row, int64_t b_row, int64_t rows,
                                              int len, int heads) {
    const int64_t w = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (w >= rows * heads) return;
    const int64_t r = w / heads;
    const int h = w % heads;
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(a + r * a_row + h * 128 + lane * 4);
    const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(b + r * b_row + h * 128 + lane * 4);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const float2 x = __bfloat1622float2(a2[j]);
        const float2 y = __bfloat1622float2(b2[j]);
        sum += x.x * y.x + x.y * y.y;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) out[((r / len) * heads + h) * len + r % len] = sum;
}

// ---- Backward passes (LoRA training) ----
// Sums over the tokens (the modulation vectors' gradients) are made per block of BWD_ROWS rows into f32
// partials and then added up by column_sums_bf16: deterministic, no atomics.
constexpr int BWD_ROWS = 8;

// norm_modulate's backward for rows of `cols` (one 8-column vector a thread; blockDim.x >= cols / 8):
// with x̂ = (x − μ)·r and g' = g·(1 + scale), dx = r·(g' − mean(g') − x̂·mean(g'·x̂)). partial gets this
// block's Σ g (shift's gradient) and Σ g·x̂ (scale's). Grid: (ceil(rows_per_batch / BWD_ROWS), batch).
extern "C" __global__ void norm_modulate_backward_bf16(const __nv_bfloat16* __restrict__ x,
                                                       const __nv_bfloat16* __restrict__ scale,
                                                       const __nv_bfloat16* __restrict__ g, __nv_bfloat16* __restrict__ dx,
                                                       float* __restrict__ partial, int cols, int rows_per_batch,
                                                       int64_t vec_bstride, float eps) {
    __shared__ float shared32[32];
    const int b = blockIdx.y, c = threadIdx.x * 8;
    const bool active = c < cols;
    float sc[8] = {}, acc_shift[8] = {}, acc_scale[8] = {};
    if (active) unpack(load8(scale + b * vec_bstride + c), sc);
    for (int i = 0; i < BWD_ROWS; ++i) {
        const int r = blockIdx.x * BWD_ROWS + i;
        if (r >= rows_per_batch) break;  // the same for the whole block
        const int64_t off = ((int64_t)b * rows_per_batch + r) * cols + c;
        float xv[8] = {}, gv[8] = {};
        if (active) {
            unpack(load8(x + off), xv);
            unpack(load8(g + off), gv);
        }
        float s = 0.f, ss = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s += xv[j];
            ss += xv[j] * xv[j];
        }
        const float mean = block_sum(s, shared32) / cols;
        const float rstd = rsqrtf(fmaxf(block_sum(ss, shared32) / cols - mean * mean, 0.f) + eps);
        float xh[8], gs[8], s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            xh[j] = (xv[j] - mean) * rstd;
            gs[j] = gv[j] * (1.f + sc[j]);
            s1 += gs[j];
            s2 += gs[j] * xh[j];
            acc_shift[j] += gv[j];
            acc_scale[j] += gv[j] * xh[j];
        }
        const float m1 = block_sum(s1, shared32) / cols, m2 = block_sum(s2, shared32) / cols;
        if (active) {
#pragma unroll
            for (int j = 0; j < 8; ++j) gs[j] = (gs[j] - m1 - xh[j] * m2) * rstd;
            store8(dx + off, pack(gs));
        }
    }
    if (active) {
        float* p = partial + ((int64_t)b * gridDim.x + blockIdx.x) * 2 * cols + c;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            p[j] = acc_shift[j];
            p[cols + j] = acc_scale[j];
        }
    }
}

// gated_add's backward: dx = g·gate; partial gets this block's Σ g·x (the gate's gradient). Layout as above.
extern "C" __global__ void gated_add_backward_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ gate,
                                                   const __nv_bfloat16* __restrict__ g, __nv_bfloat16* __restrict__ dx,
                                                   float* __restrict__ partial, int cols, int rows_per_batch,
                                                   int64_t vec_bstride) {
    const int b = blockIdx.y, c = threadIdx.x * 8;
    if (c >= cols) return;
    float gt[8], acc[8] = {};
    unpack(load8(gate + b * vec_bstride + c), gt);
    for (int i = 0; i < BWD_ROWS; ++i) {
        const int r = blockIdx.x * BWD_ROWS + i;
        if (r >= rows_per_batch) break;
        const int64_t off = ((int64_t)b * rows_per_batch + r) * cols + c;
        float xv[8], gv[8];
        unpack(load8(x + off), xv);
        unpack(load8(g + off), gv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc[j] += gv[j] * xv[j];
            gv[j] *= gt[j];
        }
        store8(dx + off, pack(gv));
    }
    float* p = partial + ((int64_t)b * gridDim.x + blockIdx.x) * cols + c;
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = acc[j];
}

// out[k][b][c] = Σ over blocks of partial[b][block][k][c], as bf16 (k < parts). A block takes 32
// columns, its 8 rows of threads every 8th block of partials, added up in shared memory in a fixed order:
// one thread a column looping over all 576 blocks of a 1024² image was latency-bound. Block: (32,
// COLUMN_SUM_ROWS).
constexpr int COLUMN_SUM_ROWS = 8;
extern "C" __global__ void column_sums_bf16(const float* __restrict__ partial, __nv_bfloat16* __restrict__ out,
                                            int batch, int blocks_per_batch, int parts, int cols) {
    __shared__ float acc[COLUMN_SUM_ROWS][33];
    const int64_t n = (int64_t)batch * parts * cols;
    const int64_t i = blockIdx.x * 32 + threadIdx.x;
    const int c = i % cols, k = (i / cols) % parts, b = i / ((int64_t)cols * parts);
    float s = 0.f;
    if (i < n)
        for (int blk = threadIdx.y; blk < blocks_per_batch; blk += COLUMN_SUM_ROWS)
            s += partial[(((int64_t)b * blocks_per_batch + blk) * parts + k) * cols + c];
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0 || i >= n) return;
#pragma unroll
    for (int y = 1; y < COLUMN_SUM_ROWS; ++y) s += acc[y][threadIdx.x];
    out[((int64_t)k * batch + b) * cols + c] = __float2bfloat16(s);
}

// qkv_heads' backward. gq, gk, gv: (B, H, g_len, 128) gradients of the heads, of which tokens g_at ..
// g_at + len are these rows' (a double block's text or image part of the joint attention's); qkv: the
// forward's input rows as qkv_heads reads them; norm_scales: (2, 128) = the q and k norm scales; rope:
// (len, 128) = RoPE's [cos | sin] rows in f32; out: (B, len, out_row) rows, of which the first 3·H·128
// columns are written (the caller zeroes the rest). q and k: RoPE backwards (the rotation by −sin), times
// the norm scale, then the RMS norm's backward dx = r·gw − x·r³·mean(gw·x); v's gradient is copied. One
// warp per (batch, token, head), 4 values a lane.
extern "C" __global__ void qkv_heads_backward_bf16(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ gq,
                                                   const __nv_bfloat16* __restrict__ gk, const __nv_bfloat16* __restrict__ gv,
                                                   const __nv_bfloat16* __restrict__ norm_scales,
                                                   const float* __restrict__ rope, __nv_bfloat16* __restrict__ out,
                                                   int batch, int len, int heads, int g_len, int g_at, int64_t row_stride,
                                                   int64_t batch_stride, int64_t out_row, float eps) {
    constexpr int D = 128;
    const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= (int64_t)batch * len * heads) return;
    const int h = warp % heads;
    const int l = (warp / heads) % len;
    const int b = warp / ((int64_t)heads * len);
    const int64_t hd = (int64_t)heads * D;
    const __nv_bfloat16* src = qkv + b * batch_stride + l * row_stride + h * D + lane * 4;
    const int64_t at = (((int64_t)b * heads + h) * g_len + g_at + l) * D + lane * 4;
    const __nv_bfloat16* gs[2] = {gq + at, gk + at};
    __nv_bfloat16* dst = out + ((int64_t)b * len + l) * out_row + h * D + lane * 4;
    const float2 cs = *reinterpret_cast<const float2*>(rope + (int64_t)l * D + lane * 2);
    const float2 sn = *reinterpret_cast<const float2*>(rope + (int64_t)l * D + 64 + lane * 2);
#pragma unroll
    for (int which = 0; which < 2; ++which) {
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(src + which * hd);
        const float2 x0 = __bfloat1622float2(p[0]), x1 = __bfloat1622float2(p[1]);
        const __nv_bfloat162* gp = reinterpret_cast<const __nv_bfloat162*>(gs[which]);
        const float2 g0 = __bfloat1622float2(gp[0]), g1 = __bfloat1622float2(gp[1]);
        const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(norm_scales + which * D + lane * 4);
        const float2 w0 = __bfloat1622float2(w[0]), w1 = __bfloat1622float2(w[1]);
        // The transposed rotation of each (even, odd) pair, then the norm scale.
        const float u0 = (g0.x * cs.x + g0.y * sn.x) * w0.x, u1 = (g0.y * cs.x - g0.x * sn.x) * w0.y;
        const float u2 = (g1.x * cs.y + g1.y * sn.y) * w1.x, u3 = (g1.y * cs.y - g1.x * sn.y) * w1.y;
        const float r = rsqrtf(warp_sum(x0.x * x0.x + x0.y * x0.y + x1.x * x1.x + x1.y * x1.y) / D + eps);
        const float dot = warp_sum(u0 * x0.x + u1 * x0.y + u2 * x1.x + u3 * x1.y) / D;
        const float k = dot * r * r * r;
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(dst + which * hd);
        o[0] = __floats2bfloat162_rn(u0 * r - x0.x * k, u1 * r - x0.y * k);
        o[1] = __floats2bfloat162_rn(u2 * r - x1.x * k, u3 * r - x1.y * k);
    }
    *reinterpret_cast<uint2*>(dst + 2 * hd) = *reinterpret_cast<const uint2*>(gv + at);
}
