// GroupNorm (with affine, optionally followed by SiLU) over bf16 (B, C, H, W), the autoencoder's
// normalisation: two passes over the tensor instead of candle's ten in f32. Each group (C/G channels x
// H·W) is contiguous and split into `chunks` pieces so that the reduction fills the GPU (the decoder
// has only 32 groups of millions of elements):
//   group_norm_stats:  per piece, its count, mean and sum of squared deviations (two passes over the
//                      piece, which stays in L2), for Chan's parallel variance
//   group_norm_apply:  combines its group's pieces, normalises, scales, shifts, SiLU
// H·W must be a multiple of 8 (16-byte vectors never straddle a channel).
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

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
    return x;
}

__device__ __forceinline__ float block_sum(float x, float* shared32) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) shared32[warp] = x;
    __syncthreads();
    x = lane < warps ? shared32[lane] : 0.f;
    return warp_sum(x);
}

// The element range [begin, end) of piece `chunk` of a group of `n` elements, in whole vectors.
__device__ __forceinline__ void piece(int64_t n, int chunks, int chunk, int64_t& begin, int64_t& end) {
    const int64_t per = ((n / 8 + chunks - 1) / chunks) * 8;
    begin = min(n, chunk * per);
    end = min(n, begin + per);
}

}  // namespace

// Grid (chunks, B·G). stats: (B·G, chunks, 3) f32 = count, mean, M2.
extern "C" __global__ void group_norm_stats_bf16(const __nv_bfloat16* __restrict__ x, float* __restrict__ stats,
                                                 int64_t group_elems, int chunks) {
    __shared__ float shared32[32];
    const int64_t g = blockIdx.y;
    int64_t begin, end;
    piece(group_elems, chunks, blockIdx.x, begin, end);
    const __nv_bfloat16* xg = x + g * group_elems;
    float s = 0.f;
    for (int64_t i = begin + threadIdx.x * 8; i < end; i += blockDim.x * 8) {
        float a[8];
        unpack(*reinterpret_cast<const bf16x8*>(xg + i), a);
#pragma unroll
        for (int j = 0; j < 8; ++j) s += a[j];
    }
    const float count = (float)(end - begin);
    const float mean = count > 0.f ? block_sum(s, shared32) / count : 0.f;
    float m2 = 0.f;
    for (int64_t i = begin + threadIdx.x * 8; i < end; i += blockDim.x * 8) {
        float a[8];
        unpack(*reinterpret_cast<const bf16x8*>(xg + i), a);
#pragma unroll
        for (int j = 0; j < 8; ++j) m2 += (a[j] - mean) * (a[j] - mean);
    }
    m2 = block_sum(m2, shared32);
    if (threadIdx.x == 0) {
        float* st = stats + (g * chunks + blockIdx.x) * 3;
        st[0] = count;
        st[1] = mean;
        st[2] = m2;
    }
}

// Grid (chunks, B·G). weight, bias: (C,). y may not alias x.
extern "C" __global__ void group_norm_apply_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ stats,
                                                 const __nv_bfloat16* __restrict__ weight,
                                                 const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y,
                                                 int64_t group_elems, int chunks, int64_t hw, int channels, int groups,
                                                 float eps, int silu) {
    const int64_t bg = blockIdx.y;
    // Chan et al.: merge the pieces' (count, mean, M2) in order; every thread does it (chunks is small).
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (int c = 0; c < chunks; ++c) {
        const float* st = stats + (bg * chunks + c) * 3;
        const float nb = st[0];
        if (nb == 0.f) continue;
        const float delta = st[1] - mean, tot = n + nb;
        mean += delta * nb / tot;
        m2 += st[2] + delta * delta * n * nb / tot;
        n = tot;
    }
    const float rstd = rsqrtf(m2 / n + eps);
    const int cpg = channels / groups;
    const int64_t ch0 = (bg % groups) * cpg;
    int64_t begin, end;
    piece(group_elems, chunks, blockIdx.x, begin, end);
    const __nv_bfloat16* xg = x + bg * group_elems;
    __nv_bfloat16* yg = y + bg * group_elems;
    for (int64_t i = begin + threadIdx.x * 8; i < end; i += blockDim.x * 8) {
        const int64_t ch = ch0 + i / hw;
        const float w = __bfloat162float(weight[ch]) * rstd;
        const float b = __bfloat162float(bias[ch]) - mean * w;
        float a[8];
        unpack(*reinterpret_cast<const bf16x8*>(xg + i), a);
        bf16x8 out;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float lo = a[2 * j] * w + b, hi = a[2 * j + 1] * w + b;
            if (silu) {
                lo = lo / (1.f + __expf(-lo));
                hi = hi / (1.f + __expf(-hi));
            }
            out.v[j] = __floats2bfloat162_rn(lo, hi);
        }
        *reinterpret_cast<bf16x8*>(yg + i) = out;
    }
}
