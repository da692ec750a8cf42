// The second half of a 3x3 convolution (stride 1, padding 1) done as one matrix product and a sum
// (engine/src/models/fused.rs `upsample_conv2d`): the product of the nine stacked tap matrices
// (9·Cout, Cin) with the input (Cin, h·w) holds every tap's contribution at every input position;
// output (c, y, x) is the bias plus tap (kh, kw)'s row c at position (y+kh-1, x+kw-1), summed in f32,
// where positions outside the image (the zero padding) contribute nothing. Unlike im2col, the matrix
// product reads the input once (K = Cin, not 9·Cin), and neither a gather nor a padded copy is made.
// With `up` > 1 the convolution runs on the input upsampled by nearest neighbour (H = up·h, W = up·w),
// as the autoencoder's upsamplers do: the product is per input pixel, so the taps of the small input are
// read at (position / up) and neither the upsampled copy nor its 4x larger product is ever made.
#include <cuda_bf16.h>
#include <stdint.h>

// Grid (ceil(W / 128), H, B·Cout), block 128: one thread per output pixel, a row of them per block,
// so each tap's reads are one coalesced run. taps: (B, 9·Cout, (H/up)·(W/up)); bias: (Cout,);
// y: (B, Cout, H, W).
extern "C" __global__ void conv3x3_tap_sum_bf16(const __nv_bfloat16* __restrict__ taps,
                                                const __nv_bfloat16* __restrict__ bias,
                                                __nv_bfloat16* __restrict__ y, int cout, int h, int w,
                                                int up) {
    const int64_t row = blockIdx.z;  // b·Cout + c
    const int64_t b = row / cout, c = row % cout;
    const int ws = w / up;
    const int64_t hws = (int64_t)(h / up) * ws, tap_stride = (int64_t)cout * hws;
    const int yy = blockIdx.y, xx = blockIdx.x * blockDim.x + threadIdx.x;
    if (xx >= w) return;
    const __nv_bfloat16* base = taps + (b * 9 * cout + c) * hws;
    float s = __bfloat162float(bias[c]);
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
        const int sy = yy + kh - 1;
        if (sy < 0 || sy >= h) continue;
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
            const int sx = xx + kw - 1;
            if (sx < 0 || sx >= w) continue;
            s += __bfloat162float(base[(kh * 3 + kw) * tap_stride + (int64_t)(sy / up) * ws + sx / up]);
        }
    }
    y[row * (int64_t)h * w + (int64_t)yy * w + xx] = __float2bfloat16(s);
}

// The columns of a 3x3 convolution (stride 1, padding 1) for output rows [y0, y0 + rows) of an H x W
// output, on the input upsampled `up` times by nearest neighbour (x: (Cin, H/up, W/up)): cols row
// ci·9 + kh·3 + kw, column (y - y0)·W + x holds the input at (y+kh-1, x+kw-1) (/ up), zero outside the
// image. With the weight as (Cout, 9·Cin), one matrix product with these columns is the convolution:
// K = 9·Cin, an efficient shape, and the output comes out channel-first.
// Grid (ceil(W / 128), rows, 9·Cin), block 128: the reads and the writes of a block are each one run.
extern "C" __global__ void im2col3x3_bf16(const __nv_bfloat16* __restrict__ x,
                                          __nv_bfloat16* __restrict__ cols, int h, int w, int up,
                                          int y0, int rows) {
    const int r = blockIdx.z, ci = r / 9, kh = (r % 9) / 3, kw = r % 3;
    const int oy = blockIdx.y, ox = blockIdx.x * blockDim.x + threadIdx.x;
    if (ox >= w) return;
    const int sy = y0 + oy + kh - 1, sx = ox + kw - 1;
    const int hs = h / up, ws = w / up;
    __nv_bfloat16 v = __float2bfloat16(0.f);
    if (sy >= 0 && sy < h && sx >= 0 && sx < w)
        v = x[((int64_t)ci * hs + sy / up) * ws + sx / up];
    cols[((int64_t)r * rows + oy) * w + ox] = v;
}
