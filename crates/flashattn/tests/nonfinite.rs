//! Non-finite inputs propagate (spec, "Non-finite inputs propagate"): a NaN or `+inf` among a row's visible
//! scores makes that row's `o` and `lse` NaN, a non-finite visible value row makes `o` non-finite where its
//! weight is non-zero, and only a row whose mask leaves no key is reported as `o = 0`, `lse = -inf`.
//! Checked on the CPU flash path (forward and backward) and on the `f64` oracle.

mod common;
use common::nonfinite::{at, check_row, vals, Case, Row};
use flashattn::reference::forward_f64;
use flashattn::{backward, forward, AttnOptions, BackwardInputs, DType, Tensor};

const D: usize = 16;

/// The case at head dim `D`.
fn case(dtype: DType) -> Case {
    Case::new(dtype, D, AttnOptions::default())
}

/// The CPU flash forward's `o` and `lse` (as f32), and the `f64` oracle's.
fn run(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f64>, Vec<f64>) {
    let [q, k, v] = c.tensors();
    let out = forward(&q, &k, &v, &c.opts).unwrap();
    let p = flashattn::problem::validate(&q.view(), &k.view(), &v.view(), &c.opts).unwrap();
    let r = forward_f64(&p, q.view().data, k.view().data, v.view().data);
    (out.o.to_f32_vec(), out.lse.to_f32_vec(), r.o, r.lse)
}

/// Checks every row of both the flash and the oracle outputs: `nan_row(seq, head, row)` says whether the
/// row must be NaN (o and lse); other rows must be finite, or exactly `0`/`-inf` when masked.
fn check_rows(c: &Case, nan_row: impl Fn(usize, usize, usize) -> bool) {
    let (o, lse, ro, rlse) = run(c);
    for (name, o, lse) in [
        ("flash", o.iter().map(|&x| x as f64).collect::<Vec<_>>(), lse.iter().map(|&x| x as f64).collect::<Vec<_>>()),
        ("oracle", ro, rlse),
    ] {
        for seq in 0..c.qs[0] {
            for head in 0..c.qs[2] {
                for i in 0..c.qs[1] {
                    let what = format!("{name} seq {seq} head {head} row {i}");
                    let expect = Row::of(c.masked(i), nan_row(seq, head, i));
                    check_row(&what, c.q_row(&o, seq, i, head), Some(lse[c.lse_at(seq, head, i)]), expect);
                }
            }
        }
    }
}

#[test]
fn clean_inputs_give_finite_rows_and_empty_masked_rows() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check_rows(&case(dtype), |_, _, _| false);
    }
}

#[test]
fn nan_in_q_makes_that_row_nan() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut c = case(dtype);
        // Row 40 of (seq 1, head 3): visible; row 5 of (seq 0, head 0): masked, so it stays empty.
        c.q[at(&c.qs, 1, 40, 3) + 7] = f32::NAN;
        c.q[at(&c.qs, 0, 5, 0) + 2] = f32::NAN;
        check_rows(&c, |seq, head, i| (seq, head, i) == (1, 3, 40));
    }
}

#[test]
fn nan_in_one_key_makes_the_rows_that_see_it_nan() {
    for dtype in [DType::F32, DType::BF16] {
        let mut c = case(dtype);
        // Key 100 of (seq 0, kv head 1): read by query heads 2 and 3, by the rows that see key 100.
        let j = 100;
        c.k[at(&c.ks, 0, j, 1) + 3] = f32::NAN;
        check_rows(&c, |seq, head, i| seq == 0 && head >= 2 && c.sees(i, j));
    }
}

#[test]
fn plus_inf_score_makes_the_row_nan() {
    // One +inf score among finite ones: q row · k row overflows f32 (the oracle, in f64, does not overflow,
    // so only the flash path is checked here).
    let mut c = case(DType::F32);
    let (qi, kj) = (at(&c.qs, 0, 149, 0), at(&c.ks, 0, 3, 0));
    c.q[qi..qi + D].fill(1e30);
    c.k[kj..kj + D].fill(1e30);
    let (o, lse, _, _) = run(&c);
    assert!(lse[c.lse_at(0, 0, 149)].is_nan(), "lse {}", lse[c.lse_at(0, 0, 149)]);
    assert!(o[qi..qi + D].iter().all(|x| x.is_nan()));
    // A q element of +inf against keys whose matching element is positive: every score of the row is +inf,
    // in f32 and in f64.
    let mut c = case(DType::F32);
    let qi = at(&c.qs, 1, 120, 2);
    c.q[qi] = f32::INFINITY;
    for j in 0..c.ks[1] {
        c.k[at(&c.ks, 1, j, 1)] = 0.5;
    }
    check_rows(&c, |seq, head, i| (seq, head, i) == (1, 2, 120));
}

#[test]
fn nan_in_one_value_row_reaches_exactly_the_rows_that_weigh_it() {
    for dtype in [DType::F32, DType::F16] {
        let mut c = case(dtype);
        let j = 90;
        c.v[at(&c.ks, 1, j, 0)] = f32::NAN;
        let (o, lse, ro, _) = run(&c);
        for head in 0..4 {
            for i in 0..c.qs[1] {
                let oi = at(&c.qs, 1, i, head);
                assert!(!lse[c.lse_at(1, head, i)].is_nan(), "lse of row {i} is a function of q, k only");
                let expect_nan = head < 2 && c.sees(i, j);
                for (name, x0) in [("flash", o[oi] as f64), ("oracle", ro[oi])] {
                    assert_eq!(x0.is_nan(), expect_nan, "{name} head {head} row {i}: o[0] = {x0}");
                }
                // Columns other than the poisoned one stay finite.
                assert!(o[oi + 1..oi + D].iter().all(|x| x.is_finite()), "head {head} row {i}");
            }
        }
    }
}

#[test]
fn nonfinite_scale_and_slopes_are_refused() {
    let c = case(DType::F32);
    let [q, k, v] = c.tensors();
    for s in [f32::NAN, f32::INFINITY] {
        let e = forward(&q, &k, &v, &c.opts.clone().scale(s)).unwrap_err();
        assert_eq!(e.arg(), Some("softmax_scale"), "{e}");
    }
    let mut slopes = vec![0.1f32; 4];
    slopes[2] = f32::NAN;
    let opts = c.opts.clone().alibi(Tensor::from_f32(&slopes, &[4], DType::F32).unwrap());
    let e = forward(&q, &k, &v, &opts).unwrap_err();
    assert_eq!(e.arg(), Some("alibi_slopes"), "{e}");
}

#[test]
fn minus_inf_scores_weigh_zero() {
    // Huge (finite) ALiBi slopes: every score but the diagonal one is -inf, so row i is exactly v_i's head
    // row and lse_i its score; the first key tiles of the later rows hold only -inf scores.
    let mut c = case(DType::F32);
    c.qs = [1, 130, 2, D];
    c.ks = [1, 130, 2, D];
    c.q = vals(130 * 2 * D, 5);
    c.k = vals(130 * 2 * D, 6);
    c.v = vals(130 * 2 * D, 7);
    c.opts = c.opts.clone().alibi(Tensor::from_f32(&[3e38, 3e38], &[2], DType::F32).unwrap());
    let (o, lse, ro, rlse) = run(&c);
    for head in 0..2 {
        for i in 0..130 {
            let oi = at(&c.qs, 0, i, head);
            let vi = at(&c.ks, 0, i, head);
            for col in 0..D {
                assert_eq!(o[oi + col], c.v[vi + col], "head {head} row {i}");
                assert!((ro[oi + col] - c.v[vi + col] as f64).abs() < 1e-6);
            }
            let l = c.lse_at(0, head, i);
            assert!(lse[l].is_finite() && (lse[l] as f64 - rlse[l]).abs() < 1e-4, "row {i}: {} {}", lse[l], rlse[l]);
        }
    }
}

#[test]
fn backward_propagates_nan_and_masked_rows_stay_zero() {
    let mut c = case(DType::F32);
    // A NaN in a masked row's q (row 5 sees no key) and in a visible row's q (row 60 of seq 1, head 1).
    c.q[at(&c.qs, 0, 5, 0) + 1] = f32::NAN;
    c.q[at(&c.qs, 1, 60, 1) + 1] = f32::NAN;
    let [q, k, v] = c.tensors();
    let out = forward(&q, &k, &v, &c.opts).unwrap();
    let dout = Tensor::from_f32(&vals(q.to_f32_vec().len(), 9), &c.qs, DType::F32).unwrap();
    let g = backward(&BackwardInputs { q: &q, k: &k, v: &v, o: &out.o, lse: &out.lse, dout: &dout }, &c.opts).unwrap();
    let (dq, dk, dv) = (g.dq.to_f32_vec(), g.dk.to_f32_vec(), g.dv.to_f32_vec());
    // Sequence 0: the masked row contributes nothing; every gradient is finite, its dq row is 0.
    let r5 = at(&c.qs, 0, 5, 0);
    assert!(dq[r5..r5 + D].iter().all(|&x| x == 0.0), "masked row's dq");
    let seq0_k = at(&c.ks, 1, 0, 0);
    assert!(dk[..seq0_k].iter().chain(&dv[..seq0_k]).all(|x| x.is_finite()), "seq 0 dk/dv must stay finite");
    assert!(dq[..at(&c.qs, 1, 0, 0)].iter().all(|x| x.is_finite()), "seq 0 dq must stay finite");
    // Sequence 1: the NaN row's dq is NaN, and the keys it sees (kv head 0) get NaN dk and dv.
    let r60 = at(&c.qs, 1, 60, 1);
    assert!(dq[r60..r60 + D].iter().all(|x| x.is_nan()));
    for j in 0..c.ks[1] {
        let kj = at(&c.ks, 1, j, 0);
        // dK = dSᵀ Q, as a product: the keys the row sees are NaN; the others of its 64-key tiles may be
        // too (a zero weight times the NaN q, as in the naive matrix formula), so only the former is asserted.
        if c.sees(60, j) {
            assert!(dk[kj].is_nan(), "dk of key {j}");
        }
        assert_eq!(dv[kj].is_nan(), c.sees(60, j), "dv of key {j}");
        let kj1 = at(&c.ks, 1, j, 1);
        assert!(dk[kj1].is_finite() && dv[kj1].is_finite(), "kv head 1 is not read by head 1");
    }
}
