// Hopper (sm_90a) primitives of the sm90 forward: mbarriers, TMA tile loads, warpgroup MMA fences,
// shared-memory matrix descriptors, register reallocation and named barriers. Inline PTX only.
#pragma once
// Needs common.cuh included first (u32, FA_DEVICE).

typedef unsigned long long u64;

// A CUtensorMap as the driver encodes it (cuTensorMapEncodeTiled); passed inside a __grid_constant__
// parameter block, never copied.
struct __align__(128) TmaMap { u64 opaque[16]; };

// ---------------------------------------------------------------- mbarriers (shared::cta, 64-bit)
FA_DEVICE void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
// Makes initialised barriers visible to the async proxy (TMA) and the other threads (with a CTA barrier).
FA_DEVICE void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
FA_DEVICE void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
FA_DEVICE void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
// Waits until the phase with parity `parity` has completed.
FA_DEVICE void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// ---------------------------------------------------------------- TMA
FA_DEVICE void tma_prefetch_desc(const TmaMap* m) {
    asm volatile("prefetch.tensormap [%0];" :: "l"((u64)m) : "memory");
}
// Rank-4 tile load {c0, c1, c2, c3} -> shared `dst`, completing `bytes` of transaction count on `bar`.
FA_DEVICE void tma_load_4d(u32 dst, const TmaMap* m, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];"
        :: "r"(dst), "l"((u64)m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}

// Rank-4 tile store, shared `src` -> {c0, c1, c2, c3} (the box's parts outside the tensor are not written), in
// the thread's current bulk group; then the group's commit, and the waits: until the sources have been read
// (the shared memory may be rewritten), or until the writes are done.
FA_DEVICE void tma_store_4d(const TmaMap* m, u32 src, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];"
        :: "l"((u64)m), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}
// Rank-3 tile reduce-add (the map's element type, here f32), shared `src` -> {c0, c1, c2} (the box's parts outside
// the tensor are skipped), in the thread's current bulk group.
FA_DEVICE void tma_reduce_add_3d(const TmaMap* m, u32 src, int c0, int c1, int c2) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];"
        :: "l"((u64)m), "r"(src), "r"(c0), "r"(c1), "r"(c2) : "memory");
}
// Bulk reduce-add of `bytes` (a multiple of 16; both addresses 16-byte aligned) f32 values from shared `src` into
// global `dst`, performed in the L2, in the thread's current bulk group.
FA_DEVICE void bulk_reduce_add_f32(float* dst, u32 src, u32 bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 :: "l"(dst), "r"(src), "r"(bytes) : "memory");
}
FA_DEVICE void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
FA_DEVICE void bulk_wait_read_all() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
FA_DEVICE void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// ---------------------------------------------------------------- warpgroup MMA ordering
FA_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
FA_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> FA_DEVICE void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// Keeps the compiler from moving register accesses of an accumulator across wgmma issue/wait points.
template <int N> FA_DEVICE void reg_fence(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i]) :: "memory");
}
template <int N> FA_DEVICE void reg_fence(u32* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i]) :: "memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major tiles: rows of 128 bytes, 8-row groups 1024 B
// apart (SBO), LBO unused. MN-major tiles (V for P.V): 8 K-rows of 128 B per 1024 B group (SBO = 1024), the
// next 64 MN-columns `lbo` bytes further (LBO).
FA_DEVICE u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    u64 d = 0;
    d |= (u64)((addr & 0x3FFFF) >> 4);
    d |= (u64)((lbo & 0x3FFFF) >> 4) << 16;
    d |= (u64)((sbo & 0x3FFFF) >> 4) << 32;
    d |= (u64)1 << 62;  // 128B swizzle
    return d;
}

// ---------------------------------------------------------------- registers, named barriers
template <int N> FA_DEVICE void regs_dealloc() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(N)); }
template <int N> FA_DEVICE void regs_alloc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(N)); }
FA_DEVICE void named_sync(int id, int threads) { asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory"); }
FA_DEVICE void named_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(threads) : "memory"); }

// ---------------------------------------------------------------- kernel frame
// Thread 0 initialises the CTA's mbarriers (`init`) and fences them for the async proxy; a CTA barrier then makes
// them visible to every thread.
template <class F> FA_DEVICE void init_mbarriers(F init) {
    if (threadIdx.x == 0) {
        init();
        mbar_init_fence();
    }
    __syncthreads();
}
