//! Non-finite inputs on the CUDA kernels (spec, "Non-finite inputs propagate"): a NaN or `+inf` among a row's
//! visible scores makes that row's `o` and `lse` NaN, a NaN in a visible value row reaches the output where its
//! weight is non-zero, and only a row whose mask leaves no key is reported as `o = 0`, `lse = -inf`. Covers the
//! sm80-class forward (odd head dim 59, and every head dim off Hopper), the sm90 forward (head dims 64, 128 and
//! 256 on Hopper), the KV-cache kernel with and without its split-KV merge, and the backward; the forward and
//! backward checks run on both kernel paths (the sm80-class one forced through the call's tuning).
//! The CPU versions of these checks are in `nonfinite.rs`.
//!
//! Without a usable GPU each test prints a visible SKIP line and passes (`FLASHATTN_REQUIRE_GPU=1`: fails).
#![cfg(feature = "cuda")]

mod common;
use common::nonfinite::{at, check_row, vals, Case, Row};
use common::*;
use flashattn::{AttnOptions, BackwardInputs, CacheSeqlens, CudaPath, DType, Device, KvCache, Tensor, Tuning};

const DIMS: [usize; 4] = [59, 64, 128, 256];
const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// Every dtype on both kernel paths: the default (on Hopper the sm90 kernels) and the sm80-class kernels forced
/// by the call's tuning, so one run covers both families.
fn dtypes_paths() -> impl Iterator<Item = (DType, CudaPath)> {
    DTYPES.into_iter().flat_map(|dt| [CudaPath::Auto, CudaPath::Sm80].map(|p| (dt, p)))
}

/// The case on kernel path `path` at head dim `d`.
fn case(dtype: DType, d: usize, path: CudaPath) -> Case {
    Case::new(dtype, d, AttnOptions::default().tuning(Tuning { cuda_path: path, ..Tuning::default() }))
}

/// Runs `body` on the case of every dtype, kernel path and head dim, unless test `test` is skipped for want of a
/// GPU.
fn for_each_case(test: &str, body: impl Fn(Case)) {
    if !gpu(test) {
        return;
    }
    for (dtype, path) in dtypes_paths() {
        for d in DIMS {
            body(case(dtype, d, path));
        }
    }
}

/// The CUDA forward's `o` and `lse` as f32.
fn run(c: &Case) -> (Vec<f32>, Vec<f32>) {
    let [q, k, v] = c.tensors();
    let out = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &c.opts).unwrap();
    (out.o.to_f32_vec(), out.lse.to_f32_vec())
}

/// The case in words: dtype, head dim, kernel path.
fn what(c: &Case) -> String {
    format!("{:?} d{} ({:?} path)", c.dtype, c.qs[3], c.opts.tuning.cuda_path)
}

/// Every row of the CUDA forward: masked rows exactly `o = 0`, `lse = -inf`; rows with `nan_row(seq, head, row)`
/// NaN in all of `o` and in `lse`; every other row finite.
fn check_rows(c: &Case, nan_row: impl Fn(usize, usize, usize) -> bool) {
    let (o, lse) = run(c);
    for seq in 0..c.qs[0] {
        for head in 0..c.qs[2] {
            for i in 0..c.qs[1] {
                let what = format!("{} seq {seq} head {head} row {i}", what(c));
                let expect = Row::of(c.masked(i), nan_row(seq, head, i));
                check_row(&what, c.q_row(&o, seq, i, head), Some(lse[c.lse_at(seq, head, i)]), expect);
            }
        }
    }
}

#[test]
fn cuda_clean_inputs_give_finite_rows_and_empty_masked_rows() {
    for_each_case("cuda_clean_inputs_give_finite_rows_and_empty_masked_rows", |c| {
        check_rows(&c, |_, _, _| false);
    });
}

#[test]
fn cuda_nan_in_q_makes_that_row_nan() {
    for_each_case("cuda_nan_in_q_makes_that_row_nan", |mut c| {
        // Row 40 of (seq 1, head 3): visible; row 5 of (seq 0, head 0): masked, so it stays empty.
        c.q[at(&c.qs, 1, 40, 3) + 7] = f32::NAN;
        c.q[at(&c.qs, 0, 5, 0) + 2] = f32::NAN;
        check_rows(&c, |seq, head, i| (seq, head, i) == (1, 3, 40));
    });
}

#[test]
fn cuda_nan_in_one_key_makes_the_rows_that_see_it_nan() {
    for_each_case("cuda_nan_in_one_key_makes_the_rows_that_see_it_nan", |mut c| {
        // Key 100 of (seq 0, kv head 1): read by query heads 2 and 3, by rows 120.. (causal).
        let j = 100;
        c.k[at(&c.ks, 0, j, 1) + 3] = f32::NAN;
        check_rows(&c, |seq, head, i| seq == 0 && head >= 2 && c.sees(i, j));
    });
}

#[test]
fn cuda_plus_inf_score_makes_the_row_nan() {
    for_each_case("cuda_plus_inf_score_makes_the_row_nan", |mut c| {
        // A q element of +inf against keys whose matching element is positive: every score of the row is
        // +inf, and the row is NaN (inf - inf), never empty.
        c.q[at(&c.qs, 1, 120, 2)] = f32::INFINITY;
        for j in 0..c.ks[1] {
            c.k[at(&c.ks, 1, j, 1)] = 0.5;
        }
        check_rows(&c, |seq, head, i| (seq, head, i) == (1, 2, 120));
    });
}

#[test]
fn cuda_nan_in_one_value_row_reaches_the_rows_that_weigh_it() {
    for_each_case("cuda_nan_in_one_value_row_reaches_the_rows_that_weigh_it", |mut c| {
        let (j, d) = (90, c.qs[3]);
        c.v[at(&c.ks, 1, j, 0)] = f32::NAN;
        let (o, lse) = run(&c);
        for seq in 0..2 {
            for head in 0..4 {
                for i in 0..c.qs[1] {
                    let oi = at(&c.qs, seq, i, head);
                    let what = format!("{} seq {seq} head {head} row {i}", what(&c));
                    let l = lse[c.lse_at(seq, head, i)];
                    if c.masked(i) {
                        check_row(&what, &o[oi..oi + d], Some(l), Row::Empty);
                        continue;
                    }
                    assert!(l.is_finite(), "{what}: lse {l} is a function of q, k only");
                    // Column 0 of the rows that weigh value row 90 is NaN. (A row of the same tiles that does
                    // not see it may be NaN there too: its zero weight times NaN in the P.V product.)
                    if seq == 1 && head < 2 && c.sees(i, j) {
                        assert!(o[oi].is_nan(), "{what}: o[0] = {}", o[oi]);
                    } else if seq == 0 || head >= 2 {
                        assert!(o[oi].is_finite(), "{what}: o[0] = {}", o[oi]);
                    }
                    assert!(o[oi + 1..oi + d].iter().all(|x| x.is_finite()), "{what}: other columns");
                }
            }
        }
    });
}

#[test]
fn cuda_backward_propagates_nan_and_masked_rows_stay_zero() {
    for_each_case("cuda_backward_propagates_nan_and_masked_rows_stay_zero", |mut c| {
        let d = c.qs[3];
        // A NaN in a visible row's q: row 60 of (seq 1, head 1), reading kv head 0.
        c.q[at(&c.qs, 1, 60, 1) + 1] = f32::NAN;
        let [q, k, v] = c.tensors();
        let dev = Device::Cuda(0);
        let out = flashattn::forward_on(dev, &q, &k, &v, &c.opts).unwrap();
        let dout = Tensor::from_f32(&vals(c.q.len(), 9), &c.qs, c.dtype).unwrap();
        let x = BackwardInputs { q: &q, k: &k, v: &v, o: &out.o, lse: &out.lse, dout: &dout };
        let g = flashattn::backward_on(dev, &x, &c.opts).unwrap();
        let (dq, dk, dv) = (g.dq.to_f32_vec(), g.dk.to_f32_vec(), g.dv.to_f32_vec());
        let w = what(&c);
        // dq: zero on masked rows, NaN on the NaN row, finite elsewhere.
        for seq in 0..2 {
            for head in 0..4 {
                for i in 0..c.qs[1] {
                    let expect = Row::of(c.masked(i), (seq, head, i) == (1, 1, 60));
                    check_row(
                        &format!("{w} seq {seq} head {head} row {i}: dq"),
                        c.q_row(&dq, seq, i, head),
                        None,
                        expect,
                    );
                }
            }
        }
        // dk, dv: sequence 0 and kv head 1 are finite; in (seq 1, kv head 0) the keys row 60 sees are NaN.
        for seq in 0..2 {
            for kh in 0..2 {
                for j in 0..c.ks[1] {
                    let kj = at(&c.ks, seq, j, kh);
                    let (rk, rv) = (&dk[kj..kj + d], &dv[kj..kj + d]);
                    let what = format!("{w} seq {seq} kv head {kh} key {j}");
                    if (seq, kh) == (1, 0) {
                        if c.sees(60, j) {
                            assert!(rk.iter().all(|x| x.is_nan()), "{what}: dk");
                            assert!(rv.iter().all(|x| x.is_nan()), "{what}: dv");
                        } else {
                            // dV = Pᵀ dO: a key the NaN row does not see has weight exactly 0 there.
                            assert!(rv.iter().all(|x| x.is_finite()), "{what}: dv");
                        }
                    } else {
                        assert!(rk.iter().chain(rv).all(|x| x.is_finite()), "{what}: dk/dv");
                    }
                }
            }
        }
    });
}

/// KV-cache attention on the device: b = 1, h = 4, hk = 2, a cache of `n` tokens (capacity `cap`), `sq` new
/// queries, causal. `poison(k)` edits the cache keys `[1, cap, 2, d]` before the call. Returns (o, lse).
fn kv_run(
    dtype: DType,
    d: usize,
    cap: usize,
    n: usize,
    sq: usize,
    poison: impl Fn(&mut [f32]),
) -> (Vec<f32>, Vec<f32>) {
    let (h, hk) = (4, 2);
    let mut kv = vals(cap * hk * d, 12);
    poison(&mut kv);
    let mut kc = Tensor::from_f32(&kv, &[1, cap, hk, d], dtype).unwrap();
    let mut vc = Tensor::from_f32(&vals(cap * hk * d, 13), &[1, cap, hk, d], dtype).unwrap();
    let q = Tensor::from_f32(&vals(sq * h * d, 11), &[1, sq, h, d], dtype).unwrap();
    let opts = AttnOptions::default().causal();
    let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(n as i32));
    let out = flashattn::kvcache_forward_on(Device::Cuda(0), &q.view(), &mut cache, &opts).unwrap();
    (out.o.to_f32_vec(), out.lse.to_f32_vec())
}

/// The query rows of the KV-cache tests (h = 4 heads of `KV_SQ` rows).
const KV_SQ: usize = 4;

/// Runs `body` for every dtype and head dim, unless test `test` is skipped for want of a GPU.
fn for_each_kv_case(test: &str, body: impl Fn(DType, usize)) {
    if !gpu(test) {
        return;
    }
    for dtype in DTYPES {
        for d in DIMS {
            body(dtype, d);
        }
    }
}

/// Checks every row of a [`kv_run`] result (`KV_SQ` queries, head dim `d`) against `expect(row, head)`; `what`
/// names the case.
fn check_kv_rows(what: &str, d: usize, (o, lse): (Vec<f32>, Vec<f32>), expect: impl Fn(usize, usize) -> Row) {
    let h = 4;
    for i in 0..KV_SQ {
        for head in 0..h {
            let what = format!("{what} row {i} head {head}");
            let orow = &o[(i * h + head) * d..(i * h + head + 1) * d];
            check_row(&what, orow, Some(lse[head * KV_SQ + i]), expect(i, head));
        }
    }
}

#[test]
fn cuda_kvcache_nan_key_makes_the_rows_that_see_it_nan() {
    for_each_kv_case("cuda_kvcache_nan_key_makes_the_rows_that_see_it_nan", |dtype, d| {
        // A short cache (one split) and an 8k-token one with b = 1 (several splits, merged by
        // combine_splits). A NaN key early in kv head 0 (every row of heads 0, 1 sees it) and one near the
        // end of kv head 1 (query i sees keys j <= i + n - sq: rows 2, 3 of heads 2, 3 see key n - 2).
        for n in [200usize, 8192] {
            let out = kv_run(dtype, d, n, n, KV_SQ, |k| {
                k[(5 * 2) * d + 1] = f32::NAN;
                k[((n - 2) * 2 + 1) * d + 3] = f32::NAN;
            });
            check_kv_rows(&format!("{dtype:?} d{d} n {n}"), d, out, |i, head| Row::of(false, head < 2 || i >= 2));
        }
    });
}

#[test]
fn cuda_kvcache_masked_rows_are_empty() {
    for_each_kv_case("cuda_kvcache_masked_rows_are_empty", |dtype, d| {
        // Two cached tokens and four queries, causal: rows 0 and 1 see no key. The rest of the cache
        // (beyond the two tokens) holds NaN, which no row may see.
        let out = kv_run(dtype, d, 64, 2, KV_SQ, |k| k[2 * 2 * d..].fill(f32::NAN));
        check_kv_rows(&format!("{dtype:?} d{d}"), d, out, |i, _| Row::of(i < 2, false));
    });
}
