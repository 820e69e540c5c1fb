// Kernel parameter blocks shared by every CUDA kernel of the crate.
//
// The Rust mirror is `crates/flashattn/src/cuda/params.rs` (`#[repr(C)]`): change both together.
// All strides are in elements; the last dimension of every tensor is contiguous.
#pragma once
#include "common.cuh"

typedef long long i64;

// Forward problem. Dense layout: q [b, sq, h, d], k/v [b, sk, hk, d], o like q, lse [b, h, sq].
// Varlen layout (cu_seqlens_q != nullptr): q [total_q, h, d], k/v [total_k, hk, d], the batch strides
// are ignored, sequence `bi` starts at row cu_seqlens_q[bi] / cu_seqlens_k[bi]; lse is [h, total_q].
struct FwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;

    i64 q_batch_stride, q_row_stride, q_head_stride;
    i64 k_batch_stride, k_row_stride, k_head_stride;
    i64 v_batch_stride, v_row_stride, v_head_stride;
    i64 o_batch_stride, o_row_stride, o_head_stride;
    // lse index = bi * lse_batch_stride + head * lse_head_stride + row (dense);
    // varlen: head * lse_head_stride + cu_seqlens_q[bi] + row (lse_batch_stride unused).
    i64 lse_batch_stride, lse_head_stride;

    int b;            // batch size
    int h;            // query heads
    int hk;           // key/value heads (h % hk == 0); query head qh reads kv head qh / (h / hk)
    int sq;           // query length (dense) or max query length (varlen)
    int sk;           // key length (dense) or max key length (varlen)
    int d;            // real head dim (<= the compiled HEAD_DIM; the rest is zero-padded in the kernel)

    const int* cu_seqlens_q;  // [b+1] or nullptr
    const int* cu_seqlens_k;  // [b+1] or nullptr
    const int* seqused_k;     // [b] or nullptr: only the first seqused_k[bi] keys are used

    float scale;              // softmax scale
    float softcap;            // > 0: s = softcap * tanh(s / softcap); 0: off
    const float* alibi_slopes;   // nullptr or [h] / [b, h]
    i64 alibi_batch_stride;      // 0 for [h], h for [b, h]
    int window_left;          // -1 = unbounded; causal is (-1, 0)
    int window_right;         // -1 = unbounded
    const float* sink;        // nullptr or [h] f32: learnable sink logits (natural-log units, joins every row's
                              // softmax denominator, carries no value; the backward's HAS_SINK variant reads it
                              // for dsink)
};

// Offsets (elements) of sequence bi's O rows (row 0, head 0) and of its lse values of head qh, in the forward's
// layouts above: dense from the batch strides, varlen from row cu_seqlens_q[bi]. `I` is the caller's index type
// (int, or the unsigned of blockIdx), so that the conversions to i64 stay the caller's.
template <class I>
FA_DEVICE void out_offsets(const FwdParams& f, I bi, I qh, i64& o_off, i64& lse_off) {
#if IS_VARLEN
    const int q0 = f.cu_seqlens_q[bi];
    o_off = (i64)q0 * f.o_row_stride;
    lse_off = (i64)qh * f.lse_head_stride + q0;
#else
    o_off = (i64)bi * f.o_batch_stride;
    lse_off = (i64)bi * f.lse_batch_stride + (i64)qh * f.lse_head_stride;
#endif
}

// Forward problem of a kernel compiled with a value head dim of its own (HEAD_DIM_V defined, HAS_DV): v is
// [b, sk, hk, d_v] (varlen [total_k, hk, d_v]) and o [b, sq, h, d_v]; every other field as in FwdParams.
// Variants without HEAD_DIM_V take FwdParams alone.
struct FwdDvParams {
    FwdParams f;
    int d_v;                  // real value head dim (<= the compiled HEAD_DIM_V)
    int pad_;
};

// Backward problem: the forward's fields plus dO, the gradients and the scratch buffers (layouts: see the header
// of bwd.cu). `rows_q` = b * sq (dense) or total_q = cu_seqlens_q[b] (varlen); row index of query i of sequence bi
// is r = bi * sq + i (dense) or cu_seqlens_q[bi] + i (varlen). HD = the compiled (padded) HEAD_DIM.
// Deterministic mode is the compile-time macro DETERMINISTIC of bwd.cu (needs dq_semaphore).
struct BwdParams {
    FwdParams fwd;            // q, k, v, o, lse as in the forward (o and lse are inputs here)

    const void* dout;         // dO, laid out like o (its own strides below)
    void* dq;                 // like q (its own strides)
    void* dk;                 // like k
    void* dv;                 // like v
    i64 do_batch_stride, do_row_stride, do_head_stride;
    i64 dq_batch_stride, dq_row_stride, dq_head_stride;
    i64 dk_batch_stride, dk_row_stride, dk_head_stride;
    i64 dv_batch_stride, dv_row_stride, dv_head_stride;

    float* dpsum;             // scratch f32 [h, rows_q]: rowsum(dO * O), written by flash_bwd_preprocess
    float* lse_log2;          // scratch f32 [h, rows_q]: lse * log2(e) (-inf -> +inf), written by preprocess
    float* dq_accum;          // scratch f32 [rows_q, h, HD]: dQ / scale accumulator, zeroed by preprocess
    int* dq_semaphore;        // DETERMINISTIC: scratch i32 [b, h, ceil(sq / BWD_BM)], zeroed by preprocess; else nullptr
    int rows_q;               // see above
    int exact_one_key;        // 1: lse and D come from this call's keys, so a row that sees one key has a constant
                              // softmax and gets dS = 0 exactly; 0: they come from a larger softmax (ring, split
                              // keys) and such a row takes the general formula
    // HAS_SINK (bwd.cu, bwd_sm90.cu): dsink = -sum over (batch, rows i) of exp(sink - lse_i) * D_i with
    // D_i = sum_j P_ij dP_ij from the main kernel's own f32 P and dP (D from the 16-bit o fails the accuracy rule).
    // Each main-kernel warp adds its (batch, head, key block) share into dsink_part, f32 [b, h, dsink_blocks, 8]
    // (slot: warp index < 8; zeroed by the launcher; blocks counted in 64 keys, so any BN >= 64 fits);
    // flash_bwd_dsink sums it in a fixed order into dsink, f32 [h]. Null / 0 without a sink.
    float* dsink_part;
    float* dsink;
    int dsink_blocks;
    int d_v;                  // real value head dim of v, o, dO and dV; read by the HAS_DV variants (HEAD_DIM_V
                              // defined), the others use fwd.d for both
};
