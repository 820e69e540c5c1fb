// Hopper (sm_90a) forward: TMA loads into 128B-swizzled shared memory completing on mbarriers, wgmma for
// S = Q K^T (both operands in shared memory) and O += P V (P from registers, V read N-major), warp
// specialization with register reallocation, and a persistent tile scheduler.
//
// Entry point: extern "C" __global__ void flash_fwd_sm90(const __grid_constant__ Sm90Params p)
//
// Compile-time macros: HEAD_DIM (64, 128 or 256: the padded head dim; p.f.d may be smaller, the TMA maps
// zero-fill columns >= d), IS_BF16, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, IS_VARLEN: as in fwd.cu.
// SM90_CONSUMERS: consumer warpgroups (2 by default; 3 only at HEAD_DIM 64: BLOCK_M 192, 512 threads, FA3's
// d64 shape). BLOCK_M = 64 x consumers, threads = 128 x (consumers + 1).
// Semantics: docs spec ATTENTION.md, exactly as fwd.cu (mask.cuh is shared).
//
// Roles (384 threads = 3 warpgroups, one CTA per SM; 512 = 4 with 3 consumers):
//   warpgroup 0: producer. Registers lowered (setmaxnreg); one thread issues every TMA load: Q of a tile
//                once, then K(j) and V(j) for the visible key blocks from high to low into 2-stage rings.
//   warpgroups 1, 2 (, 3): consumers, 64 query rows each (BLOCK_M = 128, or 192). Per key block: issue
//                S_next = Q K_j^T, issue O += P V_{j+1} for the previous block, wait for S_next, mask + online
//                softmax on it while the P.V product runs, wait for P.V, rescale O, pack P. Epilogue: normalise, LSE,
//                O staged through shared memory (d <= 128: its own buffer; d256 and d128 x BN 176: the
//                warpgroup's slice of the Q buffer, which then goes back to the producer only after the
//                stores), 16-byte row-contiguous stores. OUT_F32 (variant.cuh): f32 pairs stored straight from the
//                accumulators, no staging; the Q buffer is released where the staged path releases it.
// Barriers (shared memory, 8 bytes each): full_q / empty_q, full_k[2] / empty_k[2], full_v[2] / empty_v[2].
//   "full" barriers: 1 arrival (the producer's expect_tx) + the TMA transaction bytes.
//   "empty" barriers: one arrival per consumer warp (8, or 12).
// Scheduler (both roles walk the same static sequence, so no shared state): num_m_blocks * b * h tiles
//   ordered by groups of `l2_group` (batch, head) pairs so that their K/V stay in L2 (with masks: one
//   group, i.e. globally longest first); inside a group, query blocks from the last (longest with causal
//   masks) to the first, heads innermost (a GQA group's query heads run together). CTAs take the tiles
//   in snake order (walk()).
// Ping-pong: the consumer warpgroups take turns issuing their products, round-robin (named barriers 1 ..
// consumers, one per warpgroup's turn); the epilogue's per-warpgroup barriers follow (consumers + 1 + wg).
// The protocol (mbarriers, turns, what each buffer holds when a product reads it) is modelled and checked with
// SPIN in tools/model/sm90_fwd_sync.pml (tools/model/check.sh): keep the two in step.
//
// Tiles: d64 128 x 128 (or 192 x 128), d128 128 x 128 (or 128 x 176), d256 128 x 64 (or 128 x 80). Shared
// memory: Q (BM x D) + 2 x K + 2 x V (BN x D each), each as D/64 panels of 128-byte rows (the TMA box is 64
// columns wide), + barriers, + 1 KB for aligning the base to the 1024-byte swizzle period: SM90_SMEM_BYTES below.
#include "params.cuh"
#include "common.cuh"
#include "mask.cuh"
#include "sm90/sync.cuh"
#include "sm90/wgmma.cuh"
#include "sm90/gemm.cuh"

#include "variant.cuh"

#if !(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256)
#error "the sm90 forward is compiled for HEAD_DIM 64, 128 or 256"
#endif
#ifndef SM90_CONSUMERS
#define SM90_CONSUMERS 2
#endif
#if !(SM90_CONSUMERS == 2 || (SM90_CONSUMERS == 3 && HEAD_DIM == 64))
#error "SM90_CONSUMERS is 2, or 3 at HEAD_DIM 64"
#endif
// Keys per K/V block: 128 at d64/d128, 64 at d256. SM90_BN_OVERRIDE selects FA3's wider K/V blocks (2 consumers
// only): 176 at HEAD_DIM 128 (128 x 176 tiles: 11 k16 steps of P.V, m64n176k16 for S = Q K^T, and O staged in
// the Q buffer, since a separate O buffer does not fit next to Q + 2 x K + 2 x V = 208 KiB), or 80 at HEAD_DIM
// 256 (128 x 80 tiles: 5 k16 steps of P.V, m64n80k16 for S; Q 64 KiB + 2 x K + 2 x V (40 KiB each) = 224 KiB).
#if defined(SM90_BN_OVERRIDE)
#if !(((SM90_BN_OVERRIDE == 176 && HEAD_DIM == 128) || (SM90_BN_OVERRIDE == 80 && HEAD_DIM == 256)) && \
      SM90_CONSUMERS == 2)
#error "SM90_BN_OVERRIDE is 176 at HEAD_DIM 128 or 80 at HEAD_DIM 256, with 2 consumers"
#endif
#define SM90_BN SM90_BN_OVERRIDE
#elif HEAD_DIM == 256
#define SM90_BN 64
#else
#define SM90_BN 128
#endif
#define SM90_BM (64 * SM90_CONSUMERS)
#define SM90_THREADS (128 * (SM90_CONSUMERS + 1))
// Register split (setmaxnreg; multiples of 8, 128 x (producer + consumers x consumer) <= 64 K): 384 threads
// start at 168, 512 at 128 (__launch_bounds__ with one CTA per SM).
#ifndef SM90_PRODUCER_REGS
#define SM90_PRODUCER_REGS (SM90_CONSUMERS == 2 ? 40 : 32)
#endif
#ifndef SM90_CONSUMER_REGS
#define SM90_CONSUMER_REGS (SM90_CONSUMERS == 2 ? 232 : 160)
#endif
// Named barriers (0 is __syncthreads): SM90_TURN_BAR + w = consumer warpgroup w's turn to issue its products,
// SM90_EPI_BAR + w = its epilogue (128 threads). 2 consumers: 1, 2 and 3, 4; 3 consumers: 1-3 and 4-6.
#define SM90_TURN_BAR 1
#define SM90_EPI_BAR (SM90_TURN_BAR + SM90_CONSUMERS)
// d <= 128: a separate O staging buffer (BM x D), so that Q can go back to the producer right after the last
// S = Q K^T; d256 (either BN) and d128 x BN 176 have no room for it and stage O in the Q buffer instead.
#define SM90_O_SEPARATE (HEAD_DIM <= 128 && SM90_BN <= 128)
#define SM90_SMEM_BYTES (((SM90_BM * (1 + SM90_O_SEPARATE)) + 4 * SM90_BN) * HEAD_DIM * 2 + 128 + 1024)
static_assert(SM90_SMEM_BYTES <= 232448, "shared memory: at most 227 KiB per block");
static_assert(SM90_BN % 16 == 0 && (SM90_BN * 128) % 1024 == 0, "K/V panels keep the 1024-byte swizzle period");


// Parameter block: the common forward fields plus the scheduler's numbers and the TMA maps of q, k, v
// (rank 4: {d, rows, heads, batch}; varlen: batch extent 1, rows = total tokens). `unused` is a fourth map slot
// that no code reads (the host passes zeros): it keeps the block's layout, and so the compiled kernels, as they
// were when a removed experiment (an O store by TMA) used it; dropping it changes every cubin of this kernel and
// is a change of its own.
struct Sm90Params {
    FwdParams f;
    int num_m_blocks;  // ceil(max_sq / BLOCK_M)
    int l2_group;      // (batch, head) pairs per scheduling group (>= 1)
    int pingpong;      // 1: the consumer warpgroups take turns issuing their products (named barriers)
    TmaMap tq, tk, tv, unused;
};

namespace f90 {

constexpr int D = HEAD_DIM;
constexpr int BM = SM90_BM;
constexpr int BN = SM90_BN;
constexpr int PANELS = D / 64;             // 64-column panels of a tile
constexpr u32 Q_BYTES = PANELS * BM * 128;
constexpr u32 KV_BYTES = PANELS * BN * 128;
constexpr u32 OFF_K = Q_BYTES;
constexpr u32 OFF_V = Q_BYTES + 2 * KV_BYTES;
constexpr bool O_SEPARATE = SM90_O_SEPARATE;
constexpr u32 OFF_O = Q_BYTES + 4 * KV_BYTES;  // when O_SEPARATE
constexpr u32 OFF_BAR = OFF_O + (O_SEPARATE ? Q_BYTES : 0);
constexpr int SREG = BN / 2;               // S accumulator registers per thread
constexpr int OREG = D / 2;                // O accumulator registers per thread
constexpr int PK = BN / 16;                // k16 steps of P.V
constexpr int NPV = D == 64 ? 64 : 128;    // N of one P.V wgmma
constexpr int CONSUMER_WARPS = 4 * SM90_CONSUMERS;
static_assert(SM90_EPI_BAR + SM90_CONSUMERS <= 16, "named barrier ids are < 16");
static_assert(128 * (SM90_PRODUCER_REGS + SM90_CONSUMERS * SM90_CONSUMER_REGS) <= 65536, "register file");
static_assert(SM90_PRODUCER_REGS % 8 == 0 && SM90_CONSUMER_REGS % 8 == 0, "setmaxnreg counts");

// ---------------------------------------------------------------- scheduler
struct TileId { int m_block, bi, qh; };

FA_DEVICE TileId tile_at(const Sm90Params& p, int t) {
    const int nmb = p.num_m_blocks;
    const int bh_total = p.f.b * p.f.h;
    const int G = p.l2_group;
    const int per_group = G * nmb;
    const int grp = t / per_group;
    const int r = t - grp * per_group;
    const int gsize = min(G, bh_total - grp * G);
    const int m_idx = r / gsize;
    const int bh = grp * G + (r - m_idx * gsize);
    TileId id;
    id.m_block = nmb - 1 - m_idx;
    id.bi = bh / p.f.h;
    id.qh = bh - id.bi * p.f.h;
    return id;
}

// The t-th tile of this CTA's walk: round k takes the k-th run of gridDim.x tiles of the order above, CTA j
// taking entry j on even rounds and entry gridDim.x - 1 - j on odd ones ("snake"), so that with tiles
// sorted longest first every CTA's total work comes out about equal. Returns -1 past the end, -2 for a
// slot of the last round that holds no tile.
FA_DEVICE int walk(int k, int num_tiles) {
    const int base = k * (int)gridDim.x;
    if (base >= num_tiles) return -1;
    const int t = base + ((k & 1) ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x);
    return t < num_tiles ? t : -2;
}

// Geometry of one tile, computed identically by producer and consumers.
struct Geo {
    int sq, sk, m0, q_row, k_row, tb, nb_lo, nb_hi;
};

FA_DEVICE bool geometry(const FwdParams& f, const TileId& id, Geo& g) {
    int sq = f.sq, sk = f.sk, q0 = 0, k0 = 0;
#if IS_VARLEN
    q0 = f.cu_seqlens_q[id.bi];
    k0 = f.cu_seqlens_k[id.bi];
    sq = f.cu_seqlens_q[id.bi + 1] - q0;
    sk = f.cu_seqlens_k[id.bi + 1] - k0;
    g.tb = 0;
#else
    g.tb = id.bi;
#endif
    if (f.seqused_k) sk = min(sk, f.seqused_k[id.bi]);
    if (sk < 0) sk = 0;
    g.sq = sq;
    g.sk = sk;
    g.m0 = id.m_block * BM;
    if (g.m0 >= sq) return false;
    g.q_row = q0 + g.m0;
    g.k_row = k0;
    const int rows = min(BM, sq - g.m0);
    MaskCtx mc;
    set_mask_ctx(mc, sq, sk, f);
    kv_block_range(mc, HAS_MASK != 0, g.m0, g.m0 + rows - 1, BN, &g.nb_lo, &g.nb_hi);
    return true;
}

// Tile t (>= 0) of the order above and its geometry (id and g); false when it has no rows in its sequence.
FA_DEVICE bool tile_geometry(const Sm90Params& p, int t, TileId& id, Geo& g) {
    id = tile_at(p, t);
    return geometry(p.f, id, g);
}

// The pipeline's barriers, at fixed offsets from one base address (no arrays: indexing one with a
// run-time stage would put it in local memory).
struct Bars {
    u32 base;
    FA_DEVICE u32 full_q() const { return base; }
    FA_DEVICE u32 empty_q() const { return base + 8; }
    FA_DEVICE u32 full_k(u32 s) const { return base + 16 + 8 * s; }
    FA_DEVICE u32 empty_k(u32 s) const { return base + 32 + 8 * s; }
    FA_DEVICE u32 full_v(u32 s) const { return base + 48 + 8 * s; }
    FA_DEVICE u32 empty_v(u32 s) const { return base + 64 + 8 * s; }
};

// ---------------------------------------------------------------- producer (one thread)
FA_DEVICE void producer(const Sm90Params& p, u32 sbase, const Bars& b) {
    tma_prefetch_desc(&p.tq);
    tma_prefetch_desc(&p.tk);
    tma_prefetch_desc(&p.tv);
    const int num_tiles = p.num_m_blocks * p.f.b * p.f.h;
    const int group = p.f.h / p.f.hk;
    u32 it = 0, qt = 0;
    for (int k = 0, t; (t = walk(k, num_tiles)) != -1; ++k) {
        if (t < 0) continue;
        TileId id;
        Geo g;
        if (!tile_geometry(p, t, id, g) || g.nb_hi <= g.nb_lo) continue;
        const int kvh = id.qh / group;
        for (int nb = g.nb_hi - 1; nb >= g.nb_lo; --nb, ++it) {
            const u32 st = it & 1, ph = (it >> 1) & 1;
            const int row = g.k_row + nb * BN;
            mbar_wait(b.empty_k(st), ph ^ 1);
            mbar_arrive_expect_tx(b.full_k(st), KV_BYTES);
#pragma unroll
            for (int pn = 0; pn < PANELS; ++pn)
                tma_load_4d(sbase + OFF_K + st * KV_BYTES + pn * BN * 128, &p.tk, pn * 64, row, kvh, g.tb, b.full_k(st));
            if (nb == g.nb_hi - 1) {
                // Q after the tile's first K: the previous tile's epilogue (which stages O in the Q buffer)
                // may still hold it, while K can already stream in.
                mbar_wait(b.empty_q(), (qt & 1) ^ 1);
                mbar_arrive_expect_tx(b.full_q(), Q_BYTES);
#pragma unroll
                for (int pn = 0; pn < PANELS; ++pn)
                    tma_load_4d(sbase + pn * BM * 128, &p.tq, pn * 64, g.q_row, id.qh, g.tb, b.full_q());
                ++qt;
            }
            mbar_wait(b.empty_v(st), ph ^ 1);
            mbar_arrive_expect_tx(b.full_v(st), KV_BYTES);
#pragma unroll
            for (int pn = 0; pn < PANELS; ++pn)
                tma_load_4d(sbase + OFF_V + st * KV_BYTES + pn * BN * 128, &p.tv, pn * 64, row, kvh, g.tb, b.full_v(st));
        }
    }
}

// ---------------------------------------------------------------- consumer: register pressure (3 consumers)
// At 160 registers per consumer thread (3 consumers), ptxas keeps values that are invariant over a tile's key
// blocks in registers and then spills them (and more) inside the loop: the Q descriptors of S = Q K^T
// (derived from the warpgroup's Q address) and the row index behind the ALiBi/mask terms. An opaque copy
// (volatile asm in the loop) makes it rebuild them from one register per key block instead, a few integer
// ops. With 2 consumers (232 registers) it is the identity, and the code is exactly as before.
template <class T>  // a 32-bit integer
FA_DEVICE T rematerialize(T x) {
    static_assert(sizeof(T) == 4, "32-bit values");
#if SM90_CONSUMERS == 3
    asm volatile("mov.b32 %0, %0;" : "+r"(x));
#endif
    return x;
}
// 3 consumers with both ALiBi and soft-capping: the score transform's temporaries do not fit next to the P
// fragments of the P.V product in flight, so that product is waited for before the transform (the variant
// loses the overlap of P.V with its softmax; the other warpgroups' products still overlap it). Elsewhere P.V
// is waited for after the softmax.
#define SM90_EARLY_PV_WAIT (SM90_CONSUMERS == 3 && HAS_SOFTCAP && HAS_ALIBI)

// ---------------------------------------------------------------- consumer: matrix products
// S = Q K^T over the warpgroup's 64 rows: D/16 wgmmas, both operands K-major in shared memory.
FA_DEVICE void issue_qk(float* s, u32 sq_wg, u32 sk) {
    wgmma_ss_kmajor<BN, D, BM * 128, BN * 128>(s, rematerialize(sq_wg), sk);
}

// O += P V: P from registers (the packed S accumulators), V N-major in shared memory.
FA_DEVICE void issue_pv(float* o, const u32 (*pa)[4], u32 sv) {
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
#pragma unroll
        for (int c = 0; c < D / NPV; ++c) {
            const u64 db = smem_desc(sv + c * (NPV / 64) * BN * 128 + kk * 16 * 128, BN * 128, 1024);
#if HEAD_DIM == 64
            wgmma_rs_n64<1>(o + c * (NPV / 2), pa[kk], db, 1);
#else
            wgmma_rs_n128<1>(o + c * (NPV / 2), pa[kk], db, 1);
#endif
        }
    }
}

// ---------------------------------------------------------------- consumer: softmax
struct RowState {
    float m[2];  // running max of the (transformed) scores, rows g and g + 8 of the warp
    float l[2];  // per-thread partial row sums (reduced over the quad at the end)
};

// Score transforms (softcap, ALiBi) and masking of one S block. `i0`: row of register half 0 (within the
// sequence; half 1 is row i0 + 8), `n0`: first key of the block.
FA_DEVICE void transform_and_mask(float* s, const Geo& g, const FwdParams& f, int i0, int n0, int t, bool need_mask,
                                  float slope) {
#if HAS_SOFTCAP || HAS_ALIBI
    const int off = g.sk - g.sq;
#if HAS_SOFTCAP
    const float inv_softcap = f.softcap > 0.f ? 1.f / f.softcap : 0.f;
#endif
#pragma unroll
    for (int r = 0; r < SREG; ++r) {
        float x = s[r];
#if HAS_SOFTCAP
        x = inv_softcap > 0.f ? apply_softcap(x * f.scale, f.softcap, inv_softcap) : x * f.scale;
#else
        x *= f.scale;
#endif
#if HAS_ALIBI
        const int i = i0 + 8 * ((r >> 1) & 1);
        const int j = n0 + 8 * (r >> 2) + 2 * t + (r & 1);
        x += alibi_bias(slope, i, j, off);
#endif
        s[r] = x;
    }
#endif
    if (need_mask) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = i0 + 8 * hh;
            int hi = g.sk, lo = 0;
#if HAS_MASK
            const int off = g.sk - g.sq;
            if (f.window_right >= 0) hi = min(hi, i + off + f.window_right + 1);
            if (f.window_left >= 0) lo = i + off - f.window_left;
#endif
            const int base = n0 + 2 * t;
            hi -= base;
            lo -= base;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int cidx = nt * 8 + e;
                    if (cidx >= hi || cidx < lo) s[4 * nt + 2 * hh + e] = FA_NEG_INF;
                }
        }
    }
}

// Online softmax of one block: new maxima, p = exp2(s*c - m*c) in place, row sums; returns the rescale
// factors of O in corr (applied by the caller once the P.V product in flight has completed).
FA_DEVICE void softmax_block(float* s, RowState& rs, float c, float* corr) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float mx = rs.m[hh];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * hh], s[4 * nt + 2 * hh + 1]));
        mx = quad_max(mx);
        const float m_use = mx == FA_NEG_INF ? 0.f : mx;
        const float mc = m_use * c;
        corr[hh] = exp2_fast(rs.m[hh] * c - mc);  // -inf -> 0
        rs.m[hh] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            const float p0 = exp2_fast(fmaf(s[4 * nt + 2 * hh], c, -mc));
            const float p1 = exp2_fast(fmaf(s[4 * nt + 2 * hh + 1], c, -mc));
            s[4 * nt + 2 * hh] = p0;
            s[4 * nt + 2 * hh + 1] = p1;
            sum += p0 + p1;
        }
        rs.l[hh] = rs.l[hh] * corr[hh] + sum;
    }
}

FA_DEVICE void rescale_o(float* o, const float* corr) {
#pragma unroll
    for (int r = 0; r < OREG; ++r) o[r] *= corr[(r >> 1) & 1];
}

// S accumulators (f32) -> P as 16-bit A fragments: k16 step kk takes S columns 16kk..16kk+15.
FA_DEVICE void pack_p(const float* s, u32 (*pa)[4]) {
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
#pragma unroll
        for (int e = 0; e < 4; ++e) pa[kk][e] = Dt<elem_t>::pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
    }
}

// One elected lane per warp arrives on an "empty" barrier once the warp is done reading the stage.
FA_DEVICE void release(u32 bar, int lane) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
}

// ---------------------------------------------------------------- consumer: one pipeline step
// One issue turn: waits until K of stage st (QK) and V of stage stp (PV) have landed, takes this warpgroup's turn
// (ping-pong: my_turn), issues S = Q K^T (QK) and O += P V (PV) as one commit group each, and hands the turn on
// (next_turn). The caller waits for the groups.
template <bool QK, bool PV>
FA_DEVICE void issue_turn(const Bars& b, u32 st, u32 ph, u32 stp, u32 php, float* s, float* o, const u32 (*pa)[4],
                          u32 sq_wg, u32 sbase, bool pp, int my_turn, int next_turn) {
    if constexpr (QK) mbar_wait(b.full_k(st), ph);
    if constexpr (PV) mbar_wait(b.full_v(stp), php);
    if (pp) named_sync(my_turn, 256);
    wgmma_fence();
    if constexpr (QK) {
        issue_qk(s, sq_wg, sbase + OFF_K + st * KV_BYTES);
        wgmma_commit();
    }
    if constexpr (PV) {
        issue_pv(o, pa, sbase + OFF_V + stp * KV_BYTES);
        wgmma_commit();
    }
    if (pp) named_arrive(next_turn, 256);
}

// S complete: waits until at most PENDING commit groups are in flight (the P.V issued after S), fences S's registers,
// and releases K stage st and, after the tile's last key block (last) when O has a buffer of its own, the Q tile.
template <int PENDING> FA_DEVICE void s_complete(float* s, const Bars& b, u32 st, bool last, int lane) {
    wgmma_wait<PENDING>();
    reg_fence<SREG>(s);
    if (O_SEPARATE && last) release(b.empty_q(), lane);
    release(b.empty_k(st), lane);
}

// O += P V complete (no group in flight): fences O's registers and releases V stage stp.
FA_DEVICE void pv_complete(float* o, const Bars& b, u32 stp, int lane) {
    wgmma_wait<0>();
    reg_fence<OREG>(o);
    release(b.empty_v(stp), lane);
}

// ---------------------------------------------------------------- consumer warpgroups
FA_DEVICE void consumer(const Sm90Params& p, u32 sbase, const Bars& b, int wg, int tid_wg) {
    const FwdParams& f = p.f;
    const int warp = tid_wg >> 5, lane = tid_wg & 31, gq = lane >> 2, t = lane & 3;
    const int num_tiles = p.num_m_blocks * f.b * f.h;
    const u32 sq_wg = sbase + wg * 64 * 128;
#if HAS_SOFTCAP || HAS_ALIBI
    const float c = FA_LOG2E;
#else
    const float c = f.scale * FA_LOG2E;
#endif
    // Ping-pong: the consumer warpgroups take turns issuing their matrix products, round-robin 0, 1, (2,)
    // 0, ...: warpgroup w waits on its turn barrier SM90_TURN_BAR + w, issues, then arrives on the next one's
    // (256 threads each: the owner's bar.sync plus its predecessor's bar.arrive), so one's softmax runs
    // while another's products keep the tensor cores busy. Every warpgroup takes the same number of turns
    // (the tiles and their key blocks are the same for all); the last warpgroup grants warpgroup 0 the first
    // turn, and warpgroup 0 absorbs that extra arrival at the end. Only one turn is ever granted and not yet
    // taken, so no barrier sees two arrivals of one phase.
    const int my_turn = SM90_TURN_BAR + wg;
#if SM90_CONSUMERS == 2
    const int next_turn = SM90_TURN_BAR + 1 - wg;  // the same order; this form keeps the 2-consumer code as it was
#else
    const int next_turn = SM90_TURN_BAR + (wg + 1 == SM90_CONSUMERS ? 0 : wg + 1);
#endif
    const bool pp = p.pingpong != 0;
    if (pp && wg == SM90_CONSUMERS - 1) named_arrive(SM90_TURN_BAR, 256);
    u32 it = 0, qt = 0;
    for (int k = 0, tile; (tile = walk(k, num_tiles)) != -1; ++k) {
        if (tile < 0) continue;
        TileId id;
        Geo g;
        if (!tile_geometry(p, tile, id, g)) continue;
        const int i0 = g.m0 + wg * 64 + warp * 16 + gq;  // row of register half 0 (within the sequence)
        const int wr_lo = g.m0 + wg * 64, wr_hi = g.m0 + wg * 64 + 63;
#if HAS_ALIBI
        const float slope = f.alibi_slopes[(i64)id.bi * f.alibi_batch_stride + id.qh];
#else
        const float slope = 0.f;
#endif
        MaskCtx mc;
        set_mask_ctx(mc, g.sq, g.sk, f);
        float o[OREG];
#pragma unroll
        for (int r = 0; r < OREG; ++r) o[r] = 0.f;
        RowState rs;
        rs.m[0] = rs.m[1] = FA_NEG_INF;
        rs.l[0] = rs.l[1] = 0.f;
        const int nblk = g.nb_hi - g.nb_lo;
        if (nblk > 0) {
            mbar_wait(b.full_q(), qt & 1);
            ++qt;
            float s[SREG];
            u32 pa[PK][4];
            float corr[2];
            // first block: S, softmax, P
            {
                const int nb = g.nb_hi - 1;
                const u32 st = it & 1;
                const u32 ph = (it >> 1) & 1;
                issue_turn<true, false>(b, st, ph, 0, 0, s, o, pa, sq_wg, sbase, pp, my_turn, next_turn);
                s_complete<0>(s, b, st, nblk == 1, lane);
                const bool need_mask = tile_needs_mask(mc, HAS_MASK != 0, wr_lo, wr_hi, nb * BN, BN);
                transform_and_mask(s, g, f, rematerialize(i0), nb * BN, t, need_mask, slope);
                softmax_block(s, rs, c, corr);
                pack_p(s, pa);
            }
            for (int k = 1; k < nblk; ++k) {
                const int nb = g.nb_hi - 1 - k;
                const u32 itk = it + k, itp = it + k - 1;
                const u32 st = itk & 1, ph = (itk >> 1) & 1;
                const u32 stp = itp & 1, php = (itp >> 1) & 1;
                issue_turn<true, true>(b, st, ph, stp, php, s, o, pa, sq_wg, sbase, pp, my_turn, next_turn);
                s_complete<1>(s, b, st, k == nblk - 1, lane);
                const bool need_mask = tile_needs_mask(mc, HAS_MASK != 0, wr_lo, wr_hi, nb * BN, BN);
#if SM90_EARLY_PV_WAIT
                pv_complete(o, b, stp, lane);
#endif
                transform_and_mask(s, g, f, rematerialize(i0), nb * BN, t, need_mask, slope);
                softmax_block(s, rs, c, corr);
#if !SM90_EARLY_PV_WAIT
                pv_complete(o, b, stp, lane);
#endif
                rescale_o(o, corr);
                pack_p(s, pa);
            }
            {
                const u32 itp = it + nblk - 1;
                const u32 stp = itp & 1, php = (itp >> 1) & 1;
                issue_turn<false, true>(b, 0, 0, stp, php, s, o, pa, sq_wg, sbase, pp, my_turn, next_turn);
                pv_complete(o, b, stp, lane);
            }
            it += nblk;
        }

        // ---- epilogue: normalise, LSE; O staged in this warpgroup's slice of the Q buffer (Q is no longer
        // read once the last S is done) in the same 128B-swizzled panels, then 16-byte row-contiguous stores;
        // the Q buffer is released to the producer afterwards. Tiles with no visible key (no Q loaded; the
        // buffer may already hold the next tile's Q) store zeros straight from registers.
        i64 o_off, lse_off;
        out_offsets(f, id.bi, id.qh, o_off, lse_off);
        u16* go = (u16*)f.o + o_off + (i64)id.qh * f.o_head_stride;
        float inv[2];
        // Learnable sink (f.sink != nullptr, f32 [h], natural-log units): a branch on a kernel parameter, so a
        // null pointer computes exactly what this epilogue computed before the sink existed.
        const float sink = f.sink != nullptr ? f.sink[id.qh] : 0.f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            // l == 0: no visible key: o = 0 exactly (o may hold 0 * NaN from a masked value row), lse = -inf
            // (with a sink: lse = sink). A NaN or +inf score made l NaN: inv and lse are NaN.
            const float l = quad_sum(rs.l[hh]);
            inv[hh] = l == 0.f ? 0.f : 1.f / l;
            float lse = l != 0.f ? (rs.m[hh] * c + log2_fast(l)) * FA_LN2 : FA_NEG_INF;
            if (f.sink != nullptr) {
                // rs.m * c is the row's max in log2 units (raw scores times scale * log2 e, or final scores
                // times log2 e with softcap / ALiBi). Fold exp(sink) in against M = max(m2, sink2):
                // l' = l * 2^(m2 - M) + 2^(sink2 - M), o = acc * 2^(m2 - M) / l', lse = (M + log2 l') ln 2.
                // Empty row: m2 = -inf, l' = 1, inv stays 0 (o = 0), lse = sink exactly.
                const float m2 = rs.m[hh] * c;
                const float sink2 = sink * FA_LOG2E;
                const float mm = fmaxf(m2, sink2);
                const float a = exp2_fast(m2 - mm);
                const float ls = fmaf(l, a, exp2_fast(sink2 - mm));
                if (l != 0.f) inv[hh] = a / ls;
                lse = l != 0.f ? (mm + log2_fast(ls)) * FA_LN2 : sink;
            }
            const int i = i0 + 8 * hh;
            if (i < g.sq && t == 0) f.lse[lse_off + i] = lse;
        }
#if OUT_F32
        // f32 o straight from the accumulators (a quad's four pairs cover 8 contiguous columns: 32 bytes), zeros
        // for a tile with no visible key; the Q buffer goes back to the producer as after the staged stores.
        {
            float* gof = (float*)f.o + o_off + (i64)id.qh * f.o_head_stride;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = i0 + 8 * hh;
                if (i < g.sq) {
                    float* row = gof + (i64)i * f.o_row_stride;
                    const bool zero = nblk == 0 || inv[hh] == 0.f;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        const float x0 = zero ? 0.f : o[4 * dt + 2 * hh] * inv[hh];
                        const float x1 = zero ? 0.f : o[4 * dt + 2 * hh + 1] * inv[hh];
                        store_out_f32_pair(row, dt * 8 + 2 * t, f.d, x0, x1, true);
                    }
                }
            }
            if (nblk > 0 && !O_SEPARATE) release(b.empty_q(), lane);
        }
#else
        if (nblk > 0) {
            const u32 so_wg = O_SEPARATE ? sbase + OFF_O + wg * 64 * 128 : sq_wg;
            // Separate buffer: every thread of the warpgroup is done reading the previous tile's O from it.
            if (O_SEPARATE) named_sync(SM90_EPI_BAR + wg, 128);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = warp * 16 + gq + 8 * hh;  // row within the warpgroup's 64
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    const u32 v = inv[hh] == 0.f ? 0u : Dt<elem_t>::pack(o[4 * dt + 2 * hh] * inv[hh], o[4 * dt + 2 * hh + 1] * inv[hh]);
                    const u32 a = so_wg + (dt / 8) * BM * 128 + r * 128 + (((dt % 8) ^ (r & 7)) << 4) + 4 * t;
                    st_shared_u32(a, v);
                }
            }
            named_sync(SM90_EPI_BAR + wg, 128);
            constexpr int CH = D / 8;  // 16-byte chunks per row
#pragma unroll 4
            for (int it2 = 0; it2 < 64 * CH / 128; ++it2) {
                const int idx = it2 * 128 + tid_wg;
                const int r = idx / CH, cidx = idx % CH;
                const int i = g.m0 + wg * 64 + r;
                const int col = cidx * 8;
                const uint4 v = ld_shared_v4(so_wg + (cidx / 8) * BM * 128 + r * 128 + (((cidx % 8) ^ (r & 7)) << 4));
                if (i < g.sq && col < f.d) {
                    u16* dst = go + (i64)i * f.o_row_stride + col;
                    if (col + 8 <= f.d) {
                        st_global_v4(dst, v);
                    } else {
                        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                        for (int e = 0; e < 8; ++e)
                            if (col + e < f.d) dst[e] = (u16)(w[e >> 1] >> ((e & 1) * 16));
                    }
                }
            }
            if (!O_SEPARATE) {
                // Generic-proxy accesses to the Q buffer are done before the producer's TMA refills it.
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                release(b.empty_q(), lane);
            }
        } else {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = i0 + 8 * hh;
                if (i < g.sq) {
                    u16* row = go + (i64)i * f.o_row_stride;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        const int col = dt * 8 + 2 * t;
                        if (col + 1 < f.d) {
                            *(u32*)(row + col) = 0u;
                        } else if (col < f.d) {
                            row[col] = 0;
                        }
                    }
                }
            }
        }
#endif
    }
    // The last warpgroup arrived once more on warpgroup 0's turn barrier than warpgroup 0 waited on it (the
    // initial turn).
    if (pp && wg == 0) named_sync(SM90_TURN_BAR, 256);
}

}  // namespace f90

extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) flash_fwd_sm90(const __grid_constant__ Sm90Params p) {
    using namespace f90;
    extern __shared__ unsigned char smem_raw[];
    const u32 sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
    Bars b;
    b.base = sbase + OFF_BAR;
    init_mbarriers([&] {
        mbar_init(b.full_q(), 1);
        mbar_init(b.empty_q(), CONSUMER_WARPS);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            mbar_init(b.full_k(s), 1);
            mbar_init(b.empty_k(s), CONSUMER_WARPS);
            mbar_init(b.full_v(s), 1);
            mbar_init(b.empty_v(s), CONSUMER_WARPS);
        }
    });
    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        regs_dealloc<SM90_PRODUCER_REGS>();
        if (threadIdx.x == 0) producer(p, sbase, b);
    } else {
        regs_alloc<SM90_CONSUMER_REGS>();
        consumer(p, sbase, b, wg - 1, threadIdx.x - 128 * wg);
    }
}
