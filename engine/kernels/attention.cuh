// Device helpers shared by the two attention kernels' files (flash_attn.cu on warp MMAs,
// flash_attn_sm90.cu on warpgroup MMAs): the head size and key tile, asynchronous copies, bf16 packing,
// and the backward's store of P and dS. Both MMA kinds leave a warp's 16 x 64 scores in one fragment
// layout, so one store serves both.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace attn {

constexpr int D = 128;         // head dim
constexpr int BC = 64;         // keys per tile
constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
constexpr int TILE = BC * D;   // elements in one K or V tile

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; `valid` false writes zeros (rows past the sequence end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Staged rows of P or dS: 64 keys padded to 144 bytes, so the fragments' 4-byte stores of rows g = 0..7
// fall on distinct banks.
constexpr int SROW = BC + 8;
// bf16 elements of one warp's staging of P or of dS: 16 rows.
constexpr int STAGED = 16 * SROW;

// What one warp's two rows (g and g + 8, g = lane / 4) of the backward read: the forward's log-sum-exp
// (log2 units) and delta = rowsum(dO ⊙ O), as (B, H, N) f32 rows of head `bh`.
struct RowStats {
    float lse_lo, lse_hi, delta_lo, delta_hi;
    __device__ __forceinline__ RowStats(const float* lse, const float* delta, int64_t bh, int row_lo, int n) {
        const int row_hi = row_lo + 8;
        lse_lo = row_lo < n ? lse[bh * n + row_lo] : 0.f;
        lse_hi = row_hi < n ? lse[bh * n + row_hi] : 0.f;
        delta_lo = row_lo < n ? delta[bh * n + row_lo] : 0.f;
        delta_hi = row_hi < n ? delta[bh * n + row_hi] : 0.f;
    }
};

// One warp's 16 x 64 tile of f32 MMA fragments (rows g in elements 0, 1 and g + 8 in 2, 3, g = lane / 4;
// columns 8i + 2(lane % 4) + {0, 1}) as bf16 into rows row0 .. row0 + 15, columns col0 .. col0 + 63 of
// the contiguous (N, N) matrix `out` of head bh (rows and columns past n left out). Through the warp's
// staging `st` (STAGED elements of shared memory): stored straight from the fragments, a warp's stores
// touch 8 rows x 16 bytes each and ran at a fifth of memory speed;
// from the staging a quarter of the warp writes one row's 128 bytes.
__device__ __forceinline__ void store_tile(const float (&x)[BC / 8][4], __nv_bfloat16* st,
                                           __nv_bfloat16* __restrict__ out, int64_t bh, int row0, int col0, int n,
                                           int lane) {
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) {
        const int at = (lane / 4) * SROW + i * 8 + (lane % 4) * 2;
        *reinterpret_cast<uint32_t*>(st + at) = pack_bf16(x[i][0], x[i][1]);
        *reinterpret_cast<uint32_t*>(st + at + 8 * SROW) = pack_bf16(x[i][2], x[i][3]);
    }
    __syncwarp();
    const bool vec = n % 8 == 0;  // 16-byte aligned rows
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int r = it * 4 + lane / 8, c = (lane % 8) * 8;
        const int row = row0 + r, col = col0 + c;
        if (row >= n || col >= n) continue;
        const int64_t at = (bh * n + row) * n + col;
        const __nv_bfloat16* src = st + r * SROW + c;
        if (vec) {
            *reinterpret_cast<uint4*>(out + at) = *reinterpret_cast<const uint4*>(src);
        } else {
            for (int e = 0; e < 8 && col + e < n; ++e) out[at + e] = src[e];
        }
    }
    __syncwarp();  // the staging is free again
}

// P = exp2(S · scale_log2 − lse) and dS · scale = P (dP − delta) · scale of one warp's rows row0 ..
// row0 + 15 and keys key0 .. key0 + 63 (s and dp: the scores' and dP's fragments, overwritten with P
// and dS), into the contiguous (B, H, N, N) p and ds of head bh, through the stagings st_p and st_ds.
__device__ __forceinline__ void store_probs_grad(float (&s)[BC / 8][4], float (&dp)[BC / 8][4], const RowStats& r,
                                                 float scale_log2, float scale, __nv_bfloat16* st_p,
                                                 __nv_bfloat16* st_ds, __nv_bfloat16* __restrict__ p,
                                                 __nv_bfloat16* __restrict__ ds, int64_t bh, int row0, int key0,
                                                 int n, int lane) {
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float lse = e < 2 ? r.lse_lo : r.lse_hi, delta = e < 2 ? r.delta_lo : r.delta_hi;
            s[i][e] = exp2f(fmaf(s[i][e], scale_log2, -lse));
            dp[i][e] = s[i][e] * (dp[i][e] - delta) * scale;
        }
    }
    store_tile(s, st_p, p, bh, row0, key0, n, lane);
    store_tile(dp, st_ds, ds, bh, row0, key0, n, lane);
}

}  // namespace attn
