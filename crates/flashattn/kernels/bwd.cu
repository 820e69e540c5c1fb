// FlashAttention-2-class backward for sm_80 and up (mma.sync m16n8k16, ldmatrix, cp.async).
// Semantics: docs spec ATTENTION.md (gradients of the score pipeline scale -> softcap -> ALiBi -> mask).
//
// ================================================================ compile-time macros
//   HEAD_DIM      padded head dim: 32, 64, 96, 128, 160, 192, 224, 256 (runtime d <= HEAD_DIM, predicated)
//   HEAD_DIM_V    padded value head dim of v, o, dO and dV (variant.cuh; default HEAD_DIM). When defined (HAS_DV),
//                 the runtime value head dim is BwdParams::d_v (<= HEAD_DIM_V, predicated like d): D = rowsum(dO*O)
//                 and dP^T = V dO^T run over it, dV has its columns; S^T = K Q^T, dK and dQ run over HEAD_DIM.
//                 The tile configuration below is chosen by max(HEAD_DIM, HEAD_DIM_V) (BWD_TILE_DIM).
//   IS_BF16       1: bf16 tensors, 0: f16
//   HAS_MASK      1: causal / sliding window (window_left/right of FwdParams; causal = (-1, 0))
//   HAS_ALIBI     1: alibi_slopes used
//   HAS_SOFTCAP   1: softcap > 0 used
//   IS_VARLEN     1: cu_seqlens_q/k layout
//   DETERMINISTIC 1: dQ additions in a fixed order (per (query block, batch, head) semaphore): bit-reproducible
//   HAS_SINK      1: learnable sink: the main kernel also sums each warp's share of dsink into p.dsink_part
//                 (bwd_common.cuh) and the module exports flash_bwd_dsink
//   GRAD_F32      1: dq, dk, dv are written as f32 (variant.cuh's grad_t), 0: in the inputs' dtype
//   ALIGNED16     1 (default): q/k/v/o/dO/dq/dk/dv base pointers are 16-byte aligned and every row/head/batch
//                 stride is a multiple of 8 elements (d itself may be anything) -> 16-byte cp.async tile loads,
//                 paired stores. 0: element-wise loads and stores (any alignment, any stride). Same rule as fwd.cu.
//   BWD_BM/BWD_BN/BWD_WARPS/BWD_DSPLIT override the tile configuration below (defaults per BWD_TILE_DIM);
//   BWD_MINB: __launch_bounds__ min blocks per SM [1].
//
// Tile configuration (main kernel): BN keys per CTA, BM queries per step, BWD_WARPS warps, BWD_DSPLIT warps share
// one 16-key strip (each owning HEAD_DIM/DSPLIT columns of dK and HEAD_DIM_V/DSPLIT of dV; the strip's S/dP are
// recomputed by each of them). Rows below are BWD_TILE_DIM = max(HEAD_DIM, HEAD_DIM_V):
//   HEAD_DIM  32/64 : BM 64, BN 128, 8 warps, DSPLIT 1
//   HEAD_DIM  96    : BM 64, BN 128, 8 warps, DSPLIT 1
//   HEAD_DIM 128    : BM 32, BN 128, 8 warps, DSPLIT 1
//   HEAD_DIM 160-256: BM 32, BN  64, 8 warps, DSPLIT 2
//   (BN = 16 * BWD_WARPS / BWD_DSPLIT)
//   BWD_TILE2D (default 1 for HEAD_DIM 96/128 and, on sm_90+, 256; 0 otherwise; allowed for HEAD_DIM <= 128,
//   192, 256; d192 passes the probe tests but is not benchmarked yet; sm_80 d256 spills 116 B): 2-D warp tiling instead of 16-key strips, 8 warps; P^T and dS^T exchanged through shared memory.
//   HEAD_DIM <= 128: BN 128, BM 64 (BWD_BM 128 allowed); HEAD_DIM 192/256: BN 64, BM 64 (FA2's d256 layout, no
//   S/dP recompute). The HEAD_DIM 96/128 rows of the table above and below then read: BM 64, BN 128, 256 threads;
//   HEAD_DIM 256 on sm_90+ (and 192 with BWD_TILE2D=1): BM 64, BN 64, 256 threads.
//   BWD_QCH: dQ computed in column chunks of this width (default 32 for HEAD_DIM > 128, else the whole warp tile).
//
// ================================================================ scratch buffers (Rust allocates, f32/i32)
//   rows_q    = b * sq (dense) or total_q = cu_seqlens_q[b] (varlen); BwdParams::rows_q must hold it.
//   row index of query row `i` of sequence `bi`: r = bi * sq + i (dense) or cu_seqlens_q[bi] + i (varlen).
//   dpsum     f32 [h, rows_q]            element (head, r) at head * rows_q + r        (written by preprocess)
//   lse_log2  f32 [h, rows_q]            lse * log2(e), -inf replaced by +inf            (written by preprocess)
//   dq_accum  f32 [rows_q, h, HEAD_DIM]  element at (r * h + head) * HEAD_DIM + col      (zeroed by preprocess)
//   dq_semaphore (DETERMINISTIC only, else may be null) i32 [b, h, ceil(sq / BM)] (sq = max query length for
//             varlen), element ((bi * h + head) * ceil(sq / BM) + m)                    (zeroed by preprocess)
//   dK/dV need no scratch: GQA/MQA is handled by looping the whole query-head group inside the CTA (the group's
//   contributions are summed in registers in a fixed order, so deterministic mode needs nothing more).
//
// ================================================================ kernels (launch in this order, same stream)
//   flash_bwd_preprocess(BwdParams p)  grid (ceil(sq/64), h, b), 256 threads, no dynamic smem.
//       D = rowsum(dO * O) -> dpsum, lse -> lse_log2, zero dq_accum rows, zero dq_semaphore (if DETERMINISTIC).
//   flash_bwd_main(BwdParams p)        grid (ceil(sk/BN), hk, b), 32 * BWD_WARPS threads, dynamic smem
//       BWD_SMEM_BYTES = 2*BN*RD + 4*BM*RD + BN*RS + 16*BM,   RD = (HEAD_DIM/8 + 1)*16, RS = (BM/8 + 1)*16
//       (K, V | Q, dO double-buffered | dS^T | lse_log2, dpsum double-buffered); with a value head dim of its
//       own the V and dO tiles have rows of RDV = (HEAD_DIM_V/8 + 1)*16 bytes (BN*RD + BN*RDV + 2*BM*RD +
//       2*BM*RDV + ...; the TILE2D form likewise).  Values:
//         d32: 60416  d64: 93184  d160: 91648  d192: 108032  d224: 124416  d256: 140800
//       BWD_TILE2D: 2*BN*RD + 2*QS*BM*RD + 2*BN*RS + 8*QS*BM (K, V | Q, dO x QS | P^T, dS^T | lse, D x QS), QS = 2
//       stages if that fits the arch (227 KB sm_90, 163 KB sm_80), else 1:
//         d96: 144384   d128: 177152 (sm_90) / 141824 (sm_80, single-buffered Q/dO)
//         d192 (BN 64): 173056 (sm_90) / 121344 (sm_80, single)   d256 (BN 64, sm_90): 222208
//       (HEAD_DIM, HEAD_DIM_V): (64, 128) and (128, 64) TILE2D 144384 (two stages on sm_80 and sm_90);
//       (192, 128) 91648.
//       The module also exports `__constant__ int flash_bwd_config[4] = {BM, BN, threads, BWD_SMEM_BYTES}`
//       (cuModuleGetGlobal) so a launcher can read the tile sizes instead of mirroring the table.
//       Needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) (all values fit sm_80's 163 KB). Writes dK, dV (all
//       rows of the CTA's key block, zeros where no query sees a key) and adds dS K (unscaled) into dq_accum
//       (f32 atomics; red.v2 on sm_90). DETERMINISTIC spins on the semaphore of lower key blocks of the same
//       (batch, head): it relies on CTAs being dispatched in blockIdx order (x fastest), as FA2's does.
//   flash_bwd_convert_dq(BwdParams p)  grid (ceil(sq/64), h, b), 256 threads, no dynamic smem.
//       dq = dq_accum * scale, converted to the dtype with dq's strides.
//   flash_bwd_dsink(BwdParams p)       HAS_SINK only; grid (h), 32 threads, after the main kernel.
//       dsink[h] = -(sum of p.dsink_part over batch, key blocks and warps), in a fixed order (deterministic).
// sq/sk above are FwdParams::sq/sk (max lengths for varlen).
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "bwd_common.cuh"

#include "variant.cuh"

// The tile configuration follows the wider head dim (the dK and dV accumulators share the registers).
#if HEAD_DIM_V > HEAD_DIM
#define BWD_TILE_DIM HEAD_DIM_V
#else
#define BWD_TILE_DIM HEAD_DIM
#endif

#ifndef BWD_TILE2D
#if (BWD_TILE_DIM > 64 && BWD_TILE_DIM <= 128) || (BWD_TILE_DIM == 256 && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900))
#define BWD_TILE2D 1
#else
#define BWD_TILE2D 0
#endif
#endif

#if BWD_TILE2D
#ifndef BWD_BM
#define BWD_BM 64
#endif
#undef BWD_WARPS
#define BWD_WARPS 8
#undef BWD_DSPLIT
#define BWD_DSPLIT 1
#undef BWD_BN
#if BWD_TILE_DIM <= 128
#define BWD_BN 128
#else
#define BWD_BN 64
#endif
#else
#ifndef BWD_BM
#if BWD_TILE_DIM <= 96
#define BWD_BM 64
#else
#define BWD_BM 32
#endif
#endif
#ifndef BWD_WARPS
#define BWD_WARPS 8
#endif
#ifndef BWD_DSPLIT
#if BWD_TILE_DIM <= 128
#define BWD_DSPLIT 1
#else
#define BWD_DSPLIT 2
#endif
#endif
#ifndef BWD_BN
#define BWD_BN (16 * BWD_WARPS / BWD_DSPLIT)
#endif
#endif

#ifndef BWD_MINB
#define BWD_MINB 1
#endif

static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 32, at most 256");
static_assert(HEAD_DIM_V % 32 == 0 && HEAD_DIM_V <= 256, "HEAD_DIM_V must be a multiple of 32, at most 256");
#if BWD_TILE2D
static_assert(BWD_TILE_DIM <= 128 || (HEAD_DIM % 64 == 0 && HEAD_DIM_V % 64 == 0),
              "BWD_TILE2D needs head dims <= 128 or 192/256");
static_assert(BWD_BM == 64 || (BWD_BM == 128 && BWD_TILE_DIM <= 128), "BWD_TILE2D: BM must be 64 (or 128 for d <= 128)");
#else
static_assert(BWD_BN == 16 * BWD_WARPS / BWD_DSPLIT, "BN = 16 * warps / dsplit");
static_assert(BWD_BM % 16 == 0 && 64 % BWD_BM == 0, "BM must be 16, 32 or 64");
static_assert(BWD_WARPS % (BWD_BM / 16) == 0, "warps must cover the dQ tile rows");
static_assert((HEAD_DIM / BWD_DSPLIT) % 16 == 0, "dK/dV column share must be a multiple of 16");
static_assert((HEAD_DIM_V / BWD_DSPLIT) % 16 == 0, "dV column share must be a multiple of 16");
#endif


// ---------------------------------------------------------------- small primitives of our own
FA_DEVICE void cp_async_4(u32 smem_addr, const void* gptr, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(smem_addr), "l"(gptr), "r"(src_bytes));
}
FA_DEVICE void red_add_f32x2(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(addr), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(addr, a);
    atomicAdd(addr + 1, b);
#endif
}
// Add one m16n8 f32 accumulator fragment (rows g / g+8, columns 2t, 2t+1 of an 8-column block) to global memory.
// `a` points at (row g, column 2t); rstep8 is the distance of row g+8. ok_lo / ok_hi: rows g / g+8 exist.
FA_DEVICE void red_add_frag(float* a, i64 rstep8, const float* c, bool ok_lo, bool ok_hi) {
    if (ok_lo) red_add_f32x2(a, c[0], c[1]);
    if (ok_hi) red_add_f32x2(a + rstep8, c[2], c[3]);
}

// ================================================================ preprocess
#define PRE_ROWS 64
extern "C" __global__ void __launch_bounds__(256) flash_bwd_preprocess(const BwdParams p) {
    const FwdParams& f = p.fwd;
    const int bi = blockIdx.z, head = blockIdx.y;
    const SeqInfo si = seq_info(f, bi);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

#if DETERMINISTIC
    // Semaphore blocks whose first row lies in this CTA's rows [blockIdx.x * 64, + 64) (any BM, 16..128).
    if (p.dq_semaphore && threadIdx.x < (PRE_ROWS + BWD_BM - 1) / BWD_BM) {
        const int nmb = (f.sq + BWD_BM - 1) / BWD_BM;
        const int m = (blockIdx.x * PRE_ROWS + BWD_BM - 1) / BWD_BM + threadIdx.x;
        if (m < nmb && m * BWD_BM < (blockIdx.x + 1) * PRE_ROWS) p.dq_semaphore[(i64)(bi * f.h + head) * nmb + m] = 0;
    }
#endif
    const int row0 = blockIdx.x * PRE_ROWS;
    if (row0 >= si.sq) return;
    const elem_t* o = (const elem_t*)f.o + batch_off(f.o_batch_stride, bi) + si.q_off_rows * f.o_row_stride + head * f.o_head_stride;
    const elem_t* dO = (const elem_t*)p.dout + batch_off(p.do_batch_stride, bi) + si.q_off_rows * p.do_row_stride + head * p.do_head_stride;
    for (int rr = warp; rr < PRE_ROWS; rr += 8) {
        const int row = row0 + rr;
        if (row >= si.sq) break;
        const elem_t* orow = o + (i64)row * f.o_row_stride;
        const elem_t* drow = dO + (i64)row * p.do_row_stride;
        float acc = 0.f;
#if HAS_DV
        for (int c = lane; c < p.d_v; c += 32) acc += DT::to_f32(orow[c].x) * DT::to_f32(drow[c].x);
#else
        for (int c = lane; c < f.d; c += 32) acc += DT::to_f32(orow[c].x) * DT::to_f32(drow[c].x);
#endif
        acc = warp_sum(acc);
        const i64 r = (i64)si.q_row0 + row;
        if (lane == 0) {
#if IS_VARLEN
            const float l = f.lse[head * f.lse_head_stride + r];
#else
            const float l = f.lse[bi * f.lse_batch_stride + head * f.lse_head_stride + row];
#endif
            p.dpsum[head * (i64)p.rows_q + r] = acc;
            p.lse_log2[head * (i64)p.rows_q + r] = (l == FA_NEG_INF) ? __int_as_float(0x7f800000) : l * FA_LOG2E;
        }
        float4* dqa = (float4*)(p.dq_accum + (r * f.h + head) * HEAD_DIM);
        for (int c = lane; c < HEAD_DIM / 4; c += 32) dqa[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// ================================================================ convert dQ
extern "C" __global__ void __launch_bounds__(256) flash_bwd_convert_dq(const BwdParams p) {
    const FwdParams& f = p.fwd;
    const int bi = blockIdx.z, head = blockIdx.y;
    const SeqInfo si = seq_info(f, bi);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * PRE_ROWS;
    if (row0 >= si.sq) return;
    grad_t* dq = (grad_t*)p.dq + batch_off(p.dq_batch_stride, bi) + si.q_off_rows * p.dq_row_stride + head * p.dq_head_stride;
    for (int rr = warp; rr < PRE_ROWS; rr += 8) {
        const int row = row0 + rr;
        if (row >= si.sq) break;
        const i64 r = (i64)si.q_row0 + row;
        const float* src = p.dq_accum + (r * f.h + head) * HEAD_DIM;
        grad_t* dst = dq + (i64)row * p.dq_row_stride;
        for (int c = lane; c < f.d; c += 32) store_grad(dst + c, src[c] * f.scale);
    }
}

#if HAS_SINK
// dsink[h] = -(sum of this head's partial sums over sequences, key blocks and warps), one warp per head: each lane
// sums a fixed strided subset in order, then a fixed butterfly over the lanes, so the result is bit-reproducible.
// No shared memory (the loader raises every kernel's dynamic limit to the device maximum, which fails for a
// kernel with static shared memory).
extern "C" __global__ void __launch_bounds__(32) flash_bwd_dsink(const BwdParams p) {
    const int head = blockIdx.x;
    const i64 per_seq = (i64)p.dsink_blocks * 8;
    float acc = 0.f;
    for (int bi = 0; bi < p.fwd.b; ++bi) {
        const float* src = p.dsink_part + ((i64)bi * p.fwd.h + head) * per_seq;
        for (i64 e = threadIdx.x; e < per_seq; e += 32) acc += src[e];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (threadIdx.x == 0) p.dsink[head] = -acc;
}
#endif

// ================================================================ main kernel
namespace bwd {
#if BWD_TILE2D
// 2-D warp tiling (FA2-style). 8 warps; WK = 4 warps along the keys, each owning MS = 32 keys for S^T/dP^T and
// for dK/dV; S^T/dP^T split the BM queries over 2 warps (NS each); dK/dV split the head dim over 2 warps (DW);
// dQ = dS K split into 32-row x QC-column warp tiles. P^T and dS^T go through shared memory once per step.
constexpr int BM = BWD_BM;
constexpr int BN = BWD_BN;                   // 128 (d <= 128) or 64 (d 192/256)
constexpr int NW = 8;
constexpr int NT = NW * 32;
constexpr int WK = BN / 32;                  // warps along the keys
constexpr int MS = BN / WK;                  // keys per warp (S^T, dK/dV) = 32
constexpr int NS = BM / (NW / WK);           // queries per warp (S^T)
constexpr int DW = HEAD_DIM / (NW / WK);     // dK columns per warp
constexpr int QROWW = BM / 32;               // dQ: warps along rows (32 rows each)
constexpr int QCOLW = NW / QROWW;
constexpr int QC = HEAD_DIM / QCOLW;         // dQ columns per warp
#ifndef BWD_QCH
#define BWD_QCH (HEAD_DIM > 128 ? 32 : 0)
#endif
constexpr int QCH = (BWD_QCH > 0 && QC % BWD_QCH == 0) ? BWD_QCH : QC;  // dQ columns per chunk
static_assert(QC % 8 == 0 && DW % 16 == 0 && NS % 16 == 0, "warp tile shapes");
constexpr int RD = (HEAD_DIM / 8 + 1) * 16;
constexpr int RS = (BM / 8 + 1) * 16;        // padded row bytes of the P^T / dS^T tiles
// The value head dim's shapes, as enumerators (namespace-scope constexpr variables become PTX globals; these add
// none, so the variants without HEAD_DIM_V compile to the cubins they compiled to before it existed).
enum : int {
    DWV = HEAD_DIM_V / (NW / WK),    // dV columns per warp
    RDV = (HEAD_DIM_V / 8 + 1) * 16  // padded row bytes of the V and dO tiles
};
static_assert(DWV % 16 == 0, "dV warp tile shape");
constexpr int SMEM_2 = BN * RD + BN * RDV + 2 * BM * RD + 2 * BM * RDV + 2 * BN * RS + 16 * BM;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int SMEM_LIMIT = 227 * 1024;
#else
constexpr int SMEM_LIMIT = 163 * 1024;
#endif
constexpr int QSTAGES = SMEM_2 <= SMEM_LIMIT ? 2 : 1;  // Q/dO/lse/D buffers (1: no prefetch, sm_80 d128)
constexpr int OFF_K = 0;
constexpr int OFF_V = OFF_K + BN * RD;
constexpr int OFF_Q = OFF_V + BN * RDV;
constexpr int OFF_DO = OFF_Q + QSTAGES * BM * RD;
constexpr int OFF_P = OFF_DO + QSTAGES * BM * RDV;
constexpr int OFF_DS = OFF_P + BN * RS;
constexpr int OFF_LSE = OFF_DS + BN * RS;
constexpr int OFF_DP = OFF_LSE + QSTAGES * BM * 4;
constexpr int SMEM = OFF_DP + QSTAGES * BM * 4;
#else
constexpr int BM = BWD_BM;
constexpr int BN = BWD_BN;
constexpr int NW = BWD_WARPS;
constexpr int NT = NW * 32;
constexpr int DSPLIT = BWD_DSPLIT;
constexpr int STRIPS = NW / DSPLIT;
constexpr int DW = HEAD_DIM / DSPLIT;        // dK columns per warp
constexpr int QROWW = BM / 16;               // warps along the dQ tile rows
constexpr int QCOLW = NW / QROWW;            // warps along the dQ tile columns
constexpr int QC = HEAD_DIM / QCOLW;         // dQ columns per warp (multiple of 8)
static_assert(QC % 8 == 0, "dQ column share must be a multiple of 8");
constexpr int RD = (HEAD_DIM / 8 + 1) * 16;  // padded row bytes of HEAD_DIM-wide tiles
// The value head dim's shapes, as enumerators (see the 2-D tiling's).
enum : int {
    DWV = HEAD_DIM_V / DSPLIT,       // dV columns per warp
    RDV = (HEAD_DIM_V / 8 + 1) * 16  // padded row bytes of the HEAD_DIM_V-wide V and dO tiles
};
constexpr int RS = (BM / 8 + 1) * 16;        // padded row bytes of the dS^T tile
constexpr int OFF_K = 0;
constexpr int OFF_V = OFF_K + BN * RD;
constexpr int OFF_Q = OFF_V + BN * RDV;      // 2 buffers
constexpr int OFF_DO = OFF_Q + 2 * BM * RD;  // 2 buffers
constexpr int OFF_DS = OFF_DO + 2 * BM * RDV;
constexpr int OFF_LSE = OFF_DS + BN * RS;    // 2 x BM floats
constexpr int OFF_DP = OFF_LSE + 2 * BM * 4; // 2 x BM floats
constexpr int SMEM = OFF_DP + 2 * BM * 4;
#endif
}  // namespace bwd
#define BWD_SMEM_BYTES (bwd::SMEM)
extern "C" __constant__ int flash_bwd_config[4] = {bwd::BM, bwd::BN, bwd::NT, bwd::SMEM};

// Position (0..n_m-1, relative to m_lo) of the query block handled at step `it`. Deterministic mode walks the
// blocks from the last to the first: every CTA of a (batch, head) then starts on the same block, so the in-order
// semaphore only skews CTA n by n steps instead of serialising causal CTAs (whose first blocks differ).
FA_DEVICE int m_order(int it, int n_m) {
    const int r = it % n_m;
#if DETERMINISTIC
    return n_m - 1 - r;
#else
    return r;
#endif
}

// The value head dim: BwdParams::d_v with HEAD_DIM_V (HAS_DV), else d.
FA_DEVICE int value_dim(const BwdParams& p) {
#if HAS_DV
    return p.d_v;
#else
    return p.fwd.d;
#endif
}

// Copy `rows` x COLS tile rows [0, rows) of a strided 16-bit matrix into a padded shared tile (rows of
// (COLS/8 + 1)*16 bytes); rows >= nvalid and columns >= d are zero-filled. ALIGNED16: asynchronous (caller
// commits); otherwise synchronous.
template <int ROWS, int COLS = HEAD_DIM>
FA_DEVICE void load_tile(u32 s_base, const elem_t* g, i64 row_stride, int nvalid, int d, int tid) {
    constexpr int CH = COLS / 8;
    constexpr int RDB = (COLS / 8 + 1) * 16;
#if ALIGNED16
#pragma unroll
    for (int i = 0; i < (ROWS * CH + bwd::NT - 1) / bwd::NT; ++i) {
        const int idx = tid + i * bwd::NT;
        if ((ROWS * CH) % bwd::NT != 0 && idx >= ROWS * CH) break;
        const int r = idx / CH, c = idx % CH;
        const int rem = d - c * 8;  // elements of this chunk inside the row
        const bool ok = r < nvalid && rem > 0;
        const elem_t* src = ok ? g + (i64)r * row_stride + c * 8 : g;
        cp_async_16(s_base + r * RDB + c * 16, src, ok ? (rem >= 8 ? 16 : rem * 2) : 0);
    }
#else
    for (int idx = tid; idx < ROWS * COLS / 2; idx += bwd::NT) {
        const int r = idx / (COLS / 2), c = (idx % (COLS / 2)) * 2;
        u32 lo = 0, hi = 0;
        if (r < nvalid) {
            const elem_t* src = g + (i64)r * row_stride + c;
            if (c < d) lo = src[0].x;
            if (c + 1 < d) hi = src[1].x;
        }
        st_shared_u32(s_base + r * RDB + c * 2, lo | (hi << 16));
    }
#endif
}

// Stores the pair (x0, x1) at row r, columns col and col + 1 of a [rows][ncols] tile of g (row stride in
// elements): nothing for a row >= nrows or col >= ncols, one element when col + 1 == ncols. The epilogues of
// the HAS_DV variants store dK and dV with it (their widths differ).
FA_DEVICE void store_frag_pair(grad_t* g, i64 row_stride, int r, int col, int nrows, int ncols, float x0, float x1) {
    if (r >= nrows || col >= ncols) return;
    grad_t* ptr = g + (i64)r * row_stride + col;
#if ALIGNED16
    if (col + 1 < ncols) {
        store_grad2(ptr, x0, x1);
        return;
    }
#endif
    store_grad(ptr, x0);
    if (col + 1 < ncols) store_grad(ptr + 1, x1);
}

// Issues the loads of step `it` into buffer `buf` (not committed): query head kvh * group + it / n_m of the key
// head's group, query block m_lo + m_order(it, n_m): its Q and dO tiles (rows past the sequence and columns past
// d / d_v zero-filled) into sQ / sDO and its lse * log2(e) and D into s_lse / s_dps.
FA_DEVICE void issue_q_loads(const BwdParams& p, const SeqInfo& si, int bi, int kvh, int group, int m_lo, int n_m, int it,
                             int buf, u32 sQ, u32 sDO, float* s_lse, float* s_dps, int d, int d_v, int tid) {
    using namespace bwd;
    const FwdParams& f = p.fwd;
    const int gi = it / n_m;
    const int mr = m_order(it, n_m);
    const int m0 = (m_lo + mr) * BM;
    const int head = kvh * group + gi;
    const int nvalid = si.sq - m0;
    const elem_t* qg = (const elem_t*)f.q + batch_off(f.q_batch_stride, bi) + (si.q_off_rows + m0) * f.q_row_stride + head * f.q_head_stride;
    const elem_t* dog = (const elem_t*)p.dout + batch_off(p.do_batch_stride, bi) + (si.q_off_rows + m0) * p.do_row_stride + head * p.do_head_stride;
    load_tile<BM>(sQ + buf * BM * RD, qg, f.q_row_stride, nvalid, d, tid);
    load_tile<BM, HEAD_DIM_V>(sDO + buf * BM * RDV, dog, p.do_row_stride, nvalid, d_v, tid);
    if (tid < 2 * BM) {
        const int r = tid % BM;
        const bool ok = r < nvalid;
        const i64 idx = head * (i64)p.rows_q + si.q_row0 + m0 + (ok ? r : 0);
        const float* src = tid < BM ? p.lse_log2 + idx : p.dpsum + idx;
        float* dst = (tid < BM ? s_lse : s_dps) + buf * BM + r;
        cp_async_4(smem_u32(dst), src, ok ? 4 : 0);
    }
}

// Zeroes the dK and dV accumulators of one 16-key row block (DW / 8 and DWV / 8 fragments).
FA_DEVICE void zero_dk_dv(float (*acc_dk)[4], float (*acc_dv)[4]) {
    using bwd::DW;
    using bwd::DWV;
#pragma unroll
    for (int i = 0; i < (DW > DWV ? DW : DWV) / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (i < DW / 8) acc_dk[i][e] = 0.f;
            if (i < DWV / 8) acc_dv[i][e] = 0.f;
        }
}

// The ALiBi slope of (sequence bi, head) times log2(e), in the log2 units of the scores (HAS_ALIBI; else 0, unused).
FA_DEVICE float alibi_slope_log2(const FwdParams& f, int bi, int head) {
#if HAS_ALIBI
    return f.alibi_slopes[bi * f.alibi_batch_stride + head] * FA_LOG2E;
#else
    return 0.f;
#endif
}
// The sink of `head` times log2(e) (HAS_SINK; else 0, unused).
FA_DEVICE float sink_log2(const FwdParams& f, int head) {
#if HAS_SINK
    return f.sink[head] * FA_LOG2E;
#else
    return 0.f;
#endif
}

// P^T and dS^T of one S^T / dP^T accumulator fragment, in place: keys krow0 (c0, c1) and krow0 + 8 (c2, c3) x
// queries m0 + cl (c0, c2) and m0 + cl + 1 (c1, c3) of sequence geometry mc (off = sk - sq). s: the raw scores in,
// P = exp2(log2 score - lse) out (0 where invisible when need_mask); dp: dP in, dS = P (dP - D) out (times the
// softcap derivative; 0 for a query that sees one key when need_mask and exact_one_key). lse_s / dps_s: the
// step's lse * log2(e) and D by query offset. Returns the fragment's share of dsink (HAS_SINK; else 0): the sum
// of w_i P dP over its elements, w_i = exp(sink - lse_i), summed per query in pdp[2], scratch of the caller (an
// array of this function's own compiles the sink kernels to other cubins).
FA_DEVICE float p_ds_frag(float* s, float* dp, const MaskCtx& mc, int off, const BwdScale& sc, float slope_log2,
                          float sink_l2, const float* lse_s, const float* dps_s, int m0, int cl, int krow0,
                          bool need_mask, bool exact_one_key, float* pdp) {
    const float2 l2 = *(const float2*)(lse_s + cl);
    const float2 dd = *(const float2*)(dps_s + cl);
#if HAS_SINK
    pdp[0] = pdp[1] = 0.f;  // sum of P dP of queries cl, cl + 1 over this thread's two keys
#endif
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int qi = m0 + cl + (e & 1);
        const int kj = krow0 + 8 * (e >> 1);
        float th;
        float s2 = log2_score(sc, s[e], th);
#if HAS_ALIBI
        {
            const int dist = qi + off - kj;
            s2 -= slope_log2 * (float)(dist < 0 ? -dist : dist);
        }
#endif
        float pv = exp2_fast(s2 - ((e & 1) ? l2.y : l2.x));
        if (need_mask && !(qi < mc.sq && is_visible(mc, qi, kj))) pv = 0.f;
#if HAS_SINK
        pdp[e & 1] += pv * dp[e];
#endif
        float ds = pv * (dp[e] - ((e & 1) ? dd.y : dd.x));
        if (need_mask && exact_one_key && sees_one_key(mc, qi)) ds = 0.f;  // exact: a one-key softmax is constant
#if HAS_SOFTCAP
        ds *= (1.f - th * th);
#endif
        s[e] = pv;
        dp[e] = ds;
    }
#if HAS_SINK
    return sink_weight(sink_l2, l2.x) * pdp[0] + sink_weight(sink_l2, l2.y) * pdp[1];
#else
    return 0.f;
#endif
}

// Stores the dK and dV accumulators of MI 16-key row blocks (DW / 8 and DWV / 8 fragments each) of the CTA of keys
// [n0, n0 + BN) of key head kvh of sequence bi: block mi holds keys n0 + r0 + 16 mi + g (c0, c1) and + 8 (c2, c3),
// dK columns kc0 + 8 nt + 2t (times scale) and dV columns vc0 + 8 nt + 2t. Keys past the sequence's rows and
// columns >= d (dK) or d_v (dV) are not stored.
template <int MI>
FA_DEVICE void store_dk_dv(const BwdParams& p, const SeqInfo& si, int bi, int kvh, int n0,
                           const float (*acc_dk)[bwd::DW / 8][4], const float (*acc_dv)[bwd::DWV / 8][4], int r0, int kc0,
                           int vc0, int d, int d_v, float scale, int g, int t) {
    using bwd::DW;
    using bwd::DWV;
    grad_t* dkg = (grad_t*)p.dk + batch_off(p.dk_batch_stride, bi) + (si.k_off_rows + n0) * p.dk_row_stride + kvh * p.dk_head_stride;
    grad_t* dvg = (grad_t*)p.dv + batch_off(p.dv_batch_stride, bi) + (si.k_off_rows + n0) * p.dv_row_stride + kvh * p.dv_head_stride;
    const int nrows = si.sk_rows - n0;
    if constexpr (HAS_DV) {
        // dK (HEAD_DIM columns, d real) and dV (HEAD_DIM_V columns, d_v real) each on its own.
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int nt = 0; nt < DW / 8; ++nt)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
                    store_frag_pair(dkg, p.dk_row_stride, r0 + mi * 16 + g + 8 * hh, kc0 + nt * 8 + 2 * t, nrows, d,
                                    acc_dk[mi][nt][2 * hh] * scale, acc_dk[mi][nt][2 * hh + 1] * scale);
#pragma unroll
            for (int nt = 0; nt < DWV / 8; ++nt)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
                    store_frag_pair(dvg, p.dv_row_stride, r0 + mi * 16 + g + 8 * hh, vc0 + nt * 8 + 2 * t, nrows, d_v,
                                    acc_dv[mi][nt][2 * hh], acc_dv[mi][nt][2 * hh + 1]);
        }
    } else {
        // d_v is d and DWV is DW: dK and dV share the columns and the bounds tests.
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < DW / 8; ++nt) {
            const int col = kc0 + nt * 8 + 2 * t;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = r0 + mi * 16 + g + 8 * hh;
                if (r >= nrows || col >= d) continue;
                const float k0v = acc_dk[mi][nt][2 * hh] * scale, k1v = acc_dk[mi][nt][2 * hh + 1] * scale;
                const float v0v = acc_dv[mi][nt][2 * hh], v1v = acc_dv[mi][nt][2 * hh + 1];
                grad_t* kp = dkg + (i64)r * p.dk_row_stride + col;
                grad_t* vp = dvg + (i64)r * p.dv_row_stride + col;
#if ALIGNED16
                if (col + 1 < d) {
                    store_grad2(kp, k0v, k1v);
                    store_grad2(vp, v0v, v1v);
                    continue;
                }
#endif
                store_grad(kp, k0v);
                store_grad(vp, v0v);
                if (col + 1 < d) {
                    store_grad(kp + 1, k1v);
                    store_grad(vp + 1, v1v);
                }
            }
        }
    }
}

#if BWD_TILE2D
// Step kk (a k16 slice) of a product of the 2-D tiling: acc ACC[mi][2 np], ACC[mi][2 np + 1] (+)= A_mi B_np for the
// two 16-row tiles mi of A and NP 16-column tiles np of B. A_mi's fragments come by ldmatrix.x4 from A0 + mi * 16
// rows of A_ROW bytes + kk * 32, B_np's by B_LOAD (ldmatrix_x4 or ldmatrix_x4_trans) from B_ADDR, an expression of
// np and kk. A macro, not a function: template functions doing the same arithmetic (tried: the step, or only the
// loads of A) compiled to other cubins (the compiled code follows the order of the address arithmetic); the
// expansion is the code the loops had before, token for token.
#define BWD_2D_STEP(ACC, A0, A_ROW, NP, B_LOAD, B_ADDR)                 \
    u32 a[2][4];                                                         \
    ldmatrix_x4(a[0], A0 + kk * 32);                                     \
    ldmatrix_x4(a[1], A0 + 16 * A_ROW + kk * 32);                        \
    _Pragma("unroll") for (int np = 0; np < NP; ++np) {                  \
        u32 b[4];                                                        \
        B_LOAD(b, B_ADDR);                                               \
        _Pragma("unroll") for (int mi = 0; mi < 2; ++mi) {               \
            mma_16816<elem_t>(ACC[mi][2 * np], a[mi], b);                \
            mma_16816<elem_t>(ACC[mi][2 * np + 1], a[mi], b + 2);        \
        }                                                                \
    }
#endif

#if !BWD_TILE2D
// A product of the strip tiling over the k16 steps kk < KSTEPS that hold columns (kk < KK_END): the warp's 16 keys
// (A: ldmatrix.x4 into A_FRAG from A0 + kk * 32) against the BM queries (B_np: ldmatrix.x4 from B0 + np * 16 rows
// of B_ROW bytes + kk * 32), ACC[2 np], ACC[2 np + 1] += A B_np. A macro for the reason given at BWD_2D_STEP.
#define BWD_STRIP_PRODUCT(ACC, A_FRAG, A0, KSTEPS, KK_END, B0, B_ROW)       \
    _Pragma("unroll") for (int kk = 0; kk < KSTEPS; ++kk) {               \
        if (kk < KK_END) {                                                 \
            u32 A_FRAG[4];                                                 \
            ldmatrix_x4(A_FRAG, A0 + kk * 32);                             \
            _Pragma("unroll") for (int np = 0; np < BM / 16; ++np) {       \
                u32 b[4];                                                  \
                ldmatrix_x4(b, B0 + np * 16 * B_ROW + kk * 32);            \
                mma_16816<elem_t>(ACC[2 * np], A_FRAG, b);                 \
                mma_16816<elem_t>(ACC[2 * np + 1], A_FRAG, b + 2);         \
            }                                                              \
        }                                                                  \
    }
#endif

// ---------------------------------------------------------------- main kernel
// One kernel frame for both tilings (BWD_TILE2D picks one); the frame (CTA geometry, K/V and the query-block
// loads, the step's query head and block, the epilogue) is shared, the per-step work is each tiling's own.
#if BWD_TILE2D
// 2-D warp tiling (BWD_TILE2D: by default tile dims 96 and 128, and 256 on sm_90; see the top of the file).
// Per query block (BM queries) of the CTA's BN = 128 keys:
//   S^T = K Q^T, dP^T = V dO^T     warp (kw, qw): keys kw*32.., queries qw*NS..   (fragments via ldmatrix)
//   P^T, dS^T -> shared memory      (one 32-bit store per packed pair)
//   dQ += dS K                       warp (qrw, qcw): rows qrw*32.., columns qcw*QC.. -> f32 atomics
//   dV += P^T dO, dK += dS^T Q       warp (kw, dw): keys kw*32.., columns dw*DW..  (registers, whole CTA)
// Two __syncthreads per step: [A] after the cp.async wait (the next block's loads are issued right after it, into
// the buffer every warp finished with in the previous step), [B] after P^T/dS^T are stored.
#else
// 1-D strips: warp w owns the 16 keys of strip w % STRIPS (its S^T and dP^T rows for all BM queries) and columns
// [dpart * DW, + DW) of their dK (DWV of dV), dpart = w / STRIPS; dS^T goes through shared memory for dQ.
#endif
extern "C" __global__ void __launch_bounds__(bwd::NT, BWD_MINB) flash_bwd_main(const BwdParams p) {
    using namespace bwd;
    extern __shared__ __align__(128) unsigned char smem[];
    const FwdParams& f = p.fwd;
    const int nblk = blockIdx.x, kvh = blockIdx.y, bi = blockIdx.z;
    const SeqInfo si = seq_info(f, bi);
    const int n0 = nblk * BN;
    if (n0 >= si.sk_rows) return;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
#if BWD_TILE2D
    const int kw = warp % WK, qw = warp / WK;   // S^T tile; dK/dV tile uses (kw, dw = qw)
    const int dw = qw;
    const int qrw = warp % QROWW, qcw = warp / QROWW;
#else
    const int strip = warp % STRIPS, dpart = warp / STRIPS;
#endif
    const int d = f.d, d_v = value_dim(p);
    const int group = f.h / f.hk;

    MaskCtx mc;
    set_mask_ctx(mc, si.sq, si.sk, f);
    const int off = si.sk - si.sq;

    // Query blocks that see at least one key of [n0, min(n0 + BN, sk) - 1] (exact: every CTA counted by the
    // deterministic semaphore really processes the block).
    int m_lo, m_hi;
    bwd_q_blocks(mc, HAS_MASK != 0, n0, BN, BM, &m_lo, &m_hi);
    const int n_m = m_hi > m_lo ? m_hi - m_lo : 0;
    const int n_iter = n_m * group;

    const u32 sbase = smem_u32(smem);
    const u32 sK = sbase + OFF_K, sV = sbase + OFF_V;
#if BWD_TILE2D
    const u32 sQ = sbase + OFF_Q, sDO = sbase + OFF_DO, sP = sbase + OFF_P, sDS = sbase + OFF_DS;
#else
    const u32 sQ = sbase + OFF_Q, sDO = sbase + OFF_DO, sDS = sbase + OFF_DS;
#endif
    float* s_lse = (float*)(smem + OFF_LSE);
    float* s_dps = (float*)(smem + OFF_DP);

    const elem_t* kg = (const elem_t*)f.k + batch_off(f.k_batch_stride, bi) + (si.k_off_rows + n0) * f.k_row_stride + kvh * f.k_head_stride;
    const elem_t* vg = (const elem_t*)f.v + batch_off(f.v_batch_stride, bi) + (si.k_off_rows + n0) * f.v_row_stride + kvh * f.v_head_stride;

#if BWD_TILE2D
    float acc_dk[2][DW / 8][4], acc_dv[2][DWV / 8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) zero_dk_dv(acc_dk[mi], acc_dv[mi]);
#else
    float acc_dk[DW / 8][4], acc_dv[DWV / 8][4];
    zero_dk_dv(acc_dk, acc_dv);
#endif

    auto issue_q = [&](int it, int buf) {
        issue_q_loads(p, si, bi, kvh, group, m_lo, n_m, it, buf, sQ, sDO, s_lse, s_dps, d, d_v, tid);
    };

    // Prologue: K, V and the first query block.
    load_tile<BN>(sK, kg, f.k_row_stride, si.sk - n0, d, tid);
    load_tile<BN, HEAD_DIM_V>(sV, vg, f.v_row_stride, si.sk - n0, d_v, tid);
    if (n_iter > 0) issue_q(0, 0);
    cp_async_commit();

    const float scale = f.scale;
    const BwdScale sc = bwd_scale(f);

    // Lane-dependent ldmatrix offsets.
    // P1: A non-trans / B trans (row + (l & 15), col + (l >> 4) * 8);  P2: B non-trans / A trans.
    const int p1r = lane & 15, p1c = (lane >> 4) * 8;
    const int p2r = (lane & 7) + ((lane >> 4) << 3), p2c = ((lane >> 3) & 1) * 8;
#if BWD_TILE2D
    const u32 kA = sK + (kw * MS + p1r) * RD + p1c * 2;
    const u32 vA = sV + (kw * MS + p1r) * RDV + p1c * 2;
    const u32 pA = sP + (kw * MS + p1r) * RS + p1c * 2;
    const u32 dsAt = sDS + (kw * MS + p1r) * RS + p1c * 2;
    const u32 dsA = sDS + p2r * RS + (qrw * 32 + p2c) * 2;
    const u32 kBt = sK + p1r * RD + (qcw * QC + p1c) * 2;
    const int kk_end2 = (d + 31) / 32;
    const int kk_end2v = (d_v + 31) / 32;
    const u32 pst = (kw * MS + g) * RS + (qw * NS + 2 * t) * 2;  // P^T/dS^T store offset of c0/c1 of (0, 0)
#else
    const u32 kA = sK + (strip * 16 + p1r) * RD + p1c * 2;
    const u32 vA = sV + (strip * 16 + p1r) * RDV + p1c * 2;
    const int qrw = warp % QROWW, qcw = warp / QROWW;
    const u32 dsA = sDS + p2r * RS + (qrw * 16 + p2c) * 2;
    const u32 kBt = sK + p1r * RD + (qcw * QC + p1c) * 2;
    const int kk_end = (d + 15) / 16;
    const int kk_end_v = (d_v + 15) / 16;
#endif

    float sink_acc = 0.f;  // HAS_SINK: this warp's share of dsink for the current head (else unused)
    for (int it = 0; it < n_iter; ++it) {
#if BWD_TILE2D
        const int buf = QSTAGES == 2 ? (it & 1) : 0;
        cp_async_wait<0>();
        __syncthreads();  // [A]
        if (QSTAGES == 2 && it + 1 < n_iter) issue_q(it + 1, buf ^ 1);
        cp_async_commit();
#else
        const int buf = it & 1;
        if (it + 1 < n_iter) issue_q(it + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
#endif

        const int gi = it / n_m;
        const int mr = m_order(it, n_m);
        const int mb = m_lo + mr;
        const int m0 = mb * BM;
        const int head = kvh * group + gi;

#if BWD_TILE2D
        // ---- S^T = K Q^T and dP^T = V dO^T: 32 keys x NS queries per warp
        float acc_s[2][NS / 8][4], acc_dp[2][NS / 8][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int j = 0; j < NS / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[mi][j][e] = acc_dp[mi][j][e] = 0.f;
        {
            const u32 qB = sQ + buf * BM * RD + (qw * NS + p2r) * RD + p2c * 2;
            const u32 doB = sDO + buf * BM * RDV + (qw * NS + p2r) * RDV + p2c * 2;
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                if (kk / 2 >= kk_end2) break;  // 32-column granularity: bounds the compiler's load hoisting
                BWD_2D_STEP(acc_s, kA, RD, NS / 16, ldmatrix_x4, qB + np * 16 * RD + kk * 32)
            }
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM_V / 16; ++kk) {
                if (kk / 2 >= kk_end2v) break;  // the same granularity over HEAD_DIM_V
                BWD_2D_STEP(acc_dp, vA, RDV, NS / 16, ldmatrix_x4, doB + np * 16 * RDV + kk * 32)
            }
        }

        // ---- P = exp2(score * log2e - lse * log2e), dS = P * (dP - D); stored transposed ([key][query])
        {
            const float* lse_s = s_lse + buf * BM;
            const float* dps_s = s_dps + buf * BM;
            const int q_lo = m0 + qw * NS;
            const bool need_mask = (q_lo + NS > si.sq) || tile_needs_mask(mc, HAS_MASK != 0, q_lo, q_lo + NS - 1, n0 + kw * MS, MS);
            const float slope_log2 = alibi_slope_log2(f, bi, head);
            const float sink_l2 = sink_log2(f, head);
            const int krow0 = n0 + kw * MS + g;  // key index of c0/c1 of row tile 0 (c2/c3: + 8; row tile 1: + 16)
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int j = 0; j < NS / 8; ++j) {
                    float pdp[2];  // p_ds_frag's scratch
                    sink_acc += p_ds_frag(acc_s[mi][j], acc_dp[mi][j], mc, off, sc, slope_log2, sink_l2, lse_s, dps_s,
                                          m0, qw * NS + 8 * j + 2 * t, krow0 + 16 * mi, need_mask, p.exact_one_key, pdp);
                    const u32 o = pst + mi * 16 * RS + j * 16;
                    st_shared_u32(sP + o, DT::pack(acc_s[mi][j][0], acc_s[mi][j][1]));
                    st_shared_u32(sP + o + 8 * RS, DT::pack(acc_s[mi][j][2], acc_s[mi][j][3]));
                    st_shared_u32(sDS + o, DT::pack(acc_dp[mi][j][0], acc_dp[mi][j][1]));
                    st_shared_u32(sDS + o + 8 * RS, DT::pack(acc_dp[mi][j][2], acc_dp[mi][j][3]));
                }
            }
        }
#if HAS_SINK
        // The last step of this head: every warp hands in its sum (each S^T element has one warp).
        if ((it + 1) % n_m == 0) {
            sink_flush(p, bi, head, nblk, warp, sink_acc);
            sink_acc = 0.f;
        }
#endif
        __syncthreads();  // [B] P^T, dS^T complete

        // ---- dQ(BM x HEAD_DIM) += dS K: warp (qrw, qcw) owns rows qrw*32.. and columns qcw*QC.., done in column
        // chunks of QCH (d > 128: 32 columns, keeps the f32 chunk small next to the 128 dK/dV accumulators)
        {
#if DETERMINISTIC
            const int nmb = (f.sq + BM - 1) / BM;
            int* sem = p.dq_semaphore + (i64)(bi * f.h + head) * nmb + mb;
            const int n_first = bwd_first_k_block(mc, HAS_MASK != 0, m0, BN);
#endif
            const i64 rstep8 = (i64)8 * f.h * HEAD_DIM;
#pragma unroll
            for (int c0 = 0; c0 < QC; c0 += QCH) {
                constexpr int CW = QCH;  // columns of this chunk (QC % QCH == 0)
                float acc_dq[2][CW / 8][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                    for (int i = 0; i < CW / 8; ++i)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc_dq[mi][i][e] = 0.f;
                if (QCH == QC || qcw * QC + c0 < d) {  // (no guard for a single chunk: as before)
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk) {
                        u32 a[2][4];
                        ldmatrix_x4_trans(a[0], dsA + kk * 16 * RS);
                        ldmatrix_x4_trans(a[1], dsA + kk * 16 * RS + 32);
#pragma unroll
                        for (int np = 0; np < CW / 16; ++np) {
                            u32 b[4];
                            ldmatrix_x4_trans(b, kBt + kk * 16 * RD + (c0 / 16 + np) * 32);
#pragma unroll
                            for (int mi = 0; mi < 2; ++mi) {
                                mma_16816<elem_t>(acc_dq[mi][2 * np], a[mi], b);
                                mma_16816<elem_t>(acc_dq[mi][2 * np + 1], a[mi], b + 2);
                            }
                        }
                        if (CW % 16) {
                            u32 b[2];
                            ldmatrix_x2_trans(b, kBt + kk * 16 * RD + (c0 + (CW / 16) * 16) * 2);
#pragma unroll
                            for (int mi = 0; mi < 2; ++mi) mma_16816<elem_t>(acc_dq[mi][CW / 8 - 1], a[mi], b);
                        }
                    }
                }
#if DETERMINISTIC
                if (c0 == 0) {
                    if (tid == 0) {
                        const int want = nblk - n_first;
                        while (ld_acquire_gpu(sem) != want) { __nanosleep(64); }
                    }
                    __syncthreads();
                }
#endif
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    const int qrow = m0 + qrw * 32 + mi * 16 + g;
                    float* dqa = p.dq_accum + ((i64)si.q_row0 + qrow) * f.h * HEAD_DIM + head * HEAD_DIM + qcw * QC + c0 + 2 * t;
#pragma unroll
                    for (int nt = 0; nt < CW / 8; ++nt) {
                        if (qcw * QC + c0 + nt * 8 < d)
                            red_add_frag(dqa + nt * 8, rstep8, acc_dq[mi][nt], qrow < si.sq, qrow + 8 < si.sq);
                    }
                }
            }
#if DETERMINISTIC
            __threadfence();
            __syncthreads();
            if (tid == 0) st_release_gpu(sem, nblk - n_first + 1);
#endif
        }

        // ---- dV += P^T dO, dK += dS^T Q (k = the BM queries; B operands read transposed from [query][d] tiles)
        {
            const u32 doBt = sDO + buf * BM * RDV + p1r * RDV + (dw * DWV + p1c) * 2;
            const u32 qBt = sQ + buf * BM * RD + p1r * RD + (dw * DW + p1c) * 2;
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                BWD_2D_STEP(acc_dv, pA, RS, DWV / 16, ldmatrix_x4_trans, doBt + kk * 16 * RDV + np * 32)
            }
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                BWD_2D_STEP(acc_dk, dsAt, RS, DW / 16, ldmatrix_x4_trans, qBt + kk * 16 * RD + np * 32)
            }
        }
        if (QSTAGES == 1) {
            __syncthreads();  // every warp is done with the single Q/dO buffer and P^T/dS^T
            if (it + 1 < n_iter) issue_q(it + 1, 0);
            cp_async_commit();
        }
#else
        // ---- S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries
        float acc_s[BM / 8][4], acc_dp[BM / 8][4];
#pragma unroll
        for (int j = 0; j < BM / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[j][e] = acc_dp[j][e] = 0.f;
        {
            const u32 qB = sQ + buf * BM * RD + p2r * RD + p2c * 2;
            const u32 doB = sDO + buf * BM * RDV + p2r * RDV + p2c * 2;
            if constexpr (!HAS_DV) {
                // One loop over the shared head dim (kk_end_v == kk_end: d_v is d).
#pragma unroll
                for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                    if (kk < kk_end) {
                        u32 a[4], av[4];
                        ldmatrix_x4(a, kA + kk * 32);
                        ldmatrix_x4(av, vA + kk * 32);
#pragma unroll
                        for (int np = 0; np < BM / 16; ++np) {
                            mma_slab<elem_t, 1, false>(&acc_s, &a, qB + np * 16 * RD + kk * 32, 2 * np);
                            mma_slab<elem_t, 1, false>(&acc_dp, &av, doB + np * 16 * RDV + kk * 32, 2 * np);
                        }
                    }
                }
            } else {
                // S^T over HEAD_DIM, then dP^T over HEAD_DIM_V.
                BWD_STRIP_PRODUCT(acc_s, a, kA, HEAD_DIM / 16, kk_end, qB, RD)
                BWD_STRIP_PRODUCT(acc_dp, av, vA, HEAD_DIM_V / 16, kk_end_v, doB, RDV)
            }
        }

        // ---- P = exp2(score * log2e - lse * log2e), dS = P * (dP - D) (* softcap derivative)
        {
            const float* lse_s = s_lse + buf * BM;
            const float* dps_s = s_dps + buf * BM;
            bool need_mask = (m0 + BM > si.sq) || tile_needs_mask(mc, HAS_MASK != 0, m0, m0 + BM - 1, n0 + strip * 16, 16);
            const float slope_log2 = alibi_slope_log2(f, bi, head);
            const int krow0 = n0 + strip * 16 + g;  // key index of c0/c1 (c2/c3: + 8)
            const float sink_l2 = sink_log2(f, head);
#pragma unroll
            for (int j = 0; j < BM / 8; ++j) {
                float pdp[2];  // p_ds_frag's scratch
                sink_acc += p_ds_frag(acc_s[j], acc_dp[j], mc, off, sc, slope_log2, sink_l2, lse_s, dps_s, m0,
                                      8 * j + 2 * t, krow0, need_mask, p.exact_one_key, pdp);
            }
        }
#if HAS_SINK
        // The last step of this head: the warps of dpart 0 hand in their sums (the others recompute the same
        // elements for their dK/dV columns).
        if ((it + 1) % n_m == 0) {
            if (dpart == 0) sink_flush(p, bi, head, nblk, warp, sink_acc);
            sink_acc = 0.f;
        }
#endif

        // ---- pack P^T and dS^T as A fragments (k = queries)
        u32 pa[BM / 16][4], dsa[BM / 16][4];
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            pa[kk][0] = DT::pack(acc_s[2 * kk][0], acc_s[2 * kk][1]);
            pa[kk][1] = DT::pack(acc_s[2 * kk][2], acc_s[2 * kk][3]);
            pa[kk][2] = DT::pack(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
            pa[kk][3] = DT::pack(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
            dsa[kk][0] = DT::pack(acc_dp[2 * kk][0], acc_dp[2 * kk][1]);
            dsa[kk][1] = DT::pack(acc_dp[2 * kk][2], acc_dp[2 * kk][3]);
            dsa[kk][2] = DT::pack(acc_dp[2 * kk + 1][0], acc_dp[2 * kk + 1][1]);
            dsa[kk][3] = DT::pack(acc_dp[2 * kk + 1][2], acc_dp[2 * kk + 1][3]);
        }

        // ---- dS^T to shared memory for dQ (one warp per strip writes it)
        if (dpart == 0) {
            const u32 row_a = sDS + (strip * 16 + g) * RS + 4 * t;
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                st_shared_u32(row_a + kk * 32, dsa[kk][0]);
                st_shared_u32(row_a + 8 * RS + kk * 32, dsa[kk][1]);
                st_shared_u32(row_a + kk * 32 + 16, dsa[kk][2]);
                st_shared_u32(row_a + 8 * RS + kk * 32 + 16, dsa[kk][3]);
            }
        }

        // ---- dV += P^T dO, dK += dS^T Q   (B operands: [queries][HEAD_DIM_V] / [queries][HEAD_DIM] tiles read
        // transposed)
        {
            const u32 doBt = sDO + buf * BM * RDV + p1r * RDV + (dpart * DWV + p1c) * 2;
            const u32 qBt = sQ + buf * BM * RD + p1r * RD + (dpart * DW + p1c) * 2;
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < (DW > DWV ? DW : DWV) / 16; ++np) {
                    u32 b[4];
                    if (np < DWV / 16) {
                        ldmatrix_x4_trans(b, doBt + kk * 16 * RDV + np * 32);
                        mma_16816<elem_t>(acc_dv[2 * np], pa[kk], b);
                        mma_16816<elem_t>(acc_dv[2 * np + 1], pa[kk], b + 2);
                    }
                    if (np < DW / 16) {
                        ldmatrix_x4_trans(b, qBt + kk * 16 * RD + np * 32);
                        mma_16816<elem_t>(acc_dk[2 * np], dsa[kk], b);
                        mma_16816<elem_t>(acc_dk[2 * np + 1], dsa[kk], b + 2);
                    }
                }
            }
        }
        __syncthreads();  // dS^T complete; every warp is done with this Q/dO buffer

        // ---- dQ(BM x HEAD_DIM) += dS K: warp (qrw, qcw) owns rows qrw*16.. and columns qcw*QC..
        {
            float acc_dq[QC / 8][4];
#pragma unroll
            for (int i = 0; i < QC / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_dq[i][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32 a[4];
                ldmatrix_x4_trans(a, dsA + kk * 16 * RS);
#pragma unroll
                for (int np = 0; np < QC / 16; ++np) mma_slab<elem_t, 1, true>(&acc_dq, &a, kBt + kk * 16 * RD + np * 32, 2 * np);
                if (QC % 16) {
                    u32 b[2];
                    ldmatrix_x2_trans(b, kBt + kk * 16 * RD + (QC / 16) * 32);
                    mma_16816<elem_t>(acc_dq[QC / 8 - 1], a, b);
                }
            }

#if DETERMINISTIC
            const int nmb = (f.sq + BM - 1) / BM;
            int* sem = p.dq_semaphore + (i64)(bi * f.h + head) * nmb + mb;
            const int n_first = bwd_first_k_block(mc, HAS_MASK != 0, m0, BN);
            if (tid == 0) {
                const int want = nblk - n_first;
                while (ld_acquire_gpu(sem) != want) { __nanosleep(64); }
            }
            __syncthreads();
#endif
            const int qrow = m0 + qrw * 16 + g;
            float* dqa = p.dq_accum + ((i64)si.q_row0 + qrow) * f.h * HEAD_DIM + head * HEAD_DIM + qcw * QC + 2 * t;
            const i64 rstep8 = (i64)8 * f.h * HEAD_DIM;
#pragma unroll
            for (int nt = 0; nt < QC / 8; ++nt) {
                if (qcw * QC + nt * 8 < d) red_add_frag(dqa + nt * 8, rstep8, acc_dq[nt], qrow < si.sq, qrow + 8 < si.sq);
            }
#if DETERMINISTIC
            __threadfence();
            __syncthreads();
            if (tid == 0) st_release_gpu(sem, nblk - n_first + 1);
#endif
        }
#endif
    }
    cp_async_wait<0>();

    // ---- epilogue: dK = scale * acc_dk, dV = acc_dv, straight from the fragments
    {
#if BWD_TILE2D
        store_dk_dv<2>(p, si, bi, kvh, n0, acc_dk, acc_dv, kw * MS, dw * DW, dw * DWV, d, d_v, scale, g, t);
#else
        store_dk_dv<1>(p, si, bi, kvh, n0, &acc_dk, &acc_dv, strip * 16, dpart * DW, dpart * DWV, d, d_v, scale, g, t);
#endif
    }
}
