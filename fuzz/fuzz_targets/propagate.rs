//! Fuzz target for the CPU flash path on well-formed problems that span several tiles, with non-finite
//! values injected into `q`, `k` and `v` (spec, "Visibility" and "Non-finite inputs propagate").
//!
//! From the input bytes it builds a dense (`b` up to 3) or varlen (up to 4 sequences) problem with sequence
//! lengths up to 300 (the CPU tiles are 64 x 64), head dims 1..=16, MHA/GQA/MQA heads, f32/f16/bf16, causal or
//! windowed masks, moderate scale, softcap and ALiBi, and poisons up to four elements of q, k, v with NaN or
//! ±inf. The forward output is checked row by row against the spec and against the `f64` oracle
//! (`reference::forward_f64`); the backward pass (with a clean `dout`) is checked for finiteness and for the
//! zero gradient of masked rows:
//!
//! * a row that sees no key (spec formula, recomputed here) has `o = 0` and `lse = -inf` exactly, whatever
//!   the inputs; a row that sees a key never has `lse = -inf`;
//! * a row whose q row, or a visible k row, holds a NaN has a NaN `lse` and an all-NaN `o`;
//! * a row that sees no non-finite q or k value has a finite `lse`, and a finite `o` in every column where
//!   no visible v row is non-finite;
//! * the oracle agrees on which rows are NaN / finite / empty, and for f32 inputs on the values of clean
//!   rows (1e-4 relative for `o`, 1e-3 absolute for `lse`);
//! * backward: a row that sees no key has `dq = 0`; a sequence without a non-finite input has finite
//!   gradients (f32 and bf16: f16 gradients may legitimately overflow).
#![no_main]

use arbitrary::Arbitrary;
use flashattn::reference::forward_f64;
use flashattn::{backward, forward, AttnOptions, BackwardInputs, DType, Tensor, VarLen};
use libfuzzer_sys::fuzz_target;

/// Upper bound on `sum over sequences of sq * sk * h * d` (the work of one call): bigger inputs are skipped.
const MAX_WORK: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Lens {
    /// `b` sequences of `sq` queries and `sk` keys.
    Dense { b: u8, sq: u16, sk: u16 },
    /// Per-sequence `(sq, sk)`.
    Varlen(Vec<(u16, u16)>),
}

#[derive(Arbitrary, Debug)]
struct Poison {
    /// 0: q, 1: k, 2: v.
    tensor: u8,
    row: u16,
    head: u8,
    col: u8,
    /// NaN, +inf, -inf.
    kind: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    dtype: u8,
    lens: Lens,
    hk: u8,
    group: u8,
    d: u8,
    causal: bool,
    window: Option<(i16, i16)>,
    scale: Option<i8>,
    softcap: Option<u8>,
    alibi: Option<u8>,
    poison: Vec<Poison>,
    backward: bool,
    seed: u64,
    /// A learnable sink (its seed); last, so the stored seeds keep their meaning.
    sink: Option<u8>,
}

#[path = "shared/rng.rs"]
mod rng;
use rng::Rng;

impl Rng {
    /// Multiples of 1/8 in [-2, 2] (exact in every dtype).
    fn val(&mut self) -> f32 {
        ((self.next() >> 33) % 33) as f32 / 8.0 - 2.0
    }
}

/// One sequence: query rows `q0..q0 + sq`, key rows `k0..k0 + sk`.
struct Seq {
    q0: usize,
    sq: usize,
    k0: usize,
    sk: usize,
}

/// The keys query `i` sees (spec formula, bottom-right aligned), as a half-open range.
fn visible(i: usize, sq: usize, sk: usize, causal: bool, window: (i64, i64)) -> std::ops::Range<usize> {
    let diag = i as i64 + sk as i64 - sq as i64;
    let lo = if window.0 < 0 { 0 } else { (diag - window.0).max(0) };
    let right = if causal { 0 } else { window.1 };
    let hi = if right < 0 { sk as i64 } else { (diag + right + 1).clamp(0, sk as i64) };
    if lo >= hi {
        0..0
    } else {
        lo as usize..hi as usize
    }
}

fn run(inp: &Input) -> Option<()> {
    let dtype = [DType::F32, DType::F16, DType::BF16][inp.dtype as usize % 3];
    let hk = 1 + (inp.hk % 2) as usize;
    let h = hk * [1, 2, 3][inp.group as usize % 3];
    let d = 1 + (inp.d % 16) as usize;
    let (seqs, varlen) = match &inp.lens {
        Lens::Dense { b, sq, sk } => {
            let (b, sq, sk) = (1 + (*b % 3) as usize, (*sq % 301) as usize, (*sk % 301) as usize);
            ((0..b).map(|s| Seq { q0: s * sq, sq, k0: s * sk, sk }).collect::<Vec<_>>(), false)
        }
        Lens::Varlen(l) => {
            let (mut q0, mut k0) = (0, 0);
            let mut seqs = Vec::new();
            for &(sq, sk) in l.iter().take(4) {
                let (sq, sk) = ((sq % 301) as usize, (sk % 301) as usize);
                seqs.push(Seq { q0, sq, k0, sk });
                q0 += sq;
                k0 += sk;
            }
            if seqs.is_empty() {
                return None;
            }
            (seqs, true)
        }
    };
    let work: usize = seqs.iter().map(|s| s.sq.max(1) * s.sk.max(1)).sum::<usize>() * h * d;
    if work > MAX_WORK {
        return None;
    }
    let tq: usize = seqs.iter().map(|s| s.sq).sum();
    let tk: usize = seqs.iter().map(|s| s.sk).sum();
    let (b, sq, sk) = (seqs.len(), seqs[0].sq, seqs[0].sk);
    let (qs, ks): (Vec<usize>, Vec<usize>) =
        if varlen { (vec![tq, h, d], vec![tk, hk, d]) } else { (vec![b, sq, h, d], vec![b, sk, hk, d]) };

    let mut rng = Rng(inp.seed);
    let mut q: Vec<f32> = (0..tq * h * d).map(|_| rng.val()).collect();
    let mut k: Vec<f32> = (0..tk * hk * d).map(|_| rng.val()).collect();
    let mut v: Vec<f32> = (0..tk * hk * d).map(|_| rng.val()).collect();
    for p in inp.poison.iter().take(4) {
        let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][p.kind as usize % 3];
        let (buf, rows, heads) = match p.tensor % 3 {
            0 => (&mut q, tq, h),
            1 => (&mut k, tk, hk),
            _ => (&mut v, tk, hk),
        };
        if rows > 0 {
            let at = ((p.row as usize % rows) * heads + p.head as usize % heads) * d + p.col as usize % d;
            buf[at] = x;
        }
    }

    let mut opts = AttnOptions { causal: inp.causal, ..Default::default() };
    if let Some((l, r)) = inp.window {
        let side = |x: i16| if x < 0 { -1 } else { (x % 320) as i64 };
        opts.window = (side(l), side(r));
    }
    opts.softmax_scale = inp.scale.map(|s| (s % 17) as f32 / 8.0);
    opts.softcap = inp.softcap.map(|c| 1.0 + (c % 30) as f32).unwrap_or(0.0);
    if let Some(a) = inp.alibi {
        let mut r = Rng(a as u64 + 1);
        let slopes: Vec<f32> = (0..h).map(|_| r.val() / 4.0).collect();
        opts.alibi_slopes = Some(Tensor::from_f32(&slopes, &[h], DType::F32).unwrap());
    }
    let sink: Option<Vec<f32>> = inp.sink.map(|z| {
        let mut r = Rng(z as u64 + 7);
        (0..h).map(|_| r.val() * 2.0).collect()
    });
    if let Some(z) = &sink {
        opts.sink = Some(Tensor::from_f32(z, &[h], DType::F32).unwrap());
    }
    if varlen {
        let mut cq = vec![0i32];
        let mut ck = vec![0i32];
        for s in &seqs {
            cq.push((s.q0 + s.sq) as i32);
            ck.push((s.k0 + s.sk) as i32);
        }
        opts.varlen = Some(VarLen { cu_seqlens_q: cq, cu_seqlens_k: ck, seqused_k: None });
    }

    let qt = Tensor::from_f32(&q, &qs, dtype).unwrap();
    let kt = Tensor::from_f32(&k, &ks, dtype).unwrap();
    let vt = Tensor::from_f32(&v, &ks, dtype).unwrap();
    // The values as rounded to the dtype (what the library sees).
    let (q, k, v) = (qt.to_f32_vec(), kt.to_f32_vec(), vt.to_f32_vec());
    let out = match forward(&qt, &kt, &vt, &opts) {
        Ok(o) => o,
        Err(e) => panic!("forward refused a well-formed problem: {e}"),
    };
    let p = flashattn::problem::validate(&qt.view(), &kt.view(), &vt.view(), &opts).unwrap();
    let oracle = forward_f64(&p, qt.view().data, kt.view().data, vt.view().data);
    let (o, lse) = (out.o.to_f32_vec(), out.lse.to_f32_vec());
    assert_eq!(o.len(), tq * h * d);
    assert_eq!(lse.len(), tq * h);

    let row_of = |buf: &[f32], r: usize, hh: usize, heads: usize| -> (bool, bool) {
        let x = &buf[(r * heads + hh) * d..(r * heads + hh + 1) * d];
        (x.iter().any(|x| x.is_nan()), x.iter().any(|x| !x.is_finite()))
    };
    let group = h / hk;
    let mut masked_rows = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for hh in 0..h {
            let kh = hh / group;
            for i in 0..seq.sq {
                let row = seq.q0 + i;
                let oi = (row * h + hh) * d;
                let orow = &o[oi..oi + d];
                let li = if varlen { hh * tq + row } else { (s * h + hh) * seq.sq + i };
                let l = lse[li];
                let (ro, rl) = (&oracle.o[oi..oi + d], oracle.lse[li]);
                let what = format!("seq {s} head {hh} row {i} (sq {}, sk {})", seq.sq, seq.sk);
                let vis = visible(i, seq.sq, seq.sk, opts.causal, opts.window);
                if vis.is_empty() {
                    // No key: o = 0 and lse = -inf, or the sink's logit with one.
                    let empty = sink.as_ref().map_or(f32::NEG_INFINITY, |z| z[hh]);
                    assert!(l == empty && orow.iter().all(|&x| x == 0.0), "{what}: sees no key: {l}");
                    assert!(rl == empty as f64 && ro.iter().all(|&x| x == 0.0), "{what}: oracle not empty");
                    masked_rows.push((row, hh));
                    continue;
                }
                assert!(l != f32::NEG_INFINITY, "{what}: sees a key but lse = -inf");
                let (q_nan, q_bad) = row_of(&q, row, hh, h);
                let (mut k_nan, mut k_bad) = (false, false);
                let mut v_bad_cols = vec![false; d];
                for j in vis.clone() {
                    let (n, b) = row_of(&k, seq.k0 + j, kh, hk);
                    k_nan |= n;
                    k_bad |= b;
                    let vr = &v[((seq.k0 + j) * hk + kh) * d..((seq.k0 + j) * hk + kh + 1) * d];
                    for (c, x) in vr.iter().enumerate() {
                        v_bad_cols[c] |= !x.is_finite();
                    }
                }
                if q_nan || k_nan {
                    assert!(l.is_nan() && orow.iter().all(|x| x.is_nan()), "{what}: NaN score, got lse {l}");
                    assert!(rl.is_nan() && ro.iter().all(|x| x.is_nan()), "{what}: oracle, NaN score");
                } else if !q_bad && !k_bad {
                    assert!(l.is_finite() && rl.is_finite(), "{what}: clean scores, lse {l} (oracle {rl})");
                    for c in 0..d {
                        if !v_bad_cols[c] {
                            assert!(orow[c].is_finite() && ro[c].is_finite(), "{what}: column {c} {}", orow[c]);
                        }
                    }
                    if dtype == DType::F32 && !v_bad_cols.iter().any(|&x| x) {
                        assert!((l as f64 - rl).abs() <= 1e-3, "{what}: lse {l} vs oracle {rl}");
                        let scale = ro.iter().fold(1.0f64, |m, x| m.max(x.abs()));
                        for c in 0..d {
                            let err = (orow[c] as f64 - ro[c]).abs();
                            assert!(err <= 1e-4 * scale, "{what}: o[{c}] {} vs oracle {}", orow[c], ro[c]);
                        }
                    }
                }
            }
        }
    }

    if inp.backward {
        let dout: Vec<f32> = (0..tq * h * d).map(|_| rng.val()).collect();
        let dt = Tensor::from_f32(&dout, &qs, dtype).unwrap();
        let g = match backward(&BackwardInputs { q: &qt, k: &kt, v: &vt, o: &out.o, lse: &out.lse, dout: &dt }, &opts) {
            Ok(g) => g,
            Err(e) => panic!("backward refused a well-formed problem: {e}"),
        };
        let (dq, dk, dv) = (g.dq.to_f32_vec(), g.dk.to_f32_vec(), g.dv.to_f32_vec());
        for &(row, hh) in &masked_rows {
            let x = &dq[(row * h + hh) * d..(row * h + hh + 1) * d];
            assert!(x.iter().all(|&x| x == 0.0), "row {row} head {hh} sees no key: dq = {x:?}");
        }
        for seq in &seqs {
            let qr = seq.q0 * h * d..(seq.q0 + seq.sq) * h * d;
            let kr = seq.k0 * hk * d..(seq.k0 + seq.sk) * hk * d;
            let clean = q[qr.clone()].iter().chain(&k[kr.clone()]).chain(&v[kr.clone()]).all(|x| x.is_finite());
            // (Not for f16: a key's dk/dv sums up to 900 rows' contributions, which could pass f16's 65504.)
            if clean && dtype != DType::F16 {
                assert!(dq[qr].iter().all(|x| x.is_finite()), "dq not finite for a clean sequence");
                assert!(dk[kr.clone()].iter().all(|x| x.is_finite()), "dk not finite for a clean sequence");
                assert!(dv[kr].iter().all(|x| x.is_finite()), "dv not finite for a clean sequence");
            }
        }
        let all_clean = q.iter().chain(&k).chain(&v).all(|x| x.is_finite());
        match (&g.dsink, &sink) {
            (Some(ds), Some(_)) if all_clean && dtype != DType::F16 => {
                assert!(ds.to_f32_vec().iter().all(|x| x.is_finite()), "dsink not finite for clean inputs");
            }
            (None, Some(_)) => panic!("no dsink for a problem with a sink"),
            (Some(_), None) => panic!("a dsink without a sink"),
            _ => {}
        }
    }
    Some(())
}

fuzz_target!(|inp: Input| {
    let _ = run(&inp);
});
