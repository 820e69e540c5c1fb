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
//               written directly. Else each split writes its f32 partial O (normalised) and LSE to o_part /
//               lse_part and arrives on its group's counter (split_count[blockIdx.z * m_blocks + m_block]);
//               the last to arrive merges the group's rows (combine_splits) and resets the counter to 0:
//               m = max lse_s, w_s = exp(lse_s - m), o = sum w_s o_s / sum w_s, lse = m + log(sum w_s)
//               (every lse_s = -inf: o = 0, lse = -inf; a NaN lse_s makes the merged o and lse NaN).
//               A learnable sink (p.sink != nullptr, f32 [h]) joins each row's denominator once: in the
//               warp merge when num_splits == 1, else only in combine_splits (the partials never see it);
//               an empty row then gets o = 0, lse = sink[qh].
// Every kernel returns before writing the cache or results when *status != 0 (the call was refused; the caller
// reads and clears it); kv_attn then fills the refused rows of o and lse with NaN.
//
// Compile-time macros: HEAD_DIM (32..256, multiple of 32; p.d <= HEAD_DIM), IS_BF16, HAS_MASK, HAS_ALIBI,
// HAS_SOFTCAP, ALIGNED16 (q or q_rot and both caches have 16-byte aligned bases and strides that are
// multiples of 16 bytes: 16-byte cp.async; else element-wise loads), KV_WARPS [4], KV_STAGES [3, 2 for
// HEAD_DIM > 128], KV_FP8 [0].
//
// KV_FP8 = 1 (sm_89 and newer): the caches hold float8_e4m3fn, with per-(batch, key head) descales
// p.k_descale / p.v_descale (f32 [b, hk], nullptr = 1); q, k_new, v_new, o stay 16-bit. kv_append quantizes the
// new keys (after rotary) and values to e4m3(x / descale) (saturating at +-448, as torch's conversion does). kv_attn streams the 1-byte rows through the cp.async ring (half the bytes), and
// each warp widens its current K and V tiles to 16 bits in a tile of its own before the tensor-core
// products (e4m3 values are exact in f16 and bf16). The key descale joins the score scale, the value descale
// multiplies the warp's O once after the loop.
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
#ifndef KV_FP8
#define KV_FP8 0
#endif
#if KV_FP8 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "KV_FP8 needs sm_89 or newer (cvt from e4m3)"
#endif
#define KV_APPEND_WARPS 4
#define KV_MAX_SPLITS 128
// A split's arrival on its group's counter: +1, and + KV_SPLIT_FAILED when it returned without its partials.
#define KV_SPLIT_FAILED (1 << 16)
// L2 prefetch size hint of the K/V copies (0, 64, 128 or 256 bytes): none by default. With the swizzled rows a
// hint fetches extra sectors (more L2 reads than bytes used) and gives no gain; docs/notes/cuda-decode.md has the
// measurements.
#ifndef KV_L2_PREFETCH
#define KV_L2_PREFETCH 0
#endif
#define KV_THREADS (32 * KV_WARPS)
// Shared-memory rows of the Q/K/V tiles. Head dims that are multiples of 64 use unpadded rows with the 16-byte
// chunks XOR-swizzled within 128-byte groups (chunk c of row r at c ^ (r & 7)), so every 128-byte global line
// lands in one 128-byte group of shared memory; others keep one spare chunk per row (padded). Padded rows of
// multiples of 64 elements would split a warp's 16-byte copies over more L2 sectors than the bytes need (the
// profile: docs/notes/cuda-decode.md).
#define KV_SWIZZLE (HEAD_DIM % 64 == 0)
#if KV_SWIZZLE
#define KV_ROW_BYTES (HEAD_DIM * 2)
#else
#define KV_ROW_BYTES ((HEAD_DIM / 8 + 1) * 16)
#endif
// Each warp's ring: STAGES x (K 16 rows + V 16 rows) of 16-bit rows; with KV_FP8, STAGES x (K + V) of 1-byte
// rows (HEAD_DIM bytes, unswizzled) and one 16-bit K + V tile the current stage is widened into.
#if KV_FP8
#define KV_WARP_RING_BYTES (KV_STAGES * 32 * HEAD_DIM + 32 * KV_ROW_BYTES)
#else
#define KV_WARP_RING_BYTES (KV_STAGES * 32 * KV_ROW_BYTES)
#endif
// Q tile (16 rows) + the warps' rings + per warp row maxima and sums (16 + 16 f32).
#define KV_SMEM_BYTES (16 * KV_ROW_BYTES + KV_WARPS * KV_WARP_RING_BYTES + KV_WARPS * 32 * 4)


typedef long long i64;
typedef unsigned char u8;
// The caches' element: e4m3 bytes (KV_FP8) or the 16-bit type.
#if KV_FP8
typedef u8 cache_t;
#else
typedef u16 cache_t;
#endif

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
    int* split_count;         // workspace [b * hk * m_blocks] arrival counters (num_splits > 1), 0 between calls
    const float* sink;        // [h] f32 learnable sink logits or nullptr: added once per row where the row's
                              // softmax is complete (the warp merge when num_splits == 1, else combine_splits)
    const float* k_descale;   // KV_FP8: [b, hk] f32 (contiguous) or nullptr (1); ignored otherwise
    const float* v_descale;
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
constexpr int C4 = D / 4;  // float4 columns of an f32 row
constexpr int OS = D + 8;  // f32 row stride of the warps' staged O (rows g and g + 4 in other banks)
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
// The staged O of the warp merge and the split weights of combine_splits live over the rings.
static_assert(16 * OS * 4 <= KV_WARP_RING_BYTES && 16 * KV_MAX_SPLITS * 4 <= NW * KV_WARP_RING_BYTES, "ring space");

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

// Element e of a row, optionally rotated at table row `pos`, in f32. The rotation is computed without fused
// multiply-adds, in the same order as the host (bit-identical results).
FA_DEVICE float row_elem(const KvParams& p, const u16* src, int e, int pos, bool rotate) {
    const int half = p.rot_half;
    if (rotate && e < 2 * half) {
        int a, bb, kk;
        if (p.rot_interleaved) { kk = e >> 1; a = 2 * kk; bb = a + 1; }
        else { kk = e < half ? e : e - half; a = kk; bb = kk + half; }
        const float x1 = Dt<elem_t>::to_f32(src[a]);
        const float x2 = Dt<elem_t>::to_f32(src[bb]);
        const float c = p.rot_cos[(i64)pos * p.rot_stride + kk];
        const float s = p.rot_sin[(i64)pos * p.rot_stride + kk];
        return (e == a) ? __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)) : __fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c));
    }
    return Dt<elem_t>::to_f32(src[e]);
}
// One row of d elements (lane-strided), optionally rotated, written to dst in the 16-bit type.
FA_DEVICE void copy_row(const KvParams& p, const u16* src, u16* dst, int pos, bool rotate, int lane) {
    for (int e = lane; e < p.d; e += 32) dst[e] = Dt<elem_t>::from_f32(row_elem(p, src, e, pos, rotate));
}
#if KV_FP8
// f32 -> float8_e4m3fn as torch converts: round to nearest even, saturating to +-448 past the largest finite
// value (infinities too); NaN stays NaN.
FA_DEVICE u8 f32_to_e4m3(float x) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.f), "f"(x));
    return (u8)(r & 0xffu);
}
// One row (lane-strided), optionally rotated, quantized to e4m3(y / descale) (IEEE division, as the host).
FA_DEVICE void copy_row(const KvParams& p, const u16* src, u8* dst, int pos, bool rotate, int lane, float descale) {
    for (int e = lane; e < p.d; e += 32) dst[e] = f32_to_e4m3(__fdiv_rn(row_elem(p, src, e, pos, rotate), descale));
}
// Four e4m3 values (one 32-bit word, element 0 in the low byte) -> two 32-bit words of 16-bit pairs
// (elements 0, 1 and 2, 3; element 0 in the low half). Exact: every e4m3 value (NaN included) is an f16 and a
// bf16 value.
FA_DEVICE uint2 widen_e4m3x4(u32 w) {
    u32 lo, hi;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"((unsigned short)(w & 0xffffu)));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"((unsigned short)(w >> 16)));
#if IS_BF16
    const float2 a = unpack_f16x2(lo), b = unpack_f16x2(hi);
    lo = pack_bf16x2(a.x, a.y);
    hi = pack_bf16x2(b.x, b.y);
#endif
    return make_uint2(lo, hi);
}
// A descale of sequence i's key head kvh ([b, hk] contiguous), 1 without one.
FA_DEVICE float descale_of(const float* ds, const KvParams& p, int i, int kvh) {
    return ds != nullptr ? ds[(i64)i * p.hk + kvh] : 1.f;
}
#endif
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
        cache_t* dst = is_k ? (cache_t*)p.k_cache + (i64)outer * p.kc_batch_stride + (i64)inner * p.kc_row_stride + (i64)kh * p.kc_head_stride
                            : (cache_t*)p.v_cache + (i64)outer * p.vc_batch_stride + (i64)inner * p.vc_row_stride + (i64)kh * p.vc_head_stride;
#if KV_FP8
        copy_row(p, src, dst, pos, is_k && rot, lane, descale_of(is_k ? p.k_descale : p.v_descale, p, i, kh));
#else
        copy_row(p, src, dst, pos, is_k && rot, lane);
#endif
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
#if KV_FP8
// The 1-byte form of load_rows16: a 16-row tile of e4m3 rows (HEAD_DIM bytes each, unswizzled) at s_base.
FA_DEVICE void load_rows16_fp8(u32 s_base, const u8* my_row, int rows_valid, int d, int lane, const u8* dummy) {
    constexpr int CH = D / 16;  // 16-byte chunks per row
#pragma unroll
    for (int it = 0; it < 16 * CH / 32; ++it) {
        const int idx = it * 32 + lane;
        const int r = idx / CH, c = idx % CH;
        const int col = c * 16;
        const u32 sa = s_base + (u32)(r * D + col);
        const u8* src = (const u8*)__shfl_sync(0xffffffffu, (unsigned long long)my_row, r);
        const bool ok = r < rows_valid && col < d && src != nullptr;
#if ALIGNED16
        kv_cp_async(sa, ok ? (const void*)(src + col) : (const void*)dummy, ok ? min(16, d - col) : 0);
#else
        u32 w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            w[e] = 0u;
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (ok && col + 4 * e + k < d) w[e] |= (u32)src[col + 4 * e + k] << (8 * k);
        }
        st_shared_v4(sa, make_uint4(w[0], w[1], w[2], w[3]));
#endif
    }
}
// A warp's 16-row e4m3 tile at s8 widened into the 16-bit tile layout (chunk_at) at s16.
FA_DEVICE void widen_tile16(u32 s8, u32 s16, int lane) {
    constexpr int CH = D / 16;
#pragma unroll
    for (int it = 0; it < 16 * CH / 32; ++it) {
        const int idx = it * 32 + lane;
        const int r = idx / CH, c = idx % CH;
        const uint4 w = ld_shared_v4(s8 + (u32)(r * D + c * 16));
        const uint2 a = widen_e4m3x4(w.x), b = widen_e4m3x4(w.y), e = widen_e4m3x4(w.z), f = widen_e4m3x4(w.w);
        st_shared_v4(s16 + chunk_at(r, 2 * c), make_uint4(a.x, a.y, b.x, b.y));
        st_shared_v4(s16 + chunk_at(r, 2 * c + 1), make_uint4(e.x, e.y, f.x, f.y));
    }
}
#endif
}  // namespace kv

namespace kv {
// A 32-bit load from L2 (not this SM's L1, which may hold the value this CTA read at its start).
FA_DEVICE int ld_cg(const int* a) {
    int v;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(a));
    return v;
}

// One split's arrival on its group's counter (one thread; after a __threadfence of every thread that wrote
// partials). True for the last of the num_splits arrivals when every split arrived with its partials; the
// last arrival also resets the counter to 0 for the next call.
FA_DEVICE bool last_split(int* counter, int num_splits, bool ok) {
    const int add = ok ? 1 : 1 + KV_SPLIT_FAILED;
    const int now = atomicAdd(counter, add) + add;
    if ((now & (KV_SPLIT_FAILED - 1)) < num_splits) return false;
    *counter = 0;
    return now < KV_SPLIT_FAILED;
}

// A query tile's rows: folded row r0 + r is token (r0 + r) / group of query head kvh * group + (r0 + r) % group.
struct TileRows {
    int bi, kvh, group, r0;
    // Output row index R = (bi, qh, t) of tile row r (the o_part / lse rows).
    FA_DEVICE i64 out_row(const KvParams& p, int r) const {
        const int rr = r0 + r;
        return ((i64)bi * p.h + kvh * group + rr % group) * p.sq + rr / group;
    }
    // Writes columns 4 c4 .. 4 c4 + 3 (those < d) of tile row r of o.
    FA_DEVICE void store_o(const KvParams& p, int r, int c4, float4 v) const {
        const int rr = r0 + r;
        u16* dst = (u16*)p.o + (i64)bi * p.o_batch_stride + (i64)(rr / group) * p.o_row_stride +
                   (i64)(kvh * group + rr % group) * p.o_head_stride;
        const float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (4 * c4 + k < p.d) dst[4 * c4 + k] = Dt<elem_t>::from_f32(e[k]);
    }
};

// The merge of a group's splits by its last CTA: rows 0 .. rows_valid - 1 of the tile. s_w (the CTA's free
// shared memory, >= (16 * KV_MAX_SPLITS) * 4 bytes) holds each row's normalised split weights; then each thread
// sums float4 columns of o_part, KV_COMB_U loads in flight. One warp per row computes the weights and writes the
// row's LSE. Not inlined: it runs once per tile, and inlined it made ptxas spill the main loop at some head
// dims (d160 with a mask: 168 registers, 4 bytes spilled; 198 and none without it).
#define KV_COMB_U 8
__device__ __noinline__ void combine_splits(const KvParams& p, unsigned char* s_free, int rows_valid, TileRows tr) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int ns = p.num_splits;  // <= KV_MAX_SPLITS = 4 * 32
    const i64 rows_total = (i64)p.b * p.h * p.sq;
    float* s_w = (float*)s_free;  // [16][KV_MAX_SPLITS]
    for (int r = warp; r < rows_valid; r += NW) {
        const i64 R = tr.out_row(p, r);
        float l[KV_MAX_SPLITS / 32];
        float m = FA_NEG_INF;
#pragma unroll
        for (int k = 0; k < KV_MAX_SPLITS / 32; ++k) {
            const int s = lane + 32 * k;
            l[k] = s < ns ? __ldcg(p.lse_part + (i64)s * rows_total + R) : FA_NEG_INF;
            m = fmaxf(m, l[k]);
        }
        m = warp_max(m);
        const float mu = m == FA_NEG_INF ? 0.f : m;
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < KV_MAX_SPLITS / 32; ++k) {
            l[k] = lane + 32 * k < ns ? exp2_fast((l[k] - mu) * FA_LOG2E) : 0.f;
            sum += l[k];
        }
        sum = warp_sum(sum);
        // sum == 0: every split saw no key (o = 0, lse = -inf). A NaN split lse (skipped by the max) gives a
        // NaN weight, so sum, inv, every weight and the merged o and lse are NaN.
        float inv = sum == 0.f ? 0.f : 1.f / sum;
        float lse = sum != 0.f ? mu + logf(sum) : FA_NEG_INF;
        if (p.sink != nullptr) {
            // The sink joins the merged row once: against M = max(m, sink) (natural log), the split weights are
            // exp(lse_s - mu) * a with a = exp(m - M) (0 when every split is empty: m = -inf), the total
            // tot = sum * a + exp(sink - M), lse = M + log(tot); an empty row: weights 0, lse = sink.
            const float snk = p.sink[tr.kvh * tr.group + (tr.r0 + r) % tr.group];
            const float mx = fmaxf(m, snk);
            const float a = exp2_fast((m - mx) * FA_LOG2E);
            const float tot = fmaf(sum, a, exp2_fast((snk - mx) * FA_LOG2E));
            inv = a / tot;
            lse = sum != 0.f ? mx + logf(tot) : snk;
        }
#pragma unroll
        for (int k = 0; k < KV_MAX_SPLITS / 32; ++k) s_w[r * KV_MAX_SPLITS + lane + 32 * k] = l[k] * inv;  // 0 past ns
        if (lane == 0) p.lse[R] = lse;
    }
    __syncthreads();
    const i64 split_stride = rows_total * D;
    for (int idx = tid; idx < rows_valid * C4; idx += NT) {
        const int r = idx / C4, c4 = idx % C4;
        const float* src = p.o_part + tr.out_row(p, r) * D + 4 * c4;
        const float* w = s_w + r * KV_MAX_SPLITS;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s0 = 0; s0 < ns; s0 += KV_COMB_U) {
            float4 v[KV_COMB_U];
#pragma unroll
            for (int u = 0; u < KV_COMB_U; ++u)
                v[u] = s0 + u < ns ? __ldcg((const float4*)(src + (i64)(s0 + u) * split_stride)) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int u = 0; u < KV_COMB_U; ++u) {
                const float ws = s0 + u < KV_MAX_SPLITS ? w[s0 + u] : 0.f;
                acc.x += ws * v[u].x;
                acc.y += ws * v[u].y;
                acc.z += ws * v[u].z;
                acc.w += ws * v[u].w;
            }
        }
        tr.store_o(p, r, c4, acc);
    }
}
}  // namespace kv

extern "C" __global__ void __launch_bounds__(KV_THREADS, 1) kv_attn(const __grid_constant__ KvParams p) {
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
    const int group = p.h / p.hk;
    const int M = p.sq * group;
    const int r0 = mb * 16;
    // This query tile's arrival counter (split-KV), computed where it is used (not kept live over the main loop).
    auto split_count = [&] { return p.split_count + blockIdx.z * gridDim.y + mb; };
    if (r0 >= M) return;
    // A refused call (an earlier refusal, or this sequence's values out of range) writes nothing. Every split
    // still arrives on its group's counter, marked failed, whichever of the two it saw (another CTA of this
    // group may have set the status word before this one read it): the counter returns to 0, nobody merges.
    const bool bad_seq = !seq_ok(p, bi, n, lp);
    if (status != 0 || bad_seq) {
        if (tid == 0) {
            if (bad_seq) atomicOr(p.status, 1);
            if (p.num_splits > 1) last_split(split_count(), p.num_splits, false);
        }
        // The refused tile's rows of o and lse become NaN (split 0 writes them), so a caller that does not read
        // the status word cannot take stale memory for a result. The cache is not touched.
        if (split == 0) {
            const TileRows tr{bi, kvh, group, r0};
            const int rows = min(16, M - r0), c4s = (p.d + 3) / 4;
            const float nan = __int_as_float(0x7fffffff);
            for (int i = tid; i < rows * c4s; i += KV_THREADS)
                tr.store_o(p, i / c4s, i % c4s, make_float4(nan, nan, nan, nan));
            for (int r = tid; r < rows; r += KV_THREADS) p.lse[tr.out_row(p, r)] = nan;
        }
        return;
    }
    const int rows_valid = min(16, M - r0);
    const int d = p.d;

    const int sk = n + p.s_new - lp;  // keys this sequence attends to
    const int sq = p.sq;

    const u32 sQ = smem_u32(smem);
    const u32 sRing = sQ + 16 * RB + warp * KV_WARP_RING_BYTES;
    float* s_ml = (float*)(smem + 16 * RB + NW * KV_WARP_RING_BYTES);  // [NW][2][16]: m, l

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
    set_mask_ctx(mc, sq, sk, p);
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

    const cache_t* kc = (const cache_t*)p.k_cache + (i64)kvh * p.kc_head_stride;
    const cache_t* vc = (const cache_t*)p.v_cache + (i64)kvh * p.vc_head_stride;
#if KV_FP8
    // A stage: K then V, 16 rows of D bytes each; the widened 16-bit K and V tiles after the stages.
    constexpr int STAGE = 32 * D, HALF = 16 * D;
    const u32 sWide = sRing + ST * STAGE;
#else
    constexpr int STAGE = 32 * RB, HALF = 16 * RB;
#endif
    auto issue = [&](int it) {
        if (it < my_n) {
            const int blk = b_begin + warp + it * NW;
            const int j0 = blk * 16;
            const u32 sK = sRing + (it % ST) * STAGE;
            const u32 sV = sK + HALF;
            const int r = lane & 15;
            const cache_t* krow = nullptr;
            const cache_t* vrow = nullptr;
            int outer, inner;
            if (j0 + r < sk) {
                if (cache_loc(p, bi, lp + j0 + r, &outer, &inner)) {
                    krow = kc + (i64)outer * p.kc_batch_stride + (i64)inner * p.kc_row_stride;
                    vrow = vc + (i64)outer * p.vc_batch_stride + (i64)inner * p.vc_row_stride;
                } else if (lane < 16) {
                    atomicOr(p.status, 2);
                }
            }
#if KV_FP8
            load_rows16_fp8(sK, krow, sk - j0, d, lane, kc);
            load_rows16_fp8(sV, vrow, sk - j0, d, lane, vc);
#else
            load_rows16(sK, krow, sk - j0, d, lane, kc);
            load_rows16(sV, vrow, sk - j0, d, lane, vc);
#endif
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < ST - 1; ++s) issue(s);

    // The score scale; with an e4m3 cache it carries this key head's descale (the products use the stored values).
#if KV_FP8
    const float scale = p.scale * descale_of(p.k_descale, p, bi, kvh);
#else
    const float scale = p.scale;
#endif
    // Scores in log2 units: p = exp2(s * c - m * c).
#if HAS_SOFTCAP || HAS_ALIBI
    const float c = FA_LOG2E;
#else
    const float c = scale * FA_LOG2E;
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
#if KV_FP8
        // This stage's e4m3 tiles widened into the warp's 16-bit tiles (the previous iteration's reads of them
        // ended at its closing __syncwarp).
        widen_tile16(sRing + (it % ST) * STAGE, sWide, lane);
        widen_tile16(sRing + (it % ST) * STAGE + HALF, sWide + 16 * RB, lane);
        __syncwarp();
        const u32 sK = sWide;
        const u32 sV = sWide + 16 * RB;
#else
        const u32 sK = sRing + (it % ST) * STAGE;
        const u32 sV = sK + HALF;
#endif

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
                x = inv_softcap > 0.f ? apply_softcap(x * scale, p.softcap, inv_softcap) : x * scale;
#else
                x *= scale;
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
#if KV_FP8
    // The value descale: O is linear in V.
    {
        const float vd = descale_of(p.v_descale, p, bi, kvh);
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[dt][e] *= vd;
    }
#endif

    // ---- merge the warps. Per row, each warp's weight exp(m_w - m) / L is computed once (threads 0..15)
    // while every thread stages its unnormalised O over the rings; then float4 columns are summed.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const float l = quad_sum(row_l[hh]);
        if (tq == 0) {
            s_ml[(warp * 2 + 0) * 16 + g + hh * 8] = row_m[hh];
            s_ml[(warp * 2 + 1) * 16 + g + hh * 8] = l;
        }
    }
    __syncthreads();  // every warp is done with its ring; s_ml is complete
    float* s_o = (float*)(smem + 16 * RB);  // [NW][16][OS]
    if (tid < 16) {
        float mw[NW], lw[NW];
        float mm = FA_NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            mw[w] = s_ml[(w * 2) * 16 + tid];
            lw[w] = s_ml[(w * 2 + 1) * 16 + tid];
            mm = fmaxf(mm, mw[w]);
        }
        const float mu = (mm == FA_NEG_INF ? 0.f : mm) * c;
        float wt[NW], L = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            wt[w] = exp2_fast(mw[w] * c - mu);
            L += wt[w] * lw[w];
        }
        // L == 0: no warp saw a key (o = 0, lse = -inf). A NaN or +inf score made a warp's l (or its weight)
        // NaN, so L is NaN and so are inv, every weight, o and lse.
        float inv = L == 0.f ? 0.f : 1.f / L;
        float lse = L != 0.f ? (mu + log2_fast(L)) * FA_LN2 : FA_NEG_INF;
        if (p.sink != nullptr && p.num_splits == 1) {
            // The row's softmax is complete here (one split): the sink joins it once, against M = max(m2, sink2)
            // in log2 units (m2 = mm * c, -inf for an empty row, where a = 0 and the total is 1). With splits the
            // partials stay without it and combine_splits adds it.
            const float snk = p.sink[kvh * group + (r0 + tid) % group];
            const float sink2 = snk * FA_LOG2E;
            const float m2 = mm * c;
            const float mx = fmaxf(m2, sink2);
            const float a = exp2_fast(m2 - mx);
            const float tot = fmaf(L, a, exp2_fast(sink2 - mx));
            inv = a / tot;
            lse = L != 0.f ? (mx + log2_fast(tot)) * FA_LN2 : snk;
        }
        // Row tid's own slots only: warp w's weight over its m, the row's LSE over warp 0's l.
#pragma unroll
        for (int w = 0; w < NW; ++w) s_ml[(w * 2) * 16 + tid] = wt[w] * inv;
        s_ml[16 + tid] = lse;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = g + hh * 8;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt)
            *(float2*)&s_o[(warp * 16 + r) * OS + dt * 8 + 2 * tq] = make_float2(acc[dt][2 * hh], acc[dt][2 * hh + 1]);
    }
    __syncthreads();
    const bool direct = p.num_splits == 1;
    const i64 rows_total = (i64)p.b * p.h * sq;
    const TileRows tr{bi, kvh, group, r0};
    for (int idx = tid; idx < rows_valid * C4; idx += NT) {
        const int r = idx / C4, c4 = idx % C4;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        bool any_weight = false;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float wt = s_ml[(w * 2) * 16 + r];
            any_weight |= wt != 0.f;
            const float4 v = *(const float4*)&s_o[(w * 16 + r) * OS + 4 * c4];
            o.x += wt * v.x;
            o.y += wt * v.y;
            o.z += wt * v.z;
            o.w += wt * v.w;
        }
        // A row with no visible key (lse = -inf) is exactly 0: its zero weights may meet 0 * NaN from masked
        // value rows. With a sink in the single pass an empty row's lse is the sink: every weight is 0 then (as
        // for a row the sink outweighs beyond f32 range, whose o is 0 to that precision).
        if ((p.sink != nullptr && direct) ? !any_weight : s_ml[16 + r] == FA_NEG_INF) o = make_float4(0.f, 0.f, 0.f, 0.f);
        const i64 R = tr.out_row(p, r);
        if (direct) {
            tr.store_o(p, r, c4, o);
            if (c4 == 0) p.lse[R] = s_ml[16 + r];
        } else {
            *(float4*)&p.o_part[((i64)split * rows_total + R) * D + 4 * c4] = o;
            if (c4 == 0) p.lse_part[(i64)split * rows_total + R] = s_ml[16 + r];
        }
    }
    if (direct) return;

    // ---- split-KV: the last of the group's splits to finish merges them (no second kernel).
    __threadfence();  // this thread's partials are visible device-wide before the arrival
    __syncthreads();
    int* s_flag = (int*)s_ml;  // s_ml is no longer read; combine_splits uses the rings' space
    if (tid == 0) *s_flag = last_split(split_count(), p.num_splits, true);
    __syncthreads();
    if (*s_flag == 0) return;
    __threadfence();
    if (ld_cg(p.status) != 0) return;  // a refusal or a bad page anywhere: nothing is written
    combine_splits(p, smem + 16 * RB, rows_valid, tr);
}

// Benchmark helper: fills n 16-bit elements (or, with e4m3 != 0 in a KV_FP8 build, n e4m3 bytes) with
// pseudo-random values in [-2, 2) (a hash of the index), so timed runs never read zeros. grid-stride, any grid.
struct KvFillParams {
    void* dst;
    i64 n;
    unsigned int seed;
    int e4m3;
};
extern "C" __global__ void kv_fill(const KvFillParams f) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < f.n; i += (i64)gridDim.x * blockDim.x) {
        unsigned long long x = (unsigned long long)i * 0x9E3779B97F4A7C15ull + f.seed;
        x ^= x >> 31;
        x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 29;
        const float u = (float)(x >> 40) * (1.0f / 16777216.0f);  // [0, 1)
#if KV_FP8
        if (f.e4m3) {
            ((u8*)f.dst)[i] = kv::f32_to_e4m3(4.f * u - 2.f);
            continue;
        }
#endif
        ((u16*)f.dst)[i] = Dt<elem_t>::from_f32(4.f * u - 2.f);
    }
}
