// The second half of a 3x3 convolution (stride 1, padding 1) done as one matrix product and a sum
// (engine/src/ops/conv.rs `upsample_conv2d`): the product of the nine stacked tap matrices
// (9·Cout, Cin) with the input (Cin, h·w) holds every tap's contribution at every input position;
// output (c, y, x) is the bias plus tap (kh, kw)'s row c at position (y+kh-1, x+kw-1), summed in f32,
// where positions outside the image (the zero padding) contribute nothing. Unlike im2col, the matrix
// product reads the input once (K = Cin, not 9·Cin), and neither a gather nor a padded copy is made.
// With `up` > 1 the convolution runs on the input upsampled by nearest neighbour (H = up·h, W = up·w),
// as the autoencoder's upsamplers do: the product is per input pixel, so the taps of the small input are
// read at (position / up) and neither the upsampled copy nor its 4x larger product is ever made.
#include <cuda_bf16.h>
#include <stdint.h>

// N output values of row `yy` from x0 on: the bias plus the taps in reach, summed in f32.
template <int N>
__device__ void tap_sum_run(const __nv_bfloat16* __restrict__ base, int64_t tap_stride, float bias,
                            __nv_bfloat16* __restrict__ out, int yy, int x0, int h, int w, int up) {
    const int ws = w / up;
    float s[N];
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = bias;
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
        const int sy = yy + kh - 1;
        if (sy < 0 || sy >= h) continue;
        const __nv_bfloat16* trow = base + (int64_t)(sy / up) * ws;
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
            const __nv_bfloat16* t = trow + (kh * 3 + kw) * tap_stride;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const int sx = x0 + j + kw - 1;
                if (sx >= 0 && sx < w) s[j] += __bfloat162float(t[sx / up]);
            }
        }
    }
    if (N == 8) {
        __align__(16) __nv_bfloat16 v[8];
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = __float2bfloat16(s[j]);
        *reinterpret_cast<uint4*>(out + x0) = *reinterpret_cast<const uint4*>(v);
    } else {
        out[x0] = __float2bfloat16(s[0]);
    }
}

// Grid (H, B·Cout), block 128: a block makes one output row, each thread eight values at a time (one
// 16-byte store) when W is a multiple of 8; one value a thread and 128 threads a block left the
// memory mostly idle. taps: (B, 9·Cout, (H/up)·(W/up)); bias: (Cout,); y: (B, Cout, H, W).
extern "C" __global__ void conv3x3_tap_sum_bf16(const __nv_bfloat16* __restrict__ taps,
                                                const __nv_bfloat16* __restrict__ bias,
                                                __nv_bfloat16* __restrict__ y, int cout, int h, int w,
                                                int up) {
    const int64_t row = blockIdx.y;  // b·Cout + c
    const int64_t b = row / cout, c = row % cout;
    const int64_t hws = (int64_t)(h / up) * (w / up), tap_stride = (int64_t)cout * hws;
    const int yy = blockIdx.x;
    const __nv_bfloat16* base = taps + (b * 9 * cout + c) * hws;
    const float bc = __bfloat162float(bias[c]);
    __nv_bfloat16* out = y + (row * h + yy) * (int64_t)w;
    if ((w & 7) == 0) {
        for (int x0 = threadIdx.x * 8; x0 < w; x0 += blockDim.x * 8)
            tap_sum_run<8>(base, tap_stride, bc, out, yy, x0, h, w, up);
    } else {
        for (int x0 = threadIdx.x; x0 < w; x0 += blockDim.x)
            tap_sum_run<1>(base, tap_stride, bc, out, yy, x0, h, w, up);
    }
}
