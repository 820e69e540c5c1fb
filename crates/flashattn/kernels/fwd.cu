// FlashAttention-2-class forward kernel for sm_80 and up (also the Hopper fallback).
//
// Entry point: extern "C" __global__ void flash_fwd(const FwdParams p)   (params.cuh)
//
// Compile-time macros (pass as -D options; defaults in brackets):
//   HEAD_DIM     padded head dim: 32, 64, 96, 128, 160, 192, 224 or 256 (required). The runtime p.d may be
//                anything in 1..HEAD_DIM: loads are zero-filled beyond d, stores are predicated.
//   HEAD_DIM_V   padded value head dim of v and o (variant.cuh; default HEAD_DIM). When defined (HAS_DV) the
//                kernel takes FwdDvParams and its runtime d_v (1..HEAD_DIM_V) the way it takes d: V loads
//                zero-filled beyond d_v, O stores predicated. Q K^T runs over HEAD_DIM, P V over HEAD_DIM_V.
//   IS_BF16      1: bf16 inputs/outputs, 0: f16 [0]
//   HAS_MASK     1: window/causal active (p.window_left/right; causal = (-1, 0)): KV blocks outside the
//                window are skipped, boundary blocks are masked per element. 0: the window fields are ignored [0]
//   HAS_ALIBI    1: p.alibi_slopes is used [0]
//   HAS_SOFTCAP  1: p.softcap > 0 is applied [0]
//   IS_VARLEN    1: p.cu_seqlens_q / p.cu_seqlens_k give the sequences (batch strides ignored) [0]
//   ALIGNED16    1: q/k/v/o base pointers are 16-byte aligned and every row/head/batch stride is a multiple
//                of 8 elements (d itself may be anything), so 16-byte cp.async / stores are used. 0: any
//                alignment, element-wise loads and stores (slower; for odd layouts) [1]
//   BLOCK_M, BLOCK_N, NUM_WARPS   tile sizes; defaults per max(HEAD_DIM, HEAD_DIM_V) (FWD_DEFAULT_TILES below):
//                HEAD_DIM   32: 128 x 128, 4 warps     64: 128 x 128, 4 warps    96: 128 x 64, 4 warps
//                          128: 128 x  64, 4 warps    160: 128 x  64, 8 warps   192: 128 x 64, 8 warps
//                          224: 128 x  64, 8 warps    256: 128 x  64, 8 warps
//                HEAD_DIM_V > HEAD_DIM: 128 x 64, 8 warps.
//                Constraints: BLOCK_M % (16 * NUM_WARPS) == 0, BLOCK_N % 16 == 0.
//
// Launch configuration:
//   grid    = (ceil(max_sq / BLOCK_M), b, h)    max_sq = p.sq (dense) or the longest query sequence (varlen);
//             blockIdx.x is walked in reverse so that, with causal masks, the longest tiles start first.
//   block   = (32 * NUM_WARPS, 1, 1)
//   dynamic shared memory bytes = FWD_SMEM_BYTES = max((BLOCK_M + BLOCK_N) * RB, BLOCK_M * RBV) + BLOCK_N * RBV
//             with RB = (HEAD_DIM + 8) * 2 and RBV = (HEAD_DIM_V + 8) * 2 (Q tile + one K tile, then one V tile,
//             rows padded by 16 bytes; the epilogue stages O, BLOCK_M rows of RBV bytes, over the Q and K tiles,
//             which a wider value head dim may outgrow). With HEAD_DIM_V = HEAD_DIM this is
//             (BLOCK_M + 2 * BLOCK_N) * (HEAD_DIM + 8) * 2. Above 48 KB the launcher must set
//             CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first.
//   Defaults: d32 40960, d64 55296, d96 53248, d128 69632, d160 86016, d192 102400, d224 118784, d256 135168;
//             (HEAD_DIM, HEAD_DIM_V) (64, 128) 52224, (128, 64) 61440, (192, 128) 94208.
//
// Output: o (dtype of q; f32 with OUT_F32, variant.cuh) and lse (f32, natural log). Rows with no visible key get o = 0, lse = -inf (with a
// learnable sink p.sink: lse = sink[h]); a NaN or +inf among a row's visible scores makes its o and lse NaN.
// Sink (p.sink != nullptr, f32 [h]): folded into each row's max and sum in the epilogue only (spec step 6).
// Semantics: docs spec ATTENTION.md. Scores with softcap/ALiBi: s = scale*q.k, s = softcap*tanh(s/softcap),
// s -= slope*|i + sk - sq - j|, then masking. Plain case keeps raw-score row maxima and folds
// scale*log2(e) into one FFMA before ex2 (requires scale > 0).
//
// Pipeline per CTA (one query tile of BLOCK_M rows; each warp owns BLOCK_M / NUM_WARPS rows):
//   load Q, K(last) -> loop over visible KV blocks from high to low:
//     wait K(j) | issue V(j) | S = Q K(j)^T (ldmatrix + mma.m16n8k16) | mask / softcap / alibi
//     wait V(j) | issue K(j-1) | online softmax (exp2) | P packed in registers as the A operand | O += P V(j)
//   normalise, stage O in the warp's own rows of the Q tile, 16-byte coalesced stores (OUT_F32: f32 pairs stored
//   straight from the accumulators, no staging), LSE from registers.
#include "params.cuh"
#include "common.cuh"
#include "mask.cuh"

#include "variant.cuh"

// FWD_DEFAULT_TILES, by the wider of the two head dims (the S and O accumulators share the registers)
#if HEAD_DIM_V > HEAD_DIM
#define FWD_TILE_DIM HEAD_DIM_V
#else
#define FWD_TILE_DIM HEAD_DIM
#endif
#if HEAD_DIM_V > HEAD_DIM
// A value head dim wider than the head dim: one m16 row block per warp (the O accumulator is the wider one).
#define FWD_DEF_BM 128
#define FWD_DEF_BN 64
#define FWD_DEF_WARPS 8
#elif FWD_TILE_DIM <= 64
#define FWD_DEF_BM 128
#define FWD_DEF_BN 128
#define FWD_DEF_WARPS 4
#elif FWD_TILE_DIM <= 128
#define FWD_DEF_BM 128
#define FWD_DEF_BN 64
#define FWD_DEF_WARPS 4
#else
#define FWD_DEF_BM 128
#define FWD_DEF_BN 64
#define FWD_DEF_WARPS 8
#endif
#ifndef BLOCK_M
#define BLOCK_M FWD_DEF_BM
#endif
#ifndef BLOCK_N
#define BLOCK_N FWD_DEF_BN
#endif
#ifndef NUM_WARPS
#define NUM_WARPS FWD_DEF_WARPS
#endif

#ifndef QK_UNROLL
#define QK_UNROLL 1
#endif
#define FWD_THREADS (32 * NUM_WARPS)
#define FWD_SMEM_BYTES (fwd::OFF_V + BLOCK_N * fwd::ROW_BYTES_V)


namespace fwd {

constexpr int D = HEAD_DIM;
constexpr int BM = BLOCK_M;
constexpr int BN = BLOCK_N;
constexpr int NW = NUM_WARPS;
constexpr int NT = FWD_THREADS;
constexpr int WARP_M = BM / NW;     // query rows per warp
constexpr int MT = WARP_M / 16;     // m16 tiles per warp
constexpr int NTILES = BN / 8;      // n8 tiles of S per row block
constexpr int DTILES = HEAD_DIM_V / 8;  // n8 tiles of O
constexpr int CHUNKS = D / 8;       // 16-byte chunks per row
typedef PaddedTile<D> Tile;
constexpr int ROW_BYTES = Tile::ROW_BYTES;
// The value head dim's shapes, as enumerators (namespace-scope constexpr variables become PTX globals; these add
// none, so the variants without HEAD_DIM_V compile to the cubins they compiled to before it existed).
enum : int {
    D_V = HEAD_DIM_V,
    CHUNKS_V = HEAD_DIM_V / 8,  // 16-byte chunks per row of V and O
    ROW_BYTES_V = PaddedTile<HEAD_DIM_V>::ROW_BYTES,
    // V after the Q and K tiles, or after the O staging area (BM rows of ROW_BYTES_V over the Q and K tiles)
    // where that is larger.
    OFF_V = (BM + BN) * ROW_BYTES > BM * ROW_BYTES_V ? (BM + BN) * ROW_BYTES : BM * ROW_BYTES_V,
};

static_assert(D % 32 == 0, "HEAD_DIM must be a multiple of 32");
static_assert(D_V % 32 == 0, "HEAD_DIM_V must be a multiple of 32");
static_assert(BM % (16 * NW) == 0, "BLOCK_M must be a multiple of 16 * NUM_WARPS");
static_assert(BN % 16 == 0, "BLOCK_N must be a multiple of 16");

// Copy a [ROWS x COLS] tile (rows >= rows_valid and columns >= d zero-filled) into padded shared memory
// (PaddedTile<COLS>). Thread `tid` copies 16-byte chunks idx = tid, tid + NT, ...: row idx / CHUNKS, chunk
// idx % CHUNKS.
template <int ROWS, int COLS = D>
FA_DEVICE void load_tile(u32 s_base, const u16* g, i64 row_stride, int rows_valid, int d, int tid) {
    constexpr int CHUNKS = COLS / 8;
    constexpr int ROW_BYTES = PaddedTile<COLS>::ROW_BYTES;
    constexpr int TOTAL = ROWS * CHUNKS;
    constexpr int ITERS = (TOTAL + NT - 1) / NT;
    if constexpr (NT % CHUNKS == 0 && TOTAL % NT == 0) {
        // Every iteration advances by RPI whole rows at a fixed chunk: one pointer, one smem address.
        constexpr int RPI = NT / CHUNKS;
        const int r0 = tid / CHUNKS;
        const int col = (tid % CHUNKS) * 8;
        const bool col_ok = col < d;
        const int nbytes_full = col_ok ? min(16, (d - col) * 2) : 0;
        const u16* src = g + (i64)r0 * row_stride + col;
        const i64 step = (i64)RPI * row_stride;
        const u32 sa = s_base + r0 * ROW_BYTES + col * 2;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const bool ok = col_ok && r0 + it * RPI < rows_valid;
#if ALIGNED16
            cp_async_16(sa + it * RPI * ROW_BYTES, ok ? src : g, ok ? nbytes_full : 0);
#else
            u32 w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                u32 lo = (ok && col + 2 * e < d) ? (u32)src[2 * e] : 0u;
                u32 hi = (ok && col + 2 * e + 1 < d) ? (u32)src[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            st_shared_v4(sa + it * RPI * ROW_BYTES, make_uint4(w[0], w[1], w[2], w[3]));
#endif
            src += step;
        }
    } else {
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int idx = it * NT + tid;
            if (TOTAL % NT == 0 || idx < TOTAL) {
                const int r = idx / CHUNKS;
                const int c = idx % CHUNKS;
                const u32 sa = s_base + r * ROW_BYTES + c * 16;
                const int col = c * 8;
                const bool ok = r < rows_valid && col < d;
#if ALIGNED16
                const int nbytes = ok ? min(16, (d - col) * 2) : 0;
                const u16* src = ok ? g + (i64)r * row_stride + col : g;
                cp_async_16(sa, src, nbytes);
#else
                u32 w[4];
                const u16* src = g + (i64)r * row_stride + col;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    u32 lo = (ok && col + 2 * e < d) ? (u32)src[2 * e] : 0u;
                    u32 hi = (ok && col + 2 * e + 1 < d) ? (u32)src[2 * e + 1] : 0u;
                    w[e] = lo | (hi << 16);
                }
                st_shared_v4(sa, make_uint4(w[0], w[1], w[2], w[3]));
#endif
            }
        }
    }
}

}  // namespace fwd

#if HAS_DV
extern "C" __global__ void __launch_bounds__(FWD_THREADS, 1) flash_fwd(const FwdDvParams pv) {
    const FwdParams& p = pv.f;
#else
extern "C" __global__ void __launch_bounds__(FWD_THREADS, 1) flash_fwd(const FwdParams p) {
#endif
    using namespace fwd;
    extern __shared__ __align__(128) unsigned char smem[];

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int bi = blockIdx.y;
    const int qh = blockIdx.z;
    const int kvh = qh / (p.h / p.hk);

    // ---- sequence geometry
    int sq = p.sq, sk = p.sk;
    i64 q_off, k_off, v_off;
#if IS_VARLEN
    {
        const int q0 = p.cu_seqlens_q[bi];
        const int k0 = p.cu_seqlens_k[bi];
        sq = p.cu_seqlens_q[bi + 1] - q0;
        sk = p.cu_seqlens_k[bi + 1] - k0;
        q_off = (i64)q0 * p.q_row_stride;
        k_off = (i64)k0 * p.k_row_stride;
        v_off = (i64)k0 * p.v_row_stride;
    }
#else
    q_off = (i64)bi * p.q_batch_stride;
    k_off = (i64)bi * p.k_batch_stride;
    v_off = (i64)bi * p.v_batch_stride;
#endif
    if (p.seqused_k) sk = min(sk, p.seqused_k[bi]);
    if (sk < 0) sk = 0;
    const int m0 = m_block * BM;
    if (m0 >= sq) return;
    const int rows_valid = min(BM, sq - m0);
    const int d = p.d;
#if HAS_DV
    const int d_v = pv.d_v;
#else
    const int d_v = d;  // the value head dim is d
#endif

    const u16* gq = (const u16*)p.q + q_off + (i64)qh * p.q_head_stride + (i64)m0 * p.q_row_stride;
    const u16* gk = (const u16*)p.k + k_off + (i64)kvh * p.k_head_stride;
    const u16* gv = (const u16*)p.v + v_off + (i64)kvh * p.v_head_stride;

    MaskCtx mc;
    set_mask_ctx(mc, sq, sk, p);
    const int off = sk - sq;
    int nb_lo, nb_hi;
    kv_block_range(mc, HAS_MASK != 0, m0, m0 + rows_valid - 1, BN, &nb_lo, &nb_hi);

    const u32 sQ = smem_u32(smem);
    const u32 sK = sQ + BM * ROW_BYTES;
    const u32 sV = sK + (OFF_V - BM * ROW_BYTES);

    // Scores are handled in "log2 units": p = exp2(s * c - m * c).
#if HAS_SOFTCAP || HAS_ALIBI
    const float c = FA_LOG2E;  // s is transformed to its final natural-log value first
#else
    const float c = p.scale * FA_LOG2E;
#endif
#if HAS_SOFTCAP
    const float softcap = p.softcap;
    const float inv_softcap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
#endif
#if HAS_ALIBI
    const float slope = p.alibi_slopes[(i64)bi * p.alibi_batch_stride + qh];
#endif

    float acc_o[MT][DTILES][4];
    float row_m[MT][2], row_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < DTILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][nt][e] = 0.f;
        row_m[mt][0] = row_m[mt][1] = FA_NEG_INF;
        row_l[mt][0] = row_l[mt][1] = 0.f;
    }

    const int warp_row0 = warp * WARP_M;  // first tile row of this warp

    if (nb_hi > nb_lo) {
        load_tile<BM>(sQ, gq, p.q_row_stride, rows_valid, d, tid);
        {
            const int n0 = (nb_hi - 1) * BN;
            load_tile<BN>(sK, gk + (i64)n0 * p.k_row_stride, p.k_row_stride, sk - n0, d, tid);
        }
        cp_async_commit();

        // per-lane ldmatrix address offsets (bytes, relative to a tile base)
        // Q (A operand, x4): row = lane & 15, col = (lane >> 4) * 8
        const u32 q_lane = (u32)((warp_row0 + (lane & 15)) * ROW_BYTES + (lane >> 4) * 16);
        // K (B operand, x4 over two n8 tiles): row = (lane & 7) + ((lane >> 4) << 3), col = ((lane >> 3) & 1) * 8
        const u32 k_lane = (u32)(((lane & 7) + ((lane >> 4) << 3)) * ROW_BYTES + ((lane >> 3) & 1) * 16);
        // V (B operand via .trans, x4 over two n8 tiles of O): row = lane & 15, col = (lane >> 4) * 8
        const u32 v_lane = (u32)((lane & 15) * ROW_BYTES_V + (lane >> 4) * 16);

        for (int nb = nb_hi - 1; nb >= nb_lo; --nb) {
            const int n0 = nb * BN;
            cp_async_wait<0>();
            __syncthreads();  // K(nb) visible to all; every warp is done with the previous V
            load_tile<BN, D_V>(sV, gv + (i64)n0 * p.v_row_stride, p.v_row_stride, sk - n0, d_v, tid);
            cp_async_commit();

            // ---- S = Q K^T
            float s[MT][NTILES][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll QK_UNROLL
            for (int kk = 0; kk < D / 16; ++kk) {
                u32 qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(qa[mt], sQ + q_lane + mt * 16 * ROW_BYTES + kk * 32);
#pragma unroll
                for (int np = 0; np < NTILES / 2; ++np)
                    mma_slab<elem_t, MT, false>(s, qa, sK + k_lane + np * 16 * ROW_BYTES + kk * 32, 2 * np);
            }

            // ---- score transforms and masking
            const bool need_mask = tile_needs_mask(mc, HAS_MASK != 0, m0, m0 + rows_valid - 1, n0, BN);
#if HAS_SOFTCAP || HAS_ALIBI
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][nt][e];
#if HAS_SOFTCAP
                        x = inv_softcap > 0.f ? apply_softcap(x * p.scale, softcap, inv_softcap) : x * p.scale;
#else
                        x *= p.scale;
#endif
#if HAS_ALIBI
                        const int i = m0 + warp_row0 + mt * 16 + g + (e >> 1) * 8;
                        const int j = n0 + nt * 8 + 2 * t + (e & 1);
                        x += alibi_bias(slope, i, j, off);
#endif
                        s[mt][nt][e] = x;
                    }
#endif
            if (need_mask) {
                // Per row: visible columns are [lo, hi) (spec visibility, see mask.cuh), shifted so that the
                // test per element is one compare against the compile-time column offset nt*8 + e.
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int i = m0 + warp_row0 + mt * 16 + g + hh * 8;
                        const int base = n0 + 2 * t;
                        int hi = sk;
                        int lo = 0;
#if HAS_MASK
                        if (mc.wr >= 0) hi = min(hi, i + off + mc.wr + 1);
                        if (mc.wl >= 0) lo = i + off - mc.wl;
#endif
                        hi -= base;
                        lo -= base;
#pragma unroll
                        for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int cidx = nt * 8 + e;
                                if (cidx >= hi || cidx < lo) s[mt][nt][2 * hh + e] = FA_NEG_INF;
                            }
                    }
            }

            cp_async_wait<0>();
            __syncthreads();  // V(nb) visible; every warp is done with K(nb)
            if (nb > nb_lo) {
                const int n1 = n0 - BN;
                load_tile<BN>(sK, gk + (i64)n1 * p.k_row_stride, p.k_row_stride, sk - n1, d, tid);
                cp_async_commit();
            }

            // ---- online softmax
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    float mx = row_m[mt][hh];
#pragma unroll
                    for (int nt = 0; nt < NTILES; ++nt)
                        mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
                    mx = quad_max(mx);
                    const float m_use = mx == FA_NEG_INF ? 0.f : mx;
                    const float mc_ = m_use * c;
                    const float corr = exp2_fast(row_m[mt][hh] * c - mc_);  // -inf -> 0
                    row_m[mt][hh] = mx;
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < NTILES; ++nt) {
                        const float p0 = exp2_fast(fmaf(s[mt][nt][2 * hh], c, -mc_));
                        const float p1 = exp2_fast(fmaf(s[mt][nt][2 * hh + 1], c, -mc_));
                        s[mt][nt][2 * hh] = p0;
                        s[mt][nt][2 * hh + 1] = p1;
                        sum += p0 + p1;
                    }
                    row_l[mt][hh] = row_l[mt][hh] * corr + sum;
#pragma unroll
                    for (int dt = 0; dt < DTILES; ++dt) {
                        acc_o[mt][dt][2 * hh] *= corr;
                        acc_o[mt][dt][2 * hh + 1] *= corr;
                    }
                }
            }

            // ---- P to 16-bit A fragments (the S accumulator layout is the A layout), then O += P V
            u32 pa[BN / 16][MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) pack_a_frag<elem_t>(pa[kk][mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
                for (int dp = 0; dp < DTILES / 2; ++dp)
                    mma_slab<elem_t, MT, true>(acc_o, pa[kk], sV + v_lane + kk * 16 * ROW_BYTES_V + dp * 32, 2 * dp);
            }
        }
    }

    // ---- epilogue: normalise, LSE, stage O in this warp's own rows (of ROW_BYTES_V bytes) from the start of the
    // Q tile, coalesced stores. No warp reads Q or K any more (the last __syncthreads of the loop follows the last
    // Q K^T), and no copy into them is in flight; a wider O row may reach into the K tile (OFF_V leaves room).
    // Output offsets are recomputed here rather than kept live through the main loop (register pressure).
    i64 o_off, lse_off;
    out_offsets(p, blockIdx.y, blockIdx.z, o_off, lse_off);
#if OUT_F32
    float* go = (float*)p.o + o_off + (i64)blockIdx.z * p.o_head_stride + (i64)m0 * p.o_row_stride;
#else
    u16* go = (u16*)p.o + o_off + (i64)blockIdx.z * p.o_head_stride + (i64)m0 * p.o_row_stride;
#endif
    // Learnable sink (p.sink != nullptr): one logit per query head, in natural-log units like the final scores.
    // The branch is on a kernel parameter (uniform); with a null pointer the code below computes exactly what it
    // computed before the sink existed.
    const float sink = p.sink != nullptr ? p.sink[blockIdx.z] : 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            // l == 0: every score of the row was -inf (no visible key): o = 0 exactly (acc_o may hold 0 * NaN
            // from a masked value row), lse = -inf (with a sink: lse = sink). A NaN or +inf score made l NaN (and
            // acc_o NaN): inv and lse are then NaN too, never the empty-row encoding.
            const float l = quad_sum(row_l[mt][hh]);
            const bool empty = l == 0.f;
            float inv = 1.f / l;
            // row_m holds raw scores (plain case, c = scale * log2 e) or final natural-log scores (softcap /
            // ALiBi, c = log2 e): either way row_m * c = max_j s_ij * log2 e, the row's max in log2 units.
            float lse = empty ? FA_NEG_INF : (row_m[mt][hh] * c + log2_fast(l)) * FA_LN2;
            if (p.sink != nullptr) {
                // Fold exp(sink) into the denominator against M = max(m2, sink2) (log2 units), so a sink far
                // above the scores cannot overflow: l' = l * 2^(m2 - M) + 2^(sink2 - M), o = acc * 2^(m2 - M) / l',
                // lse = (M + log2 l') ln 2. Empty row: m2 = -inf, l' = 1; o stays 0 (`empty` below), lse = sink.
                const float m2 = row_m[mt][hh] * c;
                const float sink2 = sink * FA_LOG2E;
                const float mm = fmaxf(m2, sink2);
                const float a = exp2_fast(m2 - mm);
                const float ls = fmaf(l, a, exp2_fast(sink2 - mm));
                inv = a / ls;
                lse = empty ? sink : (mm + log2_fast(ls)) * FA_LN2;
            }
            const int r = warp_row0 + mt * 16 + g + hh * 8;
            if (t == 0 && r < rows_valid) {
                p.lse[lse_off + m0 + r] = lse;
            }
#if OUT_F32
            // f32 o straight from the accumulators (a quad's four pairs cover 8 contiguous columns: 32 bytes).
            if (r < rows_valid) {
#pragma unroll
                for (int dt = 0; dt < DTILES; ++dt) {
                    const float x0 = empty ? 0.f : acc_o[mt][dt][2 * hh] * inv;
                    const float x1 = empty ? 0.f : acc_o[mt][dt][2 * hh + 1] * inv;
                    store_out_f32_pair(go + (i64)r * p.o_row_stride, dt * 8 + 2 * t, d_v, x0, x1, ALIGNED16);
                }
            }
#else
#pragma unroll
            for (int dt = 0; dt < DTILES; ++dt) {
                const u32 v = empty ? 0u : Dt<elem_t>::pack(acc_o[mt][dt][2 * hh] * inv, acc_o[mt][dt][2 * hh + 1] * inv);
                st_shared_u32(sQ + r * ROW_BYTES_V + (dt * 8 + 2 * t) * 2, v);
            }
#endif
        }
    }
#if !OUT_F32
    __syncwarp();
    // Only this warp's rows were written and only this warp reads them back.
    constexpr int WCH = WARP_M * CHUNKS_V;
#pragma unroll
    for (int it = 0; it < (WCH + 31) / 32; ++it) {
        const int idx = it * 32 + lane;
        if (WCH % 32 == 0 || idx < WCH) {
            const int r = warp_row0 + idx / CHUNKS_V;
            const int col = (idx % CHUNKS_V) * 8;
            if (r < rows_valid && col < d_v) {
                const uint4 v = ld_shared_v4(sQ + r * ROW_BYTES_V + col * 2);
                u16* dst = go + (i64)r * p.o_row_stride + col;
#if ALIGNED16
                if (col + 8 <= d_v) {
                    st_global_v4(dst, v);
                } else
#endif
                {
                    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        if (col + e < d_v) dst[e] = (u16)(w[e >> 1] >> ((e & 1) * 16));
                }
            }
        }
    }
#endif
}
