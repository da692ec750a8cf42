// float8_e4m3fn tensors: what candle's CUDA backend has no kernel for.
//   fp8_to_bf16:        y = bf16(x) * bf16(scale), as ComfyUI dequantizes a scaled fp8 weight in the
//                       compute dtype (widening is exact; the product is rounded once to bf16)
//   f32_to_fp8:         y = fp8(x / scale), division and rounding to nearest even as torch's cast of
//                       the scaled tensor (values beyond ±448 saturate, which a scale from the
//                       tensor's own maximum never produces)
//   absmax_bf16:        *out = max |x| (out zeroed by the caller): a dynamic per-tensor scale's source
//   bf16_to_fp8_dynamic: y = fp8(x / s) with s = *absmax / 448 (1 for an all-zero tensor), written to
//                       *scale for the product: the activations of an FP8 tensor-core product
// Division is IEEE (`__fdiv_rn`): the build's --use_fast_math would otherwise approximate it.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace {
constexpr float kFp8Max = 448.f;

__device__ __forceinline__ size_t first_index() { return blockIdx.x * (size_t)blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

__device__ __forceinline__ __nv_fp8_e4m3 to_fp8(float v) {
    __nv_fp8_e4m3 r;
    r.__x = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    return r;
}

__device__ __forceinline__ float scale_of(float absmax) { return absmax > 0.f ? __fdiv_rn(absmax, kFp8Max) : 1.f; }
}  // namespace

extern "C" __global__ void fp8_to_bf16(const __nv_fp8_e4m3* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                       float scale, size_t n) {
    const float s = __bfloat162float(__float2bfloat16_rn(scale));
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        // Both factors are bf16 values, so their f32 product is exact and rounds once, as bf16's own.
        y[i] = __float2bfloat16_rn(float(x[i]) * s);
    }
}

extern "C" __global__ void f32_to_fp8(const float* __restrict__ x, __nv_fp8_e4m3* __restrict__ y, float scale,
                                      size_t n) {
    for (size_t i = first_index(); i < n; i += grid_stride()) y[i] = to_fp8(__fdiv_rn(x[i], scale));
}

// The activation kernels read 8 bf16 (16 bytes) a thread per step: n is a multiple of 8 and x 16-byte
// aligned (the launcher checks), so the passes run near memory speed.
struct alignas(16) bf16x8 {
    __nv_bfloat162 v[4];
};

extern "C" __global__ void absmax_bf16(const __nv_bfloat16* __restrict__ x, float* __restrict__ out, size_t n) {
    float m = 0.f;
    const bf16x8* x8 = reinterpret_cast<const bf16x8*>(x);
    for (size_t i = first_index(); i < n / 8; i += grid_stride()) {
        const bf16x8 p = x8[i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(p.v[j]);
            m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
    __shared__ float warps[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warps[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < blockDim.x / 32 ? warps[lane] : 0.f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
        // Non-negative floats order as their bit patterns do.
        if (lane == 0) atomicMax(reinterpret_cast<unsigned int*>(out), __float_as_uint(m));
    }
}

extern "C" __global__ void bf16_to_fp8_dynamic(const __nv_bfloat16* __restrict__ x, __nv_fp8_e4m3* __restrict__ y,
                                               const float* __restrict__ absmax, float* __restrict__ scale,
                                               size_t n) {
    const float s = scale_of(*absmax);
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale = s;
    const bf16x8* x8 = reinterpret_cast<const bf16x8*>(x);
    uint2* y8 = reinterpret_cast<uint2*>(y);
    for (size_t i = first_index(); i < n / 8; i += grid_stride()) {
        const bf16x8 p = x8[i];
        union {
            __nv_fp8_e4m3 q[8];
            uint2 packed;
        } out;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(p.v[j]);
            out.q[2 * j] = to_fp8(__fdiv_rn(f.x, s));
            out.q[2 * j + 1] = to_fp8(__fdiv_rn(f.y, s));
        }
        y8[i] = out.packed;
    }
}
