// KV-cache attention on the GPU: in-place append (with rotary) and split-KV attention straight from the
// (paged) cache, with the query heads of one key/value head folded into the query tile (GQA read once).
//
// Entry points (all take `const KvParams p` by value; the Rust mirror is `src/cuda/kvcache.rs`):
//   kv_append   grid (ceil(rows / KV_APPEND_WARPS), b), KV_APPEND_WARPS * 32 threads, no shared memory.
//               rows = 2 * s_new * hk (+ sq * h with rotary): one warp per row. Writes k_new (rotated) and
//               v_new into the cache at positions cache_seqlens[i] + t, and the rotated q into q_rot.
//               Every block first checks every sequence: if any append would overflow its capacity (or a
//               cache_seqlens / cache_leftpad / cache_batch_idx value is out of range), no block writes
//               anything and bit 1 is set in *status. A page index out of range skips that row (bit 2).
//   kv_attn     grid (num_splits, m_blocks, b * hk), KV_THREADS threads, KV_SMEM_BYTES dynamic shared memory.
//               Query tile = 16 rows of the folded (token, head-in-group) index r = t * group + g. Each
//               warp streams its own 16-key blocks (blocks w, w + NW, ... of the CTA's split) through a
//               STAGES-deep cp.async ring, so the main loop has no block-wide barrier; the warps' partial
//               (m, l, O) are merged through shared memory at the end. num_splits == 1: o and lse are
//               written directly; else f32 partial O (normalised) and its LSE go to o_part / lse_part.
//   kv_combine  grid (b * h * sq), 128 threads, KV_COMBINE_SMEM dynamic shared memory: one block per
//               output row merges the splits (<= 128):
//               m = max lse_s, w_s = exp(lse_s - m), o = sum w_s o_s / sum w_s, lse = m + log(sum w_s)
//               (every lse_s = -inf: o = 0, lse = -inf).
// Every kernel returns before writing anything when *status != 0 (the call was refused; the caller reads and
// clears it).
//
// Compile-time macros: HEAD_DIM (32..256, multiple of 32; p.d <= HEAD_DIM), IS_BF16, HAS_MASK, HAS_ALIBI,
// HAS_SOFTCAP, ALIGNED16 (q or q_rot and both caches have 16-byte aligned bases and strides that are
// multiples of 8 elements: 16-byte cp.async; else element-wise loads), KV_WARPS [4], KV_STAGES [3, 2 for
// HEAD_DIM > 128].
#include "common.cuh"
#include "mask.cuh"

#include "variant.cuh"
#ifndef KV_WARPS
#define KV_WARPS 4
#endif
#ifndef KV_STAGES
#if HEAD_DIM > 128
#define KV_STAGES 2
#else
#define KV_STAGES 3
#endif
#endif
#define KV_APPEND_WARPS 4
#define KV_COMBINE_THREADS 128
#define KV_MAX_SPLITS 128
// kv_combine's thread layout: COMB_CT threads (a power of two) along the HEAD_DIM / 4 float4 columns of a row,
// COMB_SG split groups, COMB_CPT float4 columns per thread (the last may lie past HEAD_DIM), COMB_U loads in
// flight per column.
#define COMB_C4 (HEAD_DIM / 4)
#define COMB_CT (COMB_C4 >= 32 ? 32 : COMB_C4 >= 16 ? 16 : 8)
#define COMB_SG (KV_COMBINE_THREADS / COMB_CT)
#define COMB_CPT ((COMB_C4 + COMB_CT - 1) / COMB_CT)
#define COMB_U 8
// Split weights, the block's partial reductions, the split groups' column sums (the Rust launcher mirrors it:
// src/cuda/kvcache.rs combine_smem).
#define KV_COMBINE_SMEM ((KV_MAX_SPLITS + KV_COMBINE_THREADS / 32 + COMB_SG * HEAD_DIM) * 4)
// L2 prefetch size hint of the K/V copies (0, 64, 128 or 256 bytes): none by default. With the swizzled rows the
// 256-byte hint was within 0.5% on the H100 and cost 6-8% KV bandwidth at the large decode points on the H200
// (its extra sectors: 168 M L2 reads for 134 M of data at (8, 128k)); docs/notes/cuda-decode.md.
#ifndef KV_L2_PREFETCH
#define KV_L2_PREFETCH 0
#endif
#define KV_THREADS (32 * KV_WARPS)
// Shared-memory rows of the Q/K/V tiles. Head dims that are multiples of 64 use unpadded rows with the 16-byte
// chunks XOR-swizzled within 128-byte groups (chunk c of row r at c ^ (r & 7)), so every 128-byte global line
// lands in one 128-byte group of shared memory; others keep one spare chunk per row (padded). Measured on the
// H100 (ncu, b 8, 128k keys, d 128): the padded 272-byte rows made each cp.async warp instruction fetch 24 L2
// sectors instead of 16 (1.5x the L2 read lookups of the bytes read, a 35% L2 "hit" rate), cuDNN/FA2 fetch 16.
#define KV_SWIZZLE (HEAD_DIM % 64 == 0)
#if KV_SWIZZLE
#define KV_ROW_BYTES (HEAD_DIM * 2)
#else
#define KV_ROW_BYTES ((HEAD_DIM / 8 + 1) * 16)
#endif
// Q tile (16 rows) + per warp STAGES x (K 16 rows + V 16 rows) + per warp row maxima and sums (16 + 16 f32).
#define KV_SMEM_BYTES (16 * KV_ROW_BYTES + KV_WARPS * KV_STAGES * 32 * KV_ROW_BYTES + KV_WARPS * 32 * 4)


typedef long long i64;

// Strides are in elements; the last dimension of every tensor is contiguous. Pointers and 64-bit fields
// first, then 32-bit fields (the Rust mirror relies on this order).
struct KvParams {
    const void* q;            // [b, sq, h, d]
    void* k_cache;            // unpaged [b_cache, s_cache, hk, d]; paged [num_pages, page_size, hk, d]
    void* v_cache;
    const void* k_new;        // [b, s_new, hk, d] or nullptr
    const void* v_new;
    void* o;                  // [b, sq, h, d]
    float* lse;               // [b, h, sq] contiguous
    const int* cache_seqlens; // [b] or nullptr (then seqlen_all)
    const int* block_table;   // [b, max_pages] (row stride bt_stride) or nullptr (unpaged)
    const int* cache_batch_idx;  // [b] or nullptr
    const int* cache_leftpad;    // [b] or nullptr
    const float* rot_cos;     // [s_ro, rot_half] (row stride rot_stride) or nullptr
    const float* rot_sin;
    const float* alibi;       // [h] or [b, h] or nullptr
    void* q_rot;              // workspace [b, sq, h, HEAD_DIM] (rotated q) when rot_cos != nullptr
    float* o_part;            // workspace [num_splits, b * h * sq, HEAD_DIM] f32
    float* lse_part;          // workspace [num_splits, b * h * sq] f32
    int* status;              // workspace, 0 = fine; see the header
    i64 q_batch_stride, q_row_stride, q_head_stride;
    i64 kc_batch_stride, kc_row_stride, kc_head_stride;   // batch stride = page stride when paged
    i64 vc_batch_stride, vc_row_stride, vc_head_stride;
    i64 kn_batch_stride, kn_row_stride, kn_head_stride;
    i64 vn_batch_stride, vn_row_stride, vn_head_stride;
    i64 o_batch_stride, o_row_stride, o_head_stride;
    i64 bt_stride;
    i64 rot_stride;
    i64 alibi_batch_stride;   // 0 for [h], h for [b, h]
    int b, h, hk, sq, s_new, d;
    int seqlen_all;           // cache_seqlens when the pointer is null
    int capacity;             // positions per sequence: s_cache, or max_pages * page_size
    int cache_rows;           // b_cache (unpaged) or num_pages (paged)
    int page_size;            // 0 = unpaged
    int max_pages;
    int rot_half;             // rot / 2 (0 = no rotary)
    int rot_rows;             // s_ro
    int rot_interleaved;
    int rot_q_per_token;      // 1: query t rotated at position n + t (causal / window); 0: at n
    int num_splits;
    float scale;
    float softcap;
    int window_left, window_right;   // -1 = unbounded (HAS_MASK)
};

namespace kv {
constexpr int D = HEAD_DIM;
constexpr int NW = KV_WARPS;
constexpr int NT = KV_THREADS;
constexpr int ST = KV_STAGES;
constexpr int CHUNKS = D / 8;
constexpr int DTILES = D / 8;
constexpr int RB = KV_ROW_BYTES;
static_assert(D % 32 == 0, "HEAD_DIM must be a multiple of 32");
// Byte offset of 16-byte chunk c of row r in a Q/K/V tile (see KV_SWIZZLE).
FA_DEVICE u32 chunk_at(int r, int c) {
#if KV_SWIZZLE
    return (u32)(r * RB + ((c ^ (r & 7)) << 4));
#else
    return (u32)(r * RB + (c << 4));
#endif
}
// An ldmatrix lane's row in a tile: chunk 2k + hi of row `row` is at lane_at(l, k). Swizzled, chunk
// (2k + hi) ^ x (x = row & 7) = 2 (k ^ (x >> 1)) + (hi ^ (x & 1)); padded, 2k + hi (xs = 0 folds away).
struct LaneRow {
    u32 base;
    int xs;
};
FA_DEVICE LaneRow lane_row(int row, int hi) {
#if KV_SWIZZLE
    const int x = row & 7;
    return {(u32)(row * RB + ((hi ^ (x & 1)) << 4)), x >> 1};
#else
    return {(u32)(row * RB + (hi << 4)), 0};
#endif
}
FA_DEVICE u32 lane_at(LaneRow l, int k) { return l.base + ((u32)(k ^ l.xs) << 5); }
static_assert(ST >= 2, "KV_STAGES >= 2");

FA_DEVICE int seqlen_of(const KvParams& p, int i) { return p.cache_seqlens ? p.cache_seqlens[i] : p.seqlen_all; }
FA_DEVICE int leftpad_of(const KvParams& p, int i) { return p.cache_leftpad ? p.cache_leftpad[i] : 0; }

// Location of absolute position `pos` of sequence i in a cache: outer index (cache row, or page) and row
// inside it. False when the page index is out of range.
FA_DEVICE bool cache_loc(const KvParams& p, int i, int pos, int* outer, int* inner) {
    if (p.page_size > 0) {
        const int page = p.block_table[(i64)i * p.bt_stride + pos / p.page_size];
        *outer = page;
        *inner = pos % p.page_size;
        return page >= 0 && page < p.cache_rows;
    }
    *outer = p.cache_batch_idx ? p.cache_batch_idx[i] : i;
    *inner = pos;
    return true;
}

// A 32-bit global load kept where it is written (inline asm volatile): independent loads of a kernel's
// prologue then go out together instead of each waiting behind the branch before it.
FA_DEVICE int ld_now(const int* a) {
    int v;
    asm volatile("ld.global.s32 %0, [%1];" : "=r"(v) : "l"(a));
    return v;
}

// Whether sequence i's arguments are in range (what the host validation also checks), given its cache length n
// and left padding lp.
FA_DEVICE bool seq_ok(const KvParams& p, int i, int n, int lp) {
    if (n < 0 || (long long)n + p.s_new > p.capacity) return false;
    if (lp < 0 || lp > n) return false;
    if (p.page_size == 0 && p.cache_batch_idx) {
        const int r = p.cache_batch_idx[i];
        if (r < 0 || r >= p.cache_rows) return false;
    }
    if (p.rot_half > 0) {
        const int rows = p.rot_q_per_token ? max(p.s_new, p.sq) : p.s_new;
        if ((long long)n + rows > p.rot_rows) return false;
    }
    return true;
}
FA_DEVICE bool seq_ok(const KvParams& p, int i) { return seq_ok(p, i, seqlen_of(p, i), leftpad_of(p, i)); }

// cp.async of 16 bytes (zero-filled past src_bytes) with the optional L2 prefetch hint.
FA_DEVICE void kv_cp_async(u32 sa, const void* g, int src_bytes) {
#if KV_L2_PREFETCH == 256
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(src_bytes));
#elif KV_L2_PREFETCH == 128
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(src_bytes));
#elif KV_L2_PREFETCH == 64
    asm volatile("cp.async.cg.shared.global.L2::64B [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(src_bytes));
#else
    cp_async_16(sa, g, src_bytes);
#endif
}

// One row of d elements (lane-strided), optionally rotated at table row `pos`, written to dst. The rotation
// is computed without fused multiply-adds, in the same order as the host (bit-identical results).
FA_DEVICE void copy_row(const KvParams& p, const u16* src, u16* dst, int pos, bool rotate, int lane) {
    const int half = p.rot_half;
    for (int e = lane; e < p.d; e += 32) {
        float y;
        if (rotate && e < 2 * half) {
            int a, bb, kk;
            if (p.rot_interleaved) { kk = e >> 1; a = 2 * kk; bb = a + 1; }
            else { kk = e < half ? e : e - half; a = kk; bb = kk + half; }
            const float x1 = Dt<elem_t>::to_f32(src[a]);
            const float x2 = Dt<elem_t>::to_f32(src[bb]);
            const float c = p.rot_cos[(i64)pos * p.rot_stride + kk];
            const float s = p.rot_sin[(i64)pos * p.rot_stride + kk];
            y = (e == a) ? __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)) : __fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c));
        } else {
            y = Dt<elem_t>::to_f32(src[e]);
        }
        dst[e] = Dt<elem_t>::from_f32(y);
    }
}
}  // namespace kv

extern "C" __global__ void __launch_bounds__(KV_APPEND_WARPS * 32) kv_append(const KvParams p) {
    using namespace kv;
    if (*p.status != 0) return;
    // Every block checks every sequence, so an overflow anywhere means nothing is written anywhere.
    bool bad = false;
    for (int i = threadIdx.x; i < p.b; i += blockDim.x) bad |= !seq_ok(p, i);
    if (__syncthreads_or(bad)) {
        if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) atomicOr(p.status, 1);
        return;
    }
    const int i = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * KV_APPEND_WARPS + warp;
    const int rk = p.s_new * p.hk;
    const int n = seqlen_of(p, i);
    const bool rot = p.rot_half > 0;
    if (r < 2 * rk) {
        const bool is_k = r < rk;
        const int rr = is_k ? r : r - rk;
        const int t = rr / p.hk, kh = rr % p.hk;
        const int pos = n + t;
        const u16* src = is_k ? (const u16*)p.k_new + (i64)i * p.kn_batch_stride + (i64)t * p.kn_row_stride + (i64)kh * p.kn_head_stride
                              : (const u16*)p.v_new + (i64)i * p.vn_batch_stride + (i64)t * p.vn_row_stride + (i64)kh * p.vn_head_stride;
        int outer, inner;
        if (!cache_loc(p, i, pos, &outer, &inner)) {
            if (lane == 0) atomicOr(p.status, 2);
            return;
        }
        u16* dst = is_k ? (u16*)p.k_cache + (i64)outer * p.kc_batch_stride + (i64)inner * p.kc_row_stride + (i64)kh * p.kc_head_stride
                        : (u16*)p.v_cache + (i64)outer * p.vc_batch_stride + (i64)inner * p.vc_row_stride + (i64)kh * p.vc_head_stride;
        copy_row(p, src, dst, pos, is_k && rot, lane);
    } else if (rot && r < 2 * rk + p.sq * p.h) {
        const int rr = r - 2 * rk;
        const int t = rr / p.h, hh = rr % p.h;
        const int pos = p.rot_q_per_token ? n + t : n;
        const u16* src = (const u16*)p.q + (i64)i * p.q_batch_stride + (i64)t * p.q_row_stride + (i64)hh * p.q_head_stride;
        u16* dst = (u16*)p.q_rot + (((i64)i * p.sq + t) * p.h + hh) * D;
        copy_row(p, src, dst, pos, true, lane);
    }
}

namespace kv {
// Issues the loads of one 16-row tile (rows >= rows_valid and columns >= d zero-filled) of a warp into
// padded shared memory at s_base. Lane r (< 16) holds the global address of row r in `my_row` (nullptr: a
// bad page, zero-filled); the other lanes get it by shuffle. `dummy` is any valid address.
FA_DEVICE void load_rows16(u32 s_base, const u16* my_row, int rows_valid, int d, int lane, const u16* dummy) {
    constexpr int TOTAL = 16 * CHUNKS;
    static_assert(TOTAL % 32 == 0, "whole warps");
#pragma unroll
    for (int it = 0; it < TOTAL / 32; ++it) {
        const int idx = it * 32 + lane;
        const int r = idx / CHUNKS, c = idx % CHUNKS;
        const int col = c * 8;
        const u32 sa = s_base + chunk_at(r, c);
        const u16* src = (const u16*)__shfl_sync(0xffffffffu, (unsigned long long)my_row, r);
        const bool ok = r < rows_valid && col < d && src != nullptr;
#if ALIGNED16
        kv_cp_async(sa, ok ? (const void*)(src + col) : (const void*)dummy, ok ? min(16, (d - col) * 2) : 0);
#else
        u32 w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const u32 lo = (ok && col + 2 * e < d) ? (u32)src[col + 2 * e] : 0u;
            const u32 hi = (ok && col + 2 * e + 1 < d) ? (u32)src[col + 2 * e + 1] : 0u;
            w[e] = lo | (hi << 16);
        }
        st_shared_v4(sa, make_uint4(w[0], w[1], w[2], w[3]));
#endif
    }
}
}  // namespace kv

extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_attn(const KvParams p) {
    using namespace kv;
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int split = blockIdx.x;
    const int mb = blockIdx.y;
    const int bi = blockIdx.z / p.hk;
    const int kvh = blockIdx.z % p.hk;
    // The refusal word and this sequence's cache length and left padding, loaded together: one round trip to
    // memory before the K/V loads can start, not three (docs/notes/cuda-decode.md, item 15).
    const int status = ld_now(p.status);
    const int n = p.cache_seqlens ? ld_now(p.cache_seqlens + bi) : p.seqlen_all;
    const int lp = p.cache_leftpad ? ld_now(p.cache_leftpad + bi) : 0;
    if (status != 0) return;
    const int group = p.h / p.hk;
    const int M = p.sq * group;
    const int r0 = mb * 16;
    if (r0 >= M) return;
    const int rows_valid = min(16, M - r0);
    const int d = p.d;

    if (!seq_ok(p, bi, n, lp)) {
        if (tid == 0) atomicOr(p.status, 1);
        return;
    }
    const int sk = n + p.s_new - lp;  // keys this sequence attends to
    const int sq = p.sq;

    const u32 sQ = smem_u32(smem);
    const u32 sRing = sQ + 16 * RB + warp * (ST * 32 * RB);
    float* s_ml = (float*)(smem + 16 * RB + NW * ST * 32 * RB);  // [NW][2][16]: m, l

    // ---- Q tile: row r -> token t = r / group, head qh = kvh * group + r % group.
    const bool use_rot = p.rot_half > 0;
    const u16* qbase = use_rot ? (const u16*)p.q_rot : (const u16*)p.q;
    const i64 qbs = use_rot ? (i64)sq * p.h * D : p.q_batch_stride;
    const i64 qrs = use_rot ? (i64)p.h * D : p.q_row_stride;
    const i64 qhs = use_rot ? (i64)D : p.q_head_stride;
    {
        // Every warp loads a quarter of the rows (as 16-row tiles of one warp do): reuse the warp loader.
        if (warp == 0) {
            const int rr = r0 + (lane & 15);
            const u16* qrow = qbase + (i64)bi * qbs + (i64)(rr / group) * qrs + (i64)(kvh * group + rr % group) * qhs;
            load_rows16(sQ, qrow, rows_valid, d, lane, qbase);
        }
        cp_async_commit();
    }

    // ---- key blocks of 16 visible to some row of this tile, then this split's share.
    MaskCtx mc;
    mc.sq = sq;
    mc.sk = sk;
#if HAS_MASK
    mc.wl = p.window_left;
    mc.wr = p.window_right;
#else
    mc.wl = -1;
    mc.wr = -1;
#endif
    const int t_lo = r0 / group, t_hi = (r0 + rows_valid - 1) / group;
    int nb_lo, nb_hi;
    kv_block_range(mc, HAS_MASK != 0, t_lo, t_hi, 16, &nb_lo, &nb_hi);
    if (nb_hi < nb_lo) nb_hi = nb_lo;
    const int nblocks = nb_hi - nb_lo;
    const int per_split = (nblocks + p.num_splits - 1) / p.num_splits;
    const int b_begin = nb_lo + min(nblocks, split * per_split);
    const int b_end = nb_lo + min(nblocks, (split + 1) * per_split);
    // This warp's blocks: b_begin + warp, + NW, ...
    const int my_n = b_begin + warp < b_end ? (b_end - b_begin - warp + NW - 1) / NW : 0;

    const u16* kc = (const u16*)p.k_cache + (i64)kvh * p.kc_head_stride;
    const u16* vc = (const u16*)p.v_cache + (i64)kvh * p.vc_head_stride;
    auto issue = [&](int it) {
        if (it < my_n) {
            const int blk = b_begin + warp + it * NW;
            const int j0 = blk * 16;
            const u32 sK = sRing + (it % ST) * 32 * RB;
            const u32 sV = sK + 16 * RB;
            const int r = lane & 15;
            const u16* krow = nullptr;
            const u16* vrow = nullptr;
            int outer, inner;
            if (j0 + r < sk) {
                if (cache_loc(p, bi, lp + j0 + r, &outer, &inner)) {
                    krow = kc + (i64)outer * p.kc_batch_stride + (i64)inner * p.kc_row_stride;
                    vrow = vc + (i64)outer * p.vc_batch_stride + (i64)inner * p.vc_row_stride;
                } else if (lane < 16) {
                    atomicOr(p.status, 2);
                }
            }
            load_rows16(sK, krow, sk - j0, d, lane, kc);
            load_rows16(sV, vrow, sk - j0, d, lane, vc);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < ST - 1; ++s) issue(s);

    // Scores in log2 units: p = exp2(s * c - m * c).
#if HAS_SOFTCAP || HAS_ALIBI
    const float c = FA_LOG2E;
#else
    const float c = p.scale * FA_LOG2E;
#endif
#if HAS_SOFTCAP
    const float inv_softcap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
#endif
    // Rows of this thread: g and g + 8 of the tile.
    int row_t[2];
    float slope[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int rr = r0 + g + hh * 8;
        row_t[hh] = rr / group;
        slope[hh] = 0.f;
#if HAS_ALIBI
        if (rr < M) slope[hh] = p.alibi[(i64)bi * p.alibi_batch_stride + kvh * group + rr % group];
#endif
    }
    (void)slope;
    const int off = sk - sq;

    float acc[DTILES][4];
#pragma unroll
    for (int dt = 0; dt < DTILES; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dt][e] = 0.f;
    float row_m[2] = {FA_NEG_INF, FA_NEG_INF}, row_l[2] = {0.f, 0.f};

    // Q visible to every warp.
    cp_async_wait<ST - 1>();
    __syncthreads();
    // ldmatrix rows and chunks of this lane: Q and V (x4, trans for V) rows lane & 15, chunk 2k + lane / 16;
    // K rows (lane & 7) + 8 (lane / 16), chunk 2k + (lane / 8) & 1.
    const LaneRow qv_lane = lane_row(lane & 15, lane >> 4);
    const LaneRow k_lane = lane_row((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);

    for (int it = 0; it < my_n; ++it) {
        cp_async_wait<ST - 2>();
        __syncwarp();
        issue(it + ST - 1);
        const int blk = b_begin + warp + it * NW;
        const int j0 = blk * 16;
        const u32 sK = sRing + (it % ST) * 32 * RB;
        const u32 sV = sK + 16 * RB;

        float s[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 qa[4], kb[4];
            ldmatrix_x4(qa, sQ + lane_at(qv_lane, kk));
            ldmatrix_x4(kb, sK + lane_at(k_lane, kk));
            mma_16816<elem_t>(s[0], qa, kb);
            mma_16816<elem_t>(s[1], qa, kb + 2);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e];
#if HAS_SOFTCAP || HAS_ALIBI
#if HAS_SOFTCAP
                x = inv_softcap > 0.f ? apply_softcap(x * p.scale, p.softcap, inv_softcap) : x * p.scale;
#else
                x *= p.scale;
#endif
#if HAS_ALIBI
                x += alibi_bias(slope[e >> 1], row_t[e >> 1], j0 + nt * 8 + 2 * tq + (e & 1), off);
#endif
#endif
                s[nt][e] = x;
            }
        if (j0 + 16 > sk || HAS_MASK) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = row_t[hh];
                int hi = sk, lo = 0;
#if HAS_MASK
                if (mc.wr >= 0) hi = min(hi, i + off + mc.wr + 1);
                if (mc.wl >= 0) lo = i + off - mc.wl;
#endif
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int j = j0 + nt * 8 + 2 * tq + e;
                        if (j >= hi || j < lo) s[nt][2 * hh + e] = FA_NEG_INF;
                    }
            }
        }
        // online softmax
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float mx = fmaxf(row_m[hh], fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1])));
            mx = quad_max(mx);
            const float mc_ = (mx == FA_NEG_INF ? 0.f : mx) * c;
            const float corr = exp2_fast(row_m[hh] * c - mc_);
            row_m[hh] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pv = exp2_fast(fmaf(s[nt][2 * hh + e], c, -mc_));
                    s[nt][2 * hh + e] = pv;
                    sum += pv;
                }
            row_l[hh] = row_l[hh] * corr + sum;
#pragma unroll
            for (int dt = 0; dt < DTILES; ++dt) {
                acc[dt][2 * hh] *= corr;
                acc[dt][2 * hh + 1] *= corr;
            }
        }
        u32 pa[4];
        pa[0] = Dt<elem_t>::pack(s[0][0], s[0][1]);
        pa[1] = Dt<elem_t>::pack(s[0][2], s[0][3]);
        pa[2] = Dt<elem_t>::pack(s[1][0], s[1][1]);
        pa[3] = Dt<elem_t>::pack(s[1][2], s[1][3]);
#pragma unroll
        for (int dp = 0; dp < DTILES / 2; ++dp) {
            u32 vb[4];
            ldmatrix_x4_trans(vb, sV + lane_at(qv_lane, dp));
            mma_16816<elem_t>(acc[2 * dp], pa, vb);
            mma_16816<elem_t>(acc[2 * dp + 1], pa, vb + 2);
        }
        __syncwarp();
    }
    cp_async_wait_all();

    // ---- merge the warps: m, l per row to shared memory, O (unnormalised f32) over the ring.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const float l = quad_sum(row_l[hh]);
        if (tq == 0) {
            s_ml[(warp * 2 + 0) * 16 + g + hh * 8] = row_m[hh];
            s_ml[(warp * 2 + 1) * 16 + g + hh * 8] = l;
        }
    }
    __syncthreads();  // every warp is done with its ring
    float* s_o = (float*)(smem + 16 * RB);  // [NW][16][D]
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = g + hh * 8;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            *(float2*)&s_o[(warp * 16 + r) * D + dt * 8 + 2 * tq] = make_float2(acc[dt][2 * hh], acc[dt][2 * hh + 1]);
        }
    }
    __syncthreads();
    const bool direct = p.num_splits == 1;
    for (int idx = tid; idx < 16 * D; idx += NT) {
        const int r = idx / D, col = idx % D;
        if (r >= rows_valid || col >= d) continue;
        float mm = FA_NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) mm = fmaxf(mm, s_ml[(w * 2) * 16 + r]);
        const float mu = (mm == FA_NEG_INF ? 0.f : mm) * c;
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float wt = exp2_fast(s_ml[(w * 2) * 16 + r] * c - mu);
            L += wt * s_ml[(w * 2 + 1) * 16 + r];
            O += wt * s_o[(w * 16 + r) * D + col];
        }
        const float o = L > 0.f ? O / L : 0.f;
        const float lse = L > 0.f ? (mu + log2_fast(L)) * FA_LN2 : FA_NEG_INF;
        const int rr = r0 + r;
        const int t = rr / group, qh = kvh * group + rr % group;
        const i64 R = ((i64)bi * p.h + qh) * sq + t;
        if (direct) {
            ((u16*)p.o)[(i64)bi * p.o_batch_stride + (i64)t * p.o_row_stride + (i64)qh * p.o_head_stride + col] =
                Dt<elem_t>::from_f32(o);
            if (col == 0) p.lse[R] = lse;
        } else {
            const i64 rows_total = (i64)p.b * p.h * sq;
            p.o_part[((i64)split * rows_total + R) * D + col] = o;
            if (col == 0) p.lse_part[(i64)split * rows_total + R] = lse;
        }
    }
}

extern "C" __global__ void __launch_bounds__(KV_COMBINE_THREADS) kv_combine(const KvParams p) {
    using namespace kv;
    // Dynamic shared memory (KV_COMBINE_SMEM bytes): the loader raises every kernel's dynamic limit to the
    // device maximum, which leaves no room for static shared memory.
    extern __shared__ float s_comb[];
    float* s_w = s_comb;                      // [KV_MAX_SPLITS]
    float* s_red = s_comb + KV_MAX_SPLITS;    // [KV_COMBINE_THREADS / 32]
    float* s_part = s_red + KV_COMBINE_THREADS / 32;  // [COMB_SG][D]: per split group sums
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const i64 rows_total = (i64)p.b * p.h * p.sq;
    const i64 R = blockIdx.x;
    const int ns = p.num_splits;  // <= KV_MAX_SPLITS = KV_COMBINE_THREADS
    // Thread (sg, ct) sums splits sg, sg + COMB_SG, ... of float4 columns ct, ct + COMB_CT, ... The first
    // COMB_U splits' partials are loaded before the weights are known, so their latency overlaps the lse load and
    // the reductions: one L2 round trip for up to COMB_SG * COMB_U splits (the loop of dependent loads per column
    // this replaces made the combine ~6 us at (b 1, 4k keys) on the H200, about what kv_attn takes).
    const int ct = tid % COMB_CT, sg = tid / COMB_CT;
    const float* src = p.o_part + R * D;
    const i64 split_stride = rows_total * D;
    auto col_ok = [&](int c) { return ct + c * COMB_CT < COMB_C4; };
    auto load = [&](int s, int c) {
        return s < ns && col_ok(c) ? __ldcg((const float4*)(src + (i64)s * split_stride) + ct + c * COMB_CT)
                                   : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    float4 v[COMB_CPT][COMB_U];
#pragma unroll
    for (int c = 0; c < COMB_CPT; ++c)
#pragma unroll
        for (int u = 0; u < COMB_U; ++u) v[c][u] = load(sg + u * COMB_SG, c);
    const float l = tid < ns ? __ldcg(p.lse_part + (i64)tid * rows_total + R) : FA_NEG_INF;
    // The refusal word goes out with those loads (the workspace is read either way; nothing is written when set).
    const int status = ld_now(p.status);
    float m = warp_max(l);
    if (lane == 0) s_red[warp] = m;
    __syncthreads();
    if (status != 0) return;  // the same for every thread of the block
    m = FA_NEG_INF;
#pragma unroll
    for (int w = 0; w < KV_COMBINE_THREADS / 32; ++w) m = fmaxf(m, s_red[w]);
    const float mu = m == FA_NEG_INF ? 0.f : m;
    const float wt = tid < ns ? exp2_fast((l - mu) * FA_LOG2E) : 0.f;
    if (tid < KV_MAX_SPLITS) s_w[tid] = wt;  // 0 past ns
    float sw = warp_sum(wt);
    __syncthreads();  // everyone has read s_red (max); s_w is complete
    if (lane == 0) s_red[warp] = sw;
    float4 acc[COMB_CPT];
#pragma unroll
    for (int c = 0; c < COMB_CPT; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    // acc[c] += the weighted partials v[c][u] of splits s0 + u * COMB_SG.
    auto add_round = [&](int s0, int c) {
#pragma unroll
        for (int u = 0; u < COMB_U; ++u) {
            const int si = s0 + u * COMB_SG;
            const float ws = si < ns ? s_w[si] : 0.f;
            acc[c].x += ws * v[c][u].x;
            acc[c].y += ws * v[c][u].y;
            acc[c].z += ws * v[c][u].z;
            acc[c].w += ws * v[c][u].w;
        }
    };
#pragma unroll
    for (int c = 0; c < COMB_CPT; ++c) add_round(sg, c);
    // More splits than one round covers: further rounds of COMB_U loads in flight.
    for (int s0 = sg + COMB_U * COMB_SG; s0 < ns; s0 += COMB_U * COMB_SG) {
#pragma unroll
        for (int c = 0; c < COMB_CPT; ++c) {
#pragma unroll
            for (int u = 0; u < COMB_U; ++u) v[c][u] = load(s0 + u * COMB_SG, c);
            add_round(s0, c);
        }
    }
#pragma unroll
    for (int c = 0; c < COMB_CPT; ++c)
        if (col_ok(c)) *(float4*)&s_part[sg * D + 4 * (ct + c * COMB_CT)] = acc[c];
    __syncthreads();
    sw = 0.f;
#pragma unroll
    for (int w = 0; w < KV_COMBINE_THREADS / 32; ++w) sw += s_red[w];
    const float inv = sw > 0.f ? 1.f / sw : 0.f;
    const int t = (int)(R % p.sq);
    const int qh = (int)((R / p.sq) % p.h);
    const int bi = (int)(R / ((i64)p.sq * p.h));
    u16* dst = (u16*)p.o + (i64)bi * p.o_batch_stride + (i64)t * p.o_row_stride + (i64)qh * p.o_head_stride;
    for (int col = tid; col < p.d; col += KV_COMBINE_THREADS) {
        float o = 0.f;
#pragma unroll
        for (int g = 0; g < COMB_SG; ++g) o += s_part[g * D + col];
        dst[col] = Dt<elem_t>::from_f32(o * inv);
    }
    if (tid == 0) p.lse[R] = sw > 0.f ? mu + logf(sw) : FA_NEG_INF;
}

// Benchmark helper: fills n 16-bit elements with pseudo-random values in [-2, 2) (a hash of the index), so
// timed runs never read zeros. grid-stride, any grid.
struct KvFillParams {
    void* dst;
    i64 n;
    unsigned int seed;
    int pad;
};
extern "C" __global__ void kv_fill(const KvFillParams f) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < f.n; i += (i64)gridDim.x * blockDim.x) {
        unsigned long long x = (unsigned long long)i * 0x9E3779B97F4A7C15ull + f.seed;
        x ^= x >> 31;
        x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 29;
        const float u = (float)(x >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        ((u16*)f.dst)[i] = Dt<elem_t>::from_f32(4.f * u - 2.f);
    }
}
