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

// P = exp2(S · scale_log2 − lse) and dS · scale = P (dP − delta) · scale of one warp's rows row0 ..
// row0 + 15 and keys key0 .. key0 + 63, into rows of the contiguous (B, H, N, N) p and ds of head bh.
// s and dp are the MMA fragments: rows g (elements 0, 1) and g + 8 (2, 3), keys 8i + 2(lane % 4) + {0, 1}.
// They go through the warp's staging `st_p` and `st_ds` (STAGED elements of shared memory each): stored straight from
// the fragments, a warp's stores touch 8 rows x 16 bytes each and ran at a fifth of memory speed
// (scripts/gpu/PREDICTIONS.md, run 36); from the staging a quarter of the warp writes one row's 128 bytes.
__device__ __forceinline__ void store_probs_grad(const float (&s)[BC / 8][4], const float (&dp)[BC / 8][4],
                                                 const RowStats& r, float scale_log2, float scale,
                                                 __nv_bfloat16* st_p, __nv_bfloat16* st_ds, __nv_bfloat16* __restrict__ p,
                                                 __nv_bfloat16* __restrict__ ds, int64_t bh, int row0, int key0,
                                                 int n, int lane) {
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) {
        const float p0 = exp2f(fmaf(s[i][0], scale_log2, -r.lse_lo));
        const float p1 = exp2f(fmaf(s[i][1], scale_log2, -r.lse_lo));
        const float p2 = exp2f(fmaf(s[i][2], scale_log2, -r.lse_hi));
        const float p3 = exp2f(fmaf(s[i][3], scale_log2, -r.lse_hi));
        const int at = (lane / 4) * SROW + i * 8 + (lane % 4) * 2;
        *reinterpret_cast<uint32_t*>(st_p + at) = pack_bf16(p0, p1);
        *reinterpret_cast<uint32_t*>(st_p + at + 8 * SROW) = pack_bf16(p2, p3);
        *reinterpret_cast<uint32_t*>(st_ds + at) =
            pack_bf16(p0 * (dp[i][0] - r.delta_lo) * scale, p1 * (dp[i][1] - r.delta_lo) * scale);
        *reinterpret_cast<uint32_t*>(st_ds + at + 8 * SROW) =
            pack_bf16(p2 * (dp[i][2] - r.delta_hi) * scale, p3 * (dp[i][3] - r.delta_hi) * scale);
    }
    __syncwarp();
    const bool vec = n % 8 == 0;  // 16-byte aligned rows
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int rr = it * 4 + lane / 8, c = (lane % 8) * 8;
        const int row = row0 + rr, key = key0 + c;
        if (row >= n || key >= n) continue;
        const int64_t at = (bh * n + row) * n + key;
        const __nv_bfloat16* src_p = st_p + rr * SROW + c;
        const __nv_bfloat16* src_ds = st_ds + rr * SROW + c;
        if (vec) {
            *reinterpret_cast<uint4*>(p + at) = *reinterpret_cast<const uint4*>(src_p);
            *reinterpret_cast<uint4*>(ds + at) = *reinterpret_cast<const uint4*>(src_ds);
        } else {
            for (int e = 0; e < 8 && key + e < n; ++e) {
                p[at + e] = src_p[e];
                ds[at + e] = src_ds[e];
            }
        }
    }
    __syncwarp();  // the staging is free for the next tile
}

}  // namespace attn
