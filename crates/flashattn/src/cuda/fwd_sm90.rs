//! The Hopper (sm_90a) forward path (`kernels/fwd_sm90.cu`): which problems it covers, its tile shapes, the TMA
//! tensor maps of q, k and v (`tma.rs`), the persistent grid and its tile order. Problems it does not cover run on
//! the sm80-class kernels (`fwd.rs`); [`Tuning::cuda_path`] = `Sm80` forces that path on Hopper too (to test the
//! fallback).
//! At head dim 64 the forward runs with 3 consumer warpgroups and 192-row query tiles (`-DSM90_CONSUMERS=3`,
//! 512 threads, variant `fwd90_d64_bm192_*`; measurements in docs/notes/cuda-sm90.md);
//! [`Tuning::sm90_d64_bm192`] = `false` selects the 128-row form there too (A/B). Other head dims use 128 rows.
//! At head dim 128 without a mask and from 8k keys it uses 176-key K/V blocks (128 x 176 tiles, FA3's d128 shape;
//! `-DSM90_BN_OVERRIDE=176`, O staged in the Q buffer, variant `fwd90_d128_bn176_*`); otherwise 128 keys. At head
//! dim 256 it uses FA3's 80-key blocks (128 x 80 tiles, `fwd90_d256_bn80_*`) without a mask, and with one from
//! 2048 keys; otherwise 64 keys.
//! [`Tuning::sm90_wide_kv_d128`] / [`Tuning::sm90_wide_kv_d256`] force either form per head dim.

use super::call::{check_sizes, fwd_params, variant_for, FwdArgs};
use super::compile::{Pass, Variant};
use super::launch::launch;
use super::params::FwdParams;
use super::runtime::Gpu;
use super::tiles::{block_n, sm90_head_dim, wide_block_n};
use super::tma::tensor_map;
use crate::error::Result;
use crate::problem::Problem;
use crate::tuning::Tuning;
use cudarc::driver::sys as dsys;

thread_local! {
    static LAUNCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many sm90 forward kernels the calling thread has launched (tests use it to prove which path ran; per
/// thread, so that tests running side by side, each with its own tuning, do not see each other's launches).
pub fn sm90_forward_launches() -> u64 {
    LAUNCHES.with(|n| n.get())
}

/// Query rows per CTA by default (two consumer warpgroups of 64 rows).
const BLOCK_M: usize = 128;

/// Query rows per CTA at head dim 64 (three consumer warpgroups, FA3's d64 tile).
const BLOCK_M_192: usize = 192;

/// The tile shape of the sm90 forward variant `v` (its head dim and mask set) for a problem of at most
/// `max_keys` keys per sequence under tuning `t`; the one place the shape is chosen:
/// - head dim 64: 192 query rows (3 consumer warpgroups) unless [`Tuning::sm90_d64_bm192`] is off;
/// - head dim 128: 176-key K/V blocks without a mask from 8k keys (where the larger blocks measured faster; with
///   masks and at shorter lengths they waste more masked or padded keys and the Q buffer also stages O; numbers in
///   docs/notes/cuda-sm90.md);
/// - head dim 256: 80-key blocks (FA3's d256 tile) without a mask, and with one from 2048 keys; 64-key blocks
///   for masked problems below that (fewer padded keys in the last block of a short causal row);
/// - [`Tuning::sm90_wide_kv`] forces either form per head dim;
/// - otherwise 128 x [`block_n`].
pub fn sm90_tile(v: Variant, max_keys: usize, t: &Tuning) -> Variant {
    let bm192 = v.head_dim == 64 && t.sm90_d64_bm192;
    let rule = match v.head_dim {
        128 => !v.mask && max_keys >= 8192,
        256 => !v.mask || max_keys >= 2048,
        _ => false,
    };
    let wide_n = wide_block_n(v.head_dim).is_some() && t.sm90_wide_kv(v.head_dim).unwrap_or(rule);
    Variant { bm192, wide_n, ..v }
}

/// The tile shapes [`sm90_tile`] picks under tuning `t`, in words (for `flashattn info` and bench output).
pub fn tile_summary(t: &Tuning) -> String {
    let mut s = String::new();
    if t.sm90_d64_bm192 {
        s += " (head dim 64: 192-row tiles, 3 consumer warpgroups)";
    }
    s += match t.sm90_wide_kv(128) {
        Some(true) => " (head dim 128: 176-key blocks, forced)",
        Some(false) => "",
        None => " (head dim 128 without a mask from 8k keys: 176-key blocks)",
    };
    s += match t.sm90_wide_kv(256) {
        Some(true) => " (head dim 256: 80-key blocks, forced)",
        Some(false) => "",
        None => " (head dim 256: 80-key blocks without a mask, and with one from 2k keys)",
    };
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

/// Mirror of `Sm90Params` in `fwd_sm90.cu`: the forward fields, the scheduler's numbers, the tensor maps of q, k
/// and v, and a fourth map slot that the kernel never reads (`unused`, all zero; see the kernel's comment).
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
    unused: dsys::CUtensorMap,
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

/// Whether the sm90 kernel runs this problem on this device: [`covers_on`] with the device's architecture and
/// shared memory per block.
pub(crate) fn covers(gpu: &Gpu, p: &Problem, aligned16: bool) -> bool {
    covers_on(&gpu.arch, gpu.smem_optin as i64, p, aligned16)
}

/// Whether the sm90 kernel runs this problem on a device of architecture `arch` with `smem_optin` bytes of shared
/// memory per block: a Hopper device (sm_90a cubins), f16/bf16, head dim <= 256, a value head dim equal to the head
/// dim (others run on the sm80-class kernel), 16-byte aligned pointers and strides (TMA), non-empty q and k, no
/// `seqused_k`, and the problem's tuning allows it ([`Tuning::cuda_path`]). (`seqused_k` runs on the sm80-class
/// kernel: the TMA reads whole key blocks, and the unused slots of a cache may hold anything, NaN included, which a
/// zero probability times NaN would let through.)
pub(crate) fn covers_on(arch: &str, smem_optin: i64, p: &Problem, aligned16: bool) -> bool {
    if arch != "sm_90a" || !p.tuning.sm90_forward_allowed() {
        return false;
    }
    if sm90_head_dim(p.d).is_none() || p.d_v != p.d {
        return false;
    }
    aligned16
        && p.total_q > 0
        && p.total_k > 0
        && p.batch > 0
        && p.seqused_k.is_none()
        && check_sizes(p).is_ok()
        && sm90_variant(p).is_ok_and(|v| variant_smem(&v) as i64 <= smem_optin)
}

/// The sm90 variant of a problem, with the tile shape of [`sm90_tile`] under the problem's tuning.
pub(crate) fn sm90_variant(p: &Problem) -> Result<Variant> {
    let v = variant_for(p, Pass::Fwd, true, false)?;
    let head_dim = sm90_head_dim(p.d).unwrap_or(v.head_dim);
    Ok(sm90_tile(Variant { pass: Pass::FwdSm90, head_dim, aligned16: true, ..v }, p.max_seqlen_k(), &p.tuning))
}

/// (batch, head) pairs per scheduling group, so that the group's K/V (8 or 24 MiB) stay in the L2. With
/// masks, tiles differ in length and the snake walk balances them only over a group of at least two
/// rounds of the grid, so groups are made at least that large. Causal-like masks (no left window edge) over
/// 4k keys or more use one group, the global longest-first order: the walk is static, so each group boundary
/// leaves some CTAs a last long tile while others end on short ones, and at these lengths one tile is about an
/// eighth of a CTA's whole share; shorter problems gain more from the L2 reuse of the budgeted groups
/// (measurements in docs/notes/cuda-sm90.md).
fn l2_group(p: &Problem, head_dim: usize, sk: usize, num_m_blocks: usize, ctas: usize) -> i32 {
    let all = (p.batch * p.h).max(1) as u64;
    let per_kv_head = (sk.max(1) * head_dim * 4) as u64; // K + V, 16-bit
    let q_per_kv = (p.h / p.hk.max(1)).max(1) as u64;
    // Budget: 8 MiB without masks, 24 MiB with (same-call A/B on the H100, docs/notes/cuda-sm90.md);
    // Tuning::sm90_l2_group_mib overrides it (and the causal rule) for A/B runs.
    let forced = p.tuning.sm90_l2_group_mib;
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

/// Runs the sm90 forward on `stream`. Returns `Ok(false)` without launching when the driver refuses a
/// tensor map for these layouts (the caller then runs the sm80-class kernel).
pub(crate) fn run(gpu: &Gpu, stream: dsys::CUstream, p: &Problem, a: &FwdArgs) -> Result<bool> {
    let v = sm90_variant(p)?;
    let hd = v.head_dim;
    let bm = variant_block_m(&v);
    let bn = variant_block_n(&v);
    let (q_rows, k_rows, batch) =
        if p.varlen { (p.total_q, p.total_k, 1) } else { (p.dense_sq, p.total_k / p.batch, p.batch) };
    let maps = (
        tensor_map(&a.q, [p.d, q_rows, p.h, batch], bm as u32),
        tensor_map(&a.k, [p.d, k_rows, p.hk, batch], bn as u32),
        tensor_map(&a.v, [p.d, k_rows, p.hk, batch], bn as u32),
    );
    let (Some(tq), Some(tk), Some(tv)) = maps else { return Ok(false) };
    let m = gpu.module(&v)?;
    let f = fwd_params(p, a);
    let num_m_blocks = (f.sq as usize).div_ceil(bm);
    let tiles = num_m_blocks * p.batch * p.h;
    let ctas = tiles.min(gpu.sm_count).max(1);
    let params = Sm90Params {
        f,
        num_m_blocks: num_m_blocks as i32,
        l2_group: l2_group(p, hd, f.sk as usize, num_m_blocks, ctas),
        pingpong: p.tuning.sm90_pingpong as i32,
        tq,
        tk,
        tv,
        // SAFETY: an all-zero CUtensorMap is a valid value; the kernel never reads this slot.
        unused: unsafe { std::mem::zeroed() },
    };
    let grid = (ctas as u32, 1, 1);
    let smem = variant_smem(&v);
    // SAFETY: `params` mirrors Sm90Params (layout pinned by the test below); its pointers and tensor maps
    // describe buffers sized for this problem.
    unsafe { launch(&m.kernels["flash_fwd_sm90"], "flash_fwd_sm90", stream, grid, threads(bm), smem, &params)? };
    LAUNCHES.with(|n| n.set(n.get() + 1));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_long_problems_schedule_one_group() {
        use crate::options::AttnOptions;
        let problem = |s: usize, causal: bool, window: (i64, i64), l2: Option<u64>| {
            let q = crate::tensor::Tensor::zeros(&[4, s, 16, 128], crate::dtype::DType::BF16);
            let tuning = Tuning { sm90_l2_group_mib: l2, ..Tuning::default() };
            let opts = AttnOptions { causal, window, tuning, ..AttnOptions::default() };
            crate::problem::validate(&q.view(), &q.view(), &q.view(), &opts).unwrap()
        };
        // 64 (batch, head) pairs. Causal from 4k keys: all of them in one group.
        assert_eq!(l2_group(&problem(4096, true, (-1, -1), None), 128, 4096, 32, 132), 64);
        // Causal at 2k: the 24 MiB budget (1 MiB of K/V per head: 24 pairs, above the two-round minimum of 17).
        assert_eq!(l2_group(&problem(2048, true, (-1, -1), None), 128, 2048, 16, 132), 24);
        // A window with a left edge at 4k: the budget (2 MiB per head: 12 pairs, the minimum of 9 below it).
        assert_eq!(l2_group(&problem(4096, false, (100, 0), None), 128, 4096, 32, 132), 12);
        // No mask: 8 MiB (4 pairs at 4k).
        assert_eq!(l2_group(&problem(4096, false, (-1, -1), None), 128, 4096, 32, 132), 4);
        // The override replaces both the budget and the causal rule: 24 MiB at 4k causal is 12 pairs (2 MiB each,
        // above the two-round minimum of 9), 8 MiB without a mask still 4.
        assert_eq!(l2_group(&problem(4096, true, (-1, -1), Some(24)), 128, 4096, 32, 132), 12);
        assert_eq!(l2_group(&problem(4096, false, (-1, -1), Some(8)), 128, 4096, 32, 132), 4);
    }

    #[test]
    fn layout_matches_fwd_sm90_cu() {
        assert_layout!(Sm90Params, size 768, {
            num_m_blocks: 240,
            l2_group: 244,
            pingpong: 248,
            tq: 256,
            tk: 384,
            tv: 512,
            unused: 640,
        });
    }

    #[test]
    fn smem_and_threads() {
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
            let t = sm90_tile(Variant::plain(Pass::FwdSm90, hd, true), 1 << 14, &Tuning::default());
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
        let tile_with = |hd: usize, mask: bool, keys: usize, t: &Tuning| {
            let t = sm90_tile(Variant { mask, ..Variant::plain(Pass::FwdSm90, hd, true) }, keys, t);
            (t.wide_n, variant_block_n(&t))
        };
        let tile = |hd: usize, mask: bool, keys: usize| tile_with(hd, mask, keys, &Tuning::default());
        assert_eq!(tile(64, false, 1 << 14), (false, 128));
        assert_eq!(tile(128, false, 8192), (true, 176));
        assert_eq!(tile(128, false, 4096), (false, 128));
        assert_eq!(tile(128, true, 16384), (false, 128));
        // d256: 80 keys without a mask at any length, with a mask from 2048 keys.
        assert_eq!(tile(256, false, 512), (true, 80));
        assert_eq!(tile(256, false, 1 << 14), (true, 80));
        assert_eq!(tile(256, true, 1 << 14), (true, 80));
        assert_eq!(tile(256, true, 2048), (true, 80));
        assert_eq!(tile(256, true, 2047), (false, 64));
        // The overrides act on their own head dim only.
        let wide = Tuning { sm90_wide_kv_d128: Some(true), sm90_wide_kv_d256: Some(true), ..Tuning::default() };
        let narrow = Tuning { sm90_wide_kv_d128: Some(false), sm90_wide_kv_d256: Some(false), ..Tuning::default() };
        assert_eq!(tile_with(128, true, 512, &wide), (true, 176));
        assert_eq!(tile_with(256, true, 512, &wide), (true, 80));
        assert_eq!(tile_with(64, false, 512, &wide), (false, 128));
        assert_eq!(tile_with(128, false, 1 << 14, &narrow), (false, 128));
        assert_eq!(tile_with(256, false, 1 << 14, &narrow), (false, 64));
        // The 128-row d64 form.
        let bm128 = Tuning { sm90_d64_bm192: false, ..Tuning::default() };
        let v = Variant::plain(Pass::FwdSm90, 64, true);
        assert!(sm90_tile(v, 1 << 14, &Tuning::default()).is_bm192() && !sm90_tile(v, 1 << 14, &bm128).is_bm192());
    }
}
