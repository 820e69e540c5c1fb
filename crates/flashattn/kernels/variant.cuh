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

#if IS_BF16
typedef bf16_t elem_t;
#else
typedef half_t elem_t;
#endif
typedef Dt<elem_t> DT;
