// Hopper (sm_90a) backward main kernel: TMA loads into 128B-swizzled shared memory completing on mbarriers,
// wgmma for all five products, warp specialization with register reallocation. It replaces bwd.cu's
// `flash_bwd_main` on Hopper; bwd.cu's `flash_bwd_preprocess` (D = rowsum(dO * O), lse in log2 units, zeroed
// dQ accumulator) runs before it and `flash_bwd_convert_dq` after it, with the same scratch layouts (see the
// header of bwd.cu).
//
// Entry point: extern "C" __global__ void flash_bwd_sm90(const __grid_constant__ Sm90BwdParams p)
//   grid (ceil(sk / BN) * hk * b) (1-D; the tile order below), 384 threads, dynamic shared memory BWD90_SMEM_BYTES (+ 1 KB alignment slack,
//   included), exported as `flash_bwd_config` = {BM, BN, threads, smem} like bwd.cu.
//
// Compile-time macros: HEAD_DIM (64, 128 or 256: the padded head dim; p.b.fwd.d may be smaller, the TMA maps
// zero-fill columns >= d), IS_BF16, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, IS_VARLEN, DETERMINISTIC, HAS_SINK (each
// consumer warp sums its share of dsink, bwd_common.cuh; the weights exp(sink - lse) of a step's rows sit beside
// its lse and D rows in shared memory; bwd.cu's flash_bwd_dsink finishes it), GRAD_F32 (f32 dK / dV): as in bwd.cu. Not
// covered (the launcher sends them to bwd.cu): seqused_k, unaligned layouts.
// DETERMINISTIC: the query blocks are walked last to first (as bwd.cu does: all key blocks of a head then start
// on the same block, so taking turns skews CTA n by n steps instead of serialising causal CTAs) and each dQ
// block is added in key-block order (bwd_common.cuh, p.b.dq_semaphore: [b, h, ceil(sq / BM)] counters, zeroed).
// Semantics: docs spec ATTENTION.md, exactly as bwd.cu (mask.cuh and bwd_common.cuh are shared).
//
// One CTA per key block of BN keys of one (batch, kv head) (128 keys; 64 at HEAD_DIM 256); it walks the query
// blocks (BM rows: 128 at HEAD_DIM 64, else 64) that see its keys, for every query head of the kv head's group,
// and keeps dK and dV in registers.
// Tile order: CTA t takes group t / (l2_group * ceil(sk / BN)) of `l2_group` (batch, kv head) pairs; inside a
// group key blocks go from first to last (the longest first under causal masks), pairs innermost. l2_group = 1
// gives key blocks innermost (one head's Q/dO shared by the CTAs running together); with masks the launcher
// makes the group as large as an L2 budget allows, so the long CTAs start first and the short ones fill the tail.
// Roles (3 warpgroups):
//   warpgroup 0: producer, registers lowered. Warp 0 (one thread) issues the TMA loads: K and V once, then Q
//                and dO of each step into a 2-stage ring. Warp 1 (DQ_BULK) adds each step's dQ tile, which the
//                consumers store into shared memory, to the f32 accumulator with bulk reduce-adds: one
//                cp.reduce.async.bulk per query row at HEAD_DIM 128, two tensor-map reduce-adds
//                (cp.reduce.async.bulk.tensor, 32-column x 128-row boxes) at HEAD_DIM 64 (DQ_TENSOR); the other
//                warps have nothing to do.
//   warpgroups 1, 2: consumers, 64 keys each (the wgmma M). Per step:
//                S^T = K Q^T and dP^T = V dO^T (A = the warpgroup's K / V rows, B = Q / dO, both K-major);
//                P^T = exp2(S^T * scale * log2e - lse), dS^T = P^T (dP^T - D) (+ softcap derivative, masks);
//                dV += P^T dO and dK += dS^T Q with P^T / dS^T straight from registers (the accumulator
//                layout packed pairwise is the wgmma A fragment; B = dO / Q read N-major);
//                dS^T is also written to shared memory, [key][query] rows of 128 bytes, swizzled;
//                dQ = dS K over all 128 keys (both warpgroups' dS^T: one 256-thread named barrier per step), A =
//                that buffer read M-major (transposed), B = K read N-major, as 64 x 64 tiles per warpgroup:
//                  HEAD_DIM 128 (BM 64): warpgroup w computes dQ columns [64w, 64w + 64);
//                  HEAD_DIM 64 (BM 128): warpgroup w computes query rows [64w, 64w + 64);
//                so each dQ element is added once per CTA: DQ_BULK (HEAD_DIM 64 and 128)
//                stores the tile into shared memory for the writer warp; otherwise (HEAD_DIM 256, a 3-stage
//                ring) each thread adds its values with red.global.add.v2.f32.
//                Epilogue: dK * scale and dV stored from registers.
//   HEAD_DIM 256 (SPLIT_D): dK + dV of 64 keys x 256 columns would need 256 registers a thread, so the two
//                warpgroups split the head dim instead of the keys. Both work on all BN = 64 keys; warpgroup w
//                computes S^T and dP^T for the step's queries [32w, 32w + 32) (N 32, over all 256 columns),
//                P^T and dS^T for them, and stores both into swizzled shared memory ([key][query], 128-byte
//                rows). After the named barrier it owns columns [128w, 128w + 128) of dV += P^T dO, dK += dS^T Q
//                (A = the P^T / dS^T buffers read K-major) and dQ = dS K (A = the dS^T buffer read M-major).
//                The step's lse (log2 units) and D rows are copied into shared memory by the consumers themselves
//                (one value per thread, the next step's during this one; ordered by the dS^T barrier). A producer
//                warp that stored them and arrived on the "full" mbarrier was correct (release / acquire) but drew
//                racecheck hazard reports.
// Barriers (shared memory, 8 bytes each): full_kv; full_q[2] (1 expect_tx arrival + the TMA bytes); empty_q[2] (one
// arrival per consumer warp, 8); dq_full (one arrival per consumer warp: the step's dQ tile is stored) and dq_empty
// (the writer warp: the tile has been read; the consumers wait for it before storing the next one). dS^T is
// double-buffered: the barrier of step i orders every reader of buffer (i & 1) at step i - 2 before its next writer.
// The protocol is model-checked in tools/model/sm90_bwd_sync.pml.
//
// Shared memory (1024-aligned): K, V (BN x HEAD_DIM each), Q[2], dO[2] (BM x HEAD_DIM each), each as HEAD_DIM/64
// panels of 128-byte rows (TMA boxes of 64 columns x 64 key rows / BM query rows); dS^T[2] (BM/64 panels of BN
// rows x 128 B); at HEAD_DIM 256 also P^T[2] (as dS^T); lse/D[2] (2 x BM floats); DQ_BULK: the dQ tile (HEAD_DIM
// 128: BM rows of HEAD_DIM f32 + 32 bytes of padding; HEAD_DIM 64: two 32-column boxes of BM rows x 128 B,
// 1024-aligned and 128-byte swizzled); barriers. About 194 KB at HEAD_DIM 64, 195 KB at 128, 226 KB at 256.
#include "params.cuh"
#include "common.cuh"
#include "mask.cuh"
#include "bwd_common.cuh"
#include "sm90/sync.cuh"
#include "sm90/wgmma.cuh"
#include "sm90/gemm.cuh"

#include "variant.cuh"

#if HEAD_DIM != 64 && HEAD_DIM != 128 && HEAD_DIM != 256
#error "the sm90 backward is compiled for HEAD_DIM 64, 128 or 256"
#endif

// Stages of the Q / dO ring (2 or 3 below HEAD_DIM 256; 3 measured no faster, and turns DQ_BULK off: both do not
// fit).
#ifndef BWD90_STAGES
#define BWD90_STAGES 2
#endif
// dQ through shared memory and bulk reduce-adds from a writer warp (1), or per-thread red.global.add (0), at HEAD_DIM
// 128 (HEAD_DIM 256 has no shared memory left). For A/B runs (`--nvrtc-option=-DBWD90_DQ_BULK=0`).
#ifndef BWD90_DQ_BULK
#define BWD90_DQ_BULK 1
#endif
// HEAD_DIM 64 (BM 128): the staged dQ tile added with HEAD_DIM / 32 tensor-map reduce-adds per step (boxes of 32
// columns x BM rows, 128-byte swizzled), 1 (+1-13% over the per-thread additions, deterministic +12-43%, H100,
// docs/notes/cuda-bwd.md), or the per-thread additions, 0 (the per-row bulk form measured 5-13% slower than those:
// 128 row operations per step). Rows past the sequence are staged as zeros (a box may reach into the next sequence
// of a varlen batch: adding +0 leaves it unchanged; rows past the tensor are clipped by the TMA).
#ifndef BWD90_DQ_TENSOR
#define BWD90_DQ_TENSOR 1
#endif

namespace b90 {

// A compile-time bool as a value (selects the form of a generic lambda).
template <bool B> struct BoolC { static constexpr bool value = B; };

constexpr int D = HEAD_DIM;
// HEAD_DIM 256: the warpgroups split the head dim (dK, dV, dQ columns) and the step's queries (S^T, dP^T), not
// the keys (see the header).
constexpr bool SPLIT_D = D == 256;
constexpr int BM = D == 64 ? 128 : 64;    // queries per step (at HEAD_DIM 64 dQ is split over the query rows)
constexpr int BN = SPLIT_D ? 64 : 128;    // keys per CTA (64 per consumer warpgroup unless SPLIT_D)
constexpr int WN = SPLIT_D ? BM / 2 : BM; // queries of a warpgroup's S^T / dP^T tile (its N)
constexpr int DW = SPLIT_D ? D / 2 : D;   // dK / dV / dQ columns a warpgroup owns
constexpr int THREADS = 384;
constexpr int STAGES = BWD90_STAGES;   // Q/dO ring depth
constexpr int PANELS = D / 64;
constexpr u32 KV_BYTES = PANELS * BN * 128;
constexpr u32 QS_BYTES = PANELS * BM * 128;   // one stage of Q (or dO)
constexpr int QPANELS = BM / 64;              // 64-query panels of the dS^T tile
constexpr u32 DS_BYTES = QPANELS * BN * 128;  // dS^T: BN keys x BM queries, 16-bit
constexpr u32 LD_BYTES = (HAS_SINK ? 3 : 2) * BM * 4;  // lse, D (and the sink weights) of one stage
constexpr u32 OFF_K = 0;
constexpr u32 OFF_V = OFF_K + KV_BYTES;
constexpr u32 OFF_Q = OFF_V + KV_BYTES;
constexpr u32 OFF_DO = OFF_Q + STAGES * QS_BYTES;
constexpr u32 OFF_DS = OFF_DO + STAGES * QS_BYTES;
constexpr u32 OFF_P = OFF_DS + 2 * DS_BYTES;              // P^T[2], like dS^T (SPLIT_D only)
constexpr u32 OFF_LD = OFF_P + (SPLIT_D ? 2 * DS_BYTES : 0);
// dQ through shared memory (see the header): the step's BM x D f32 tile. Row form (HEAD_DIM 128): one padded row per
// query; the 32-byte pad puts rows r and r + 4 in the same banks and rows r..r + 3 in disjoint ones, so a warp's v2
// stores of 8 rows x 4 column pairs take 2 wavefronts; the bulk reads take each row's D * 4 bytes. Tensor form
// (DQ_TENSOR, HEAD_DIM 64): D / 32 boxes of BM rows x 128 bytes, 128-byte swizzled (1024-aligned).
constexpr bool DQ_TENSOR = BWD90_DQ_TENSOR && D == 64 && STAGES == 2;  // at HEAD_DIM 128 this form spilled 48 bytes
constexpr bool DQ_BULK = DQ_TENSOR || (BWD90_DQ_BULK && D == 128 && STAGES == 2);  // 3 stages: no room
constexpr u32 DQ_ROW_BYTES = D * 4 + 32;
constexpr int DQ_BOXES = D / 32;               // DQ_TENSOR: boxes of 32 columns (128 bytes) x BM rows
constexpr u32 DQ_BYTES = !DQ_BULK ? 0 : DQ_TENSOR ? DQ_BOXES * BM * 128 : BM * DQ_ROW_BYTES;
constexpr u32 OFF_DQ = DQ_TENSOR ? (OFF_LD + STAGES * LD_BYTES + 1023) / 1024 * 1024 : OFF_LD + STAGES * LD_BYTES;
constexpr u32 OFF_BAR = OFF_DQ + DQ_BYTES;
constexpr int NBARS = 1 + 2 * STAGES + 2;      // full_kv, full_q[], empty_q[], dq_full, dq_empty
constexpr u32 SMEM = OFF_BAR + 8 * NBARS + 1024;   // + slack to align the base to 1024
constexpr int SREG = WN / 2;        // S^T / dP^T accumulator registers (64 keys x WN queries)
constexpr int KVREG = DW / 2;       // dK / dV accumulator registers (64 keys x DW)
constexpr int DQW = SPLIT_D ? DW : 64;  // dQ columns of a warpgroup's tile
constexpr int DQREG = DQW / 2;      // dQ accumulator registers (64 queries x DQW columns)
constexpr int PK = BM / 16;         // k16 steps of dV / dK (over the queries)
constexpr int PKW = WN / 16;        // k16 steps of the packed P^T / dS^T fragments a warpgroup computes
// dQ (BM x D) = dS K over all BN keys, split between the warpgroups into 64 x DQW tiles: by columns when BM is
// 64 (HEAD_DIM 128, 256), by query rows when BM is 128 (HEAD_DIM 64).
constexpr bool DQ_SPLIT_N = BM == 64;
static_assert(!SPLIT_D || (DW == 128 && BM == 64 && DQW == 128), "the SPLIT_D tiles: 64 x 128 dK / dV / dQ per warpgroup");
static_assert(SMEM <= 232448, "shared memory above 227 KB");
static_assert(OFF_DQ % 16 == 0 && DQ_ROW_BYTES % 16 == 0, "bulk copies need 16-byte aligned rows");
constexpr int CONSUMER_WARPS = 8;
constexpr int BAR_DS = 1;           // named barrier id (0 is __syncthreads): dS^T of both warpgroups written
constexpr int BAR_DQ_ADDED = 2;     // DETERMINISTIC: both warpgroups have added the step's dQ
constexpr int BAR_DQ_TURN = 3;      // DETERMINISTIC: + warpgroup: its thread 0 saw the CTA's turn

}  // namespace b90

#define BWD90_SMEM_BYTES (b90::SMEM)
extern "C" __constant__ int flash_bwd_config[4] = {b90::BM, b90::BN, b90::THREADS, (int)b90::SMEM};

// Parameter block: the backward fields plus the TMA maps of q, k, v, dO (rank 4: {d, rows, heads, batch};
// varlen: batch extent 1, rows = total tokens), boxes of 64 columns x 64 rows (k, v) or BM rows (q, dO).
struct Sm90BwdParams {
    BwdParams b;
    int l2_group;      // (batch, kv head) pairs per group of the tile order (>= 1)
    TmaMap tq, tk, tv, tdo;
    TmaMap tdq;        // DQ_TENSOR: f32 dq_accum as {HEAD_DIM, h, rows_q}, boxes of 32 columns x BM rows
};

namespace b90 {

struct Bars {
    u32 base;
    FA_DEVICE u32 full_kv() const { return base; }
    FA_DEVICE u32 full_q(u32 s) const { return base + 8 + 8 * s; }
    FA_DEVICE u32 empty_q(u32 s) const { return base + 8 + 8 * STAGES + 8 * s; }
    FA_DEVICE u32 dq_full() const { return base + 8 + 16 * STAGES; }
    FA_DEVICE u32 dq_empty() const { return base + 16 + 16 * STAGES; }
};

// The CTA's problem: which key block, which query blocks, for which heads. Computed identically by every role.
struct Work {
    SeqInfo si;
    MaskCtx mc;
    int n0, kvh, bi, group, m_lo, n_m, n_iter;
    // Step `it`: query head and first query row (within the sequence); DETERMINISTIC walks the blocks backwards.
    FA_DEVICE int head(int it) const { return kvh * group + it / n_m; }
    FA_DEVICE int m0(int it) const { return (m_lo + (DETERMINISTIC ? n_m - 1 - it % n_m : it % n_m)) * BM; }
};

FA_DEVICE Work work(const Sm90BwdParams& prm) {
    const BwdParams& p = prm.b;
    const FwdParams& f = p.fwd;
    Work w;
    {
        const int t = blockIdx.x, nb = (f.sk + BN - 1) / BN, pairs = f.b * f.hk, G = prm.l2_group;
        const int grp = t / (G * nb), r = t - grp * G * nb;
        const int gsize = min(G, pairs - grp * G);
        const int n = r / gsize, pair = grp * G + (r - n * gsize);
        w.bi = pair / f.hk;
        w.kvh = pair - w.bi * f.hk;
        w.n0 = n * BN;
    }
    w.si = seq_info(f, w.bi);
    w.group = f.h / f.hk;
    set_mask_ctx(w.mc, w.si.sq, w.si.sk, f);
    int m_hi;
    bwd_q_blocks(w.mc, HAS_MASK != 0, w.n0, BN, BM, &w.m_lo, &m_hi);
    w.n_m = m_hi > w.m_lo ? m_hi - w.m_lo : 0;
    w.n_iter = w.n_m * w.group;
    return w;
}

// ---------------------------------------------------------------- producer: TMA (one thread)
FA_DEVICE void produce_tiles(const Sm90BwdParams& p, const Work& w, u32 sbase, const Bars& bars) {
    tma_prefetch_desc(&p.tq);
    tma_prefetch_desc(&p.tk);
    tma_prefetch_desc(&p.tv);
    tma_prefetch_desc(&p.tdo);
#if IS_VARLEN
    const int tb = 0;
#else
    const int tb = w.bi;
#endif
    const int k_row = (int)w.si.k_off_rows + w.n0;
    mbar_arrive_expect_tx(bars.full_kv(), 2 * KV_BYTES);
#pragma unroll
    for (int pn = 0; pn < PANELS; ++pn)
#pragma unroll
        for (int h = 0; h < BN / 64; ++h) {
            const u32 o = pn * BN * 128 + h * 64 * 128;
            tma_load_4d(sbase + OFF_K + o, &p.tk, pn * 64, k_row + 64 * h, w.kvh, tb, bars.full_kv());
            tma_load_4d(sbase + OFF_V + o, &p.tv, pn * 64, k_row + 64 * h, w.kvh, tb, bars.full_kv());
        }
    for (int it = 0; it < w.n_iter; ++it) {
        const u32 st = it % STAGES, ph = (it / STAGES) & 1;
        const int head = w.head(it);
        const int q_row = (int)w.si.q_off_rows + w.m0(it);
        mbar_wait(bars.empty_q(st), ph ^ 1);
        mbar_arrive_expect_tx(bars.full_q(st), 2 * QS_BYTES);
#pragma unroll
        for (int pn = 0; pn < PANELS; ++pn) {
            tma_load_4d(sbase + OFF_Q + st * QS_BYTES + pn * BM * 128, &p.tq, pn * 64, q_row, head, tb, bars.full_q(st));
            tma_load_4d(sbase + OFF_DO + st * QS_BYTES + pn * BM * 128, &p.tdo, pn * 64, q_row, head, tb, bars.full_q(st));
        }
    }
}

// DETERMINISTIC: the counter of the dQ block of query head `head` from row m0 (bwd_common.cuh: [b, h, ceil(sq / BM)],
// zeroed) and the value it holds when this key block's turn to add has come (its rank among the key blocks that see
// the query block).
struct DqTurn {
    int* sem;
    int turn;
};
FA_DEVICE DqTurn dq_turn(const BwdParams& p, const Work& w, int head, int m0) {
    const FwdParams& f = p.fwd;
    return {p.dq_semaphore + ((i64)w.bi * f.h + head) * ((f.sq + BM - 1) / BM) + m0 / BM,
            w.n0 / BN - bwd_first_k_block(w.mc, HAS_MASK != 0, m0, BN)};
}

// ---------------------------------------------------------------- dQ writer: bulk reduce-adds (one warp)
// DQ_BULK: for each step, once the consumers have stored its dQ tile (dq_full), each lane adds rows lane,
// lane + 32, ... of it to the f32 accumulator with one bulk reduce-add per row (the accumulator is token-major:
// a query's row of one head is contiguous, the next query's is h * HEAD_DIM floats further), waits until the
// tile has been read and frees it (dq_empty). Rows past the sequence are skipped. Before exiting it waits for the
// additions themselves (the dQ conversion kernel reads them next).
// DETERMINISTIC: the writer, not the consumers, waits for this key block's turn on the query block's counter
// (bwd_common.cuh) before adding, waits until its additions are done, and then passes the turn on; the consumers
// only wait when the writer is still a whole step behind.
FA_DEVICE void write_dq(const Sm90BwdParams& prm, const Work& w, u32 sbase, const Bars& bars, int lane) {
    const BwdParams& p = prm.b;
    const i64 row_stride = (i64)p.fwd.h * HEAD_DIM;
    for (int it = 0; it < w.n_iter; ++it) {
        const int m0 = w.m0(it), head = w.head(it);
#if DETERMINISTIC
        const DqTurn dt = dq_turn(p, w, head, m0);
        if (lane == 0)
            while (ld_acquire_gpu(dt.sem) != dt.turn) __nanosleep(32);
        __syncwarp();
        // The previous key block's additions (seen through the acquire) come before this block's bulk ones.
        asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
        mbar_wait(bars.dq_full(), it & 1);
        if constexpr (DQ_TENSOR) {
            if (lane == 0) {
#pragma unroll
                for (int b = 0; b < DQ_BOXES; ++b)
                    tma_reduce_add_3d(&prm.tdq, sbase + OFF_DQ + b * BM * 128, 32 * b, head, (int)w.si.q_row0 + m0);
            }
        } else {
            float* dst = p.dq_accum + ((i64)w.si.q_row0 + m0) * row_stride + (i64)head * HEAD_DIM;
#pragma unroll
            for (int r = lane; r < BM; r += 32) {
                if (m0 + r < w.si.sq) bulk_reduce_add_f32(dst + r * row_stride, sbase + OFF_DQ + r * DQ_ROW_BYTES, D * 4);
            }
        }
        bulk_commit();
#if DETERMINISTIC
        bulk_wait_all();
        asm volatile("fence.proxy.async.global;" ::: "memory");
        __syncwarp();
        if (lane == 0) {
            __threadfence();
            st_release_gpu(dt.sem, dt.turn + 1);
        }
#else
        bulk_wait_read_all();
        __syncwarp();
#endif
        if (lane == 0) mbar_arrive(bars.dq_empty());
    }
    bulk_wait_all();
}

// ---------------------------------------------------------------- consumers: lse and D rows
// Entry `e` (< 2 BM) of step `it`'s lse / D rows, read from the scratch written by the preprocess: lse (log2
// units; +inf past the sequence, so P = 0) for e < BM, else D (0 past the sequence).
FA_DEVICE float ld_row_value(const BwdParams& p, const Work& w, int it, int e) {
    const int r = e < BM ? e : e - BM;
    const int i = w.m0(it) + r;
    const bool ok = i < w.si.sq;
    const i64 idx = w.head(it) * (i64)p.rows_q + w.si.q_row0 + (ok ? i : 0);
    const float v = e < BM ? p.lse_log2[idx] : p.dpsum[idx];
    return ok ? v : (e < BM ? __int_as_float(0x7f800000) : 0.f);
}

// ---------------------------------------------------------------- consumer: matrix products
// acc[64 x WN] = A_rows(64 x D, K-major) * B_rows(WN x D, K-major)^T: S^T = K Q^T or dP^T = V dO^T.
FA_DEVICE void issue_kt(float* acc, u32 sa, u32 sb) { wgmma_ss_kmajor<WN, D, BN * 128, BM * 128>(acc, sa, sb); }

// acc[64 keys x D] += A (registers: P^T or dS^T, k = the BM queries) * B (BM x D tile read N-major).
FA_DEVICE void issue_kv_grad(float* acc, const u32 (*a)[4], u32 sb) {
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
        const u64 db = smem_desc(sb + kk * 16 * 128, BM * 128, 1024);
#if HEAD_DIM == 64
        wgmma_rs_n64<1>(acc, a[kk], db, 1);
#else
        wgmma_rs_n128<1>(acc, a[kk], db, 1);
#endif
    }
}

// SPLIT_D: acc[64 keys x DW] += A (a P^T / dS^T buffer: 64 keys x BM queries, read K-major) * B (the
// warpgroup's DW columns of a BM x D tile, read N-major, starting at its first panel `sb`).
FA_DEVICE void issue_kv_grad_ss(float* acc, u32 sa, u32 sb) {
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
        const u64 da = smem_desc(sa + kk * 32, 16, 1024);
        const u64 db = smem_desc(sb + kk * 16 * 128, BM * 128, 1024);
        wgmma_ss_n128<1, 0>(acc, da, db, 1);
    }
}

// dQ[64 queries x DQW columns] = dS (A: one 64-query panel of the dS^T buffer, read M-major, all BN keys) * K
// (BN keys x DQW columns from the panel at `sk_panel`, read N-major).
FA_DEVICE void issue_dq(float* acc, u32 sds_panel, u32 sk_panel) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const u64 da = smem_desc(sds_panel + kk * 16 * 128, BN * 128, 1024);
        const u64 db = smem_desc(sk_panel + kk * 16 * 128, BN * 128, 1024);
        if constexpr (DQW == 128) {
            wgmma_ss_n128<1, 1>(acc, da, db, kk > 0);
        } else {
            wgmma_ss_n64<1, 1>(acc, da, db, kk > 0);
        }
    }
}

// dS^T row `row` (a key of the block), queries 8nt + 2t, +1 of the step: 16-byte chunk nt % 8 of 64-query panel
// nt / 8, XOR-swizzled by row (the 128-byte swizzle the M-major A operand of dQ = dS K reads).
FA_DEVICE void store_ds(u32 sds, int row, int nt, int t, u32 v) {
    st_shared_u32(sds + (nt >> 3) * BN * 128 + row * 128 + (((nt & 7) ^ (row & 7)) << 4) + 4 * t, v);
}

// The queries key kj sees, as column offsets [lo, hi] from query cb (empty when hi < lo), as mask.cuh defines
// visibility: kj <= i + off + wr, kj >= i + off - wl, i < sq, kj < sk. A key row sees an interval of queries, so
// testing an element costs two compares.
FA_DEVICE int2 visible_cols(const MaskCtx& mc, int kj, int cb) {
    const int off = mc.sk - mc.sq;
    int qlo = 0, qhi = mc.sq - 1;
    if (mc.wr >= 0) qlo = max(qlo, kj - off - mc.wr);
    if (mc.wl >= 0) qhi = min(qhi, kj - off + mc.wl);
    if (kj >= mc.sk) qhi = -1;
    return make_int2(qlo - cb, qhi - cb);
}

// The mask of one S^T tile, applied to its packed P^T / dS^T fragments (rows: keys k0 and k0 + 8 of this thread;
// columns: queries cb + 8 nt + e, nt < WN / 8), as mask.cuh defines visibility: invisible elements (rows >= sq and keys >= sk
// included) become 0 in both (also where the unmasked pass overflowed to inf or NaN); with `exact_one_key`, dS^T of
// queries that see a single key is 0 (their softmax is constant). An element costs two compares and a select.
FA_DEVICE void mask_packed(u32 (*pa)[4], u32 (*da)[4], const Work& w, int k0, int cb, bool exact_one_key) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int2 r = visible_cols(w.mc, k0 + 8 * hh, cb);
        const int lo = r.x, hi = r.y;
#pragma unroll
        for (int nt = 0; nt < WN / 8; ++nt) {
            const int c = 8 * nt;
            const u32 keep = (c >= lo && c <= hi ? 0x0000ffffu : 0u) | (c + 1 >= lo && c + 1 <= hi ? 0xffff0000u : 0u);
            pa[nt >> 1][2 * (nt & 1) + hh] &= keep;
            da[nt >> 1][2 * (nt & 1) + hh] &= keep;
        }
    }
    if (exact_one_key) {
#pragma unroll
        for (int nt = 0; nt < WN / 8; ++nt) {
            const u32 keep = (sees_one_key(w.mc, cb + 8 * nt) ? 0u : 0x0000ffffu) |
                             (sees_one_key(w.mc, cb + 8 * nt + 1) ? 0u : 0xffff0000u);
            da[nt >> 1][2 * (nt & 1)] &= keep;
            da[nt >> 1][2 * (nt & 1) + 1] &= keep;
        }
    }
}

FA_DEVICE void st_shared_f32(u32 addr, float v) { asm volatile("st.shared.f32 [%0], %1;" :: "r"(addr), "f"(v) : "memory"); }

#if HAS_SINK
// The sink logit (times log2(e)) of step it's head, for the thread that stages entry e < BM (lse) of that step;
// loaded with the entry itself, while the step before runs its products, so no global load waits at the barrier.
FA_DEVICE float ld_sink_log2(const BwdParams& p, const Work& w, int it, int e) {
    return e < BM ? p.fwd.sink[w.head(it)] * FA_LOG2E : 0.f;
}
// With a sink, the thread that stores entry e < BM (lse) of a step into buffer `ld_buf` also stores that row's
// weight exp(sink - lse) at entry 2 BM + e.
FA_DEVICE void st_sink_weight(u32 ld_buf, int e, float sink_l2, float lse_log2) {
    if (e < BM) st_shared_f32(ld_buf + 4 * (2 * BM + e), sink_weight(sink_l2, lse_log2));
}
#endif

FA_DEVICE void release(u32 bar, int lane) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
}

// ---------------------------------------------------------------- consumer warpgroups
FA_DEVICE void consumer(const Sm90BwdParams& prm, const Work& w, u32 sbase, const Bars& bars, int wg, int tid_wg) {
    const BwdParams& p = prm.b;
    const FwdParams& f = p.fwd;
    const int warp = tid_wg >> 5, lane = tid_wg & 31, gq = lane >> 2, t = lane & 3;
#if HAS_ALIBI
    const int off = w.si.sk - w.si.sq;
#endif
    const float scale = f.scale;
    const BwdScale sc = bwd_scale(f);
    const u32 sK = sbase + OFF_K, sV = sbase + OFF_V;
    // The 64 key rows of this warpgroup's S^T / dP^T (panel 0): its half of the block, or all of it (SPLIT_D).
    const int key0 = SPLIT_D ? 0 : wg * 64;
    const u32 sK_wg = sK + key0 * 128, sV_wg = sV + key0 * 128;
    // Its query columns of S^T / dP^T: [qc0, qc0 + WN) of the step.
    const int qc0 = SPLIT_D ? wg * WN : 0;
    // Its dK / dV columns [kc0, kc0 + DW), as a byte offset of their first panel in a BM-row tile (SPLIT_D).
    const int kc0 = SPLIT_D ? wg * DW : 0;
    const u32 kv_b_off = (u32)(kc0 / 64) * BM * 128;
    // dQ tile of this warpgroup: columns [dq_col0, +DQW) of query rows [dq_row0, +64) of the step.
    const u32 dq_a_off = DQ_SPLIT_N ? 0u : (u32)wg * BN * 128;
    const u32 dq_b = DQ_SPLIT_N ? sK + wg * (DQW / 64) * BN * 128 : sK;
    const int dq_col0 = DQ_SPLIT_N ? DQW * wg : 0;
    const int dq_row0 = DQ_SPLIT_N ? 0 : 64 * wg;
    const int krow_lo = w.n0 + key0;                          // first key of this warpgroup's S^T
    const int kr0 = key0 + warp * 16 + gq;                    // key row (in the CTA block) of register half 0

    float dk[KVREG], dv[KVREG];
#pragma unroll
    for (int r = 0; r < KVREG; ++r) dk[r] = dv[r] = 0.f;

    // lse / D rows of step it live in buffer (it & 1) of OFF_LD. Consumer thread `e_ld` (2 BM of the 256 take
    // part, spread over every warp) loads entry e_ld of step it + 1 and stores it during step it,
    // into buffer (it + 1) & 1, before that step's dS^T barrier: the barrier orders the store before step it + 1's
    // reads, and every read of that buffer (at step it - 1) came before barrier it - 1.
    const int e_ld = BM == 128 ? wg * 128 + tid_wg : (lane < 16 ? wg * 64 + warp * 16 + lane : 2 * BM);
#if HAS_SINK
    float sink_acc = 0.f;  // this warp's share of dsink for the current head
#endif
    if (w.n_iter > 0) {
        if (e_ld < 2 * BM) {
            const float v0 = ld_row_value(p, w, 0, e_ld);
            st_shared_f32(sbase + OFF_LD + 4 * e_ld, v0);
#if HAS_SINK
            st_sink_weight(sbase + OFF_LD, e_ld, ld_sink_log2(p, w, 0, e_ld), v0);
#endif
        }
        named_sync(BAR_DS, 256);
        mbar_wait(bars.full_kv(), 0);
    }
    const i64 dq_row_stride = (i64)f.h * HEAD_DIM;
    for (int it = 0; it < w.n_iter; ++it) {
        const u32 st = it % STAGES, ph = (it / STAGES) & 1;
        const int head = w.head(it), m0 = w.m0(it);
        const u32 sQ = sbase + OFF_Q + st * QS_BYTES, sDO = sbase + OFF_DO + st * QS_BYTES;
        const u32 sDS = sbase + OFF_DS + (it & 1) * DS_BYTES;
        const u32 sP = sbase + OFF_P + (it & 1) * DS_BYTES;  // SPLIT_D only
        mbar_wait(bars.full_q(st), ph);

        float s[SREG], dp[SREG];
        // (One pass computes P^T and dS^T once both products are done. Computing P^T while dP^T is still in
        // flight needs a second pass over f32 P^T and dP^T: 28-88 bytes of spills at HEAD_DIM 128.)
        wgmma_fence();
        issue_kt(s, sK_wg, sQ + qc0 * 128);
        issue_kt(dp, sV_wg, sDO + qc0 * 128);
        wgmma_commit();
        // lse / D entry of step it + 1, loaded while the products run (a step earlier gains nothing: cuda-bwd.md).
        const float ld_val = it + 1 < w.n_iter && e_ld < 2 * BM ? ld_row_value(p, w, it + 1, e_ld) : 0.f;
#if HAS_SINK
        const float ld_sink = it + 1 < w.n_iter ? ld_sink_log2(p, w, it + 1, e_ld) : 0.f;
#endif
        wgmma_wait<0>();
        reg_fence<SREG>(s);
        reg_fence<SREG>(dp);

        // ---- P^T = exp2(score - lse), dS^T = P^T (dP^T - D), packed to 16 bits as the A fragments of dV / dK (rows
        // are keys, columns queries); on tiles that need it the mask is then applied to the packed values. No
        // per-element branches in the common pass: they multiply the instructions and add branch-resolving and
        // instruction-cache stalls (docs/notes/cuda-bwd.md).
        const bool need_mask = (m0 + BM > w.si.sq) || tile_needs_mask(w.mc, HAS_MASK != 0, m0, m0 + BM - 1, krow_lo, 64);
#if HAS_ALIBI
        const float slope_log2 = f.alibi_slopes[w.bi * f.alibi_batch_stride + head] * FA_LOG2E;
#endif
        const u32 ld = sbase + OFF_LD + (it & 1) * LD_BYTES;
        const int cb = m0 + qc0 + 2 * t;  // query of column offset 0 of this thread
        const int ct = qc0 / 8;           // 8-query chunk of column offset 0 in the dS^T / P^T rows
        u32 pa[PKW][4], da[PKW][4];
        // The pass over this thread's elements. With a sink it also sums P dP, and comes in two forms chosen per
        // tile: MASKED drops invisible elements from those sums by a select (their f32 P may be inf or NaN from
        // the unmasked pass; the packed values are masked later), the other adds every product (one FMA). Without
        // a sink there is one form, and masked tiles store dS^T after mask_packed below.
        auto elementwise = [&](auto masked_c) {
            constexpr bool MASKED = decltype(masked_c)::value;
#pragma unroll
            for (int nt = 0; nt < WN / 8; ++nt) {
                float2 l2, dd;
                const u32 le = ld + 4 * (qc0 + 8 * nt + 2 * t);
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(l2.x), "=f"(l2.y) : "r"(le));
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(dd.x), "=f"(dd.y) : "r"(le + 4 * BM));
#if HAS_SINK
                float pdp[2] = {0.f, 0.f};  // sum of P dP of this thread's two queries over its two keys (visible only)
#endif
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    float pv[2], dsv[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int r = 4 * nt + 2 * hh + e;
                        float th;
                        float s2 = log2_score(sc, s[r], th);
#if HAS_ALIBI
                        {
                            const int dist = cb + 8 * nt + e + off - (w.n0 + kr0 + 8 * hh);
                            s2 -= slope_log2 * (float)(dist < 0 ? -dist : dist);
                        }
#endif
                        const float pr = exp2_fast(s2 - (e ? l2.y : l2.x));
#if HAS_SINK
                        if constexpr (MASKED) {
                            const int qi = cb + 8 * nt + e;
                            pdp[e] += qi < w.si.sq && is_visible(w.mc, qi, w.n0 + kr0 + 8 * hh) ? pr * dp[r] : 0.f;
                        } else {
                            pdp[e] += pr * dp[r];
                        }
#endif
                        float ds = pr * (dp[r] - (e ? dd.y : dd.x));
#if HAS_SOFTCAP
                        ds *= (1.f - th * th);
#endif
                        pv[e] = pr;
                        dsv[e] = ds;
                    }
                    // Register pair (4nt + 2hh, +1) -> A fragment of k16 step nt / 2, element 2 (nt & 1) + hh.
                    pa[nt >> 1][2 * (nt & 1) + hh] = DT::pack(pv[0], pv[1]);
                    da[nt >> 1][2 * (nt & 1) + hh] = DT::pack(dsv[0], dsv[1]);
                }
#if HAS_SINK
                // The two queries' sink weights, loaded before this chunk's dS^T stores: the shared-memory accesses are
                // volatile, so a load after them would wait for them and expose its latency every chunk.
                {
                    float2 ww;
                    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(ww.x), "=f"(ww.y) : "r"(le + 8 * BM));
                    sink_acc += ww.x * pdp[0] + ww.y * pdp[1];
                }
#endif
                if (HAS_SINK ? !MASKED : !need_mask) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        store_ds(sDS, kr0 + 8 * hh, ct + nt, t, da[nt >> 1][2 * (nt & 1) + hh]);
                        if constexpr (SPLIT_D) store_ds(sP, kr0 + 8 * hh, ct + nt, t, pa[nt >> 1][2 * (nt & 1) + hh]);
                    }
                }
            }
        };
#if HAS_SINK
        if (need_mask) {
            elementwise(BoolC<true>{});
        } else {
            elementwise(BoolC<false>{});
        }
#else
        elementwise(BoolC<false>{});
#endif
#if HAS_SINK
        // The last step of this head: each consumer warp hands in its sum (each S^T element has one warp).
        if (it + 1 == w.n_iter || w.head(it + 1) != head) {
            sink_flush(p, w.bi, head, w.n0 / BN, wg * 4 + warp, sink_acc);
            sink_acc = 0.f;
        }
#endif
        if (need_mask) {
            mask_packed(pa, da, w, w.n0 + kr0, cb, p.exact_one_key != 0);
#pragma unroll
            for (int nt = 0; nt < WN / 8; ++nt)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    store_ds(sDS, kr0 + 8 * hh, ct + nt, t, da[nt >> 1][2 * (nt & 1) + hh]);
                    if constexpr (SPLIT_D) store_ds(sP, kr0 + 8 * hh, ct + nt, t, pa[nt >> 1][2 * (nt & 1) + hh]);
                }
        }
        if (it + 1 < w.n_iter && e_ld < 2 * BM) {
            st_shared_f32(sbase + OFF_LD + ((it + 1) & 1) * LD_BYTES + 4 * e_ld, ld_val);
#if HAS_SINK
            st_sink_weight(sbase + OFF_LD + ((it + 1) & 1) * LD_BYTES, e_ld, ld_sink, ld_val);
#endif
        }
        // dV += P^T dO needs only this warpgroup's P^T (registers): issued before the barrier, it runs while the
        // warpgroups meet there.
        if constexpr (!SPLIT_D) {
            wgmma_fence();
            issue_kv_grad(dv, pa, sDO);
            wgmma_commit();
        }
        // The generic-proxy dS^T (and P^T) writes become visible to the wgmma (async proxy) reads of both warpgroups.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        named_sync(BAR_DS, 256);

        // dQ first, in a group of its own, then dK (and, SPLIT_D, dV: it reads both warpgroups' P^T): dQ's
        // additions to global memory below run while dK is still in the tensor cores.
        float dq[DQREG];
        wgmma_fence();
        issue_dq(dq, sDS + dq_a_off, dq_b);
        wgmma_commit();
        if constexpr (SPLIT_D) {
            issue_kv_grad_ss(dv, sP, sDO + kv_b_off);
            issue_kv_grad_ss(dk, sDS, sQ + kv_b_off);
        } else {
            issue_kv_grad(dk, da, sQ);
        }
        wgmma_commit();
        wgmma_wait<1>();
        reg_fence<DQREG>(dq);

        // ---- dQ rows (queries) m0 + dq_row0 + 16 warp + gq (+8), columns dq_col0 + 8 nt + 2t: DQ_BULK stores them
        // into the shared tile once the writer has read the last step's (dq_empty) and hands it over (dq_full);
        // otherwise each thread adds them to the f32 accumulator (DETERMINISTIC: in this key block's turn).
        if constexpr (DQ_BULK) {
            mbar_wait(bars.dq_empty(), (it & 1) ^ 1);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = dq_row0 + warp * 16 + gq + 8 * hh;
                if constexpr (DQ_TENSOR) {
                    // Box col / 32, row r: 128-byte rows, 16-byte chunk (col % 32) / 4 swizzled by r % 8 (= gq).
                    // Rows past the sequence are zeros: the box may reach into the next sequence's rows.
                    const bool in = m0 + r < w.si.sq;
#pragma unroll
                    for (int nt = 0; nt < DQW / 8; ++nt) {
                        const int col = dq_col0 + 8 * nt + 2 * t, cb = col & 31;
                        const u32 a = sbase + OFF_DQ + (u32)(col >> 5) * BM * 128 + (u32)r * 128 +
                                      ((((u32)cb >> 2) ^ (u32)(r & 7)) << 4) + 4 * (cb & 3);
                        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" :: "r"(a), "f"(in ? dq[4 * nt + 2 * hh] : 0.f),
                                     "f"(in ? dq[4 * nt + 2 * hh + 1] : 0.f) : "memory");
                    }
                } else {
                    const u32 row = sbase + OFF_DQ + (u32)r * DQ_ROW_BYTES + 4 * (dq_col0 + 2 * t);
#pragma unroll
                    for (int nt = 0; nt < DQW / 8; ++nt)
                        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" :: "r"(row + 32 * nt), "f"(dq[4 * nt + 2 * hh]),
                                     "f"(dq[4 * nt + 2 * hh + 1]) : "memory");
                }
            }
            // The generic-proxy stores become visible to the writer's bulk reads (async proxy).
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            release(bars.dq_full(), lane);
        } else {
#if DETERMINISTIC
            const DqTurn dt = dq_turn(p, w, head, m0);
            if (tid_wg == 0)
                while (ld_acquire_gpu(dt.sem) != dt.turn) __nanosleep(64);
            named_sync(BAR_DQ_TURN + wg, 128);
#endif
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int qi = m0 + dq_row0 + warp * 16 + gq + 8 * hh;
                if (qi >= w.si.sq) continue;
                float* dst = p.dq_accum + ((i64)w.si.q_row0 + qi) * dq_row_stride + (i64)head * HEAD_DIM + dq_col0 + 2 * t;
#pragma unroll
                for (int nt = 0; nt < DQW / 8; ++nt) {
                    if (dq_col0 + 8 * nt >= f.d) break;
                    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(dst + 8 * nt), "f"(dq[4 * nt + 2 * hh]),
                                 "f"(dq[4 * nt + 2 * hh + 1]) : "memory");
                }
            }
#if DETERMINISTIC
            __threadfence();
            named_sync(BAR_DQ_ADDED, 256);
            if (wg == 0 && tid_wg == 0) st_release_gpu(dt.sem, dt.turn + 1);
#endif
        }
        // dK, dV done: this stage's Q and dO may be overwritten.
        wgmma_wait<0>();
        reg_fence<KVREG>(dv);
        reg_fence<KVREG>(dk);
        release(bars.empty_q(st), lane);
    }

    // ---- epilogue: dK = scale * acc, dV = acc, rows n0 + kr0 (+8) of the tensors, columns kc0 + 8 nt + 2t
    {
        const SeqInfo& si = w.si;
        grad_t* dkg = (grad_t*)p.dk + batch_off(p.dk_batch_stride, w.bi) + si.k_off_rows * p.dk_row_stride + w.kvh * p.dk_head_stride;
        grad_t* dvg = (grad_t*)p.dv + batch_off(p.dv_batch_stride, w.bi) + si.k_off_rows * p.dv_row_stride + w.kvh * p.dv_head_stride;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = w.n0 + kr0 + 8 * hh;
            if (r >= si.sk_rows) continue;
#pragma unroll
            for (int nt = 0; nt < DW / 8; ++nt) {
                const int col = kc0 + 8 * nt + 2 * t;
                if (col >= f.d) break;
                const float k0v = dk[4 * nt + 2 * hh] * scale, k1v = dk[4 * nt + 2 * hh + 1] * scale;
                const float v0v = dv[4 * nt + 2 * hh], v1v = dv[4 * nt + 2 * hh + 1];
                grad_t* kp = dkg + (i64)r * p.dk_row_stride + col;
                grad_t* vp = dvg + (i64)r * p.dv_row_stride + col;
                if (col + 1 < f.d) {
                    store_grad2(kp, k0v, k1v);
                    store_grad2(vp, v0v, v1v);
                } else {
                    store_grad(kp, k0v);
                    store_grad(vp, v0v);
                }
            }
        }
    }
}

}  // namespace b90

extern "C" __global__ void __launch_bounds__(b90::THREADS, 1) flash_bwd_sm90(const __grid_constant__ Sm90BwdParams p) {
    using namespace b90;
    extern __shared__ unsigned char smem_raw[];
    const Work w = work(p);
    if (w.n0 >= w.si.sk_rows) return;  // the whole CTA: past this sequence's keys
    const u32 sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
    Bars bars;
    bars.base = sbase + OFF_BAR;
    init_mbarriers([&] {
        mbar_init(bars.full_kv(), 1);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars.full_q(s), 1);
            mbar_init(bars.empty_q(s), CONSUMER_WARPS);
        }
        mbar_init(bars.dq_full(), CONSUMER_WARPS);
        mbar_init(bars.dq_empty(), 1);
    });
    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        regs_dealloc<24>();
        const int warp = threadIdx.x / 32;
        if (w.n_iter == 0) return;  // nothing to load; the consumers store zero dK / dV
        if (warp == 0 && threadIdx.x == 0) produce_tiles(p, w, sbase, bars);
        if (DQ_BULK && warp == 1) write_dq(p, w, sbase, bars, threadIdx.x & 31);
    } else {
        regs_alloc<240>();
        consumer(p, w, sbase, bars, wg - 1, threadIdx.x - 128 * wg);
    }
}
