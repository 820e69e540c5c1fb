//! Learnable sinks on the CUDA kernels (spec, "Scores" step 6): the sm80-class and Hopper forward and backward
//! (`dq`, `dk`, `dv` and `dsink` against the f64 oracle under the accuracy rule) and the KV-cache decode
//! (single pass and split merge) against the CPU backend.
//!
//! Without a usable GPU each test prints a visible SKIP line and passes; with `FLASHATTN_REQUIRE_GPU=1` it
//! fails instead.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use flashattn::{AttnOptions, CacheSeqlens, CudaPath, DType, Device, KvCache, Tensor, Tuning};

/// `Variant::Sink` cases, forward and backward (the sink draws causal / window / none, and a +8 lift a quarter
/// of the time) over head dims and shapes that include rows without keys (sq > sk under causal).
fn sink_cases(dtype: DType, tuning: &Tuning) -> Vec<Case> {
    let dims = [32, 59, 64, 128, 192, 256];
    let shapes = [(113, 203), (1, 147), (239, 1), (127, 513), (128, 217), (300, 64), (3, 799)];
    let mut out = Vec::new();
    for (di, &d) in dims.iter().enumerate() {
        for (si, &shape) in shapes.iter().enumerate() {
            let mut c = Case::new(dtype, d, shape, HEADS[(di + si) % HEADS.len()], Variant::Sink);
            c.backward = true;
            c.batch = 2;
            c.tuning = tuning.clone();
            out.push(c);
        }
    }
    out
}

fn run(name: &str, dtype: DType, tuning: Tuning) {
    if !gpu(name) {
        return;
    }
    let cases = sink_cases(dtype, &tuning);
    run_cases(Device::Cuda(0), &cases).report(name);
}

/// The default path: the Hopper forward on sm_90a for the problems it covers, else the sm80-class kernel.
#[test]
fn sink_forward_f16() {
    run("sink_forward_f16", DType::F16, Tuning::default());
}

#[test]
fn sink_forward_bf16() {
    run("sink_forward_bf16", DType::BF16, Tuning::default());
}

/// The sm80-class forward and backward forced by the call's tuning (on Hopper too).
#[test]
fn sink_forward_bf16_sm80_path() {
    run("sink_forward_bf16_sm80_path", DType::BF16, Tuning { cuda_path: CudaPath::Sm80, ..Tuning::default() });
}

/// The Hopper forward with the sm80-class backward (the strip and 2-D tiled main kernels by head dim).
#[test]
fn sink_f16_sm80_backward() {
    run("sink_f16_sm80_backward", DType::F16, Tuning { bwd_path: CudaPath::Sm80, ..Tuning::default() });
}

/// Rows without keys give `o = 0` and `lse = sink` exactly; a sink far above the scores (+60) gives `o` near 0
/// and `lse` near the sink, with no overflow (the epilogue folds it against max(m, sink)).
#[test]
fn sink_empty_rows_and_a_dominating_sink() {
    let Some(mut r) = gpu_rng("sink_empty_rows_and_a_dominating_sink") else { return };
    for (d, path) in [(64, CudaPath::default()), (128, CudaPath::Sm80), (128, CudaPath::default())] {
        let (sq, sk, h) = (200, 70, 4);
        let q = randn_tensor(&mut r, &[1, sq, h, d], DType::BF16, 1.0);
        let k = randn_tensor(&mut r, &[1, sk, h, d], DType::BF16, 1.0);
        let v = randn_tensor(&mut r, &[1, sk, h, d], DType::BF16, 1.0);
        for sink in [vec![0.75f32, -1.5, 3.0, -40.0], vec![60.0f32; h]] {
            let mut opts = AttnOptions::default().causal().sink(Tensor::from_f32(&sink, &[h], DType::F32).unwrap());
            opts.tuning = Tuning { cuda_path: path, ..Tuning::default() };
            let got = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).expect("cuda forward");
            let want = flashattn::forward(&q, &k, &v, &opts).expect("cpu forward");
            let (o, lse) = (got.o.to_f32_vec(), got.lse.to_f32_vec());
            let (wo, wlse) = (want.o.to_f32_vec(), want.lse.to_f32_vec());
            for i in 0..sq {
                for hh in 0..h {
                    let row = &o[(i * h + hh) * d..(i * h + hh + 1) * d];
                    let l = lse[hh * sq + i];
                    if i < sq - sk {
                        assert!(row.iter().all(|&x| x == 0.0), "d {d} {path:?}: row {i} head {hh} not 0");
                        assert_eq!(l, sink[hh], "d {d} {path:?}: row {i} head {hh}: lse");
                    } else {
                        let wl = wlse[hh * sq + i];
                        assert!((l - wl).abs() <= 1e-3, "d {d} {path:?}: row {i} head {hh}: lse {l} vs {wl}");
                        let wrow = &wo[(i * h + hh) * d..(i * h + hh + 1) * d];
                        let err = row.iter().zip(wrow).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                        assert!(err <= 2e-2, "d {d} {path:?}: row {i} head {hh}: o error {err}");
                    }
                }
            }
        }
    }
}

/// The KV-cache decode with a sink against the CPU KV-cache path: short caches (one pass, the sink in the warp
/// merge) and long ones (split-KV, the sink added once in the merge of the splits, not per split), causal
/// with more queries than cached keys for rows without keys.
#[test]
fn sink_kvcache_single_pass_and_splits() {
    let Some(mut r) = gpu_rng("sink_kvcache_single_pass_and_splits") else { return };
    let dt = DType::F16;
    for (b, sq, h, hk, d, seqlen, cap, causal) in [
        (2, 1, 8, 2, 128, 37, 64, false),
        (2, 4, 8, 8, 64, 3, 16, true),
        (1, 1, 16, 2, 128, 30000, 32768, false),
        (3, 2, 8, 1, 256, 9000, 9000, true),
    ] {
        let q = randn_tensor(&mut r, &[b, sq, h, d], dt, 1.0);
        let kc0 = randn_tensor(&mut r, &[b, cap, hk, d], dt, 1.0);
        let vc0 = randn_tensor(&mut r, &[b, cap, hk, d], dt, 1.0);
        let sink: Vec<f32> =
            randn(&mut r, h, 2.0).into_iter().enumerate().map(|(i, x)| x + 8.0 * (i % 3 == 0) as u8 as f32).collect();
        let mut opts = AttnOptions::default().sink(Tensor::from_f32(&sink, &[h], DType::F32).unwrap());
        opts.causal = causal;
        let run = |dev: Option<Device>| {
            let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
            let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(seqlen));
            match dev {
                Some(dev) => flashattn::kvcache_forward_on(dev, &q.view(), &mut cache, &opts),
                None => flashattn::kvcache_forward(&q.view(), &mut cache, &opts),
            }
            .expect("kvcache forward")
        };
        let got = run(Some(Device::Cuda(0)));
        let want = run(None);
        let (o, wo) = (got.o.to_f32_vec(), want.o.to_f32_vec());
        let (lse, wlse) = (got.lse.to_f32_vec(), want.lse.to_f32_vec());
        let lerr = lse.iter().zip(&wlse).map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() }).fold(0.0f32, f32::max);
        let oerr = o.iter().zip(&wo).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let case = format!("b {b} sq {sq} h {h}/{hk} d {d} seqlen {seqlen} causal {causal}");
        assert!(lerr <= 1e-3, "{case}: lse error {lerr}");
        assert!(oerr <= 1e-2, "{case}: o error {oerr}");
    }
}
