// Fused scaled-dot-product attention, forward only: softmax(q kᵀ · scale) v without materialising the
// scores (FlashAttention-2's online softmax). bf16 in and out, f32 accumulation, head dim 128,
// no mask (FLUX attends over the whole joint sequence). Tensor cores through mma.sync m16n8k16
// (sm_80 and newer), tiles moved with cp.async and read with ldmatrix from XOR-swizzled shared memory.
//
// One block: 16 query rows per warp (4 or 8 warps) of one (batch, head), walking the keys 64 at a
// time with the next K/V tile loading while the current one is used. More warps per block share
// each K/V tile among more query rows (less L2 traffic) at the cost of fewer, larger blocks.
#include <cuda_bf16.h>
#include <stdint.h>

#include "attention.cuh"

namespace {

using namespace attn;

// Element offset of chunk `c` of row `r` in a [rows][D] tile: chunks are XOR-swizzled with the row so
// that ldmatrix's eight row reads of one column hit eight different bank groups.
__device__ __forceinline__ int swz(int r, int c) { return r * D + ((c ^ (r & 7)) << 3); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a · b for a 16x16 bf16 A (row-major fragment), 16x8 bf16 B (column-major fragment), f32 C.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Loads rows [row0, row0 + ROWS) of one (batch, head) into a swizzled tile; rows >= n become zeros.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* base, int64_t row_stride,
                                          int row0, int n, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / THREADS; ++i) {
        int idx = tid + i * THREADS;
        int r = idx / CHUNKS, c = idx % CHUNKS;
        bool valid = row0 + r < n;
        const __nv_bfloat16* src = base + (valid ? (int64_t)(row0 + r) * row_stride : 0) + c * 8;
        cp_async16(tile + swz(r, c), src, valid);
    }
}

// q, k, v: (B, H, N, D) with unit stride along D and the given element strides for batch, head and
// position (multiples of 8). out: contiguous (B, N, H, D), ready to be read as (B, N, H·D).
// Grid: (ceil(N / (16·WARPS)), H, B); 32·WARPS threads; dynamic shared memory: the Q tile and two
// K and two V tiles of 64x128 bf16.
template <int WARPS>
__device__ __forceinline__ void flash_attn_fwd(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                               const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out,
                                               float* __restrict__ lse, int n, int heads, float scale_log2,
                                               int64_t q_sb, int64_t q_sh, int64_t q_sn,
                                               int64_t k_sb, int64_t k_sh, int64_t k_sn,
                                               int64_t v_sb, int64_t v_sh, int64_t v_sn) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int BR = WARPS * 16;
    constexpr int THREADS = WARPS * 32;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* sk = sq + BR * D;    // two K tiles
    __nv_bfloat16* sv = sk + 2 * TILE;  // two V tiles

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int q0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
    const __nv_bfloat16* qb = q + b * q_sb + h * q_sh;
    const __nv_bfloat16* kb = k + b * k_sb + h * k_sh;
    const __nv_bfloat16* vb = v + b * v_sb + h * v_sh;

    load_tile<BR, THREADS>(sq, qb, q_sn, q0, n, tid);
    load_tile<BC, THREADS>(sk, kb, k_sn, 0, n, tid);
    load_tile<BC, THREADS>(sv, vb, v_sn, 0, n, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // This warp's 16 query rows as A fragments, one per 16-wide slice of D.
    uint32_t qf[D / 16][4];
    {
        int r = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], smem_addr(sq + swz(r, kk * 2 + lane / 16)));
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    // Running max (log2 domain, scaled) and this thread's partial row sums for rows g and g + 8.
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    const int tiles = (n + BC - 1) / BC;
    for (int j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < tiles) {
            load_tile<BC, THREADS>(sk + (buf ^ 1) * TILE, kb, k_sn, (j + 1) * BC, n, tid);
            load_tile<BC, THREADS>(sv + (buf ^ 1) * TILE, vb, v_sn, (j + 1) * BC, n, tid);
            cp_async_commit();
        }
        const __nv_bfloat16* tk = sk + buf * TILE;
        const __nv_bfloat16* tv = sv + buf * TILE;

        // S = Q Kᵀ for 16 rows x 64 keys: 8 n-tiles of 8 keys.
        float s[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                uint32_t bk[4];
                int r = np * 16 + (lane % 8) + (lane / 16) * 8;
                ldsm_x4(bk, smem_addr(tk + swz(r, kk * 2 + (lane / 8) % 2)));
                mma(s[2 * np], qf[kk], bk[0], bk[1]);
                mma(s[2 * np + 1], qf[kk], bk[2], bk[3]);
            }
        }

        // Keys past the end of the sequence (last tile only) get no weight.
        if ((j + 1) * BC > n) {
#pragma unroll
            for (int i = 0; i < BC / 8; ++i) {
                int key = j * BC + i * 8 + (lane % 4) * 2;
                if (key >= n) s[i][0] = s[i][2] = -INFINITY;
                if (key + 1 >= n) s[i][1] = s[i][3] = -INFINITY;
            }
        }

        // Online softmax: rows g (s[.][0..1]) and g + 8 (s[.][2..3]), each spread over a quad of lanes.
        float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            mx_lo = fmaxf(mx_lo, fmaxf(s[i][0], s[i][1]) * scale_log2);
            mx_hi = fmaxf(mx_hi, fmaxf(s[i][2], s[i][3]) * scale_log2);
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffff, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffff, mx_hi, off));
        }
        const float a_lo = exp2f(m_lo - mx_lo), a_hi = exp2f(m_hi - mx_hi);
        m_lo = mx_lo;
        m_hi = mx_hi;
        l_lo *= a_lo;
        l_hi *= a_hi;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= a_lo;
            o[i][1] *= a_lo;
            o[i][2] *= a_hi;
            o[i][3] *= a_hi;
        }
        // P in bf16 as A fragments: the accumulators of n-tiles 2p and 2p + 1 form one 16x16 A tile.
        uint32_t pf[BC / 16][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            float p0 = exp2f(fmaf(s[i][0], scale_log2, -m_lo));
            float p1 = exp2f(fmaf(s[i][1], scale_log2, -m_lo));
            float p2 = exp2f(fmaf(s[i][2], scale_log2, -m_hi));
            float p3 = exp2f(fmaf(s[i][3], scale_log2, -m_hi));
            l_lo += p0 + p1;
            l_hi += p2 + p3;
            pf[i / 2][(i % 2) * 2 + 0] = pack_bf16(p0, p1);
            pf[i / 2][(i % 2) * 2 + 1] = pack_bf16(p2, p3);
        }

        // O += P V: V read transposed by ldmatrix, 16 keys x 16 dims per load.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t bv[4];
                int r = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                ldsm_x4_t(bv, smem_addr(tv + swz(r, dp * 2 + lane / 16)));
                mma(o[2 * dp], pf[kk], bv[0], bv[1]);
                mma(o[2 * dp + 1], pf[kk], bv[2], bv[3]);
            }
        }

        if (j + 1 < tiles) cp_async_wait_all();
        __syncthreads();
    }

#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffff, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffff, l_hi, off);
    }
    const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    const int row_lo = q0 + warp * 16 + lane / 4, row_hi = row_lo + 8;
    const int col = (lane % 4) * 2;
    if (lse != nullptr && lane % 4 == 0) {
        float* lb = lse + ((int64_t)b * heads + h) * n;
        if (row_lo < n) lb[row_lo] = m_lo + log2f(l_lo);
        if (row_hi < n) lb[row_hi] = m_hi + log2f(l_hi);
    }
    const int64_t out_row = (int64_t)heads * D;
    __nv_bfloat16* ob = out + (int64_t)b * n * out_row + (int64_t)h * D + col;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        if (row_lo < n)
            *reinterpret_cast<uint32_t*>(ob + row_lo * out_row + i * 8) = pack_bf16(o[i][0] * inv_lo, o[i][1] * inv_lo);
        if (row_hi < n)
            *reinterpret_cast<uint32_t*>(ob + row_hi * out_row + i * 8) = pack_bf16(o[i][2] * inv_hi, o[i][3] * inv_hi);
    }
#endif
}

// The first half of attention's backward for 16 query rows a warp (WARPS warps) of one (batch, head),
// walking the keys 64 at a time as the forward does: with S = Q Kᵀ and dP = dO Vᵀ computed here,
// P = exp2(S · scale_log2 − lse) (the forward's log-sum-exp, so no second softmax pass) and
// dS = P (dP − delta) · scale are written out in bf16; the three products that follow (dV = Pᵀ dO,
// dQ = dS K, dK = dSᵀ Q) are cuBLAS's. S and dP never reach memory.
//
// q, k, v, g (= dO): (B, H, N, D) with the strides as in flash_attn_fwd (g's given separately); lse and
// delta: contiguous (B, H, N) f32; p and ds: contiguous (B, H, N, N). Grid: (ceil(N / (16·WARPS)), H, B);
// 32·WARPS threads; dynamic shared memory: the Q and dO tiles and two K and two V tiles.
template <int WARPS>
__device__ __forceinline__ void flash_attn_bwd_probs(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                     const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ g,
                                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                                     __nv_bfloat16* __restrict__ p, __nv_bfloat16* __restrict__ ds,
                                                     int n, int heads, float scale_log2, float scale,
                                                     int64_t q_sb, int64_t q_sh, int64_t q_sn,
                                                     int64_t k_sb, int64_t k_sh, int64_t k_sn,
                                                     int64_t v_sb, int64_t v_sh, int64_t v_sn,
                                                     int64_t g_sb, int64_t g_sh, int64_t g_sn) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int BR = WARPS * 16;
    constexpr int THREADS = WARPS * 32;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* sg = sq + BR * D;
    __nv_bfloat16* sk = sg + BR * D;    // two K tiles
    __nv_bfloat16* sv = sk + 2 * TILE;  // two V tiles

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int q0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
    const __nv_bfloat16* kb = k + b * k_sb + h * k_sh;
    const __nv_bfloat16* vb = v + b * v_sb + h * v_sh;

    load_tile<BR, THREADS>(sq, q + b * q_sb + h * q_sh, q_sn, q0, n, tid);
    load_tile<BR, THREADS>(sg, g + b * g_sb + h * g_sh, g_sn, q0, n, tid);
    load_tile<BC, THREADS>(sk, kb, k_sn, 0, n, tid);
    load_tile<BC, THREADS>(sv, vb, v_sn, 0, n, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // This warp's 16 rows of Q and of dO as A fragments.
    uint32_t qf[D / 16][4], gf[D / 16][4];
    {
        int r = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            ldsm_x4(qf[kk], smem_addr(sq + swz(r, kk * 2 + lane / 16)));
            ldsm_x4(gf[kk], smem_addr(sg + swz(r, kk * 2 + lane / 16)));
        }
    }
    const int64_t bh = (int64_t)b * heads + h;
    const int row0 = q0 + warp * 16;  // this warp's first row
    const RowStats stats(lse, delta, bh, row0 + lane / 4, n);
    // The staging of this warp's P and dS: its own rows of the Q and dO tiles, free once their fragments
    // are in registers (a warp's 16 rows span 4096 bytes, a staging 2304).
    __nv_bfloat16* st_p = sq + warp * 16 * D;
    __nv_bfloat16* st_ds = sg + warp * 16 * D;
    static_assert(STAGED <= 16 * D, "a staging fits in a warp's rows of a tile");

    const int tiles = (n + BC - 1) / BC;
    for (int j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < tiles) {
            load_tile<BC, THREADS>(sk + (buf ^ 1) * TILE, kb, k_sn, (j + 1) * BC, n, tid);
            load_tile<BC, THREADS>(sv + (buf ^ 1) * TILE, vb, v_sn, (j + 1) * BC, n, tid);
            cp_async_commit();
        }
        const __nv_bfloat16* tk = sk + buf * TILE;
        const __nv_bfloat16* tv = sv + buf * TILE;

        // S = Q Kᵀ and dP = dO Vᵀ, 16 rows x 64 keys each: V's rows are read as K's are.
        float s[BC / 8][4], dp[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                uint32_t bk[4], bv[4];
                int r = np * 16 + (lane % 8) + (lane / 16) * 8;
                ldsm_x4(bk, smem_addr(tk + swz(r, kk * 2 + (lane / 8) % 2)));
                ldsm_x4(bv, smem_addr(tv + swz(r, kk * 2 + (lane / 8) % 2)));
                mma(s[2 * np], qf[kk], bk[0], bk[1]);
                mma(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                mma(dp[2 * np], gf[kk], bv[0], bv[1]);
                mma(dp[2 * np + 1], gf[kk], bv[2], bv[3]);
            }
        }

        store_probs_grad(s, dp, stats, scale_log2, scale, st_p, st_ds, p, ds, bh, row0, j * BC, n, lane);

        if (j + 1 < tiles) cp_async_wait_all();
        __syncthreads();
    }
#endif
}

}  // namespace

#define FLASH_ATTN_ARGS                                                                                   \
    const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,                             \
        const __nv_bfloat16 *__restrict__ v, __nv_bfloat16 *__restrict__ out, float *__restrict__ lse,     \
        int n, int heads, float scale_log2, int64_t q_sb, int64_t q_sh, int64_t q_sn, int64_t k_sb, int64_t k_sh,           \
        int64_t k_sn, int64_t v_sb, int64_t v_sh, int64_t v_sn
#define FLASH_ATTN_PASS q, k, v, out, lse, n, heads, scale_log2, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn

// 64 query rows a block, two blocks an SM.
extern "C" __global__ void __launch_bounds__(128, 2) flash_attn_fwd_bf16_d128_r64(FLASH_ATTN_ARGS) {
    flash_attn_fwd<4>(FLASH_ATTN_PASS);
}
// 128 query rows a block, one block an SM.
extern "C" __global__ void __launch_bounds__(256, 1) flash_attn_fwd_bf16_d128_r128(FLASH_ATTN_ARGS) {
    flash_attn_fwd<8>(FLASH_ATTN_PASS);
}

// The backward's probabilities and score gradients, 64 query rows a block, two blocks an SM.
extern "C" __global__ void __launch_bounds__(128, 2) flash_attn_bwd_probs_bf16_d128_r64(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const __nv_bfloat16* __restrict__ g, const float* __restrict__ lse, const float* __restrict__ delta,
    __nv_bfloat16* __restrict__ p, __nv_bfloat16* __restrict__ ds, int n, int heads, float scale_log2, float scale,
    int64_t q_sb, int64_t q_sh, int64_t q_sn, int64_t k_sb, int64_t k_sh, int64_t k_sn, int64_t v_sb, int64_t v_sh,
    int64_t v_sn, int64_t g_sb, int64_t g_sh, int64_t g_sn) {
    flash_attn_bwd_probs<4>(q, k, v, g, lse, delta, p, ds, n, heads, scale_log2, scale, q_sb, q_sh, q_sn, k_sb, k_sh,
                            k_sn, v_sb, v_sh, v_sn, g_sb, g_sh, g_sn);
}
