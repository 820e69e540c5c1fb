//! The Hopper (sm_90a) forward path (`kernels/fwd_sm90.cu`): which problems it covers, the TMA tensor maps
//! of q, k and v, the persistent grid and its tile order. Problems it does not cover run on the sm80-class
//! kernels (`fwd.rs`); `FLASHATTN_CUDA_PATH=sm80` forces that path on Hopper too (to test the fallback).
//! At head dim 64 the forward runs with 3 consumer warpgroups and 192-row query tiles (`-DSM90_CONSUMERS=3`,
//! 512 threads, variant `fwd90_d64_bm192_*`; H200: +5..+22% over the 128-row form from 2k, same call);
//! `FLASHATTN_SM90_BM=128` selects the 128-row form there too (A/B). Other head dims use 128 rows.
//! At head dim 128 without a mask and from 8k keys it uses 176-key K/V blocks (128 x 176 tiles, FA3's d128 shape;
//! `-DSM90_BN_OVERRIDE=176`, O staged in the Q buffer, variant `fwd90_d128_bn176_*`); otherwise 128 keys. At head
//! dim 256 FA3's 80-key blocks (128 x 80 tiles, `fwd90_d256_bn80_*`) are compiled but opt-in: not yet run on a
//! GPU. `FLASHATTN_SM90_BN` forces a form per head dim (`176`/`128`, `80`/`64`; a list such as `176,80`).

use super::compile::{Pass, Variant};
use super::fwd::{check_sizes, fwd_params, variant_for, FwdArgs};
use super::launch::launch;
use super::params::FwdParams;
use super::runtime::{dev_err, Gpu};
use super::tensor::DevView;
use crate::error::Result;
use crate::problem::Problem;
use cudarc::driver::sys as dsys;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// How many sm90 forward kernels this process has launched (tests use it to prove which path ran).
pub fn sm90_forward_launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Head dims the sm90 kernel is compiled for; a problem's `d` runs on the smallest one `>= d`.
pub const SM90_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Query rows per CTA by default (two consumer warpgroups of 64 rows).
const BLOCK_M: usize = 128;

/// Query rows per CTA at head dim 64 (three consumer warpgroups, FA3's d64 tile).
const BLOCK_M_192: usize = 192;

/// Whether the 192-row forward (3 consumer warpgroups, 512 threads) runs at head dim 64: yes unless
/// `FLASHATTN_SM90_BM=128` asks for the 128-row kernel (so that one binary can A/B the two).
fn bm192_requested() -> bool {
    std::env::var("FLASHATTN_SM90_BM").map_or(true, |v| v.trim() != "128")
}

/// GQA packing of the forward (`FLASHATTN_SM90_PACK_GQA=1`; opt-in: not yet run on a GPU).
fn pack_gqa_requested() -> bool {
    std::env::var("FLASHATTN_SM90_PACK_GQA").is_ok_and(|v| v.trim() == "1")
}

/// The TMA-store epilogue of the forward (`FLASHATTN_SM90_TMA_STORE=1`; opt-in: not yet run on a GPU).
fn tma_store_requested() -> bool {
    std::env::var("FLASHATTN_SM90_TMA_STORE").is_ok_and(|v| v.trim() == "1")
}

/// Whether a problem with `h` query heads over `hk` key/value heads runs with the query heads of a group packed
/// into one tile (`-DSM90_PACK_GQA=1`): when asked for, with groups of more than one head that divide the
/// 128 rows of the 2-consumer tile (the Q box is `group` heads x `128 / group` tokens).
pub fn pack_gqa_for(h: usize, hk: usize, requested: bool) -> bool {
    requested && hk > 0 && h > hk && h % hk == 0 && BLOCK_M % (h / hk) == 0
}

/// Keys per K/V block of FA3's wider form of the forward at a head dim, where it has one: 176 at head dim 128
/// (128 x 176 tiles), 80 at head dim 256 (128 x 80 tiles; both as `SM90_BN_OVERRIDE` in `fwd_sm90.cu`).
pub const fn wide_block_n(head_dim: usize) -> Option<usize> {
    match head_dim {
        128 => Some(176),
        256 => Some(80),
        _ => None,
    }
}

/// Whether the list `spec` (comma-separated key-block sizes, the form of `FLASHATTN_SM90_BN`) forces the
/// wide form at `head_dim` (its wide size is listed: `Some(true)`) or the default one (its default size is
/// listed: `Some(false)`); `None` leaves the choice to the rule. `176` / `128` act on head dim 128, `80` / `64`
/// on head dim 256.
fn wide_n_in(spec: &str, head_dim: usize) -> Option<bool> {
    let wide = wide_block_n(head_dim)?;
    let sizes: Vec<usize> = spec.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    if sizes.contains(&wide) {
        Some(true)
    } else if sizes.contains(&block_n(head_dim)) {
        Some(false)
    } else {
        None
    }
}

/// `FLASHATTN_SM90_BN` for A/B runs: see [`wide_n_in`].
fn wide_n_forced(head_dim: usize) -> Option<bool> {
    wide_n_in(&std::env::var("FLASHATTN_SM90_BN").ok()?, head_dim)
}

/// The tile shape of the sm90 forward variant `v` (its head dim and mask set) for a problem of at most
/// `max_keys` keys per sequence; the one place the shape is chosen:
/// - head dim 64: 192 query rows (3 consumer warpgroups) unless `FLASHATTN_SM90_BM=128`;
/// - head dim 128: 176-key K/V blocks without a mask from 8k keys (H200, same binary, bf16 non-causal: 4k +2%,
///   8k +4..12%, 16k +9..12%; but 512-2k 0..-8% and causal -2..-22%, where the larger blocks waste more masked or
///   padded keys and the Q buffer also stages O);
/// - head dim 256: 64-key blocks; the 80-key form (FA3's d256 tile) only when asked for, as it has not yet run
///   on a GPU;
/// - `FLASHATTN_SM90_BN` forces either form per head dim ([`wide_n_in`]);
/// - otherwise 128 x [`block_n`].
pub fn sm90_tile(v: Variant, max_keys: usize) -> Variant {
    let bm192 = v.head_dim == 64 && bm192_requested();
    let rule = v.head_dim == 128 && !v.mask && max_keys >= 8192;
    let wide_n = wide_block_n(v.head_dim).is_some() && wide_n_forced(v.head_dim).unwrap_or(rule);
    Variant { bm192, wide_n, ..v }
}

/// The tile shapes [`sm90_tile`] picks in this process, in words (for `flashattn info` and bench output).
pub fn tile_summary() -> String {
    let mut s = String::new();
    if bm192_requested() {
        s += " (head dim 64: 192-row tiles, 3 consumer warpgroups)";
    }
    s += match wide_n_forced(128) {
        Some(true) => " (head dim 128: 176-key blocks, FLASHATTN_SM90_BN)",
        Some(false) => "",
        None => " (head dim 128 without a mask from 8k keys: 176-key blocks)",
    };
    if wide_n_forced(256) == Some(true) {
        s += " (head dim 256: 80-key blocks, FLASHATTN_SM90_BN)";
    }
    if pack_gqa_requested() {
        s += " (GQA heads packed into 128-row tiles, FLASHATTN_SM90_PACK_GQA)";
    }
    if tma_store_requested() {
        s += " (O stored by TMA where O has its own buffer, FLASHATTN_SM90_TMA_STORE)";
    }
    s
}

/// Query rows per CTA of a compiled sm90 forward variant (`SM90_BM` of the kernel).
pub fn variant_block_m(v: &Variant) -> usize {
    if v.is_bm192() {
        BLOCK_M_192
    } else {
        BLOCK_M
    }
}

/// Keys per K/V block of a compiled sm90 forward variant (`SM90_BN` of the kernel).
pub fn variant_block_n(v: &Variant) -> usize {
    v.wide_block_n().unwrap_or_else(|| block_n(v.head_dim))
}

/// Threads per CTA for `block_m` query rows: a producer warpgroup plus one consumer warpgroup per 64 rows
/// (`SM90_THREADS`).
pub fn threads(block_m: usize) -> u32 {
    (128 * (block_m / 64 + 1)) as u32
}

/// Mirror of `Sm90Params` in `fwd_sm90.cu`: the forward fields, the scheduler's numbers, the tensor maps of q, k,
/// v and o (o's: 64 x 64 boxes, read only by the TMA-store variant; zero otherwise).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Sm90Params {
    f: FwdParams,
    num_m_blocks: i32,
    l2_group: i32,
    pingpong: i32,
    tq: dsys::CUtensorMap,
    tk: dsys::CUtensorMap,
    tv: dsys::CUtensorMap,
    to: dsys::CUtensorMap,
}

/// The padded head dim of the sm90 kernel for head dim `d`.
pub fn sm90_head_dim(d: usize) -> Option<usize> {
    SM90_HEAD_DIMS.iter().copied().find(|&h| h >= d)
}

/// Key rows per block by default (`SM90_BN` of the kernel without `SM90_BN_OVERRIDE`).
pub fn block_n(head_dim: usize) -> usize {
    if head_dim <= 128 {
        128
    } else {
        64
    }
}

/// Dynamic shared memory of a compiled sm90 forward variant.
fn variant_smem(v: &Variant) -> u32 {
    smem_bytes(v.head_dim, variant_block_m(v), variant_block_n(v))
}

/// Dynamic shared memory of the kernel with `block_m` query rows and `block_n` keys per K/V block
/// (`SM90_SMEM_BYTES`: Q, an O staging buffer for d <= 128 with blocks of at most 128 keys, 2 x K, 2 x V,
/// barriers, alignment slack).
pub fn smem_bytes(head_dim: usize, block_m: usize, block_n: usize) -> u32 {
    let o = if o_separate(head_dim, block_n) { block_m } else { 0 };
    ((block_m + o + 4 * block_n) * head_dim * 2 + 128 + 1024) as u32
}

/// Whether the kernel stages O in a buffer of its own (`SM90_O_SEPARATE`): d <= 128 with blocks of at most 128
/// keys; elsewhere there is no room, and O goes through the Q buffer.
pub fn o_separate(head_dim: usize, block_n: usize) -> bool {
    head_dim <= 128 && block_n <= 128
}

/// The forced path, if any: `FLASHATTN_CUDA_PATH=sm80` (never the sm90 kernel) or `sm90`.
pub fn path_override() -> Option<String> {
    std::env::var("FLASHATTN_CUDA_PATH").ok().map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty())
}

/// Whether the sm90 kernel runs this problem on this device: a Hopper device (sm_90a cubins), f16/bf16,
/// head dim <= 256, 16-byte aligned pointers and strides (TMA), non-empty q and k, no `seqused_k`, and no
/// override. (`seqused_k` runs on the sm80-class kernel: the TMA reads whole key blocks, and the unused slots
/// of a cache may hold anything, NaN included, which a zero probability times NaN would let through.)
pub(crate) fn covers(gpu: &Gpu, p: &Problem, aligned16: bool) -> bool {
    if gpu.arch != "sm_90a" || path_override().as_deref() == Some("sm80") {
        return false;
    }
    if sm90_head_dim(p.d).is_none() {
        return false;
    }
    aligned16
        && p.total_q > 0
        && p.total_k > 0
        && p.batch > 0
        && p.seqused_k.is_none()
        && check_sizes(p).is_ok()
        && sm90_variant(p).is_ok_and(|v| variant_smem(&v) as i64 <= gpu.smem_optin as i64)
}

/// The sm90 variant of a problem, with the tile shape of [`sm90_tile`], GQA packing where [`pack_gqa_for`] says
/// so (which takes precedence over the 192-row d64 form), and the TMA-store epilogue where
/// [`tma_store_for`] does.
pub(crate) fn sm90_variant(p: &Problem) -> Result<Variant> {
    let v = variant_for(p, Pass::Fwd, true, false)?;
    let head_dim = sm90_head_dim(p.d).unwrap_or(v.head_dim);
    let t = sm90_tile(Variant { pass: Pass::FwdSm90, head_dim, aligned16: true, ..v }, p.max_seqlen_k());
    let t = Variant { pack_gqa: pack_gqa_for(p.h, p.hk, pack_gqa_requested()), ..t };
    Ok(Variant { tma_store: tma_store_for(&t, tma_store_requested()), ..t })
}

/// Whether variant `v` stores O by TMA boxes: when asked for, with a separate O buffer, without varlen (a box
/// would cover the next sequence's rows) and without GQA packing (rows are not box-shaped there).
pub fn tma_store_for(v: &Variant, requested: bool) -> bool {
    requested && o_separate(v.head_dim, variant_block_n(v)) && !v.varlen && !v.is_pack_gqa()
}

/// A rank-4 tensor map `{d, rows, heads, batch}` over 16-bit elements with a 64 x `box_rows` box and the
/// 128-byte swizzle; `None` when the driver refuses the layout.
pub(crate) fn tensor_map(
    view: &DevView,
    d: usize,
    rows: usize,
    heads: usize,
    batch: usize,
    box_rows: u32,
) -> Option<dsys::CUtensorMap> {
    let (dims, strides, boxd) = map_layout(view, d, rows, heads, batch, None, box_rows);
    encode_map(view.ptr, dims, strides, boxd)
}

/// The Q map of the GQA-packed forward: `{d, heads, rows, batch}` with a box of 64 columns x `group` heads x
/// `box_rows` tokens, so that a box lands in shared memory as folded rows `token * group + head-in-group`.
pub(crate) fn tensor_map_gqa(
    view: &DevView,
    d: usize,
    rows: usize,
    heads: usize,
    batch: usize,
    group: u32,
    box_rows: u32,
) -> Option<dsys::CUtensorMap> {
    let (dims, strides, boxd) = map_layout(view, d, rows, heads, batch, Some(group), box_rows);
    encode_map(view.ptr, dims, strides, boxd)
}

/// Dims, byte strides and box of the rank-4 maps: `{d, rows, heads, batch}` with a 64 x `box_rows` box, or with
/// `group` (GQA packing) `{d, heads, rows, batch}` with a 64 x `group` x `box_rows` box.
fn map_layout(
    view: &DevView,
    d: usize,
    rows: usize,
    heads: usize,
    batch: usize,
    group: Option<u32>,
    box_rows: u32,
) -> ([u64; 4], [u64; 3], [u32; 4]) {
    let (rb, hb, bb) = byte_strides(view, rows, heads, batch);
    let (d, rows, heads, batch) = (d as u64, rows as u64, heads as u64, batch as u64);
    match group {
        None => ([d, rows, heads, batch], [rb, hb, bb], [64, box_rows, 1, 1]),
        Some(g) => ([d, heads, rows, batch], [hb, rb, bb], [64, g, box_rows, 1]),
    }
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

/// Encodes a rank-4 tiled map over 16-bit elements with the 128-byte swizzle; `None` when the driver refuses it.
fn encode_map(ptr: u64, dims: [u64; 4], strides: [u64; 3], boxd: [u32; 4]) -> Option<dsys::CUtensorMap> {
    let estr: [u32; 4] = [1, 1, 1, 1];
    // SAFETY: an all-zero CUtensorMap is a valid value to be overwritten by the encoder.
    let mut map: dsys::CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: every pointer refers to a live local array of the rank the call is told; the global address
    // is a device pointer the tensor map only records.
    let r = unsafe {
        dsys::cuTensorMapEncodeTiled(
            &mut map,
            dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            4,
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

/// (batch, head) pairs per scheduling group, so that the group's K/V (8 or 24 MiB) stay in the L2. With
/// masks, tiles differ in length and the snake walk balances them only over a group of at least two
/// rounds of the grid, so groups are made at least that large. Causal-like masks (no left window edge) over
/// 4k keys or more use one group, the global longest-first order: the walk is static, so each group boundary
/// leaves some CTAs a last long tile while others end on short ones, and at these lengths one tile is about an
/// eighth of a CTA's whole share. H200, same call (bf16, standard grid, causal): one group instead of 24 MiB
/// gave d128 4k/8k/16k +7/+12/+12%, d256 +18/+18/+19%, d64 8k/16k +26/+21% (4k -4%); at 512-2k the
/// 24 MiB groups were faster (L2 reuse: up to 10%), docs/notes/cuda-sm90.md.
/// With GQA packing the tiles walk (batch, key/value head) pairs, one per key/value head's K/V.
fn l2_group(p: &Problem, head_dim: usize, sk: usize, num_m_blocks: usize, ctas: usize, packed: bool) -> i32 {
    let all = (p.batch * if packed { p.hk } else { p.h }).max(1) as u64;
    let per_kv_head = (sk.max(1) * head_dim * 4) as u64; // K + V, 16-bit
    let q_per_kv = if packed { 1 } else { (p.h / p.hk.max(1)).max(1) as u64 };
    // Budget: 8 MiB without masks, 24 MiB with (same-call A/B on the H100, docs/notes/cuda-sm90.md);
    // FLASHATTN_SM90_L2_MIB overrides it (and the causal rule) for A/B runs.
    let forced = std::env::var("FLASHATTN_SM90_L2_MIB").ok().and_then(|v| v.trim().parse::<u64>().ok());
    if forced.is_none() && p.mask.is_active() && p.mask.left.is_none() && sk >= 4096 {
        return all as i32;
    }
    let mib = forced.unwrap_or(if p.mask.is_active() { 24 } else { 8 });
    let mut g = ((mib.max(1) << 20) / per_kv_head).max(1) * q_per_kv;
    if p.mask.is_active() {
        g = g.max((2 * ctas).div_ceil(num_m_blocks.max(1)) as u64);
    }
    g.min(all).max(1) as i32
}

/// Whether the consumer warpgroups ping-pong: on (measured faster at every head dim,
/// docs/notes/cuda-sm90.md); `FLASHATTN_SM90_PINGPONG=0` turns it off for A/B runs.
fn pingpong() -> bool {
    std::env::var("FLASHATTN_SM90_PINGPONG").map_or(true, |v| v.trim() != "0")
}

/// Runs the sm90 forward on `stream`. Returns `Ok(false)` without launching when the driver refuses a
/// tensor map for these layouts (the caller then runs the sm80-class kernel).
pub(crate) fn run(gpu: &Gpu, stream: dsys::CUstream, p: &Problem, a: &FwdArgs) -> Result<bool> {
    let v = sm90_variant(p)?;
    let hd = v.head_dim;
    let bm = variant_block_m(&v);
    let bn = variant_block_n(&v);
    let (q_rows, k_rows, batch) =
        if p.varlen { (p.total_q, p.total_k, 1) } else { (p.dense_sq, p.total_k / p.batch, p.batch) };
    // GQA packing: `group` query heads x `bm / group` tokens per Q box (pack_gqa_for: bm is a multiple of group).
    let packed = v.is_pack_gqa();
    let group = p.h / p.hk.max(1);
    let tq = if packed {
        tensor_map_gqa(&a.q, p.d, q_rows, p.h, batch, group as u32, (bm / group) as u32)
    } else {
        tensor_map(&a.q, p.d, q_rows, p.h, batch, bm as u32)
    };
    let maps = (
        tq,
        tensor_map(&a.k, p.d, k_rows, p.hk, batch, bn as u32),
        tensor_map(&a.v, p.d, k_rows, p.hk, batch, bn as u32),
    );
    let (Some(tq), Some(tk), Some(tv)) = maps else { return Ok(false) };
    // o's map (64-row boxes: one per consumer warpgroup and 64-column panel), only for the TMA-store variant;
    // every other variant never reads it.
    let to = if v.is_tma_store() {
        match tensor_map(&a.o, p.d, q_rows, p.h, batch, 64) {
            Some(m) => m,
            None => return Ok(false),
        }
    } else {
        // SAFETY: an all-zero CUtensorMap is a valid value; the kernel does not read it in this variant.
        unsafe { std::mem::zeroed() }
    };
    let m = gpu.module(&v)?;
    let f = fwd_params(p, a);
    // Packed: folded rows (token x group) per sequence, tiles over (batch, key/value head).
    let (rows_per_seq, walk_heads) = if packed { (f.sq as usize * group, p.hk) } else { (f.sq as usize, p.h) };
    let num_m_blocks = rows_per_seq.div_ceil(bm);
    let tiles = num_m_blocks * p.batch * walk_heads;
    let sms = gpu
        .ctx
        .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| dev_err("reading the multiprocessor count", e))?
        .max(1) as usize;
    let ctas = tiles.min(sms).max(1);
    let params = Sm90Params {
        f,
        num_m_blocks: num_m_blocks as i32,
        l2_group: l2_group(p, hd, f.sk as usize, num_m_blocks, ctas, packed),
        pingpong: pingpong() as i32,
        tq,
        tk,
        tv,
        to,
    };
    let grid = (ctas as u32, 1, 1);
    let smem = variant_smem(&v);
    // SAFETY: `params` mirrors Sm90Params (layout pinned by the test below); its pointers and tensor maps
    // describe buffers sized for this problem.
    unsafe { launch(&m.kernels["flash_fwd_sm90"], "flash_fwd_sm90", stream, grid, threads(bm), smem, &params)? };
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn causal_long_problems_schedule_one_group() {
        if std::env::var("FLASHATTN_SM90_L2_MIB").is_ok() {
            return; // the override replaces the rule
        }
        use crate::options::AttnOptions;
        let problem = |s: usize, causal: bool, window: (i64, i64)| {
            let q = crate::tensor::Tensor::zeros(&[4, s, 16, 128], crate::dtype::DType::BF16);
            let opts = AttnOptions { causal, window, ..AttnOptions::default() };
            crate::problem::validate(&q.view(), &q.view(), &q.view(), &opts).unwrap()
        };
        // 64 (batch, head) pairs. Causal from 4k keys: all of them in one group.
        assert_eq!(l2_group(&problem(4096, true, (-1, -1)), 128, 4096, 32, 132, false), 64);
        // Causal at 2k: the 24 MiB budget (1 MiB of K/V per head: 24 pairs, above the two-round minimum of 17).
        assert_eq!(l2_group(&problem(2048, true, (-1, -1)), 128, 2048, 16, 132, false), 24);
        // A window with a left edge at 4k: the budget (2 MiB per head: 12 pairs, the minimum of 9 below it).
        assert_eq!(l2_group(&problem(4096, false, (100, 0)), 128, 4096, 32, 132, false), 12);
        // No mask: 8 MiB (4 pairs at 4k).
        assert_eq!(l2_group(&problem(4096, false, (-1, -1)), 128, 4096, 32, 132, false), 4);
    }

    #[test]
    fn layout_matches_fwd_sm90_cu() {
        assert_eq!(offset_of!(Sm90Params, num_m_blocks), 232);
        assert_eq!(offset_of!(Sm90Params, l2_group), 236);
        assert_eq!(offset_of!(Sm90Params, pingpong), 240);
        assert_eq!(offset_of!(Sm90Params, tq), 256);
        assert_eq!(offset_of!(Sm90Params, tk), 384);
        assert_eq!(offset_of!(Sm90Params, tv), 512);
        assert_eq!(offset_of!(Sm90Params, to), 640);
        assert_eq!(size_of::<Sm90Params>(), 768);
    }

    #[test]
    fn head_dims_and_smem() {
        assert_eq!(sm90_head_dim(40), Some(64));
        assert_eq!(sm90_head_dim(96), Some(128));
        assert_eq!(sm90_head_dim(192), Some(256));
        assert_eq!(sm90_head_dim(257), None);
        // d256: Q 64 KiB + 2 x K + 2 x V (32 KiB each) + barriers + alignment slack, under 227 KiB.
        assert_eq!(smem_bytes(256, BLOCK_M, 64), 196608 + 1152);
        assert_eq!(smem_bytes(128, BLOCK_M, 128), (2 * 128 + 4 * 128) * 128 * 2 + 1152);
        assert!(smem_bytes(128, BLOCK_M, 128) < 232448);
        assert_eq!(smem_bytes(64, BLOCK_M, 128), 96 * 1024 + 1152);
        assert_eq!(threads(BLOCK_M), 384);
    }

    #[test]
    fn bm192_smem_threads_and_variant() {
        // d64, 192 rows: Q 24 KiB + O 24 KiB + 2 x K + 2 x V (16 KiB each) = 112 KiB, + barriers + slack.
        assert_eq!(smem_bytes(64, BLOCK_M_192, 128), 114688 + 1152);
        assert_eq!(smem_bytes(64, BLOCK_M_192, 128), ((2 * 192 + 4 * 128) * 64 * 2 + 128 + 1024) as u32);
        assert!(smem_bytes(64, BLOCK_M_192, 128) < 232448);
        assert_eq!(threads(BLOCK_M_192), 512);
        let v = Variant::plain(Pass::FwdSm90, 64, true);
        assert_eq!(variant_block_m(&v), 128);
        assert_eq!(variant_block_m(&Variant { bm192: true, ..v }), 192);
        // Only head dim 64 has the 192-row form.
        assert_eq!(variant_block_m(&Variant { bm192: true, head_dim: 128, ..v }), 128);
        for hd in [128, 256] {
            let t = sm90_tile(Variant::plain(Pass::FwdSm90, hd, true), 1 << 14);
            assert!(!t.bm192);
            assert_eq!(variant_block_m(&t), 128);
        }
    }

    #[test]
    fn wide_n_smem_and_variant() {
        // d128, 176 keys: Q 32 KiB + 2 x K + 2 x V (44 KiB each) = 208 KiB, O staged in the Q buffer (a separate
        // 32 KiB O buffer would not fit), + barriers + slack: under the 227 KiB opt-in limit.
        assert_eq!(smem_bytes(128, BLOCK_M, 176), 212992 + 1152);
        assert_eq!(smem_bytes(128, BLOCK_M, 176), ((128 + 4 * 176) * 128 * 2 + 128 + 1024) as u32);
        // d256, 80 keys: Q 64 KiB + 2 x K + 2 x V (40 KiB each) = 224 KiB, O in the Q buffer as at 64 keys.
        assert_eq!(smem_bytes(256, BLOCK_M, 80), 229376 + 1152);
        for (hd, bn) in [(128, 176), (256, 80)] {
            assert_eq!(wide_block_n(hd), Some(bn));
            assert!(smem_bytes(hd, BLOCK_M, bn) <= 232448);
            // Every K/V stage and panel offset stays a multiple of the 1024-byte swizzle period.
            assert_eq!(bn * 128 % 1024, 0);
            let v = Variant::plain(Pass::FwdSm90, hd, true);
            assert_eq!(variant_block_n(&v), block_n(hd));
            assert_eq!(variant_block_n(&Variant { wide_n: true, ..v }), bn);
            assert_eq!(variant_block_m(&Variant { wide_n: true, ..v }), 128);
            // The flag means nothing on other passes.
            assert_eq!(variant_block_n(&Variant { wide_n: true, pass: Pass::BwdSm90, ..v }), block_n(hd));
        }
        // Head dim 64 has no wide form.
        assert_eq!(wide_block_n(64), None);
        let v64 = Variant { wide_n: true, ..Variant::plain(Pass::FwdSm90, 64, true) };
        assert_eq!(variant_block_n(&v64), 128);
        let tile = |hd: usize, mask: bool, keys: usize| {
            let t = sm90_tile(Variant { mask, ..Variant::plain(Pass::FwdSm90, hd, true) }, keys);
            (t.wide_n, variant_block_n(&t))
        };
        assert_eq!(tile(64, false, 1 << 14), (false, 128));
        if std::env::var("FLASHATTN_SM90_BN").is_err() {
            assert_eq!(tile(128, false, 8192), (true, 176));
            assert_eq!(tile(128, false, 4096), (false, 128));
            assert_eq!(tile(128, true, 16384), (false, 128));
            // Opt-in at d256 until it has run on a GPU.
            assert_eq!(tile(256, false, 1 << 14), (false, 64));
            assert_eq!(tile(256, true, 1 << 14), (false, 64));
        }
    }

    #[test]
    fn gqa_packing_rule_and_variant() {
        // Only when asked for, for real groups that divide the 128 rows.
        assert!(pack_gqa_for(32, 8, true) && pack_gqa_for(8, 1, true) && pack_gqa_for(128, 1, true));
        assert!(!pack_gqa_for(32, 8, false));
        assert!(!pack_gqa_for(8, 8, true), "MHA: nothing to pack");
        assert!(!pack_gqa_for(28, 4, true), "group 7 does not divide 128");
        assert!(!pack_gqa_for(256, 1, true), "group 256 is more than a tile");
        assert!(!pack_gqa_for(6, 4, true), "h must be a multiple of hk");
        // The packed form has 2 consumer warpgroups (128 rows) even where the 192-row d64 form is asked for, its
        // own define and name, and means nothing on other passes.
        let v = Variant { pack_gqa: true, bm192: true, ..Variant::plain(Pass::FwdSm90, 64, true) };
        assert!(v.is_pack_gqa() && !v.is_bm192());
        assert_eq!(variant_block_m(&v), 128);
        assert_eq!(v.to_string(), "fwd90_d64_gqa_bf16");
        assert!(v.defines().contains(&"SM90_PACK_GQA=1".to_string()));
        assert!(!v.defines().iter().any(|d| d.starts_with("SM90_CONSUMERS")));
        let w = Variant { pack_gqa: true, wide_n: true, mask: true, ..Variant::plain(Pass::FwdSm90, 128, false) };
        assert_eq!(w.to_string(), "fwd90_d128_bn176_gqa_f16_mask");
        let b = Variant { pack_gqa: true, ..Variant::plain(Pass::BwdSm90, 128, true) };
        assert!(!b.is_pack_gqa() && !b.defines().iter().any(|d| d.contains("PACK")));
        assert_eq!(b.to_string(), Variant::plain(Pass::BwdSm90, 128, true).to_string());
        // Packed tiles walk (batch, key/value head) pairs: with masks from 4k keys all of them form one group.
        use crate::options::AttnOptions;
        let q = crate::tensor::Tensor::zeros(&[2, 4096, 32, 128], crate::dtype::DType::BF16);
        let k = crate::tensor::Tensor::zeros(&[2, 4096, 8, 128], crate::dtype::DType::BF16);
        let opts = AttnOptions { causal: true, ..AttnOptions::default() };
        let p = crate::problem::validate(&q.view(), &k.view(), &k.view(), &opts).unwrap();
        if std::env::var("FLASHATTN_SM90_L2_MIB").is_err() {
            assert_eq!(l2_group(&p, 128, 4096, 128, 132, true), 16);
            assert_eq!(l2_group(&p, 128, 4096, 32, 132, false), 64);
        }
    }

    #[test]
    fn tma_store_rule_and_variant() {
        let v = |hd: usize| Variant::plain(Pass::FwdSm90, hd, true);
        // Asked for, with a separate O buffer: d64 and d128 with 128-key blocks.
        assert!(tma_store_for(&v(64), true) && tma_store_for(&v(128), true));
        assert!(!tma_store_for(&v(128), false));
        // Not where O goes through the Q buffer, nor with varlen or GQA packing.
        assert!(!tma_store_for(&v(256), true));
        assert!(!tma_store_for(&Variant { wide_n: true, ..v(128) }, true));
        assert!(!tma_store_for(&Variant { varlen: true, ..v(128) }, true));
        assert!(!tma_store_for(&Variant { pack_gqa: true, ..v(64) }, true));
        assert!(o_separate(128, 128) && !o_separate(128, 176) && !o_separate(256, 64));
        let w = Variant { tma_store: true, mask: true, ..v(128) };
        assert_eq!(w.to_string(), "fwd90_d128_tstore_bf16_mask");
        assert!(w.defines().contains(&"SM90_TMA_STORE=1".to_string()));
        let b = Variant { tma_store: true, ..Variant::plain(Pass::BwdSm90, 128, true) };
        assert!(!b.is_tma_store() && !b.defines().iter().any(|d| d.contains("TMA_STORE")));
    }

    #[test]
    fn packed_q_map_layout() {
        // q [b 2, s 40, h 32, d 128] contiguous: strides in elements row 32 * 128, head 128, batch 40 * 32 * 128.
        let view = DevView { ptr: 0, batch: 40 * 32 * 128, row: 32 * 128, head: 128 };
        let (dims, strides, boxd) = map_layout(&view, 128, 40, 32, 2, None, 128);
        assert_eq!((dims, strides, boxd), ([128, 40, 32, 2], [8192, 256, 327680], [64, 128, 1, 1]));
        // Packed, group 4: heads before rows, so a box of 4 heads x 32 tokens lands as 128 folded rows
        // token * 4 + head-in-group.
        let (dims, strides, boxd) = map_layout(&view, 128, 40, 32, 2, Some(4), 32);
        assert_eq!((dims, strides, boxd), ([128, 32, 40, 2], [256, 8192, 327680], [64, 4, 32, 1]));
        assert_eq!(boxd[1] * boxd[2], BLOCK_M as u32);
    }

    #[test]
    fn block_n_override_list() {
        // Each head dim reads its own sizes; a list serves both.
        assert_eq!(wide_n_in("176", 128), Some(true));
        assert_eq!(wide_n_in("128", 128), Some(false));
        assert_eq!(wide_n_in("176", 256), None);
        assert_eq!(wide_n_in("80", 256), Some(true));
        assert_eq!(wide_n_in("64", 256), Some(false));
        assert_eq!(wide_n_in("80", 128), None);
        assert_eq!(wide_n_in("176, 80", 128), Some(true));
        assert_eq!(wide_n_in("176, 80", 256), Some(true));
        assert_eq!(wide_n_in("128,80", 128), Some(false));
        assert_eq!(wide_n_in("128,80", 256), Some(true));
        // No wide form at head dim 64; unparsable or empty lists leave the rule.
        assert_eq!(wide_n_in("128", 64), None);
        assert_eq!(wide_n_in("", 128), None);
        assert_eq!(wide_n_in("wide", 256), None);
    }
}
