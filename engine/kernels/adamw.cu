// The optimizer's per-variable passes over f32 tensors, one kernel each where candle runs ~17 (AdamW)
// and 3 (the squared norm of gradient clipping), for hundreds of small LoRA variables a step:
//   adamw:        torch.optim.AdamW's update of param, m and v from g · g_scale (gradient clipping's
//                 factor, applied here rather than by a pass of its own), in place, in the order of the
//                 candle ops of training/optim.rs (the reference); the host folds the step's scalars
//   sum_squares:  sum(g²) as one partial sum per block (no atomics: the same result every run)
#include <stdint.h>

extern "C" __global__ void adamw_f32(float* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ g, int64_t n, float g_scale, float beta1,
                                     float one_minus_beta1,
                                     float beta2, float one_minus_beta2, float inv_sqrt_bc2, float eps, float decay,
                                     float step_size) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * g_scale;
        const float mi = m[i] * beta1 + gi * one_minus_beta1;
        const float vi = v[i] * beta2 + gi * gi * one_minus_beta2;
        const float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;
        param[i] = param[i] * decay - mi / denom * step_size;
        m[i] = mi;
        v[i] = vi;
    }
}

// Block b (of at most as many as `partials` holds) writes the sum of its elements' squares to partials[b].
extern "C" __global__ void sum_squares_f32(const float* __restrict__ g, int64_t n, float* __restrict__ partials) {
    __shared__ float warps[32];
    float s = 0.f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += g[i] * g[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
    if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < blockDim.x / 32 ? warps[threadIdx.x] : 0.f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        if (threadIdx.x == 0) partials[blockIdx.x] = s;
    }
}
