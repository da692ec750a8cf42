// Memory-bound ops of a FLUX block fused into single passes over bf16 tensors (f32 arithmetic inside):
// candle runs each as several kernels, and its broadcasting kernels index every element through
// divisions, which made a bias add 15x slower than the memory allows.
//   add_bias:       y = x + bias                        (rows x cols) + (cols)
//   norm_modulate:  y = LayerNorm(x) * (1 + scale) + shift   (no affine; per-batch modulation vectors)
//   gated_add:      y = r + x * gate                    (per-batch gate vector)
//   qkv_heads:      fused q|k|v rows -> (B, H, L, D) heads, RMS-normed q and k, RoPE on q and k
//   gelu_cat:       [a | gelu(m)]; gelu_backward: g * gelu'(x)
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

extern "C" __global__ void add_bias_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ bias,
                                         __nv_bfloat16* __restrict__ y, int64_t rows, int cols) {
    const int c8 = cols / 8;
    const int64_t n = rows * c8;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float a[8], b[8];
        unpack(load8(x + i * 8), a);
        unpack(load8(bias + (i % c8) * 8), b);
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] += b[j];
        store8(y + i * 8, pack(a));
    }
}

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
// per position (FLUX's interleaved pairs). out: (3, B, H, L, 128) = q, k, v.
// One warp per (batch, token, head), 4 consecutive elements a lane (two RoPE pairs).
extern "C" __global__ void qkv_heads_bf16(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ norm_scales,
                                          const __nv_bfloat16* __restrict__ rope, __nv_bfloat16* __restrict__ out,
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

    const float2 cs = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rope + (int64_t)l * D + lane * 2));
    const float2 sn = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rope + (int64_t)l * D + 64 + lane * 2));
#pragma unroll
    for (int which = 0; which < 2; ++which) {
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(src + which * hd);
        float2 x0 = __bfloat1622float2(p[0]), x1 = __bfloat1622float2(p[1]);
        const float rms = rsqrtf(warp_sum(x0.x * x0.x + x0.y * x0.y + x1.x * x1.x + x1.y * x1.y) / D + eps);
        const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(norm_scales + which * D + lane * 4);
        const float2 w0 = __bfloat1622float2(w[0]), w1 = __bfloat1622float2(w[1]);
        // RMS norm rounded to bf16 as the plain path stores it, then RoPE on each (even, odd) pair.
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

// dx = g * gelu_tanh'(x) over contiguous bf16 tensors of n8 * 8 elements: the backward pass of every GELU
// of a training step (candle composes it of a dozen elementwise kernels).
extern "C" __global__ void gelu_backward_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ g,
                                              __nv_bfloat16* __restrict__ dx, int64_t n8) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
        float xv[8], gv[8];
        unpack(load8(x + i * 8), xv);
        unpack(load8(g + i * 8), gv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float v = xv[j];
            const float t = tanhf(0.7978845608f * (v + 0.044715f * v * v * v));
            const float d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * 0.7978845608f * (1.f + 0.134145f * v * v);
            xv[j] = gv[j] * d;
        }
        store8(dx + i * 8, pack(xv));
    }
}
