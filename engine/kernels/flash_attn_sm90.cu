// Fused scaled-dot-product attention for Hopper (sm_90a): the same computation as flash_attn.cu
// (softmax(q kᵀ · scale) v, bf16 in and out, f32 accumulation, head dim 128, no mask), with the two
// products on warpgroup MMAs (wgmma) instead of warp MMAs. wgmma reads its operands from shared
// memory itself (no ldmatrix through registers) and runs asynchronously, so while one warpgroup
// does its softmax another keeps the tensor cores busy: mma.sync tops out near 2/3 of H100's bf16
// peak, wgmma does not.
//
// One block: WGS warpgroups of 64 query rows each, one (batch, head), walking the keys 64 at a time
// with the next K/V tile loading (cp.async) while the current one is used. Tiles are stored as two
// halves of 64 head dims, each row 128 bytes with its 16-byte chunks XOR-swizzled by row (the
// layout wgmma's 128-byte swizzle mode reads; tiles start on 1024-byte boundaries).
//
// Compiled only for sm_90a (the wgmma instructions exist nowhere else); elsewhere the kernels are
// empty and the host side never launches them (it checks the PTX target).
#include <cuda_bf16.h>
#include <stdint.h>

#include "attention.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

using namespace attn;
constexpr int HALF = 64;  // head dims in one 128-byte swizzled row

// Element offset of chunk `c` (0..15) of row `r` in a tile of `rows` rows: half `c / 8` holds rows of
// 64 dims; within it chunk `c % 8` is XOR-swizzled with the row (wgmma's 128-byte swizzle).
__device__ __forceinline__ int swz(int rows, int r, int c) {
    return (c >> 3) * rows * HALF + r * HALF + (((c & 7) ^ (r & 7)) << 3);
}

template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* base, int64_t row_stride,
                                          int row0, int n, int tid) {
    constexpr int TOTAL = ROWS * CHUNKS;
#pragma unroll
    for (int i = 0; i < (TOTAL + THREADS - 1) / THREADS; ++i) {
        int idx = tid + i * THREADS;
        if (TOTAL % THREADS != 0 && idx >= TOTAL) break;
        int r = idx / CHUNKS, c = idx % CHUNKS;
        bool valid = row0 + r < n;
        const __nv_bfloat16* src = base + (valid ? (int64_t)(row0 + r) * row_stride : 0) + c * 8;
        cp_async16(tile + swz(ROWS, r, c), src, valid);
    }
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets.
__device__ __forceinline__ uint64_t desc(const void* p, uint32_t lead, uint32_t stride) {
    return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | ((uint64_t)(lead >> 4) << 16) |
           ((uint64_t)(stride >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}
// Generic-proxy writes (cp.async) become visible to wgmma's reads, which go through the async proxy.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The compiler does not know wgmma writes its accumulators late: tie them to this point.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(r[i][j])::"memory");
}

// A-fragment registers that an issued wgmma still reads: kept alive (and unchanged) to this point.
template <int N>
__device__ __forceinline__ void keep_regs(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

#define F4(a) "+f"(a[0]), "+f"(a[1]), "+f"(a[2]), "+f"(a[3])

// s (64 rows x 64 keys) = (accumulate ? s : 0) + A · B for A (64 x 16) and B (16 x 64) both
// K-major in shared memory.
__device__ __forceinline__ void wgmma_qk(float (&s)[8][4], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
        "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : F4(s[0]), F4(s[1]), F4(s[2]), F4(s[3]), F4(s[4]), F4(s[5]), F4(s[6]), F4(s[7])
        : "l"(a), "l"(b), "r"(accumulate));
}

// o (64 rows x 128 dims) += P · V for P (64 x 16 keys) in registers (the warp-MMA A fragment layout)
// and V (16 keys x 128) N-major in shared memory.
__device__ __forceinline__ void wgmma_pv(float (&o)[16][4], const uint32_t (&p)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
        "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, "
        "%39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
        "%58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : F4(o[0]), F4(o[1]), F4(o[2]), F4(o[3]), F4(o[4]), F4(o[5]), F4(o[6]), F4(o[7]), F4(o[8]),
          F4(o[9]), F4(o[10]), F4(o[11]), F4(o[12]), F4(o[13]), F4(o[14]), F4(o[15])
        : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(b), "r"(1));
}

#undef F4

// The online softmax of one warpgroup's 64 rows. Each thread holds rows g and g + 8 of its warp's
// 16 (g = lane / 4) and, of each 8-key column group i, keys 8i + 2(lane % 4) + {0, 1}: the same
// fragment layout as the warp-MMA kernel, so the same arithmetic.
struct OnlineSoftmax {
    float m_lo = -INFINITY, m_hi = -INFINITY;  // running max, log2 domain, scaled
    float l_lo = 0.f, l_hi = 0.f;              // this thread's partial row sums

    // Turns the scores of keys key0 .. key0 + 63 into probabilities in place (keys >= n get none) and
    // returns in a_lo / a_hi the factor the output so far must be scaled by.
    __device__ __forceinline__ void probabilities(float (&s)[BC / 8][4], int key0, int n, int lane,
                                                  float scale_log2, float& a_lo, float& a_hi) {
        if (key0 + BC > n) {
#pragma unroll
            for (int i = 0; i < BC / 8; ++i) {
                int key = key0 + i * 8 + (lane % 4) * 2;
                if (key >= n) s[i][0] = s[i][2] = -INFINITY;
                if (key + 1 >= n) s[i][1] = s[i][3] = -INFINITY;
            }
        }
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
        a_lo = exp2f(m_lo - mx_lo);
        a_hi = exp2f(m_hi - mx_hi);
        m_lo = mx_lo;
        m_hi = mx_hi;
        l_lo *= a_lo;
        l_hi *= a_hi;
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            s[i][0] = exp2f(fmaf(s[i][0], scale_log2, -m_lo));
            s[i][1] = exp2f(fmaf(s[i][1], scale_log2, -m_lo));
            s[i][2] = exp2f(fmaf(s[i][2], scale_log2, -m_hi));
            s[i][3] = exp2f(fmaf(s[i][3], scale_log2, -m_hi));
            l_lo += s[i][0] + s[i][1];
            l_hi += s[i][2] + s[i][3];
        }
    }
};

// Probabilities as bf16 A fragments: the accumulators of column groups 2p and 2p + 1 form one 16x16 tile.
__device__ __forceinline__ void pack(const float (&s)[BC / 8][4], uint32_t (&pf)[BC / 16][4]) {
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) {
        pf[i / 2][(i % 2) * 2 + 0] = pack_bf16(s[i][0], s[i][1]);
        pf[i / 2][(i % 2) * 2 + 1] = pack_bf16(s[i][2], s[i][3]);
    }
}

__device__ __forceinline__ void rescale(float (&o)[D / 8][4], float a_lo, float a_hi) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        o[i][0] *= a_lo;
        o[i][1] *= a_lo;
        o[i][2] *= a_hi;
        o[i][3] *= a_hi;
    }
}

// q, k, v: (B, H, N, D), unit stride along D, element strides for batch, head and position
// (multiples of 8). out: contiguous (B, N, H, D). Grid: (ceil(N / (64·WGS)), H, B); 128·WGS
// threads; dynamic shared memory: 1024 bytes of alignment slack, the Q tile, two K and two V tiles.
//
// Per tile: S = Q Kᵀ, softmax, O += P V, each waited for; the warpgroups of the SM overlap each other.
// FlashAttention-3's intra-warpgroup overlap (a tile's S issued with the previous tile's P V, the
// softmax running meanwhile, three K/V stages) was measured slower here with two warpgroups.
template <int WGS>
__device__ __forceinline__ void flash_attn_wgmma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                 const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out,
                                                 float* __restrict__ lse, int n, int heads, float scale_log2,
                                                 int64_t q_sb, int64_t q_sh, int64_t q_sn,
                                                 int64_t k_sb, int64_t k_sh, int64_t k_sn,
                                                 int64_t v_sb, int64_t v_sh, int64_t v_sn) {
    constexpr int BR = WGS * 64;
    constexpr int THREADS = WGS * 128;
    constexpr int STAGES = 2;
    extern __shared__ unsigned char smem_raw[];
    // The swizzle is a function of the address: every tile starts on a 1024-byte boundary.
    __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(
        smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
    __nv_bfloat16* sk = sq + BR * D;         // STAGES K tiles
    __nv_bfloat16* sv = sk + STAGES * TILE;  // STAGES V tiles

    const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128, warp = (tid / 32) % 4;
    const int q0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
    const __nv_bfloat16* qb = q + b * q_sb + h * q_sh;
    const __nv_bfloat16* kb = k + b * k_sb + h * k_sh;
    const __nv_bfloat16* vb = v + b * v_sb + h * v_sh;
    const int tiles = (n + BC - 1) / BC;
    auto load_kv = [&](int t) {
        const int st = t % STAGES;
        load_tile<BC, THREADS>(sk + st * TILE, kb, k_sn, t * BC, n, tid);
        load_tile<BC, THREADS>(sv + st * TILE, vb, v_sn, t * BC, n, tid);
    };

    // Descriptors' byte offsets: 8 rows of 128 bytes make one swizzle atom (1024 bytes); V's two
    // halves of head dims lie a half-tile apart.
    constexpr uint32_t ATOM = 1024, V_HALF = BC * HALF * 2;
    const __nv_bfloat16* sq_wg = sq + wg * 64 * HALF;
    // S = Q Kᵀ for tile t: 8 steps of 16 head dims (32 bytes within a 128-byte row, then the next half).
    auto issue_qk = [&](float (&s)[BC / 8][4], int t) {
        const __nv_bfloat16* tk = sk + (t % STAGES) * TILE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int half = kk / 4, col = (kk % 4) * 16;
            wgmma_qk(s, desc(sq_wg + half * BR * HALF + col, 16, ATOM),
                     desc(tk + half * BC * HALF + col, 16, ATOM), kk > 0);
        }
        wgmma_commit();
    };
    // O += P V for tile t: 4 steps of 16 keys (two atoms of 8 keys); N spans both halves of head dims.
    auto issue_pv = [&](float (&o)[D / 8][4], const uint32_t (&pf)[BC / 16][4], int t) {
        const __nv_bfloat16* tv = sv + (t % STAGES) * TILE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) wgmma_pv(o, pf[kk], desc(tv + kk * 16 * HALF, V_HALF, ATOM));
        wgmma_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float s[BC / 8][4];
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    OnlineSoftmax sm;
    uint32_t pf[BC / 16][4];
    float a_lo, a_hi;

    load_tile<BR, THREADS>(sq, qb, q_sn, q0, n, tid);
    load_kv(0);
    cp_async_commit();
    cp_async_wait_all();
    fence_async_shared();
    __syncthreads();
    for (int j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) {
            load_kv(j + 1);
            cp_async_commit();
        }
        issue_qk(s, j);
        wgmma_wait<0>();
        fence_regs(s);
        sm.probabilities(s, j * BC, n, lane, scale_log2, a_lo, a_hi);
        pack(s, pf);
        rescale(o, a_lo, a_hi);
        issue_pv(o, pf, j);
        wgmma_wait<0>();
        fence_regs(o);
        if (j + 1 < tiles) {
            cp_async_wait_all();
            fence_async_shared();
        }
        __syncthreads();
    }

#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        sm.l_lo += __shfl_xor_sync(0xffffffff, sm.l_lo, off);
        sm.l_hi += __shfl_xor_sync(0xffffffff, sm.l_hi, off);
    }
    const float inv_lo = 1.f / sm.l_lo, inv_hi = 1.f / sm.l_hi;
    const int row_lo = q0 + wg * 64 + warp * 16 + lane / 4, row_hi = row_lo + 8;
    const int col = (lane % 4) * 2;
    if (lse != nullptr && lane % 4 == 0) {
        float* lb = lse + ((int64_t)b * heads + h) * n;
        if (row_lo < n) lb[row_lo] = sm.m_lo + log2f(sm.l_lo);
        if (row_hi < n) lb[row_hi] = sm.m_hi + log2f(sm.l_hi);
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
}

// Attention's backward for WGS warpgroups of 64 keys each of one (batch, head), after
// FlashAttention-3's: the block keeps its keys' K and V tiles and dK, dV accumulators, and walks the
// queries 64 at a time (Q and dO tiles loading one ahead). Per tile, with S and dP transposed (keys as
// rows) so that each warpgroup's products stay its own:
//   Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (operands in shared memory, K-major),
//   Pᵀ = exp2(Sᵀ · scale_log2 − lse) and dSᵀ = Pᵀ (dPᵀ − delta) (per query: columns),
//   dV += Pᵀ dO and dK += dSᵀ Q (Pᵀ, dSᵀ from registers; dO and Q read N-major, as the forward's V),
// and dSᵀ · scale is written out through shared memory for dQ = dS K, cuBLAS's. P never reaches memory.
// dK leaves multiplied by scale.
//
// q, k, v, g (= dO): (B, H, N, D), unit stride along D, element strides (multiples of 8); lse (log2
// units) and delta = rowsum(dO ⊙ O): contiguous (B, H, N) f32; dk, dv: contiguous (B, H, N, D); ds_t:
// contiguous (B, H, N, N), keys as rows. Grid: (ceil(N / (64·WGS)), H, B); 128·WGS threads; dynamic
// shared memory: 1024 bytes of alignment slack, the K and V tiles, two stages of Q and dO tiles and of
// their rows' lse and delta, and a staging of 16 rows a warp.
template <int WGS>
__device__ __forceinline__ void flash_attn_bwd_kv_wgmma(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const __nv_bfloat16* __restrict__ g, const float* __restrict__ lse, const float* __restrict__ delta,
    __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv, __nv_bfloat16* __restrict__ ds_t, int n,
    int heads, float scale_log2, float scale, int64_t q_sb, int64_t q_sh, int64_t q_sn, int64_t k_sb, int64_t k_sh,
    int64_t k_sn, int64_t v_sb, int64_t v_sh, int64_t v_sn, int64_t g_sb, int64_t g_sh, int64_t g_sn) {
    constexpr int BK = WGS * 64;  // keys a block
    constexpr int THREADS = WGS * 128;
    constexpr int STAGES = 2;
    extern __shared__ unsigned char smem_raw[];
    __nv_bfloat16* sk = reinterpret_cast<__nv_bfloat16*>(
        smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
    __nv_bfloat16* sv = sk + BK * D;
    __nv_bfloat16* sq = sv + BK * D;         // STAGES Q tiles of BC queries
    __nv_bfloat16* sg = sq + STAGES * TILE;  // STAGES dO tiles
    __nv_bfloat16* staged = sg + STAGES * TILE;
    float* s_lse = reinterpret_cast<float*>(staged + THREADS / 32 * STAGED);  // STAGES x BC
    float* s_delta = s_lse + STAGES * BC;

    const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128, warp = (tid / 32) % 4;
    const int k0 = blockIdx.x * BK, h = blockIdx.y, b = blockIdx.z;
    const int64_t bh = (int64_t)b * heads + h;
    const __nv_bfloat16* qb = q + b * q_sb + h * q_sh;
    const __nv_bfloat16* gb = g + b * g_sb + h * g_sh;
    const int tiles = (n + BC - 1) / BC;
    auto load_q = [&](int t) {
        const int st = t % STAGES;
        load_tile<BC, THREADS>(sq + st * TILE, qb, q_sn, t * BC, n, tid);
        load_tile<BC, THREADS>(sg + st * TILE, gb, g_sn, t * BC, n, tid);
        // Queries past the end get an infinite log-sum-exp: probability 0, no gradient.
        for (int i = tid; i < BC; i += THREADS) {
            const int row = t * BC + i;
            s_lse[st * BC + i] = row < n ? lse[bh * n + row] : INFINITY;
            s_delta[st * BC + i] = row < n ? delta[bh * n + row] : 0.f;
        }
    };

    constexpr uint32_t ATOM = 1024, T_HALF = BC * HALF * 2;
    const __nv_bfloat16* sk_wg = sk + wg * 64 * HALF;
    const __nv_bfloat16* sv_wg = sv + wg * 64 * HALF;
    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for tile t in one commit group.
    auto issue_scores = [&](float (&st_)[BC / 8][4], float (&dpt)[BC / 8][4], int t) {
        const __nv_bfloat16* tq = sq + (t % STAGES) * TILE;
        const __nv_bfloat16* tg = sg + (t % STAGES) * TILE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int half = kk / 4, col = (kk % 4) * 16;
            wgmma_qk(st_, desc(sk_wg + half * BK * HALF + col, 16, ATOM), desc(tq + half * BC * HALF + col, 16, ATOM),
                     kk > 0);
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int half = kk / 4, col = (kk % 4) * 16;
            wgmma_qk(dpt, desc(sv_wg + half * BK * HALF + col, 16, ATOM), desc(tg + half * BC * HALF + col, 16, ATOM),
                     kk > 0);
        }
        wgmma_commit();
    };
    // dV += Pᵀ dO and dK += dSᵀ Q for tile t: 4 steps of 16 queries each.
    auto issue_grads = [&](float (&dv_)[D / 8][4], float (&dk_)[D / 8][4], const uint32_t (&pf)[BC / 16][4],
                           const uint32_t (&dsf)[BC / 16][4], int t) {
        const __nv_bfloat16* tq = sq + (t % STAGES) * TILE;
        const __nv_bfloat16* tg = sg + (t % STAGES) * TILE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) wgmma_pv(dv_, pf[kk], desc(tg + kk * 16 * HALF, T_HALF, ATOM));
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) wgmma_pv(dk_, dsf[kk], desc(tq + kk * 16 * HALF, T_HALF, ATOM));
        wgmma_commit();
    };

    load_tile<BK, THREADS>(sk, k + b * k_sb + h * k_sh, k_sn, k0, n, tid);
    load_tile<BK, THREADS>(sv, v + b * v_sb + h * v_sh, v_sn, k0, n, tid);
    load_q(0);
    cp_async_commit();
    cp_async_wait_all();
    fence_async_shared();
    __syncthreads();

    float dv_acc[D / 8][4], dk_acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dv_acc[i][e] = dk_acc[i][e] = 0.f;
    float st_[BC / 8][4], dpt[BC / 8][4];
#pragma unroll
    for (int i = 0; i < BC / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) st_[i][e] = dpt[i][e] = 0.f;
    uint32_t pf[BC / 16][4], dsf[BC / 16][4];
    const int key0 = k0 + wg * 64 + warp * 16;  // this warp's first key
    __nv_bfloat16* st_ds = staged + (wg * 4 + warp) * STAGED;

    for (int j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) {
            load_q(j + 1);
            cp_async_commit();
        }
        issue_scores(st_, dpt, j);
        wgmma_wait<0>();
        fence_regs(st_);
        fence_regs(dpt);
        // Element e of column group i is query 8i + 2(lane % 4) + (e & 1) of the tile.
        const float* tl = s_lse + (j % STAGES) * BC;
        const float* td = s_delta + (j % STAGES) * BC;
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            const int c = i * 8 + (lane % 4) * 2;
            const float l0 = tl[c], l1 = tl[c + 1], d0 = td[c], d1 = td[c + 1];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(fmaf(st_[i][e], scale_log2, -(e & 1 ? l1 : l0)));
                st_[i][e] = p;
                dpt[i][e] = p * (dpt[i][e] - (e & 1 ? d1 : d0));
            }
        }
        pack(st_, pf);
        pack(dpt, dsf);
        issue_grads(dv_acc, dk_acc, pf, dsf, j);
        // dSᵀ · scale out while the tensor cores take the two products.
#pragma unroll
        for (int i = 0; i < BC / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dpt[i][e] *= scale;
        store_tile(dpt, st_ds, ds_t, bh, key0, j * BC, n, lane);
        wgmma_wait<0>();
        fence_regs(dv_acc);
        fence_regs(dk_acc);
        keep_regs(pf);  // the products read them until the wait
        keep_regs(dsf);
        if (j + 1 < tiles) {
            cp_async_wait_all();
            fence_async_shared();
        }
        __syncthreads();
    }

    // Rows g and g + 8 of this warp's 16 keys, dims 8i + 2(lane % 4) + {0, 1}.
    const int row_lo = key0 + lane / 4, row_hi = row_lo + 8, col = (lane % 4) * 2;
    __nv_bfloat16* dkb = dk + bh * n * D + col;
    __nv_bfloat16* dvb = dv + bh * n * D + col;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        if (row_lo < n) {
            *reinterpret_cast<uint32_t*>(dkb + (int64_t)row_lo * D + i * 8) =
                pack_bf16(dk_acc[i][0] * scale, dk_acc[i][1] * scale);
            *reinterpret_cast<uint32_t*>(dvb + (int64_t)row_lo * D + i * 8) = pack_bf16(dv_acc[i][0], dv_acc[i][1]);
        }
        if (row_hi < n) {
            *reinterpret_cast<uint32_t*>(dkb + (int64_t)row_hi * D + i * 8) =
                pack_bf16(dk_acc[i][2] * scale, dk_acc[i][3] * scale);
            *reinterpret_cast<uint32_t*>(dvb + (int64_t)row_hi * D + i * 8) = pack_bf16(dv_acc[i][2], dv_acc[i][3]);
        }
    }
}

}  // namespace
#define WGMMA_KERNEL(WGS) flash_attn_wgmma<WGS>(FLASH_ATTN_PASS)
#define WGMMA_BWD_KV_KERNEL(WGS) flash_attn_bwd_kv_wgmma<WGS>(BWD_KV_PASS)
#else
#define WGMMA_KERNEL(WGS)
#define WGMMA_BWD_KV_KERNEL(WGS)
#endif

#define FLASH_ATTN_ARGS                                                                                   \
    const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,                             \
        const __nv_bfloat16 *__restrict__ v, __nv_bfloat16 *__restrict__ out, float *__restrict__ lse,     \
        int n, int heads, float scale_log2, int64_t q_sb, int64_t q_sh, int64_t q_sn, int64_t k_sb, int64_t k_sh,           \
        int64_t k_sn, int64_t v_sb, int64_t v_sh, int64_t v_sn
#define FLASH_ATTN_PASS q, k, v, out, lse, n, heads, scale_log2, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn

// 192 query rows a block: three warpgroups share each K/V tile (the fastest at FLUX's lengths).
extern "C" __global__ void __launch_bounds__(384, 1) flash_attn_wgmma_bf16_d128_r192(FLASH_ATTN_ARGS) {
    WGMMA_KERNEL(3);
}
// 128 query rows a block: two warpgroups.
extern "C" __global__ void __launch_bounds__(256, 1) flash_attn_wgmma_bf16_d128_r128(FLASH_ATTN_ARGS) {
    WGMMA_KERNEL(2);
}

#define BWD_KV_ARGS                                                                                                 \
    const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v, \
        const __nv_bfloat16 *__restrict__ g, const float *__restrict__ lse, const float *__restrict__ delta,       \
        __nv_bfloat16 *__restrict__ dk, __nv_bfloat16 *__restrict__ dv, __nv_bfloat16 *__restrict__ ds_t, int n,  \
        int heads, float scale_log2, float scale, int64_t q_sb, int64_t q_sh, int64_t q_sn, int64_t k_sb,         \
        int64_t k_sh, int64_t k_sn, int64_t v_sb, int64_t v_sh, int64_t v_sn, int64_t g_sb, int64_t g_sh,         \
        int64_t g_sn
#define BWD_KV_PASS                                                                                                \
    q, k, v, g, lse, delta, dk, dv, ds_t, n, heads, scale_log2, scale, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, \
        v_sh, v_sn, g_sb, g_sh, g_sn

// The backward's dK, dV and dSᵀ, 128 keys a block: two warpgroups.
extern "C" __global__ void __launch_bounds__(256, 1) flash_attn_bwd_kv_wgmma_bf16_d128_r128(BWD_KV_ARGS) {
    WGMMA_BWD_KV_KERNEL(2);
}
