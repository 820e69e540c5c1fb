// The compile-time variant of a kernel: every kernel source includes this once, and the launcher
// (src/cuda/compile.rs, `Variant::defines`) sets the macros with -D. Defaults are the plain kernel.
//   HEAD_DIM       padded head dimension (required)
//   HEAD_DIM_V     padded value head dimension of v, o, dO and dV (fwd.cu, bwd.cu). Undefined: the value head dim
//                  is the query/key one (HAS_DV 0: the runtime d serves both). Defined: HAS_DV 1, the runtime value
//                  head dim is a field of its own (FwdDvParams::d_v, BwdParams::d_v), even where HEAD_DIM_V equals
//                  HEAD_DIM
//   IS_BF16        1: bf16 inputs and outputs, 0: f16
//   HAS_MASK       1: causal / sliding window / key-length masking is applied (mask.cuh)
//   HAS_ALIBI      1: ALiBi bias (mask.cuh `alibi_bias`)
//   HAS_SOFTCAP    1: scores soft-capped (mask.cuh `apply_softcap`)
//   IS_VARLEN      1: cu_seqlens addressing (packed sequences)
//   DETERMINISTIC  1: the backward's fixed-order dQ accumulation
//   ALIGNED16      1: 16-byte aligned bases and strides (vector / cp.async / TMA copies), 0: element-wise
//   HAS_SINK       1: the backward also computes the learnable sink's gradient (bwd_common.cuh)
//   GRAD_F32       1: the backward writes dq, dk and dv as f32 (ring attention's partial gradients, summed over
//                  the ring's steps before one rounding), 0: in the inputs' 16-bit type
//   OUT_F32        1: the forward writes o as f32 (ring attention's partial outputs, merged over the ring's
//                  steps before one rounding), 0: in the inputs' 16-bit type (fwd.cu, fwd_sm90.cu)
// and the variant's 16-bit element type `elem_t` (bf16_t or half_t) with its conversions `DT` (common.cuh's `Dt`):
// include common.cuh first.
#pragma once

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifdef HEAD_DIM_V
#define HAS_DV 1
#else
#define HAS_DV 0
#define HEAD_DIM_V HEAD_DIM
#endif
#ifndef IS_BF16
#define IS_BF16 0
#endif
#ifndef HAS_MASK
#define HAS_MASK 0
#endif
#ifndef HAS_ALIBI
#define HAS_ALIBI 0
#endif
#ifndef HAS_SOFTCAP
#define HAS_SOFTCAP 0
#endif
#ifndef IS_VARLEN
#define IS_VARLEN 0
#endif
#ifndef DETERMINISTIC
#define DETERMINISTIC 0
#endif
#ifndef ALIGNED16
#define ALIGNED16 1
#endif
#ifndef HAS_SINK
#define HAS_SINK 0
#endif
#ifndef GRAD_F32
#define GRAD_F32 0
#endif
#ifndef OUT_F32
#define OUT_F32 0
#endif

#if IS_BF16
typedef bf16_t elem_t;
#else
typedef half_t elem_t;
#endif
typedef Dt<elem_t> DT;

// The backward's gradient element (dq, dk, dv) and its stores: one value, or the pair at columns (col, col + 1)
// (16-bit: one 4-byte store, so the pair's address must be 4-byte aligned, as ALIGNED16 guarantees).
#if GRAD_F32
typedef float grad_t;
FA_DEVICE void store_grad(grad_t* g, float x) { *g = x; }
FA_DEVICE void store_grad2(grad_t* g, float x0, float x1) {
    g[0] = x0;
    g[1] = x1;
}
#else
typedef elem_t grad_t;
FA_DEVICE void store_grad(grad_t* g, float x) { g->x = DT::from_f32(x); }
FA_DEVICE void store_grad2(grad_t* g, float x0, float x1) { *(u32*)g = DT::pack(x0, x1); }
#endif

// An f32 output row's pair at columns (col, col + 1) of `n` columns, straight from the accumulators (OUT_F32):
// one 8-byte store where both columns exist and the row is 8-byte aligned (`vec`), else element-wise.
FA_DEVICE void store_out_f32_pair(float* row, int col, int n, float x0, float x1, bool vec) {
    if (vec && col + 1 < n) {
        *(float2*)(row + col) = make_float2(x0, x1);
    } else {
        if (col < n) row[col] = x0;
        if (col + 1 < n) row[col + 1] = x1;
    }
}
