//! TMA tensor maps (`cuTensorMapEncodeTiled`) over the 16-bit q, k, v and dO tensors of the Hopper kernels:
//! rank 4 `{d, rows, heads, batch}`, a 64 x `box_rows` box, the 128-byte swizzle; and over the backward's f32 dQ
//! accumulator (rank 3, 32-column boxes).

use super::tensor::DevView;
use cudarc::driver::sys as dsys;
use std::ffi::c_void;

/// A rank-4 tensor map over 16-bit elements with dims `[d, rows, heads, batch]` (innermost first), a 64 x
/// `box_rows` box and the 128-byte swizzle; `None` when the driver refuses the layout.
pub(crate) fn tensor_map(view: &DevView, dims: [usize; 4], box_rows: u32) -> Option<dsys::CUtensorMap> {
    let (dims, strides, boxd) = map_layout(view, dims, box_rows);
    encode_map(view.ptr, dims, strides, boxd)
}

/// Dims, byte strides and box of the rank-4 maps: dims `[d, rows, heads, batch]` with a 64 x `box_rows` box.
fn map_layout(view: &DevView, [d, rows, heads, batch]: [usize; 4], box_rows: u32) -> ([u64; 4], [u64; 3], [u32; 4]) {
    let (rb, hb, bb) = byte_strides(view, rows, heads, batch);
    ([d as u64, rows as u64, heads as u64, batch as u64], [rb, hb, bb], [64, box_rows, 1, 1])
}

/// Row, head and batch strides of a view in bytes; a dimension of extent 1 is never stepped over and gets a
/// stride the driver accepts.
fn byte_strides(view: &DevView, rows: usize, heads: usize, batch: usize) -> (u64, u64, u64) {
    let e = 2u64;
    let (rb, hb) = (view.row as u64 * e, view.head as u64 * e);
    let mut bb = view.batch as u64 * e;
    let safe = (rb * rows as u64).max(hb * heads as u64).max(16).next_multiple_of(16);
    if batch == 1 || bb == 0 {
        bb = safe;
    }
    let hb = if heads == 1 || hb == 0 { safe } else { hb };
    let rb = if rows == 1 || rb == 0 { safe } else { rb };
    (rb, hb, bb)
}

/// The map of the backward's f32 dQ accumulator `[rows_q, h, head_dim]` (contiguous) as dims `{head_dim, h,
/// rows_q}` with a box of 32 columns (128 bytes) x one head x `box_rows` rows and the 128-byte swizzle, for the
/// sm90 backward's tile reduce-adds; `None` when the driver refuses it.
pub(crate) fn dq_accum_map(
    ptr: u64,
    head_dim: usize,
    h: usize,
    rows_q: usize,
    box_rows: u32,
) -> Option<dsys::CUtensorMap> {
    let (dims, strides, boxd) = dq_accum_layout(head_dim, h, rows_q, box_rows);
    encode(dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32, ptr, &dims, &strides, &boxd)
}

/// Dims, byte strides and box of [`dq_accum_map`].
fn dq_accum_layout(head_dim: usize, h: usize, rows_q: usize, box_rows: u32) -> ([u64; 3], [u64; 2], [u32; 3]) {
    let (hd, h, rows) = (head_dim as u64, h.max(1) as u64, rows_q.max(1) as u64);
    ([hd, h, rows], [hd * 4, hd * 4 * h], [32, 1, box_rows])
}

/// Encodes a rank-4 tiled map over 16-bit elements with the 128-byte swizzle; `None` when the driver refuses it.
fn encode_map(ptr: u64, dims: [u64; 4], strides: [u64; 3], boxd: [u32; 4]) -> Option<dsys::CUtensorMap> {
    encode(dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16, ptr, &dims, &strides, &boxd)
}

/// Encodes a tiled map of rank `dims.len()` (`strides`: the byte strides of dims 1..) with the 128-byte swizzle.
fn encode(
    dtype: dsys::CUtensorMapDataType,
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    boxd: &[u32],
) -> Option<dsys::CUtensorMap> {
    debug_assert!(strides.len() + 1 == dims.len() && boxd.len() == dims.len() && dims.len() <= 5);
    let estr = [1u32; 5];
    // SAFETY: an all-zero CUtensorMap is a valid value to be overwritten by the encoder.
    let mut map: dsys::CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: every pointer refers to a live local array of the rank the call is told; the global address
    // is a device pointer the tensor map only records.
    let r = unsafe {
        dsys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            dims.len() as u32,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    (r == dsys::CUresult::CUDA_SUCCESS).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_map_layout() {
        // q [b 2, s 40, h 32, d 128] contiguous: strides in elements row 32 * 128, head 128, batch 40 * 32 * 128.
        let view = DevView { ptr: 0, batch: 40 * 32 * 128, row: 32 * 128, head: 128 };
        let (dims, strides, boxd) = map_layout(&view, [128, 40, 32, 2], 128);
        assert_eq!((dims, strides, boxd), ([128, 40, 32, 2], [8192, 256, 327680], [64, 128, 1, 1]));
    }

    #[test]
    fn dq_accum_layout_is_token_major() {
        // dq_accum [rows_q 300, h 8, 64] f32: a head's row is 256 bytes, a query's 8 heads 2048; boxes of 32 columns
        // (128 bytes, the swizzle span) x one head x BM 128 rows.
        assert_eq!(dq_accum_layout(64, 8, 300, 128), ([64, 8, 300], [256, 2048], [32, 1, 128]));
    }
}
