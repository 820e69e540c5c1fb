// Shared-memory x shared-memory wgmma loops of the sm90 kernels, on the tile layout their TMA loads produce.
#pragma once
// Needs common.cuh, sm90/sync.cuh and sm90/wgmma.cuh included first.

// acc[64 x N] (+)= A * B^T over K = KD columns, both operands K-major 128B-swizzled tiles stored as KD/64 panels of
// 128-byte rows: A = 64 rows starting at `sa` (panels A_PANEL bytes apart), B = N rows starting at `sb` (panels
// B_PANEL bytes apart). One wgmma per k16 step (start +32 B inside a panel); the first overwrites acc.
// The forward's S = Q K^T (N 176: the d128 forward's 176-key blocks; N 80: the d256 forward's 80-key blocks) and the backward's S^T = K Q^T, dP^T = V dO^T (N 32: a warpgroup's query half at head dim 256).
template <int N, int KD, unsigned A_PANEL, unsigned B_PANEL>
FA_DEVICE void wgmma_ss_kmajor(float* acc, u32 sa, u32 sb) {
    static_assert(N == 32 || N == 64 || N == 80 || N == 128 || N == 176, "N must be 32, 64, 80, 128 or 176");
#pragma unroll
    for (int kk = 0; kk < KD / 16; ++kk) {
        const u32 pn = kk / 4, w = kk % 4;
        const u64 da = smem_desc(sa + pn * A_PANEL + w * 32, 16, 1024);
        const u64 db = smem_desc(sb + pn * B_PANEL + w * 32, 16, 1024);
        if constexpr (N == 176) {
            wgmma_ss_n176<0>(acc, da, db, kk > 0);
        } else if constexpr (N == 128) {
            wgmma_ss_n128<0>(acc, da, db, kk > 0);
        } else if constexpr (N == 80) {
            wgmma_ss_n80<0>(acc, da, db, kk > 0);
        } else if constexpr (N == 64) {
            wgmma_ss_n64<0>(acc, da, db, kk > 0);
        } else {
            wgmma_ss_n32<0>(acc, da, db, kk > 0);
        }
    }
}
