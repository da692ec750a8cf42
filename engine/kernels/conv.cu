// The second half of a 3x3 convolution (stride 1, padding 1) done as one matrix product and a sum
// (engine/src/models/fused.rs `conv2d`): the product of the nine stacked tap matrices (9·Cout, Cin)
// with the zero-padded input (Cin, (H+2)·(W+2)) holds every tap's contribution at every padded
// position; output (c, y, x) is the bias plus tap (kh, kw)'s row c at (y+kh, x+kw), summed in f32.
// Unlike im2col, the matrix product reads the input once (K = Cin, not 9·Cin) and needs no gather.
#include <cuda_bf16.h>
#include <stdint.h>

// Grid (ceil(H·W / 256) capped, B·Cout); taps: (B, 9·Cout, (H+2)·(W+2)); bias: (Cout,); y: (B, Cout, H, W).
extern "C" __global__ void conv3x3_tap_sum_bf16(const __nv_bfloat16* __restrict__ taps,
                                                const __nv_bfloat16* __restrict__ bias,
                                                __nv_bfloat16* __restrict__ y, int cout, int h, int w) {
    const int64_t row = blockIdx.y;  // b·Cout + c
    const int64_t b = row / cout, c = row % cout;
    const int64_t wp = w + 2, np = (int64_t)(h + 2) * wp, tap_stride = (int64_t)cout * np;
    const __nv_bfloat16* base = taps + (b * 9 * cout + c) * np;
    const float bc = __bfloat162float(bias[c]);
    const int hw = h * w;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hw; i += gridDim.x * blockDim.x) {
        const int yy = i / w, xx = i % w;
        const __nv_bfloat16* p = base + yy * wp + xx;
        float s = bc;
#pragma unroll
        for (int kh = 0; kh < 3; ++kh)
#pragma unroll
            for (int kw = 0; kw < 3; ++kw) s += __bfloat162float(p[(kh * 3 + kw) * tap_stride + kh * wp + kw]);
        y[row * hw + i] = __float2bfloat16(s);
    }
}
