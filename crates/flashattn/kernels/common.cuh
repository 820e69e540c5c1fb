// Small device primitives shared by the CUDA kernels of the crate (sm_80 and up).
//
// Header-only and self-contained: no CUDA headers are included (NVRTC compiles it with no -I to the
// toolkit). 16-bit types are our own structs; every conversion goes through inline PTX.
//
// Matrix-fragment conventions (PTX ISA, mma.m16n8k16 with 16-bit inputs, f32 accumulators), for lane
// l of a warp, g = l / 4 ("group", 0..7) and t = l % 4 ("thread in quad", 0..3):
//   A (16x16, row major), 4 x b32 regs:  a0 = A[g][2t..2t+1]    a1 = A[g+8][2t..2t+1]
//                                        a2 = A[g][2t+8..2t+9]  a3 = A[g+8][2t+8..2t+9]
//   B (16x8, "col" = K-contiguous), 2 x b32 regs: b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C/D (16x8 f32), 4 regs: c0,c1 = C[g][2t], C[g][2t+1];  c2,c3 = C[g+8][2t], C[g+8][2t+1]
// Consequence used by attention: the accumulators of two adjacent n8 tiles (columns 0-7 and 8-15),
// packed pairwise to 16 bits, are exactly the A fragment of a following product with k = those 16
// columns: a0 = pack(c0,c1 of tile 0), a1 = pack(c2,c3 of tile 0), a2/a3 likewise from tile 1.
//
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8x8 matrix i; register i of
// lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of matrix i (.trans: column l/4, rows 2(l%4), +1).
#pragma once

#ifndef FA_DEVICE
#define FA_DEVICE __device__ __forceinline__
#endif

typedef unsigned int u32;
typedef unsigned short u16;

// ---------------------------------------------------------------- 16-bit storage types
struct __align__(2) half_t { u16 x; };
struct __align__(2) bf16_t { u16 x; };

// f32 <-> 16-bit scalars (round to nearest even).
FA_DEVICE u16 f32_to_f16_bits(float f) { u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; }
FA_DEVICE u16 f32_to_bf16_bits(float f) { u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; }
FA_DEVICE float f16_bits_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
FA_DEVICE float bf16_bits_to_f32(u16 h) { return __int_as_float(((u32)h) << 16); }

// Two f32 -> one b32 holding {lo, hi} as 16-bit values (lo in bits 0-15). One cvt instruction.
FA_DEVICE u32 pack_f16x2(float lo, float hi) {
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
FA_DEVICE u32 pack_bf16x2(float lo, float hi) {
    u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
FA_DEVICE float2 unpack_f16x2(u32 v) {
    return make_float2(f16_bits_to_f32((u16)(v & 0xffffu)), f16_bits_to_f32((u16)(v >> 16)));
}
FA_DEVICE float2 unpack_bf16x2(u32 v) {
    return make_float2(__int_as_float(v << 16), __int_as_float(v & 0xffff0000u));
}

// Type traits: `Dt<T>` gives the conversions and the tensor-core product for storage type T.
template <typename T> struct Dt;
template <> struct Dt<half_t> {
    static FA_DEVICE u32 pack(float lo, float hi) { return pack_f16x2(lo, hi); }
    static FA_DEVICE float2 unpack(u32 v) { return unpack_f16x2(v); }
    static FA_DEVICE u16 from_f32(float f) { return f32_to_f16_bits(f); }
    static FA_DEVICE float to_f32(u16 h) { return f16_bits_to_f32(h); }
};
template <> struct Dt<bf16_t> {
    static FA_DEVICE u32 pack(float lo, float hi) { return pack_bf16x2(lo, hi); }
    static FA_DEVICE float2 unpack(u32 v) { return unpack_bf16x2(v); }
    static FA_DEVICE u16 from_f32(float f) { return f32_to_bf16_bits(f); }
    static FA_DEVICE float to_f32(u16 h) { return bf16_bits_to_f32(h); }
};

// ---------------------------------------------------------------- tensor cores
// D(16x8 f32) += A(16x16) * B(16x8), both 16-bit. c[4] is accumulated in place. One overload per storage type
// (the tag argument picks it), PTX_T the type's name in the instruction.
#define FA_MMA_16816(TAG, PTX_T)                                                                \
    FA_DEVICE void mma_16816(float* c, const u32* a, const u32* b, TAG) {                       \
        asm volatile(                                                                           \
            "mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T ".f32 "                    \
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                           \
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                    \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));                \
    }
FA_MMA_16816(half_t, "f16")
FA_MMA_16816(bf16_t, "bf16")
#undef FA_MMA_16816
template <typename T> FA_DEVICE void mma_16816(float* c, const u32* a, const u32* b) { mma_16816(c, a, b, T()); }

// The A fragment (k = 16 columns) of the f32 accumulators of two adjacent n8 tiles, c0 (columns 0-7) and c1
// (8-15), packed to 16 bits: the consequence of the fragment conventions above.
template <typename T> FA_DEVICE void pack_a_frag(u32* a, const float* c0, const float* c1) {
    a[0] = Dt<T>::pack(c0[0], c0[1]);
    a[1] = Dt<T>::pack(c0[2], c0[3]);
    a[2] = Dt<T>::pack(c1[0], c1[1]);
    a[3] = Dt<T>::pack(c1[2], c1[3]);
}

// ---------------------------------------------------------------- shared memory
// Generic pointer -> 32-bit shared-window address (what ldmatrix / cp.async / ld.shared take).
FA_DEVICE u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

FA_DEVICE void ldmatrix_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
FA_DEVICE void ldmatrix_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
FA_DEVICE void ldmatrix_x2(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
FA_DEVICE void ldmatrix_x2_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// One 16 x 16 tile of B against MT row tiles of A: acc[mt][n] += A(mt) * B[:, 0:8] and acc[mt][n + 1] += A(mt) *
// B[:, 8:16] for mt < MT (a[mt]: A(mt)'s fragments), with B's fragments of both n8 tiles loaded by one ldmatrix.x4
// (.trans when TRANS) from lane address b.
template <typename T, int MT, bool TRANS, class Acc> FA_DEVICE void mma_slab(Acc acc, const u32 (*a)[4], u32 b, int n) {
    u32 bf[4];
    if constexpr (TRANS) {
        ldmatrix_x4_trans(bf, b);
    } else {
        ldmatrix_x4(bf, b);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][n], a[mt], bf);
        mma_16816<T>(acc[mt][n + 1], a[mt], bf + 2);
    }
}

FA_DEVICE void st_shared_u32(u32 addr, u32 v) { asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(v)); }
FA_DEVICE void st_shared_v4(u32 addr, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
// 16-byte global store (the address must be 16-byte aligned). Written as PTX because NVRTC turns a plain
// `*(uint4*)p = v` through a 16-bit element pointer into four 4-byte stores (seen in the PTX of fwd.cu and
// fwd_sm90.cu: 4x the store instructions and L2 sector requests of the O epilogue, ncu 2026-11-25).
FA_DEVICE void st_global_v4(void* p, uint4 v) {
    asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};" :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
FA_DEVICE uint4 ld_shared_v4(u32 addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

// Shared-memory tile layouts for [rows][cols] 16-bit tiles accessed in 16-byte chunks (8 elements).
// Padded: each row is followed by one spare chunk, so the row stride is an odd number of chunks and any
// 8 consecutive rows at the same column hit 8 distinct bank groups (conflict-free ldmatrix and
// cp.async for every head dim that is a multiple of 8, including 96/160/224). Costs 16 B per row.
template <int COLS> struct PaddedTile {
    static constexpr int ROW_CHUNKS = COLS / 8 + 1;
    static constexpr int ROW_BYTES = ROW_CHUNKS * 16;
    static FA_DEVICE u32 offset(int row, int col) { return (u32)(row * ROW_BYTES + col * 2); }  // col in elements
    static constexpr int bytes(int rows) { return rows * ROW_BYTES; }
};
// XOR swizzle: 16-byte chunk c of row r is stored at chunk c ^ (r & 7) within its 128-byte group.
// Conflict-free for ldmatrix / cp.async without padding; needs COLS to be a multiple of 64.
template <int COLS> struct SwizzledTile {
    static_assert(COLS % 64 == 0, "SwizzledTile needs rows of whole 128-byte groups");
    static constexpr int ROW_BYTES = COLS * 2;
    static FA_DEVICE u32 offset(int row, int col) {
        int chunk = (col >> 3) ^ (row & 7);
        return (u32)(row * ROW_BYTES + chunk * 16 + (col & 7) * 2);
    }
    static constexpr int bytes(int rows) { return rows * ROW_BYTES; }
};

// ---------------------------------------------------------------- asynchronous copies
// 16-byte global -> shared copy; only the first `src_bytes` (0..16) bytes are read, the rest of the
// 16 bytes is zero-filled (src_bytes = 0: pure zero fill, the global address is not dereferenced but
// must still be a valid-looking address; pass the tensor base). Global address must be 16-byte aligned.
FA_DEVICE void cp_async_16(u32 smem_addr, const void* gptr, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem_addr), "l"(gptr), "r"(src_bytes));
}
FA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> FA_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
FA_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// ---------------------------------------------------------------- math
// 2^x on the special-function unit (ex2.approx.ftz: ~2 ulp, -inf -> +0, +inf -> +inf).
FA_DEVICE float exp2_fast(float x) { float r; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
FA_DEVICE float log2_fast(float x) { float r; asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
FA_DEVICE float rcp_fast(float x) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
// tanh(x) = 1 - 2 / (1 + e^{2x}); absolute error ~1e-7 (enough for soft-capping), saturates cleanly.
FA_DEVICE float tanh_accurate(float x) { return 1.f - 2.f / (1.f + exp2_fast(x * 2.8853900817779268f)); }

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_NEG_INF (-__int_as_float(0x7f800000))

// ---------------------------------------------------------------- warp reductions
// Over the 4 lanes of a quad (lanes 4g..4g+3): the lanes that share rows of an mma accumulator.
FA_DEVICE float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return v;
}
FA_DEVICE float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}
FA_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
FA_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
