//! `#[repr(C)]` mirrors of the kernels' parameter blocks (`kernels/params.cuh`). Change both together: the
//! unit test below pins sizes and field offsets to the layout the C++ compiler gives the structs.

use std::ffi::c_void;

/// Mirror of `FwdParams` (all strides in elements; see `params.cuh`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FwdParams {
    /// Query base pointer.
    pub q: *const c_void,
    /// Key base pointer.
    pub k: *const c_void,
    /// Value base pointer.
    pub v: *const c_void,
    /// Output base pointer (q's dtype).
    pub o: *mut c_void,
    /// Log-sum-exp output (`f32`).
    pub lse: *mut f32,
    /// q strides: batch, row, head.
    pub q_batch_stride: i64,
    /// See `q_batch_stride`.
    pub q_row_stride: i64,
    /// See `q_batch_stride`.
    pub q_head_stride: i64,
    /// k strides: batch, row, head.
    pub k_batch_stride: i64,
    /// See `k_batch_stride`.
    pub k_row_stride: i64,
    /// See `k_batch_stride`.
    pub k_head_stride: i64,
    /// v strides: batch, row, head.
    pub v_batch_stride: i64,
    /// See `v_batch_stride`.
    pub v_row_stride: i64,
    /// See `v_batch_stride`.
    pub v_head_stride: i64,
    /// o strides: batch, row, head.
    pub o_batch_stride: i64,
    /// See `o_batch_stride`.
    pub o_row_stride: i64,
    /// See `o_batch_stride`.
    pub o_head_stride: i64,
    /// lse strides: batch (dense only), head.
    pub lse_batch_stride: i64,
    /// See `lse_batch_stride`.
    pub lse_head_stride: i64,
    /// Batch size.
    pub b: i32,
    /// Query heads.
    pub h: i32,
    /// Key/value heads.
    pub hk: i32,
    /// Query length (dense) or longest query sequence (varlen).
    pub sq: i32,
    /// Key length (dense) or longest key sequence (varlen).
    pub sk: i32,
    /// Real head dim (at most the compiled `HEAD_DIM`).
    pub d: i32,
    /// `[b + 1]` or null.
    pub cu_seqlens_q: *const i32,
    /// `[b + 1]` or null.
    pub cu_seqlens_k: *const i32,
    /// `[b]` or null.
    pub seqused_k: *const i32,
    /// Softmax scale.
    pub scale: f32,
    /// Soft-capping (0 = off).
    pub softcap: f32,
    /// ALiBi slopes `[h]` / `[b, h]` or null.
    pub alibi_slopes: *const f32,
    /// 0 for `[h]` slopes, `h` for `[b, h]`.
    pub alibi_batch_stride: i64,
    /// Window left (-1 = unbounded).
    pub window_left: i32,
    /// Window right (-1 = unbounded).
    pub window_right: i32,
    /// Learnable sink logits `f32 [h]` or null (the forward folds it in; the backward's sink variant reads
    /// it for `dsink`).
    pub sink: *const f32,
}

/// Mirror of `FwdDvParams`: the forward of a variant with a value head dim of its own (`HEAD_DIM_V`), whose v
/// and o have the last dim `d_v`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FwdDvParams {
    /// Every other field.
    pub f: FwdParams,
    /// Real value head dim (at most the compiled `HEAD_DIM_V`).
    pub d_v: i32,
    /// Padding (the C struct's `pad_`).
    pub pad_: i32,
}

/// Mirror of `BwdParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BwdParams {
    /// The forward's fields (o and lse are inputs here).
    pub fwd: FwdParams,
    /// Upstream gradient, laid out like o.
    pub dout: *const c_void,
    /// dQ output.
    pub dq: *mut c_void,
    /// dK output.
    pub dk: *mut c_void,
    /// dV output.
    pub dv: *mut c_void,
    /// dO strides: batch, row, head.
    pub do_batch_stride: i64,
    /// See `do_batch_stride`.
    pub do_row_stride: i64,
    /// See `do_batch_stride`.
    pub do_head_stride: i64,
    /// dQ strides.
    pub dq_batch_stride: i64,
    /// See `dq_batch_stride`.
    pub dq_row_stride: i64,
    /// See `dq_batch_stride`.
    pub dq_head_stride: i64,
    /// dK strides.
    pub dk_batch_stride: i64,
    /// See `dk_batch_stride`.
    pub dk_row_stride: i64,
    /// See `dk_batch_stride`.
    pub dk_head_stride: i64,
    /// dV strides.
    pub dv_batch_stride: i64,
    /// See `dv_batch_stride`.
    pub dv_row_stride: i64,
    /// See `dv_batch_stride`.
    pub dv_head_stride: i64,
    /// Scratch `f32 [h, rows_q]`.
    pub dpsum: *mut f32,
    /// Scratch `f32 [h, rows_q]`.
    pub lse_log2: *mut f32,
    /// Scratch `f32 [rows_q, h, HEAD_DIM]`.
    pub dq_accum: *mut f32,
    /// Scratch `i32 [b, h, ceil(sq / BM)]` (deterministic mode) or null.
    pub dq_semaphore: *mut i32,
    /// `b * sq` (dense) or `total_q` (varlen).
    pub rows_q: i32,
    /// 1 when lse and D come from this call's keys (a one-key row then gets `dS = 0` exactly); 0 when they
    /// come from a larger softmax (ring attention, split keys).
    pub exact_one_key: i32,
    /// With a sink: per-warp partial `dsink` sums, `f32 [b, h, dsink_blocks, 8]`, zeroed before the main kernel.
    pub dsink_part: *mut f32,
    /// With a sink: the sink's gradient, `f32 [h]`, written by `flash_bwd_dsink`.
    pub dsink: *mut f32,
    /// 64-key blocks of the longest key sequence (the partial buffer's third extent).
    pub dsink_blocks: i32,
    /// Real value head dim of v, o, dO and dV (read by the variants with a value head dim of its own; the
    /// others use `fwd.d`).
    pub d_v: i32,
}

impl Default for FwdParams {
    fn default() -> Self {
        // SAFETY: every field is a raw pointer, an integer or a float, for which all-zero bits are valid
        // (null pointers, zeros).
        unsafe { std::mem::zeroed() }
    }
}

impl Default for BwdParams {
    fn default() -> Self {
        // SAFETY: as for `FwdParams`.
        unsafe { std::mem::zeroed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets as the C ABI lays out `params.cuh` on a 64-bit target (8-byte pointers and `long long`).
    #[test]
    fn layout_matches_params_cuh() {
        assert_layout!(FwdParams, size 240, {
            q: 0,
            lse: 32,
            q_batch_stride: 40,
            lse_head_stride: 40 + 13 * 8,
            b: 152,
            d: 172,
            cu_seqlens_q: 176,
            seqused_k: 192,
            scale: 200,
            softcap: 204,
            alibi_slopes: 208,
            alibi_batch_stride: 216,
            window_left: 224,
            window_right: 228,
            sink: 232,
        });

        assert_layout!(BwdParams, size 432, {
            dout: 240,
            dv: 264,
            do_batch_stride: 272,
            dv_head_stride: 272 + 11 * 8,
            dpsum: 368,
            dq_semaphore: 392,
            rows_q: 400,
            exact_one_key: 404,
            dsink_part: 408,
            dsink: 416,
            dsink_blocks: 424,
            d_v: 428,
        });

        assert_layout!(FwdDvParams, size 248, {
            f: 0,
            d_v: 240,
        });
    }
}
