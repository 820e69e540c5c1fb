//! The f64 oracle's gradients agree with central finite differences of its own forward pass.

mod common;
use common::*;
use flashattn::problem::validate;
use flashattn::reference::{backward_f64, forward_f64};
use flashattn::{AttnOptions, DType, Tensor};

/// Loss = sum(o * g) in f64.
fn loss(q: &Tensor, k: &Tensor, v: &Tensor, g: &[f64], opts: &AttnOptions) -> f64 {
    let p = validate(&q.view(), &k.view(), &v.view(), opts).unwrap();
    let f = forward_f64(&p, q.view().data, k.view().data, v.view().data);
    f.o.iter().zip(g).map(|(a, b)| a * b).sum()
}

fn check(opts: AttnOptions, (b, sq, sk, h, hk, d): (usize, usize, usize, usize, usize, usize), seed: u64) {
    let mut r = rng(seed);
    let q = randn_tensor(&mut r, &[b, sq, h, d], DType::F32, 1.0);
    let k = randn_tensor(&mut r, &[b, sk, hk, d], DType::F32, 1.0);
    let v = randn_tensor(&mut r, &[b, sk, hk, d], DType::F32, 1.0);
    let gt = randn_tensor(&mut r, &[b, sq, h, d], DType::F32, 1.0);
    let g: Vec<f64> = gt.to_f32_vec().iter().map(|&x| x as f64).collect();
    let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
    let grads =
        backward_f64(&p, q.view().data, k.view().data, v.view().data, gt.view().data, &p.q_like_map(gt.layout()));
    let step = 1e-2f32;
    for (name, which, analytic) in [("q", 0, &grads.dq), ("k", 1, &grads.dk), ("v", 2, &grads.dv)] {
        let base = [&q, &k, &v][which];
        let x = base.to_f32_vec();
        let mut worst = 0f64;
        for idx in (0..x.len()).step_by(x.len() / 13 + 1) {
            let eval = |delta: f32| {
                let mut y = x.clone();
                y[idx] += delta;
                let t = Tensor::from_f32(&y, base.shape(), DType::F32).unwrap();
                let actual = y[idx] as f64 - x[idx] as f64;
                let l = match which {
                    0 => loss(&t, &k, &v, &g, &opts),
                    1 => loss(&q, &t, &v, &g, &opts),
                    _ => loss(&q, &k, &t, &g, &opts),
                };
                (l, actual)
            };
            let ((lp, ap), (lm, am)) = (eval(step), eval(-step));
            let fd = (lp - lm) / (ap - am);
            let err = (fd - analytic[idx]).abs() / (1.0 + analytic[idx].abs());
            worst = worst.max(err);
        }
        assert!(worst < 2e-3, "{opts:?}: d{name} finite-difference mismatch {worst:.2e} (seed {seed})");
    }
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed();
    let shape = (2, 5, 7, 4, 2, 8);
    check(AttnOptions::default(), shape, s);
    check(AttnOptions::default().causal(), shape, s);
    check(AttnOptions::default().window(2, 1), (2, 7, 5, 4, 4, 8), s);
    check(AttnOptions::default().softcap(2.0), shape, s);
    let slopes = Tensor::from_f32(&[0.1, 0.2, 0.05, 0.3], &[4], DType::F32).unwrap();
    check(AttnOptions::default().alibi(slopes).causal(), shape, s);
    check(AttnOptions::default().scale(0.7), (1, 3, 9, 3, 1, 5), s);
}
