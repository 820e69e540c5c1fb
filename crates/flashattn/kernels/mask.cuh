// Device side of visibility, ALiBi and soft-capping, exactly as in docs spec ATTENTION.md
// ("Scores" and "Visibility"), plus block-range helpers for skipping invisible tiles.
//
// Coordinates are 0-based within one sequence: query row i in [0, sq), key column j in [0, sk), where sk
// is the number of keys actually used (seqused_k / varlen length) and sq the sequence's query count.
// Every mask is aligned to the bottom-right corner: off = sk - sq, and key j is visible to row i when
//   j < sk  and  (wr < 0 || j <= i + off + wr)  and  (wl < 0 || j >= i + off - wl)
// Causal is the window (wl, wr) = (-1, 0). A window side of -1 is unbounded.
#pragma once
#include "common.cuh"

struct MaskCtx {
    int sq;   // queries in this sequence
    int sk;   // keys used by this sequence
    int wl;   // window left, -1 = unbounded
    int wr;   // window right, -1 = unbounded
    FA_DEVICE int off() const { return sk - sq; }
};

// Sets the mask context of one sequence: its query and key counts and, in a HAS_MASK variant, the window of the
// call's parameters `p` (any parameter block with window_left / window_right); unbounded on both sides otherwise,
// so that a variant without a mask compiles the window tests away. (Filled in place rather than returned: the
// kernels compile to the same code as with the fields written at the call site.)
template <class P>
FA_DEVICE void set_mask_ctx(MaskCtx& mc, int sq, int sk, const P& p) {
    mc.sq = sq;
    mc.sk = sk;
#if HAS_MASK
    mc.wl = p.window_left;
    mc.wr = p.window_right;
#else
    mc.wl = -1;
    mc.wr = -1;
#endif
}

// Key j visible to query i?
FA_DEVICE bool is_visible(const MaskCtx& m, int i, int j) {
    const int c = i + m.sk - m.sq;
    return j < m.sk && j >= 0 && (m.wr < 0 || j <= c + m.wr) && (m.wl < 0 || j >= c - m.wl);
}

// Whether query i sees exactly one key. Its softmax is then identically 1, so dS = P (dP - D) is exactly 0;
// the backward returns that exact zero instead of the rounding noise left by D = rowsum(dO * O) and dP = dO . V
// being summed in different orders (which would otherwise accumulate into dK over many such rows).
FA_DEVICE bool sees_one_key(const MaskCtx& m, int i) {
    const int c = i + m.sk - m.sq;
    const int lo = m.wl < 0 ? 0 : (c - m.wl > 0 ? c - m.wl : 0);
    const int hi = m.wr < 0 ? m.sk - 1 : (c + m.wr < m.sk - 1 ? c + m.wr : m.sk - 1);
    return hi == lo;
}

// Soft-capping of an already scaled score: softcap * tanh(s / softcap). `inv_softcap` = 1 / softcap.
FA_DEVICE float apply_softcap(float s, float softcap, float inv_softcap) { return softcap * tanh_accurate(s * inv_softcap); }

// ALiBi bias (to add to the scaled, soft-capped score): -slope * |i + sk - sq - j|.
FA_DEVICE float alibi_bias(float slope, int i, int j, int off) {
    int d = i + off - j;
    return -slope * (float)(d < 0 ? -d : d);
}

// Floor division for possibly negative numerators (b > 0).
FA_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Key blocks of width BN that hold at least one key visible to some row of [row_lo, row_hi] (inclusive,
// clipped to valid rows by the caller): [*nb_lo, *nb_hi). Empty when *nb_hi <= *nb_lo.
// With has_window = false only j < sk limits the range.
FA_DEVICE void kv_block_range(const MaskCtx& m, bool has_window, int row_lo, int row_hi, int BN, int* nb_lo, int* nb_hi) {
    int hi = (m.sk + BN - 1) / BN;
    int lo = 0;
    if (has_window) {
        const int off = m.off();
        if (m.wr >= 0) {
            int last = row_hi + off + m.wr;  // last visible key of the lowest row
            int b = last < 0 ? 0 : last / BN + 1;
            hi = b < hi ? b : hi;
        }
        if (m.wl >= 0) {
            int first = row_lo + off - m.wl;  // first visible key of the top row
            lo = first <= 0 ? 0 : first / BN;
        }
    }
    *nb_lo = lo;
    *nb_hi = hi;
}

// Query blocks of height BM holding at least one row that sees a key of [col_lo, col_hi] (for kernels that
// walk queries for a fixed key block, e.g. the backward): [*mb_lo, *mb_hi).
FA_DEVICE void q_block_range(const MaskCtx& m, bool has_window, int col_lo, int col_hi, int BM, int* mb_lo, int* mb_hi) {
    int hi = (m.sq + BM - 1) / BM;
    int lo = 0;
    if (col_lo >= m.sk) { *mb_lo = 0; *mb_hi = 0; return; }
    if (has_window) {
        const int off = m.off();
        if (m.wr >= 0) {  // row i sees col_lo' >= ... : need i >= col_lo - off - wr
            int first = col_lo - off - m.wr;
            lo = first <= 0 ? 0 : first / BM;
        }
        if (m.wl >= 0) {  // need i <= col_hi - off + wl
            int last = col_hi - off + m.wl;
            int b = last < 0 ? 0 : last / BM + 1;
            hi = b < hi ? b : hi;
        }
    }
    *mb_lo = lo;
    *mb_hi = hi;
}

// Does the tile rows [row_lo, row_hi] x cols [col_lo, col_lo + BN) contain any invisible element (including
// j >= sk)? If not, per-element masking can be skipped for it.
FA_DEVICE bool tile_needs_mask(const MaskCtx& m, bool has_window, int row_lo, int row_hi, int col_lo, int BN) {
    const int col_hi = col_lo + BN - 1;
    if (col_hi >= m.sk) return true;
    if (!has_window) return false;
    const int off = m.off();
    if (m.wr >= 0 && col_hi > row_lo + off + m.wr) return true;
    if (m.wl >= 0 && col_lo < row_hi + off - m.wl) return true;
    return false;
}
