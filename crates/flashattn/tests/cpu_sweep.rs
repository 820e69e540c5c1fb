//! The spec's sweep on the CPU backend against the f64 oracle. `FLASHATTN_SWEEP=full` runs the whole cross
//! product (long); the default is a rotating subset that still covers every head dim, shape, head layout
//! and variant. `FLASHATTN_SWEEP_SHARD=i/n` runs this process's share of each test's cases (shards of equal
//! projected cost), `FLASHATTN_SWEEP_PLAN=1` prints case counts and projected work without running, and the
//! ignored test `profile` times each step of a few large cases. `determinism` and `stress_no_nan` are the
//! spec's determinism and stress items (run once, by shard 0 of a sharded run).

mod common;
use common::*;
use flashattn::{BackwardInputs, DType, Device};

fn sweep(dtypes: &[DType], backward: bool) {
    run_sweep(&format!("cpu sweep {} {dtypes:?} backward={backward}", sweep_level()), &cases(dtypes, backward));
}

/// Runs this shard's share of `all` (cases in parallel), prints the counts, fails on any failure.
fn run_sweep(name: &str, all: &[Case]) {
    if plan_only() {
        print_plan(name, all);
        return;
    }
    let mine = my_shard(all);
    let shard = shard_spec().map_or("all".to_string(), |(i, n)| format!("shard {i}/{n}"));
    let t0 = std::time::Instant::now();
    let o = run_cases_parallel(Device::Cpu, &mine);
    let projected: f64 = mine.iter().map(|c| c.cost().seconds()).sum();
    println!(
        "{name} [{shard}]: {} cases run, {} passed, {} failed in {:.1}s; projected {projected:.1} core-s; steps: {}",
        mine.len(),
        o.pass,
        o.fail,
        t0.elapsed().as_secs_f64(),
        o.timing
    );
    o.assert_passed();
    assert_eq!(o.pass, mine.len());
    assert!(o.pass > 0 || shard_spec().is_some());
}

/// One `#[test]` per pass and dtype, each running the shared sweep (so that each runs, and is filtered, alone).
macro_rules! sweep_tests {
    ($($name:ident: $dtype:ident, backward: $backward:literal;)+) => {
        $(
            #[test]
            fn $name() {
                sweep(&[DType::$dtype], $backward);
            }
        )+
    };
}

sweep_tests! {
    forward_f16: F16, backward: false;
    forward_bf16: BF16, backward: false;
    forward_f32: F32, backward: false;
    backward_f16: F16, backward: true;
    backward_bf16: BF16, backward: true;
    backward_f32: F32, backward: true;
}

/// The spec's FP8 row: e4m3 q, k, v with random descales, bf16 output, against the f64 oracle of the
/// dequantized inputs under the FP8 rule (`2 * baseline error + 1e-3`).
#[test]
fn forward_fp8() {
    run_sweep(&format!("cpu sweep {} fp8 (e4m3)", sweep_level()), &fp8_cases());
}

/// Every variant on small shapes, all dtypes, forward and backward: cheap and exhaustive over variants.
#[test]
fn small_exhaustive() {
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for variant in VARIANTS {
            for heads in HEADS {
                for (sq, sk) in [(1, 1), (5, 17), (17, 5), (64, 64), (65, 130), (130, 65)] {
                    // Equal head dims, and a value head dim above and below the query/key one.
                    for dims in [(8, 8), (59, 59), (24, 40), (40, 17)] {
                        let mut c = Case::with_dv(dtype, dims, (sq, sk), heads, variant);
                        c.batch = 3;
                        c.backward = true;
                        cases.push(c);
                    }
                }
            }
        }
    }
    run_sweep("cpu small exhaustive", &cases);
}

/// Where the time of a case goes (oracle, baseline, backend forward/backward, comparison) on a few large
/// cases, against the cost model's projection: `cargo test --release --test cpu_sweep -- --ignored profile
/// --nocapture` (with RAYON_NUM_THREADS=1 for single-core rates).
#[test]
#[ignore = "timing tool"]
fn profile() {
    let mut cs = Vec::new();
    for (dtype, d, shape, heads, variant) in [
        (DType::BF16, 128, (1024, 1024), (6, 6), Variant::Plain),
        (DType::BF16, 256, (2048, 2048), (6, 1), Variant::Plain),
        (DType::F16, 64, (1024, 1023), (6, 2), Variant::Causal),
        (DType::F32, 128, (1024, 1024), (6, 6), Variant::Plain),
        (DType::F16, 32, (512, 256), (6, 6), Variant::Softcap),
        (DType::BF16, 111, (127, 513), (6, 2), Variant::Alibi),
    ] {
        for backward in [false, true] {
            let mut c = Case::new(dtype, d, shape, heads, variant);
            c.backward = backward;
            cs.push(c);
        }
    }
    for c in &cs {
        let (r, t) = run_case_timed(Device::Cpu, c, seed());
        let ok = r.map(|v| v.iter().all(|x| x.pass)).unwrap_or(false);
        let k = c.cost();
        println!(
            "{c:?}: pass {ok}; {t}; projected {:.3}s; ns/MAC oracle {:.3} naive {:.3} fwd {:.3} bwd {:.3}",
            k.seconds(),
            1e9 * t.oracle / k.oracle,
            1e9 * t.naive / k.naive.max(1.0),
            1e9 * t.fwd / k.fwd,
            1e9 * t.bwd / k.bwd.max(1.0)
        );
        assert!(ok, "{c:?} failed");
    }
}

fn bits(t: &flashattn::Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

/// Whether this process runs the sweep's one-off tests (determinism, stress): always, except in shards
/// other than 0 of a sharded run.
fn first_shard() -> bool {
    shard_spec().map_or(true, |(i, _)| i == 0)
}

/// The spec's determinism: forward bit-identical over repeated runs, and backward too (the CPU backward is
/// always deterministic: fixed summation order, no atomics). Every variant, dtype and head layout, value head
/// dims different from `d` too; the full sweep adds a long sequence in bf16.
#[test]
fn determinism() {
    if !first_shard() {
        println!("cpu determinism: run by shard 0");
        return;
    }
    let mut checked = 0;
    let r = &mut rng(seed());
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let mut shapes = vec![(113, 203), (65, 33)];
        if sweep_level() == "full" && dtype == DType::BF16 {
            // Many key tiles per row and many query tiles per key (the full sweep only: ~30 core-s).
            shapes.push((1023, 1024));
        }
        for &shape in &shapes {
            for (i, variant) in VARIANTS.into_iter().chain([Variant::Sink]).enumerate() {
                // Equal head dims, then (variants 3..) the value head dims of the spec.
                let dims = [(59, 59), (128, 128), (64, 64), VALUE_DIMS[0], VALUE_DIMS[1], VALUE_DIMS[2]][i % 6];
                let heads = [(6, 2), (6, 6), (6, 1)][i % 3];
                let c = Case::with_dv(dtype, dims, shape, heads, variant);
                let inp = make_inputs(&c, r);
                let run = || {
                    let f = flashattn::forward_on(Device::Cpu, &inp.q, &inp.k, &inp.v, &inp.opts).expect("fwd");
                    let x = BackwardInputs { q: &inp.q, k: &inp.k, v: &inp.v, o: &f.o, lse: &f.lse, dout: &inp.dout };
                    let g = flashattn::backward_on(Device::Cpu, &x, &inp.opts).expect("bwd");
                    [bits(&f.o), bits(&f.lse), bits(&g.dq), bits(&g.dk), bits(&g.dv)]
                };
                let first = run();
                for _ in 0..2 {
                    let again = run();
                    for (n, name) in ["o", "lse", "dq", "dk", "dv"].iter().enumerate() {
                        assert!(first[n] == again[n], "{name} not bit-identical over runs: {c:?}");
                    }
                }
                checked += 1;
            }
        }
    }
    println!("cpu determinism: {checked} cases bit-identical (o, lse, dq, dk, dv) over 3 runs");
}

/// The spec's stress: seqlen 1..17 everywhere (sq and sk), logits scaled by 100 — no NaN, no Inf in `o` or in
/// the gradients, and `lse` finite except `-inf` on rows with no visible key.
#[test]
fn stress_no_nan() {
    if !first_shard() {
        println!("cpu stress: run by shard 0");
        return;
    }
    let r = &mut rng(seed());
    let mut n = 0;
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for sq in 1..=17usize {
            for sk in [1, 2, 5, 9, 16, 17, 18 - sq] {
                let d = [32, 59, 128][(sq + sk) % 3];
                for causal in [false, true] {
                    let q = randn_tensor(r, &[2, sq, 4, d], dtype, 100.0);
                    let k = randn_tensor(r, &[2, sk, 2, d], dtype, 1.0);
                    let v = randn_tensor(r, &[2, sk, 2, d], dtype, 1.0);
                    let g = randn_tensor(r, &[2, sq, 4, d], dtype, 1.0);
                    let opts = flashattn::AttnOptions { causal, ..Default::default() };
                    let f = flashattn::forward_on(Device::Cpu, &q, &k, &v, &opts).expect("fwd");
                    let at = format!("{dtype} sq {sq} sk {sk} d {d} causal {causal}");
                    assert!(f.o.to_f32_vec().iter().all(|x| x.is_finite()), "non-finite o at {at}");
                    assert!(
                        f.lse.to_f32_vec().iter().all(|x| x.is_finite() || *x == f32::NEG_INFINITY),
                        "NaN or +inf lse at {at}"
                    );
                    let x = BackwardInputs { q: &q, k: &k, v: &v, o: &f.o, lse: &f.lse, dout: &g };
                    let gr = flashattn::backward_on(Device::Cpu, &x, &opts).expect("bwd");
                    for (name, t) in [("dq", &gr.dq), ("dk", &gr.dk), ("dv", &gr.dv)] {
                        assert!(t.to_f32_vec().iter().all(|x| x.is_finite()), "non-finite {name} at {at}");
                    }
                    n += 1;
                }
            }
        }
    }
    println!("cpu stress: {n} cases (seqlen 1..17, logits x100), o/lse/dq/dk/dv free of NaN and Inf");
}
