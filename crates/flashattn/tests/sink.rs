//! Learnable sinks (spec, "Scores" step 6) on the CPU backends: the oracle's `dsink` against finite
//! differences, rows without keys (`o = 0`, `lse = sink`), a dominating sink, the KV-cache path, and what is
//! refused (the CUDA backward; the CUDA forward is tests/cuda_sink.rs). The sweep's `Variant::Sink` cases (`cpu_sweep`) check forward and backward against the oracle.

mod common;

use common::{randn, rng};
use flashattn::kvcache::{CacheSeqlens, KvCache};
use flashattn::problem::validate;
use flashattn::reference::{forward_f64, oracle_f64};
use flashattn::{forward, kvcache_forward, AttnOptions, DType, Tensor};

fn tensor(rng: &mut common::Rng64, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&randn(rng, n, 1.0), shape, dtype).unwrap()
}

/// Random q `[b, sq, h, d]` and k, v `[b, sk, hk, d]` of `dtype`, drawn from `rng` in that order.
fn qkv(rng: &mut common::Rng64, [b, sq, sk, h, hk, d]: [usize; 6], dtype: DType) -> (Tensor, Tensor, Tensor) {
    let q = tensor(rng, &[b, sq, h, d], dtype);
    let k = tensor(rng, &[b, sk, hk, d], dtype);
    let v = tensor(rng, &[b, sk, hk, d], dtype);
    (q, k, v)
}

#[test]
fn oracle_dsink_matches_finite_differences() {
    // L = sum(dO ∘ O); dL/dsink_h by central differences of the f64 oracle against its analytic gradient.
    let mut r = rng(11);
    let (b, sq, sk, h, hk, d) = (2, 7, 9, 4, 2, 16);
    let (q, k, v) = qkv(&mut r, [b, sq, sk, h, hk, d], DType::F32);
    let dout = tensor(&mut r, &[b, sq, h, d], DType::F32);
    let sink: Vec<f32> = randn(&mut r, h, 1.0);
    for causal in [false, true] {
        let opts = |z: &[f32]| {
            let o = AttnOptions::default().sink(Tensor::from_f32(z, &[h], DType::F32).unwrap());
            if causal {
                o.causal()
            } else {
                o
            }
        };
        let o0 = opts(&sink);
        let p = validate(&q.view(), &k.view(), &v.view(), &o0).unwrap();
        let do_map = p.q_like_map(dout.layout());
        let (qd, kd, vd) = (q.view().data, k.view().data, v.view().data);
        let g = oracle_f64(&p, qd, kd, vd, Some((dout.view().data, &do_map))).1.unwrap();
        let dv = dout.to_f32_vec();
        let loss = |z: &[f32]| -> f64 {
            let p = validate(&q.view(), &k.view(), &v.view(), &opts(z)).unwrap();
            let f = forward_f64(&p, qd, kd, vd);
            f.o.iter().zip(&dv).map(|(a, &b)| a * b as f64).sum()
        };
        for hh in 0..h {
            let eps = 1e-2f32;
            let (mut up, mut dn) = (sink.clone(), sink.clone());
            up[hh] += eps;
            dn[hh] -= eps;
            // The perturbed sinks are exact in f32, so the step is exactly 2 * eps.
            let fd = (loss(&up) - loss(&dn)) / (up[hh] as f64 - dn[hh] as f64);
            let an = g.dsink[hh];
            assert!((fd - an).abs() <= 1e-4 * an.abs().max(1.0), "causal {causal} head {hh}: fd {fd} vs {an}");
        }
    }
}

#[test]
fn rows_without_keys_give_zero_and_the_sink() {
    // Causal with sq > sk: the first sq - sk rows see no key.
    let mut r = rng(12);
    let (sq, sk, h, d) = (9, 4, 2, 8);
    let (q, k, _) = qkv(&mut r, [1, sq, sk, h, h, d], DType::BF16);
    let sink = [0.75f32, -1.5];
    let opts = AttnOptions::default().causal().sink(Tensor::from_f32(&sink, &[h], DType::BF16).unwrap());
    let out = forward(&q, &k, &k, &opts).unwrap();
    let (o, lse) = (out.o.to_f32_vec(), out.lse.to_f32_vec());
    for i in 0..sq {
        for hh in 0..h {
            let l = lse[hh * sq + i];
            if i < sq - sk {
                assert!(o[(i * h + hh) * d..(i * h + hh + 1) * d].iter().all(|&x| x == 0.0), "row {i} head {hh}");
                assert_eq!(l, sink[hh], "row {i} head {hh}: lse");
            } else {
                assert!(l.is_finite() && l > sink[hh], "row {i} head {hh}: lse {l}");
            }
        }
    }
    let p = validate(&q.view(), &k.view(), &k.view(), &opts).unwrap();
    let f = forward_f64(&p, q.view().data, k.view().data, k.view().data);
    for (a, b) in lse.iter().zip(&f.lse) {
        assert!((*a as f64 - b).abs() <= 1e-3, "lse {a} vs oracle {b}");
    }
}

#[test]
fn rows_whose_visible_scores_are_all_minus_inf_give_zero_and_the_sink() {
    // q's first element -inf and every key's first element positive: every score of that row is -inf. With a
    // sink the row's softmax is the sink's alone: o = 0, lse = sink (as the oracle computes it); the others
    // are ordinary rows.
    let mut r = rng(14);
    let (sq, sk, h, d) = (4, 6, 2, 8);
    for dtype in [DType::F32, DType::BF16] {
        let mut qv = randn(&mut r, sq * h * d, 1.0);
        qv[(2 * h + 1) * d] = f32::NEG_INFINITY; // row 2, head 1
        let kv: Vec<f32> = randn(&mut r, sk * h * d, 1.0)
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % d == 0 { x.abs() + 0.5 } else { x })
            .collect();
        let q = Tensor::from_f32(&qv, &[1, sq, h, d], dtype).unwrap();
        let k = Tensor::from_f32(&kv, &[1, sk, h, d], dtype).unwrap();
        let v = tensor(&mut r, &[1, sk, h, d], dtype);
        let sink = [0.25f32, -0.5];
        let opts = AttnOptions::default().sink(Tensor::from_f32(&sink, &[h], DType::F32).unwrap());
        let out = forward(&q, &k, &v, &opts).unwrap();
        let (o, lse) = (out.o.to_f32_vec(), out.lse.to_f32_vec());
        let row = (2 * h + 1) * d;
        assert!(o[row..row + d].iter().all(|&x| x == 0.0), "{dtype:?}: o {:?}", &o[row..row + d]);
        assert_eq!(lse[sq + 2], sink[1], "{dtype:?}: lse");
        assert!(o.iter().all(|x| x.is_finite()) && lse.iter().all(|x| x.is_finite()), "{dtype:?}");
        let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
        let f = forward_f64(&p, q.view().data, k.view().data, v.view().data);
        for (a, b) in lse.iter().zip(&f.lse) {
            assert!((*a as f64 - b).abs() <= 1e-3, "{dtype:?}: lse {a} vs oracle {b}");
        }
    }
}

#[test]
fn a_dominating_sink_leaves_almost_nothing() {
    let mut r = rng(13);
    let (sq, sk, h, d) = (5, 6, 2, 8);
    let (q, k, v) = qkv(&mut r, [1, sq, sk, h, h, d], DType::F32);
    let plain = forward(&q, &k, &v, &AttnOptions::default()).unwrap();
    let opts = AttnOptions::default().sink(Tensor::from_f32(&[30.0, 30.0], &[h], DType::F32).unwrap());
    let out = forward(&q, &k, &v, &opts).unwrap();
    // o shrinks by exp(lse_plain - lse_sink) (about e^-28 here); lse is the sink's to within that.
    for (a, p) in out.o.to_f32_vec().iter().zip(plain.o.to_f32_vec()) {
        assert!(a.abs() <= 1e-9 * p.abs().max(1.0), "o {a} (plain {p})");
    }
    for l in out.lse.to_f32_vec() {
        assert!((l - 30.0).abs() < 1e-5, "lse {l}");
    }
}

#[test]
fn kvcache_with_a_sink_equals_the_forward() {
    let mut r = rng(14);
    let (b, sq, sk, h, hk, d) = (2, 3, 11, 4, 2, 16);
    let (q, mut kc, mut vc) = qkv(&mut r, [b, sq, sk, h, hk, d], DType::F16);
    let sink = Tensor::from_f32(&randn(&mut r, h, 2.0), &[h], DType::F16).unwrap();
    let opts = AttnOptions::default().causal().sink(sink);
    let want = forward(&q, &kc, &vc, &opts).unwrap();
    let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::PerSeq(vec![sk as i32; b]));
    let got = kvcache_forward(&q.view(), &mut cache, &opts).unwrap();
    assert_eq!(got.o.to_f32_vec(), want.o.to_f32_vec());
    assert_eq!(got.lse.to_f32_vec(), want.lse.to_f32_vec());
}

#[test]
fn bad_sinks_are_refused_naming_the_argument() {
    let q = Tensor::from_f32(&[0.5; 2 * 3 * 4 * 8], &[2, 3, 4, 8], DType::BF16).unwrap();
    let bad = [
        Tensor::from_f32(&[0.0; 3], &[3], DType::F32).unwrap(),
        Tensor::from_f32(&[0.0; 4], &[1, 4], DType::F32).unwrap(),
        Tensor::from_f32(&[0.0, f32::NAN, 0.0, 0.0], &[4], DType::F32).unwrap(),
        Tensor::from_f32(&[0.0; 4], &[4], DType::I32).unwrap(),
    ];
    for s in bad {
        let e = forward(&q, &q, &q, &AttnOptions::default().sink(s)).unwrap_err();
        assert_eq!(e.arg(), Some("sink"), "{e}");
    }
    let ok = AttnOptions::default().sink(Tensor::from_f32(&[0.0; 4], &[4], DType::F32).unwrap());
    let e = flashattn::ring::ring_forward(&q, &q, &q, &ok, 2).unwrap_err();
    assert!(e.to_string().contains("sink"), "{e}");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_takes_a_sink_in_the_backward_but_the_raw_device_api_refuses_it() {
    // The host API's CUDA backward computes dsink (tests/cuda_sink.rs, on a GPU): without a GPU it fails on the
    // device, never as an unsupported sink. The raw device API has no place for dsink and refuses a sink from
    // validation, before any device work.
    let q = Tensor::from_f32(&[0.5; 3 * 2 * 8], &[1, 3, 2, 8], DType::BF16).unwrap();
    let opts = AttnOptions::default().sink(Tensor::from_f32(&[0.0; 2], &[2], DType::F32).unwrap());
    let o = forward(&q, &q, &q, &opts).unwrap();
    let unsupported_sink =
        |e: &flashattn::Error| matches!(e, flashattn::Error::Unsupported { .. }) && e.to_string().contains("sink");
    let x = flashattn::BackwardInputs { q: &q, k: &q, v: &q, o: &o.o, lse: &o.lse, dout: &o.o };
    if let Err(e) = flashattn::backward_on(flashattn::Device::Cuda(0), &x, &opts) {
        assert!(!unsupported_sink(&e), "{e}");
    }
    if let Err(e) = flashattn::forward_on(flashattn::Device::Cuda(0), &q, &q, &q, &opts) {
        assert!(!unsupported_sink(&e), "{e}");
    }
    let t = |dtype, shape: &[usize]| flashattn::cuda::DeviceTensorRef::contiguous(0x1000, dtype, shape);
    let (x, lse) = (t(DType::BF16, &[1, 3, 2, 8]), t(DType::F32, &[1, 2, 3]));
    let fwd = flashattn::cuda::ForwardTensors { q: &x, k: &x, v: &x, o: &x, lse: &lse };
    let bwd = flashattn::cuda::BackwardTensors { fwd, dout: &x, dq: &x, dk: &x, dv: &x, dsink: None };
    // SAFETY: refused by validation before any pointer is used.
    let e = unsafe { flashattn::cuda::backward_raw(0, std::ptr::null_mut(), bwd, &opts) }.unwrap_err();
    assert!(unsupported_sink(&e), "{e}");
}
