//! GPU tests of the CUDA backend: the spec's sweep against the f64 oracle on `Device::Cuda(0)`, KV-cache
//! attention, determinism, stress, compile/load times, plus NVRTC compilation of the kernel variants (no
//! GPU needed).
//!
//! Without a usable GPU (or NVRTC) each test prints a visible SKIP line and passes; with
//! `FLASHATTN_REQUIRE_GPU=1` it fails instead. `FLASHATTN_SWEEP=full|quick` sets the sweep size (quick is
//! for compute-sanitizer and CI). Outputs are poisoned (NaN) on the device before every launch.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use flashattn::cuda::{self, compile, Variant};
use flashattn::problem::validate;
use flashattn::reference::{forward_f64, naive_forward};
use flashattn::{AttnOptions, BackwardInputs, CacheSeqlens, CudaPath, DType, Device, KvCache, Rotary, Tensor, Tuning};
use rand::Rng;

fn full() -> bool {
    sweep_level() == "full"
}

/// The CUDA sweep of one dtype. Full: every head dim x every (sq, sk) of the spec, forward and backward,
/// with the variant and head layout rotating so each appears with every head dim. Quick: a small subset. Both
/// end with the value head dim rows of the spec (`(d, d_v)` = (192, 128), (128, 64), (64, 128): every variant,
/// sink included, on small shapes; full: also each pair with every (sq, sk)), forward and backward.
fn cuda_cases(dtype: DType) -> Vec<Case> {
    let mut out = Vec::new();
    let (dims, shapes): (Vec<usize>, Vec<(usize, usize)>) = if full() {
        (HEAD_DIMS.to_vec(), SEQLENS.to_vec())
    } else {
        (vec![32, 59, 128, 256], vec![(113, 203), (1, 147), (239, 1), (127, 513), (128, 217), (3, 799)])
    };
    let dt = if dtype == DType::BF16 { 1 } else { 0 };
    // Every backend's variants and the learnable sink (the CUDA kernels run it forward and backward).
    let variants: Vec<common::Variant> = VARIANTS.into_iter().chain([common::Variant::Sink]).collect();
    for (di, &d) in dims.iter().enumerate() {
        for (si, &shape) in shapes.iter().enumerate() {
            // The f64 oracle dominates the run time: the largest shapes run with a third of the head dims
            // (rotating, so each head dim meets large shapes too).
            if full() && shape.0 * shape.1 >= 1024 * 1023 && (di + si) % 3 != 0 {
                continue;
            }
            let variant = variants[(di + si + dt) % variants.len()];
            let heads = HEADS[(di * 7 + si + dt) % HEADS.len()];
            let mut c = Case::new(dtype, d, shape, heads, variant);
            c.backward = true;
            if !full() {
                c.batch = 2;
            }
            out.push(c);
        }
    }
    out.extend(value_dim_rows(dtype));
    out
}

/// The sweep's value head dim rows of one dtype (see [`cuda_cases`]), forward and backward.
fn value_dim_rows(dtype: DType) -> Vec<Case> {
    let mut out = value_dim_cases(dtype, true);
    if full() {
        let dt = usize::from(dtype == DType::BF16);
        let variants: Vec<common::Variant> = VARIANTS.into_iter().chain([common::Variant::Sink]).collect();
        for (pi, &dims) in VALUE_DIMS.iter().enumerate() {
            for (si, &shape) in SEQLENS.iter().enumerate() {
                let mut c = Case::with_dv(
                    dtype,
                    dims,
                    shape,
                    HEADS[(pi + si + dt) % HEADS.len()],
                    variants[(pi * 3 + si + dt) % variants.len()],
                );
                c.backward = true;
                out.push(c);
            }
        }
    }
    out
}

/// Compiles, in parallel, every variant the cases will use (so the sweep measures kernels, not NVRTC).
fn warm_up(cases: &[Case], deterministic: bool) {
    let arch = cuda::device_arch(0).expect("device arch");
    let mut vs: Vec<Variant> = Vec::new();
    for c in cases {
        let inp = make_inputs(c, &mut rng(1));
        // Varlen cases may or may not be causal: take both.
        for causal in [false, true] {
            let mut o = inp.opts.clone();
            if c.variant == Variant_::Varlen || c.variant == Variant_::Alibi {
                o.causal = causal;
            }
            let p = validate(&inp.q.view(), &inp.k.view(), &inp.v.view(), &o).expect("valid case");
            let (f, b) = cuda::variants_for(&p, c.d % 8 == 0 && c.d_v % 8 == 0, deterministic).expect("variant");
            vs.push(f);
            vs.push(b);
        }
    }
    vs.sort();
    vs.dedup();
    let t0 = std::time::Instant::now();
    let reps = cuda::precompile_variants(&[arch], &vs).expect("precompile");
    let compiled = reps.iter().filter(|r| !r.cached).count();
    say(&format!(
        "warm-up: {} variants ({compiled} compiled, {} cached) in {:.1} s",
        reps.len(),
        reps.len() - compiled,
        t0.elapsed().as_secs_f64()
    ));
}

use common::Variant as Variant_;

/// Runs cases on the GPU one by one, printing a line per case past the capture (a run cut short by a
/// timeout still shows how far it got).
fn run_cases_logged(cases: &[Case]) -> Outcome {
    let mut out = Outcome::default();
    for (i, c) in cases.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let o = run_cases(Device::Cuda(0), std::slice::from_ref(c));
        let f = o.fail;
        out.add(o);
        let dims = if c.d_v == c.d { format!("d{}", c.d) } else { format!("d{} dv{}", c.d, c.d_v) };
        say(&format!(
            "  case {}/{} {} {:?} {dims} {}x{} h{}/{} b{}{}: {} ({:.2} s)",
            i + 1,
            cases.len(),
            c.dtype,
            c.variant,
            c.sq,
            c.sk,
            c.h,
            c.hk,
            c.batch,
            if c.deterministic { " det" } else { "" },
            if f == 0 { "ok" } else { "FAIL" },
            t0.elapsed().as_secs_f64()
        ));
    }
    out
}

/// Launch counts of the Hopper kernels (forward, backward) so far in this process.
fn sm90_launches() -> (u64, u64) {
    (cuda::sm90_forward_launches(), cuda::sm90_backward_launches())
}

/// Says how many forwards and backwards of a run (under `tuning`) took the Hopper path; on Hopper (unless
/// `tuning.cuda_path` forces the sm80-class fallback) some must have, so the sweep really covers those kernels
/// (the backward only when the run had backward cases; `tuning.bwd_path` forces its fallback alone). The
/// launch counters are per thread: tests running side by side do not disturb them.
fn report_sm90(what: &str, before: (u64, u64), had_backward: bool, tuning: &Tuning) {
    let (f0, b0) = before;
    let (f1, b1) = sm90_launches();
    let (n, nb) = (f1 - f0, b1 - b0);
    let hopper = cuda::device_arch(0).is_ok_and(|a| a == "sm_90a");
    let forced = !tuning.sm90_forward_allowed();
    let bwd_forced = !tuning.sm90_backward_allowed();
    say(&format!(
        "{what}: {n} forward and {nb} backward launches on the sm90 path (device sm_90a: {hopper}, forced sm80: \
         {forced}, backward forced sm80: {bwd_forced})"
    ));
    if hopper && !forced {
        assert!(n > 0, "{what}: no forward ran on the sm90 path on a Hopper device");
    } else {
        assert_eq!(n, 0, "{what}: the sm90 forward ran where it must not");
    }
    if hopper && !bwd_forced && had_backward {
        assert!(nb > 0, "{what}: no backward ran on the sm90 path on a Hopper device");
    } else if !hopper || bwd_forced {
        assert_eq!(nb, 0, "{what}: the sm90 backward ran where it must not");
    }
}

/// Compiles the variants of `cases` (of `deterministic` ones), runs the cases on the GPU one by one, says their
/// counts and the time as `what`, checks their Hopper launches with [`report_sm90`] and fails on any failed case.
fn run_checked(what: &str, cases: &[Case], deterministic: bool, had_backward: bool, tuning: &Tuning) -> Outcome {
    warm_up(cases, deterministic);
    let t0 = std::time::Instant::now();
    let before = sm90_launches();
    let o = run_cases_logged(cases);
    say(&format!("{what}: {} ({:.1} s)", o.counts(), t0.elapsed().as_secs_f64()));
    report_sm90(what, before, had_backward, tuning);
    o.assert_passed();
    o
}

/// The CUDA sweep of one dtype under `tuning` (every case's options carry it).
fn sweep(dtype: DType, tuning: Tuning) {
    let mut cases = cuda_cases(dtype);
    for c in &mut cases {
        c.tuning = tuning.clone();
    }
    let what = format!(
        "cuda sweep {dtype} ({}, cuda path {:?}, backward path {:?})",
        sweep_level(),
        tuning.cuda_path,
        tuning.bwd_path
    );
    let o = run_checked(&what, &cases, false, cases.iter().any(|c| c.backward), &tuning);
    assert!(o.pass > 0);
}

/// One `#[test]` per dtype and forced path, each running the shared sweep (so that each runs, and is filtered,
/// alone) when a GPU is usable.
macro_rules! sweep_tests {
    ($($(#[$doc:meta])* $name:ident: $dtype:ident, $tuning:expr;)+) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                if gpu(stringify!($name)) {
                    sweep(DType::$dtype, $tuning);
                }
            }
        )+
    };
}

sweep_tests! {
    sweep_f16: F16, Tuning::default();
    sweep_bf16: BF16, Tuning::default();
    /// The bf16 sweep on the sm80-class kernels (forced by the call's tuning, so on Hopper this process runs the
    /// fallback beside the sm90 path of the other tests): no sm90 launch may happen.
    sweep_bf16_sm80_path: BF16, Tuning { cuda_path: CudaPath::Sm80, ..Tuning::default() };
    /// The bf16 sweep with only the backward forced onto the sm80-class kernel: on Hopper the forwards still run
    /// on the sm90 path, no backward may.
    sweep_bf16_sm80_backward: BF16, Tuning { bwd_path: CudaPath::Sm80, ..Tuning::default() };
}

/// The sweep's cases above head dim 128 (both dtypes) with the Hopper forward's 64-key K/V blocks forced at head
/// dim 256 (`Tuning::sm90_wide_kv_d256 = Some(false)`; the rule runs the 80-key blocks except on short masked
/// problems, so the sweep alone would leave the 64-key kernel mostly untested); elsewhere the same as the sweep.
#[test]
fn sweep_d256_bn64() {
    if !gpu("sweep_d256_bn64") {
        return;
    }
    let tuning = Tuning { sm90_wide_kv_d256: Some(false), ..Tuning::default() };
    let mut cases: Vec<Case> =
        [DType::F16, DType::BF16].into_iter().flat_map(cuda_cases).filter(|c| c.d > 128).collect();
    for c in &mut cases {
        c.tuning = tuning.clone();
    }
    let o = run_checked("cuda sweep d256 BN64", &cases, false, true, &tuning);
    assert!(o.pass > 0);
}

/// Backward cases of batch 2 over f16 and bf16, every variant and `shapes`, their heads cycling through [`HEADS`];
/// `head_dim(dtype, variant index, shape index)` gives each one's head dim.
fn backward_cases(shapes: &[(usize, usize)], head_dim: impl Fn(DType, usize, usize) -> usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for (vi, variant) in VARIANTS.into_iter().enumerate() {
            for (si, &shape) in shapes.iter().enumerate() {
                let mut c = Case::new(dtype, head_dim(dtype, vi, si), shape, HEADS[(vi + si) % HEADS.len()], variant);
                c.batch = 2;
                c.backward = true;
                cases.push(c);
            }
        }
    }
    cases
}

/// Every variant on small odd shapes, MHA/GQA/MQA, forward and backward.
#[test]
fn small_variants() {
    if !gpu("small_variants") {
        return;
    }
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for (vi, variant) in VARIANTS.into_iter().enumerate() {
            for (hi, heads) in HEADS.into_iter().enumerate() {
                for (si, shape) in [(1, 1), (5, 17), (17, 5), (65, 130), (130, 65)].into_iter().enumerate() {
                    let dims = [40, 59, 64, 96, 128, 200];
                    let d = dims[(vi + hi + si) % dims.len()];
                    let mut c = Case::new(dtype, d, shape, heads, variant);
                    c.batch = 3;
                    c.backward = true;
                    cases.push(c);
                }
            }
        }
    }
    if !full() {
        cases.retain(|c| c.sq * c.sk <= 130 * 65 && (c.h == c.hk || c.sq != 65));
    }
    run_checked("cuda small variants", &cases, false, true, &Tuning::default());
}

/// The Hopper backward at head dims above 128 (compiled at 256, smaller ones zero-padded): every variant,
/// MHA/GQA/MQA, one and several key blocks of 64, f16 and bf16. On Hopper every one of these backwards must
/// run on the sm90 path (checked case by case; varlen cases draw `seqused_k` on half the batches, which the
/// sm90 backward leaves to the sm80-class kernel, so of those at least one), elsewhere none.
#[test]
fn sm90_backward_wide_heads() {
    if !gpu("sm90_backward_wide_heads") {
        return;
    }
    let cases =
        backward_cases(&[(1, 65), (130, 257), (257, 130), (64, 64)], |_, vi, si| [256, 192, 136, 256][(vi + si) % 4]);
    warm_up(&cases, false);
    let hopper = cuda::device_arch(0).is_ok_and(|a| a == "sm_90a");
    let forced = false; // the cases run with the default tuning
    let sm90_expected = hopper && !forced;
    let (mut out, mut off_path, mut varlen_sm90) = (Outcome::default(), Vec::new(), 0);
    for c in &cases {
        let before = sm90_launches().1;
        out.add(run_cases(Device::Cuda(0), std::slice::from_ref(c)));
        let on_sm90 = sm90_launches().1 > before;
        if c.variant == Variant_::Varlen && sm90_expected {
            varlen_sm90 += on_sm90 as usize;
        } else if on_sm90 != sm90_expected {
            off_path.push(format!("{c:?}"));
        }
    }
    say(&format!(
        "cuda sm90 backward, head dims > 128: {}; {} of {} on the expected path, {varlen_sm90} varlen on sm90 \
         (sm_90a: {hopper}, forced sm80: {forced})",
        out.counts(),
        cases.len() - off_path.len(),
        cases.len()
    ));
    out.assert_passed();
    assert!(off_path.is_empty(), "backwards not on the expected path: {}", off_path.join("; "));
    assert!(!sm90_expected || varlen_sm90 > 0, "no varlen backward ran on the sm90 path");
}

/// Deterministic mode against the f64 oracle: every variant, head dims on each sm90 backward tile (64, 128, 256)
/// and padded ones, MHA/GQA/MQA, shapes of one and several blocks. On Hopper it runs on the sm90 backward
/// (counted), elsewhere on bwd.cu's.
#[test]
fn deterministic_sweep() {
    if !gpu("deterministic_sweep") {
        return;
    }
    let mut cases = backward_cases(&[(130, 257), (257, 130), (300, 300)], |dtype, vi, si| {
        [64, 128, 256, 96, 200][(vi + si + usize::from(dtype == DType::BF16)) % 5]
    });
    for c in &mut cases {
        c.deterministic = true;
    }
    run_checked("cuda deterministic sweep", &cases, true, true, &Tuning::default());
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

/// Forward is bit-identical over runs; backward too in deterministic mode.
#[test]
fn determinism() {
    if !gpu("determinism") {
        return;
    }
    let shapes = if full() { vec![(1024, 1024), (239, 799)] } else { vec![(130, 257)] };
    let mut checked = 0;
    let before = sm90_launches();
    for dtype in [DType::F16, DType::BF16] {
        for &(sq, sk) in &shapes {
            for (d, heads, variant) in
                [(128, (6, 2), Variant_::Causal), (64, (6, 6), Variant_::Plain), (256, (6, 1), Variant_::Window)]
            {
                let c = Case::new(dtype, d, (sq, sk), heads, variant);
                let mut inp = make_inputs(&c, &mut rng(seed()));
                inp.opts.deterministic = true;
                let run = || {
                    let f = flashattn::forward_on(Device::Cuda(0), &inp.q, &inp.k, &inp.v, &inp.opts).expect("fwd");
                    let x = BackwardInputs { q: &inp.q, k: &inp.k, v: &inp.v, o: &f.o, lse: &f.lse, dout: &inp.dout };
                    let g = flashattn::backward_on(Device::Cuda(0), &x, &inp.opts).expect("bwd");
                    (bits(&f.o), bits(&f.lse), bits(&g.dq), bits(&g.dk), bits(&g.dv))
                };
                let first = run();
                for _ in 0..3 {
                    let again = run();
                    assert!(first.0 == again.0 && first.1 == again.1, "forward not bit-identical: {c:?}");
                    assert!(first.2 == again.2, "deterministic dq differs: {c:?}");
                    assert!(first.3 == again.3 && first.4 == again.4, "deterministic dk/dv differ: {c:?}");
                }
                checked += 1;
            }
        }
    }
    say(&format!("cuda determinism: {checked} cases bit-identical over 4 runs"));
    report_sm90("cuda determinism", before, true, &Tuning::default());
}

/// A 16-bit forward with an f32 `out_dtype` (ring attention's partial outputs) writes the output unrounded: the
/// same values as the 16-bit output before its rounding (bit for bit once rounded), bits no 16-bit value has,
/// within the spec's rule of the f64 oracle; on the default kernels (sm90 on Hopper) and the sm80-class ones,
/// aligned and unaligned (d 59) head dims, every variant, a value head dim of its own and the sm90 forward's wide
/// K/V tiles (d 128 from 8k keys without a mask; d 256 without one). Outputs are poisoned before each launch.
#[test]
fn forward_f32_output() {
    if !gpu("forward_f32_output") {
        return;
    }
    let mut checked = 0;
    let small = (130, 257);
    for path in [CudaPath::Auto, CudaPath::Sm80] {
        for dtype in [DType::F16, DType::BF16] {
            for (dims, shape, variant) in [
                ((32, 32), small, Variant_::Causal),
                ((64, 64), small, Variant_::Softcap),
                ((128, 128), small, Variant_::Causal),
                ((256, 256), small, Variant_::Plain),
                ((59, 59), small, Variant_::Window),
                ((128, 128), small, Variant_::Varlen),
                ((64, 64), small, Variant_::Alibi),
                ((128, 128), small, Variant_::Sink),
                ((192, 128), small, Variant_::Causal),
                ((128, 128), (64, 8192), Variant_::Plain),
            ] {
                let c = Case::with_dv(dtype, dims, shape, (4, 2), variant);
                let mut inp = make_inputs(&c, &mut rng(seed()));
                inp.opts.tuning.cuda_path = path;
                let o32_opts = inp.opts.clone().out_dtype(DType::F32);
                let run = |o: &AttnOptions| flashattn::forward_on(Device::Cuda(0), &inp.q, &inp.k, &inp.v, o);
                let (f16_, f32_) = (run(&inp.opts).expect("16-bit forward"), run(&o32_opts).expect("f32 forward"));
                let what = format!("{c:?} {path:?}");
                assert_eq!(f32_.o.dtype(), DType::F32, "{what}");
                let o32 = f32_.o.to_f32_vec();
                let rounded = Tensor::from_f32(&o32, f32_.o.shape(), dtype).expect("shape");
                assert!(bits(&rounded) == bits(&f16_.o), "f32 output rounds to another 16-bit output: {what}");
                assert!(bits(&f32_.lse) == bits(&f16_.lse), "lse differs: {what}");
                assert!(o32.iter().zip(rounded.to_f32_vec()).any(|(a, b)| *a != b), "only 16-bit values: {what}");
                let p = validate(&inp.q.view(), &inp.k.view(), &inp.v.view(), &inp.opts).expect("valid case");
                let (qd, kd, vd) = (inp.q.view().data, inp.k.view().data, inp.v.view().data);
                let reference = forward_f64(&p, qd, kd, vd);
                let (base, _) = naive_forward(&p, qd, kd, vd);
                let factor = flashattn::accuracy::o_factor(inp.opts.softcap > 0.0, false);
                let v = flashattn::accuracy::compare("o", &o32, &reference.o, &base.to_f32_vec(), dtype, factor);
                assert!(v.pass, "{what}: {v:?}");
                checked += 1;
            }
        }
    }
    say(&format!("cuda f32 outputs of 16-bit inputs: {checked} cases"));
}

/// Seqlens 1..17 everywhere with logits scaled by 100: no NaN, no Inf in o.
#[test]
fn stress_no_nan() {
    let Some(mut r) = gpu_rng("stress_no_nan") else { return };
    let mut n = 0;
    for dtype in [DType::F16, DType::BF16] {
        for s in 1..=17usize {
            let (sq, sk) = (s, 18 - s);
            let d = [32, 59, 128][s % 3];
            for causal in [false, true] {
                let q = randn_tensor(&mut r, &[2, sq, 4, d], dtype, 100.0);
                let k = randn_tensor(&mut r, &[2, sk, 2, d], dtype, 1.0);
                let v = randn_tensor(&mut r, &[2, sk, 2, d], dtype, 1.0);
                let opts = AttnOptions { causal, ..Default::default() };
                let out = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).expect("fwd");
                let o = out.o.to_f32_vec();
                assert!(o.iter().all(|x| x.is_finite()), "non-finite o at sq {sq} sk {sk} d {d} causal {causal}");
                n += 1;
            }
        }
    }
    say(&format!("cuda stress: {n} cases finite"));
}

/// KV-cache attention on the device against the oracle over the same (appended) cache: paged (page sizes
/// 1, 16, 256) and unpaged, rotary none/half/full, interleaved or not, leftpad, batch index.
#[test]
fn kvcache() {
    let Some(mut r) = gpu_rng("kvcache") else { return };
    let mut tally = Outcome::default();
    let dtypes = [DType::F16, DType::BF16];
    let mut case = 0usize;
    for &dtype in &dtypes {
        for paged in [None, Some(1usize), Some(16), Some(256)] {
            for rot in [0usize, 1, 2] {
                case += 1;
                let (b, h, hk) = (3usize, 6usize, [6, 2, 1][case % 3]);
                let d = [64usize, 59, 128][case % 3];
                let sq = [1usize, 4, 7][case % 3];
                let s_new = if rot > 0 || case % 2 == 0 { 3usize } else { 0 };
                let cap = 300usize;
                let seqlens: Vec<i32> = (0..b).map(|_| r.gen_range(0..(cap - s_new - 1)) as i32).collect();
                let interleaved = case % 2 == 1;
                let causal = case % 4 != 0;
                let (kshape, table) = match paged {
                    None => (vec![b + 1, cap, hk, d], None),
                    Some(ps) => {
                        let maxp = cap.div_ceil(ps);
                        let npages = b * maxp + 2;
                        let mut perm: Vec<i32> = (0..npages as i32).collect();
                        for i in (1..perm.len()).rev() {
                            perm.swap(i, r.gen_range(0..=i));
                        }
                        let t = Tensor::from_i32(perm[..b * maxp].to_vec(), &[b, maxp]).unwrap();
                        (vec![npages, ps, hk, d], Some(t))
                    }
                };
                let kc0 = randn_tensor(&mut r, &kshape, dtype, 1.0);
                let vc0 = randn_tensor(&mut r, &kshape, dtype, 1.0);
                let q = randn_tensor(&mut r, &[b, sq, h, d], dtype, 1.0);
                let kn = randn_tensor(&mut r, &[b, s_new, hk, d], dtype, 1.0);
                let vn = randn_tensor(&mut r, &[b, s_new, hk, d], dtype, 1.0);
                let half = [0, d / 4, d / 2][rot];
                let ro = 2 * cap;
                let cos = Tensor::from_f32(
                    &(0..ro * half).map(|i| ((i as f32) * 0.01).cos()).collect::<Vec<_>>(),
                    &[ro, half.max(1)],
                    DType::F32,
                );
                let sin = Tensor::from_f32(
                    &(0..ro * half).map(|i| ((i as f32) * 0.01).sin()).collect::<Vec<_>>(),
                    &[ro, half.max(1)],
                    DType::F32,
                );
                let opts = AttnOptions { causal, ..Default::default() };
                let leftpad = (paged.is_none() && case % 3 == 1)
                    .then(|| seqlens.iter().map(|&n| r.gen_range(0..=n.min(5))).collect::<Vec<i32>>());
                let batch_idx = (paged.is_none() && case % 3 == 2).then(|| vec![2i32, 0, 3]);
                let run = |device: Device| -> (
                    flashattn::Result<flashattn::ForwardOutput>,
                    Tensor,
                    Tensor,
                    Option<flashattn::kvcache::KvPlan>,
                ) {
                    let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
                    let (cos_t, sin_t) = (cos.as_ref().ok().cloned(), sin.as_ref().ok().cloned());
                    let (res, plan) = {
                        let (kv, vv) = (kc.view_mut(), vc.view_mut());
                        let mut cache = KvCache::new(kv, vv, CacheSeqlens::PerSeq(seqlens.clone()));
                        if s_new > 0 {
                            cache.k_new = Some(kn.view());
                            cache.v_new = Some(vn.view());
                        }
                        cache.block_table = table.clone();
                        cache.cache_leftpad = leftpad.clone();
                        cache.cache_batch_idx = batch_idx.clone();
                        let (ct, st);
                        if rot > 0 {
                            ct = cos_t.unwrap();
                            st = sin_t.unwrap();
                            cache.rotary = Some(Rotary { cos: ct.view(), sin: st.view(), interleaved });
                        }
                        match device {
                            Device::Cpu => {
                                let plan = flashattn::kvcache::prepare(&q.view(), &mut cache, &opts);
                                (Err(flashattn::Error::Device("plan only".into())), plan.ok())
                            }
                            dev => (flashattn::kvcache_forward_on(dev, &q.view(), &mut cache, &opts), None),
                        }
                    };
                    (res, kc, vc, plan)
                };
                let (out, kc_dev, vc_dev, _) = run(Device::Cuda(0));
                let (_, kc_ref, vc_ref, plan) = run(Device::Cpu);
                let tag = format!("kvcache {dtype} paged {paged:?} rot {rot} inter {interleaved} d {d} hk {hk} sq {sq} s_new {s_new} causal {causal} leftpad {} batch_idx {}", leftpad.is_some(), batch_idx.is_some());
                let (out, plan) = match (out, plan) {
                    (Ok(o), Some(p)) => (o, p),
                    (o, p) => {
                        tally.record(Err(format!("ERROR {tag}: {:?} / plan {}", o.err(), p.is_some())));
                        continue;
                    }
                };
                assert_eq!(kc_dev, kc_ref, "{tag}: appended k cache differs");
                assert_eq!(vc_dev, vc_ref, "{tag}: appended v cache differs");
                let p = &plan.problem;
                let qv = plan.q_rotated.as_ref().map(|t| t.view()).unwrap_or_else(|| q.view());
                let reference = forward_f64(p, qv.data, kc_ref.view().data, vc_ref.view().data);
                let (base, _) = naive_forward(p, qv.data, kc_ref.view().data, vc_ref.view().data);
                let vo = flashattn::accuracy::compare(
                    "o",
                    &out.o.to_f32_vec(),
                    &reference.o,
                    &base.to_f32_vec(),
                    dtype,
                    2.0,
                );
                let vl = flashattn::accuracy::compare_lse(&out.lse.to_f32_vec(), &reference.lse);
                tally.record(if vo.pass && vl.pass { Ok(()) } else { Err(format!("FAIL {tag}: {vo}; {vl}")) });
            }
        }
    }
    tally.report("cuda kvcache");
}

/// First-call compile time of a new variant and the load time from the disk cache (targets: < 2 s and
/// < 50 ms).
#[test]
fn compile_and_load_times() {
    if !gpu("compile_and_load_times") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("flashattn-timing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let old = std::env::var_os("FLASHATTN_CACHE_DIR");
    std::env::set_var("FLASHATTN_CACHE_DIR", &dir);
    let mut lines = Vec::new();
    for v in [
        Variant::plain(compile::Pass::Fwd, 128, true),
        Variant { mask: true, ..Variant::plain(compile::Pass::Fwd, 64, false) },
        Variant::plain(compile::Pass::Bwd, 128, true),
    ] {
        let (first, from_disk) = cuda::measure_load(0, &v).expect("compile");
        assert!(!from_disk);
        let (cached, from_disk) = cuda::measure_load(0, &v).expect("load");
        assert!(from_disk);
        lines.push(format!(
            "{v}: first call {:.0} ms, cached load {:.1} ms",
            first.as_secs_f64() * 1e3,
            cached.as_secs_f64() * 1e3
        ));
    }
    match old {
        Some(o) => std::env::set_var("FLASHATTN_CACHE_DIR", o),
        None => std::env::remove_var("FLASHATTN_CACHE_DIR"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    say(&format!("cuda compile/load times: {}", lines.join("; ")));
}

/// Every variant compiles with NVRTC for sm_80 and sm_90a (no GPU needed), ptxas serialises the wgmma
/// instructions of none of them (that would take away the sm90 kernels' overlap of products and softmax, with
/// correct results: only this check sees it), and the hot variants do not spill (`FLASHATTN_ALLOW_SPILLS=1`
/// reports spills without failing). Quick: the hot variants; full: every variant.
#[test]
fn nvrtc_compiles_variants() {
    if !compile::nvrtc_present() {
        if require_gpu() {
            panic!("FLASHATTN_REQUIRE_GPU=1 but libnvrtc was not found");
        }
        say("SKIP nvrtc_compiles_variants: libnvrtc not found on the loader path");
        return;
    }
    let mut variants = if full() { compile::all_variants() } else { compile::hot_variants() };
    // The backward's learnable-sink forms of the hot backward variants (their main kernels and flash_bwd_dsink).
    let sinks: Vec<Variant> = compile::hot_variants()
        .into_iter()
        .filter(|v| matches!(v.pass, compile::Pass::Bwd | compile::Pass::BwdSm90))
        .map(|v| Variant { sink: true, ..v })
        .collect();
    variants.extend(sinks);
    let archs = vec!["sm_80".to_string(), "sm_90a".to_string()];
    let t0 = std::time::Instant::now();
    let reps = cuda::compile_reports(&archs, &variants).unwrap_or_else(|e| panic!("{e}"));
    let hot = compile::hot_variants();
    let mut spills = Vec::new();
    let mut serialized = Vec::new();
    let mut max_regs = 0;
    for r in &reps {
        assert!(!r.usage.is_empty(), "no ptxas report for {r}");
        for u in &r.usage {
            // The loader raises every kernel's dynamic shared-memory limit to the device maximum, which fails for
            // a kernel with static shared memory.
            assert_eq!(u.smem, 0, "{r}: {} uses static shared memory", u.kernel);
            max_regs = max_regs.max(u.registers);
            if u.spills() && hot.contains(&r.variant) {
                spills.push(r.to_string());
            }
            if u.wgmma_serialized {
                serialized.push(r.to_string());
            }
        }
    }
    assert!(serialized.is_empty(), "ptxas serialised the wgmma instructions of:\n{}", serialized.join("\n"));
    say(&format!(
        "nvrtc: {} variant compiles ok ({} newly compiled) in {:.1} s, max {max_regs} registers, {} hot spills",
        reps.len(),
        reps.iter().filter(|r| !r.cached).count(),
        t0.elapsed().as_secs_f64(),
        spills.len()
    ));
    if !spills.is_empty() && std::env::var("FLASHATTN_ALLOW_SPILLS").is_ok_and(|v| v == "1") {
        say(&format!("WARNING (FLASHATTN_ALLOW_SPILLS=1): hot kernels spill:\n{}", spills.join("\n")));
        return;
    }
    assert!(
        spills.is_empty(),
        "hot kernels spill (FLASHATTN_ALLOW_SPILLS=1 makes this a warning):\n{}",
        spills.join("\n")
    );
}

/// The raw form: device pointers with a packed-QKV stride layout and the caller's stream give the same bits
/// as the host path over the same strided tensors.
#[test]
fn raw_pointers_packed_qkv() {
    if !gpu("raw_pointers_packed_qkv") {
        return;
    }
    use cuda::cudarc::driver::{CudaContext, DevicePtr};
    use cuda::DeviceTensorRef;
    use flashattn::tensor::{CpuStorage, Layout};
    let (b, s, h, d) = (2usize, 77usize, 4usize, 64usize);
    let dtype = DType::BF16;
    let mut r = rng(seed());
    let qkv = randn_tensor(&mut r, &[b, s, 3, h, d], dtype, 1.0);
    let dout = randn_tensor(&mut r, &[b, s, h, d], dtype, 1.0);
    let strides = vec![s * 3 * h * d, 3 * h * d, d, 1];
    let part = |i: usize| {
        Tensor::from_storage_strided(
            qkv.storage().clone(),
            Layout { shape: vec![b, s, h, d], strides: strides.clone(), offset: i * h * d },
        )
        .unwrap()
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let opts = AttnOptions { causal: true, ..Default::default() };
    let host = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).expect("host path");
    let x = BackwardInputs { q: &q, k: &k, v: &v, o: &host.o, lse: &host.lse, dout: &dout };
    let hg = flashattn::backward_on(Device::Cuda(0), &x, &opts).expect("host bwd");

    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let bits16 = |t: &Tensor| -> Vec<u16> {
        match t.storage() {
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
            _ => unreachable!(),
        }
    };
    let d_qkv = stream.clone_htod(&bits16(&qkv)).unwrap();
    let d_do = stream.clone_htod(&bits16(&dout)).unwrap();
    let n_o = b * s * h * d;
    let d_o = stream.alloc_zeros::<u16>(n_o).unwrap();
    let d_lse = stream.alloc_zeros::<f32>(b * h * s).unwrap();
    let (d_dq, d_dk, d_dv) = (
        stream.alloc_zeros::<u16>(n_o).unwrap(),
        stream.alloc_zeros::<u16>(n_o).unwrap(),
        stream.alloc_zeros::<u16>(n_o).unwrap(),
    );
    let base = d_qkv.device_ptr(&stream).0;
    let t = |i: usize| DeviceTensorRef {
        ptr: base + (i * h * d * 2) as u64,
        dtype,
        shape: vec![b, s, h, d],
        strides: strides.clone(),
    };
    let c = |p: u64, dt: DType, shape: &[usize]| DeviceTensorRef::contiguous(p, dt, shape);
    let o_ref = c(d_o.device_ptr(&stream).0, dtype, &[b, s, h, d]);
    let lse_ref = c(d_lse.device_ptr(&stream).0, DType::F32, &[b, h, s]);
    let cs = stream.cu_stream() as *mut std::ffi::c_void;
    let (qd, kd, vd) = (t(0), t(1), t(2));
    let fwd = cuda::ForwardTensors { q: &qd, k: &kd, v: &vd, o: &o_ref, lse: &lse_ref };
    let [dod, dqd, dkd, dvd] = [&d_do, &d_dq, &d_dk, &d_dv].map(|g| c(g.device_ptr(&stream).0, dtype, &[b, s, h, d]));
    let bwd = cuda::BackwardTensors { fwd, dout: &dod, dq: &dqd, dk: &dkd, dv: &dvd, dsink: None };
    // SAFETY: all buffers live on device 0 and outlive the synchronisation below.
    unsafe {
        cuda::forward_raw(0, cs, fwd, &opts).expect("forward_raw");
        cuda::backward_raw(0, cs, bwd, &opts).expect("backward_raw");
    }
    let o: Vec<u16> = stream.clone_dtoh(&d_o).unwrap();
    let lse: Vec<f32> = stream.clone_dtoh(&d_lse).unwrap();
    let dq: Vec<u16> = stream.clone_dtoh(&d_dq).unwrap();
    let dk: Vec<u16> = stream.clone_dtoh(&d_dk).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(o, bits16(&host.o), "raw o differs from the host path");
    assert_eq!(lse, host.lse.to_f32_vec(), "raw lse differs from the host path");
    // dq accumulates with atomics (order may differ run to run): compare values loosely, dk exactly.
    let to_f = |v: &[u16]| v.iter().map(|&x| flashattn::bf16::from_bits(x).to_f32()).collect::<Vec<f32>>();
    let (dqf, hdq) = (to_f(&dq), hg.dq.to_f32_vec());
    let max = dqf.iter().zip(&hdq).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max < 1e-2, "raw dq differs from the host path by {max}");
    assert_eq!(dk, bits16(&hg.dk), "raw dk differs from the host path");
    say("cuda raw pointers (packed QKV, caller stream): forward and backward match the host path");
}

/// A value head dim other than `d`: the sweep's value head dim rows (both dtypes, every variant, sink included,
/// MHA/GQA/MQA, forward and backward) and each pair in deterministic mode, against the f64 oracle. They run on the
/// sm80-class kernels on every device, Hopper included: no case may launch an sm90 kernel (checked case by case).
#[test]
fn value_head_dims() {
    if !gpu("value_head_dims") {
        return;
    }
    let mut cases: Vec<Case> = [DType::F16, DType::BF16].into_iter().flat_map(value_dim_rows).collect();
    for (pi, &dims) in VALUE_DIMS.iter().enumerate() {
        for (vi, variant) in [Variant_::Causal, Variant_::Varlen, Variant_::Window].into_iter().enumerate() {
            let dtype = if (pi + vi) % 2 == 0 { DType::BF16 } else { DType::F16 };
            let mut c =
                Case::with_dv(dtype, dims, [(130, 257), (257, 130), (300, 300)][vi], HEADS[(pi + vi) % 3], variant);
            c.batch = 2;
            c.backward = true;
            c.deterministic = true;
            cases.push(c);
        }
    }
    warm_up(&cases, false);
    warm_up(&cases, true);
    let (mut out, mut on_sm90) = (Outcome::default(), Vec::new());
    for c in &cases {
        let before = sm90_launches();
        out.add(run_cases_logged(std::slice::from_ref(c)));
        if sm90_launches() != before {
            on_sm90.push(format!("{c:?}"));
        }
    }
    say(&format!("cuda value head dims: {}, {} on the sm90 path", out.counts(), on_sm90.len()));
    out.assert_passed();
    assert!(on_sm90.is_empty(), "value head dim cases launched sm90 kernels: {}", on_sm90.join("; "));
    assert!(out.pass > 0);
}

/// Value head dims the CUDA kernels are not compiled for, and any `d_v != d` on the KV-cache kernels, are refused
/// by the CUDA host entry points with `Error::Unsupported` naming `d_v` before any device work, so this runs with
/// or without a GPU (a refused KV-cache call appends nothing).
#[test]
fn value_head_dim_refusals_before_device_work() {
    let r = &mut rng(seed());
    let dt = DType::BF16;
    let refused = |e: flashattn::Error, entry: &str, d_v: usize| match e {
        flashattn::Error::Unsupported { backend: "cuda", what } => {
            assert!(what.contains(&format!("d_v = {d_v}")) && what.contains("d = 192"), "{entry}: {what}")
        }
        other => panic!("{entry}: expected Unsupported, got {other}"),
    };
    // (192, 64) pads to a pair the kernels are not compiled for.
    let (q, k, v) = (
        randn_tensor(r, &[1, 8, 4, 192], dt, 1.0),
        randn_tensor(r, &[1, 8, 2, 192], dt, 1.0),
        randn_tensor(r, &[1, 8, 2, 64], dt, 1.0),
    );
    let opts = AttnOptions::default();
    refused(flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).unwrap_err(), "forward", 64);
    let f = flashattn::forward(&q, &k, &v, &opts).expect("cpu forward");
    let g = randn_tensor(r, f.o.shape(), dt, 1.0);
    let x = BackwardInputs { q: &q, k: &k, v: &v, o: &f.o, lse: &f.lse, dout: &g };
    refused(flashattn::backward_on(Device::Cuda(0), &x, &opts).unwrap_err(), "backward", 64);
    // The KV-cache kernels take no d_v != d, even a pair the other kernels run.
    let (kn, vn) = (randn_tensor(r, &[1, 8, 2, 192], dt, 1.0), randn_tensor(r, &[1, 8, 2, 128], dt, 1.0));
    let (mut kc, mut vc) = (randn_tensor(r, &[1, 16, 2, 192], dt, 1.0), randn_tensor(r, &[1, 16, 2, 128], dt, 1.0));
    let before = (kc.clone(), vc.clone());
    let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(4));
    cache.k_new = Some(kn.view());
    cache.v_new = Some(vn.view());
    refused(flashattn::kvcache_forward_on(Device::Cuda(0), &q.view(), &mut cache, &opts).unwrap_err(), "kvcache", 128);
    drop(cache);
    assert!(kc == before.0 && vc == before.1, "a refused KV-cache call must not append");
    // Ring attention on CUDA refuses it too (before picking a GPU).
    let e = flashattn::ring::ring_forward_cuda(0, &q, &kn, &vn, &opts, 2).unwrap_err();
    assert!(matches!(e, flashattn::Error::Unsupported { .. }), "ring_forward_cuda: {e}");
}

/// The spec's FP8 row (e4m3 q, k, v with random descales) on the CUDA backend. The kernels do not take FP8
/// yet: every case must then be refused with `Error::Unsupported` naming FP8, and the row is reported as
/// skipped (a visible SKIP line with the count), not passed; a case that runs must pass the FP8 rule.
#[test]
fn fp8_sweep() {
    if !gpu("fp8_sweep") {
        return;
    }
    let cases = fp8_cases();
    let (mut pass, mut unsupported, mut msgs) = (0, 0, Vec::new());
    for c in &cases {
        let s = seed();
        match run_case(Device::Cuda(0), c, s) {
            Ok(v) if v.iter().all(|x| x.pass) => pass += 1,
            Ok(v) => msgs.push(format!(
                "FAIL {c:?} seed {s}: {}",
                v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; ")
            )),
            Err(e) if e.contains("unsupported on the cuda backend") && e.contains("FP8") => unsupported += 1,
            Err(e) => msgs.push(format!("ERROR {e}")),
        }
    }
    if unsupported > 0 {
        say(&format!(
            "SKIP fp8_sweep: {unsupported} of {} FP8 cases unsupported on the cuda backend (no FP8 kernels yet)",
            cases.len()
        ));
    }
    say(&format!("cuda fp8 sweep: {pass} passed, {unsupported} unsupported, {} failed", msgs.len()));
    assert!(msgs.is_empty(), "{}", msgs.join("\n"));
}

/// FP8 q, k, v are refused by every CUDA host entry point with `Error::Unsupported` before any device work (so
/// this runs with or without a GPU), and a refused KV-cache call writes nothing.
#[test]
fn fp8_is_refused_before_device_work() {
    let r = &mut rng(seed());
    let dt = DType::E4M3;
    let (q, k, v) = (
        randn_tensor(r, &[1, 8, 4, 64], dt, 1.0),
        randn_tensor(r, &[1, 8, 2, 64], dt, 1.0),
        randn_tensor(r, &[1, 8, 2, 64], dt, 1.0),
    );
    let opts = AttnOptions::default();
    let refused = |e: flashattn::Error, entry: &str| match e {
        flashattn::Error::Unsupported { backend: "cuda", what } => assert!(what.contains("FP8"), "{entry}: {what}"),
        other => panic!("{entry}: expected Unsupported, got {other}"),
    };
    refused(flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).unwrap_err(), "forward");
    // An FP8 q with an FP8 cache (and rows to append): refused, nothing appended. (A 16-bit q with an FP8 cache
    // runs on the KV kernels: cuda_kvcache's kvcache_fp8_device.)
    let qb = randn_tensor(r, &[1, 8, 4, 64], dt, 1.0);
    let kn = randn_tensor(r, &[1, 8, 2, 64], dt, 1.0);
    let (mut kc, mut vc) = (randn_tensor(r, &[1, 16, 2, 64], dt, 1.0), randn_tensor(r, &[1, 16, 2, 64], dt, 1.0));
    let before = (kc.clone(), vc.clone());
    let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(4));
    cache.k_new = Some(kn.view());
    cache.v_new = Some(kn.view());
    refused(flashattn::kvcache_forward_on(Device::Cuda(0), &qb.view(), &mut cache, &opts).unwrap_err(), "kvcache");
    drop(cache);
    assert!(kc == before.0 && vc == before.1, "a refused KV-cache call must not append");
    let e = flashattn::ring::ring_forward_cuda(0, &q, &k, &v, &opts, 2).unwrap_err();
    assert!(matches!(e, flashattn::Error::Unsupported { .. }), "ring_forward_cuda: {e}");
}
