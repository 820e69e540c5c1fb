// Geometry shared by the backward kernels (bwd.cu, the sm80-class path, and bwd_sm90.cu, the Hopper path):
// per-sequence lengths and offsets, the query blocks a key block must visit, and the score's scale and softcap.
#pragma once
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"

// The backward's scale and softcap in log2 units, set once per thread from the call's parameters.
struct BwdScale {
#if HAS_SOFTCAP
    float cap_in;    // tanh argument per raw dot product: scale / softcap
    float cap_log2;  // softcap * log2(e)
#else
    float scale_log2;
#endif
};
FA_DEVICE BwdScale bwd_scale(const FwdParams& f) {
#if HAS_SOFTCAP
    return BwdScale{f.scale / f.softcap, f.softcap * FA_LOG2E};
#else
    return BwdScale{f.scale * FA_LOG2E};
#endif
}
// The log2-unit score of raw dot product `x` before ALiBi; with softcap, `th` = tanh(x * scale / softcap), which
// dS's softcap factor (1 - th^2) needs (left unset otherwise).
FA_DEVICE float log2_score(const BwdScale& c, float x, float& th) {
#if HAS_SOFTCAP
    th = tanh_accurate(x * c.cap_in);
    return th * c.cap_log2;
#else
    return x * c.scale_log2;
#endif
}

// Per-sequence geometry shared by the backward kernels.
struct SeqInfo {
    int sq, sk;        // queries of this sequence, keys used (seqused_k applied)
    int sk_rows;       // key rows present in the tensors (written as dK/dV; >= sk)
    int q_row0;        // row index r of query 0 (dense: bi*sq, varlen: cu_seqlens_q[bi])
    i64 q_off_rows;    // rows to skip in q/o/dO/dq (varlen: cu_seqlens_q[bi]; dense: 0, batch stride used)
    i64 k_off_rows;
};
FA_DEVICE SeqInfo seq_info(const FwdParams& f, int bi) {
    SeqInfo s;
#if IS_VARLEN
    const int q0 = f.cu_seqlens_q[bi], k0 = f.cu_seqlens_k[bi];
    s.sq = f.cu_seqlens_q[bi + 1] - q0;
    s.sk_rows = f.cu_seqlens_k[bi + 1] - k0;
    s.q_row0 = q0;
    s.q_off_rows = q0;
    s.k_off_rows = k0;
#else
    s.sq = f.sq;
    s.sk_rows = f.sk;
    s.q_row0 = bi * f.sq;
    s.q_off_rows = 0;
    s.k_off_rows = 0;
#endif
    s.sk = f.seqused_k ? f.seqused_k[bi] : s.sk_rows;
    if (s.sk > s.sk_rows) s.sk = s.sk_rows;
    return s;
}

// Batch offset in elements of a [b, s, h, d] tensor (0 for varlen, where rows carry it).
FA_DEVICE i64 batch_off(i64 stride, int bi) {
#if IS_VARLEN
    return 0;
#else
    return stride * bi;
#endif
}

// Query blocks of height BM holding a row that sees at least one key of [n0, min(n0 + BN, sk) - 1]: [*m_lo, *m_hi),
// empty when *m_hi <= *m_lo. Exact (no block without a visible key is counted): the deterministic semaphore of
// bwd.cu relies on it. With has_mask = false only the key count limits it.
FA_DEVICE void bwd_q_blocks(const MaskCtx& mc, bool has_mask, int n0, int BN, int BM, int* m_lo, int* m_hi) {
    const int off = mc.sk - mc.sq;
    int lo = 0, hi = (mc.sq + BM - 1) / BM;
    if (n0 >= mc.sk) hi = 0;
    if (has_mask && mc.wr >= 0) {
        const int first = n0 - off - mc.wr;
        if (first > mc.sq - 1) hi = 0;
        else lo = first <= 0 ? 0 : first / BM;
    }
    if (has_mask && mc.wl >= 0) {
        const int last = min(n0 + BN, mc.sk) - 1 - off + mc.wl;
        if (last < 0) hi = 0;
        else hi = min(hi, last / BM + 1);
    }
    *m_lo = lo;
    *m_hi = hi;
}

// ---------------------------------------------------------------- deterministic dQ (DETERMINISTIC)
// The key blocks of one (batch, head) add their dQ to a query block in key order, taking turns on a per-(batch,
// head, query block) counter (dq_semaphore, zeroed before the backward): key block n waits until the counter is
// n - first, adds, then stores n - first + 1. `first` is the first key block (of BN keys) that sees query block
// [m0, m0 + BM): every key block from it up to the block's last visible one visits it (the band masks' visible
// key ranges grow with the query index), so the turns are dense. Fixed order = bit-reproducible sums.
FA_DEVICE int bwd_first_k_block(const MaskCtx& mc, bool has_mask, int m0, int BN) {
    if (!has_mask || mc.wl < 0) return 0;
    const int first = m0 + (mc.sk - mc.sq) - mc.wl;
    return first <= 0 ? 0 : first / BN;
}
FA_DEVICE int ld_acquire_gpu(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
FA_DEVICE void st_release_gpu(int* p, int v) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

// ---------------------------------------------------------------- learnable sink (HAS_SINK)
// dsink_h = -sum over (batch, rows i of head h) of w_i * D_i, w_i = exp(sink_h - lse_i), D_i = sum_j P_ij dP_ij.
// Each warp of a main kernel sums w_i * P_ij * dP_ij over the visible elements it computes (f32 P and dP, before
// any rounding to 16 bits) for one head at a time, and hands its sum to sink_flush when the head changes.
#ifndef HAS_SINK
#define HAS_SINK 0
#endif
#if HAS_SINK
// Adds a warp's sum for (sequence bi, head, key block n_blk) into its slot of p.dsink_part (each slot has one
// writer: key block and warp are unique per CTA, the head per run of steps). Every lane of the warp calls it.
FA_DEVICE void sink_flush(const BwdParams& p, int bi, int head, int n_blk, int warp, float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0)
        p.dsink_part[(((i64)bi * p.fwd.h + head) * p.dsink_blocks + n_blk) * 8 + warp] = v;
}
// The weight exp(sink - lse) of a row from the sink and its lse in log2 units (lse +inf past the sequence: 0).
FA_DEVICE float sink_weight(float sink_log2, float lse_log2) { return exp2f(sink_log2 - lse_log2); }
#endif
