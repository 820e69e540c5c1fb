//! `flashattn bench --ranks N`: ring attention (context parallelism) over `N` ranks, against the
//! single-device call on the same inputs: per-rank work and time, the ring's total time, and the largest
//! difference from the single-device result (the run fails if it is more than the two results' rounding allows,
//! [`worst_steps`]).
//!
//! This build runs the ring on simulated ranks only: `N` threads of this process on the CPU backend, blocks
//! passed through in-process channels, or with `--device cuda` `N` streams of one GPU (no transport: ranks
//! read the visiting shard in place). The output says which, and whether the NCCL transport is compiled in
//! and loadable (it is not used: the multi-GPU ring is not wired yet).

use crate::bench::{points, BenchArgs, Mode};
use crate::common::{randn, CliError, CliResult, DeviceArg};
use flashattn::ring::{ring_backward, ring_forward, RankStats, RingBackward, RingForward};
use flashattn::{AttnOptions, BackwardInputs, DType, Device, Tensor};
use std::process::ExitCode;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn nccl_line() -> String {
    #[cfg(feature = "nccl")]
    {
        match flashattn::ring::nccl::probe() {
            Ok(v) => format!("NCCL transport: compiled in, libnccl {v} loadable; not used by this run"),
            Err(e) => format!("NCCL transport: compiled in, not loadable here ({e}); not used by this run"),
        }
    }
    #[cfg(not(feature = "nccl"))]
    {
        "NCCL transport: not in this build (feature `nccl`)".to_string()
    }
}

/// Largest per-element difference of the ring's `o` (`a`) from the single-device one (`b`) in units of what their
/// rounding allows (1.0 = all of it). f32: one rounding step of `o` (both paths compute in f32; the ring's merges
/// differ only in the last bits). 16-bit: the kernels round the probabilities to the input dtype for `P V` (as
/// the spec's baseline does), each path against its own key blocks' running maxima, so besides one step of `o`
/// each element may differ by a step of every weighted value in both results: at most
/// `eps * (|o| + 2 max|v|)`.
fn worst_steps(a: &Tensor, b: &Tensor, v: &Tensor, dtype: DType) -> f32 {
    let eps = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1.0 / 1024.0,
        _ => 1.0 / 128.0,
    };
    let weighted =
        if dtype == DType::F32 { 0.0 } else { 2.0 * v.to_f32_vec().iter().fold(0f32, |m, x| m.max(x.abs())) };
    a.to_f32_vec()
        .iter()
        .zip(b.to_f32_vec())
        .map(|(x, y)| (x - y).abs() / (eps * (y.abs() + weighted) + 1e-5))
        .map(|s| if s.is_nan() { f32::INFINITY } else { s })
        .fold(0f32, f32::max)
}

/// `max |a - b| / max |b|`.
fn rel_to_max(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn print_ranks(stats: &[RankStats]) {
    println!("  rank  chunk pairs  visible (q,k) pairs per head  compute ms  waiting ms");
    for s in stats {
        println!(
            "  {:>4}  {:>11}  {:>28}  {:>10.2}  {:>10.2}",
            s.rank,
            s.pairs,
            s.visible,
            s.compute_s * 1e3,
            s.wait_s * 1e3
        );
    }
    let (lo, hi) = stats.iter().fold((u64::MAX, 0u64), |(lo, hi), s| (lo.min(s.visible), hi.max(s.visible)));
    let total: u64 = stats.iter().map(|s| s.visible).sum();
    println!("  work balance: max/min visible pairs = {hi}/{lo}, total {total}");
}

/// Runs the ring benchmark.
pub fn main(a: &BenchArgs, ranks: usize) -> CliResult<ExitCode> {
    if ranks == 0 {
        return Err(CliError::Input("--ranks must be at least 1".into()));
    }
    // The CPU unless a GPU is asked for by name (`--device cuda`): the GPU path simulates ranks by streams.
    let gpu = match a.device {
        DeviceArg::Exact(Device::Cuda(n)) => Some(n),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    if gpu.is_some() {
        return Err(CliError::Failed("this build has no `cuda` feature".into()));
    }
    if gpu.is_none() && ranks > flashattn::ring::MAX_SIMULATED_RANKS {
        return Err(CliError::Input(format!(
            "--ranks: at most {} simulated ranks on the CPU (one thread each), got {ranks}",
            flashattn::ring::MAX_SIMULATED_RANKS
        )));
    }
    let device = gpu.map_or(Device::Cpu, Device::Cuda);
    let mut args = a.clone();
    if args.shape.is_none() {
        args.shape = Some([1, 4, 2048, 64]);
        if args.causal.is_empty() {
            args.causal = vec![1];
        }
    }
    let warmup = a.warmup.unwrap_or(1);
    let reps = a.reps.unwrap_or(3).max(1);
    match gpu {
        None => println!(
            "ring attention: {ranks} simulated ranks (threads of this process on the CPU backend), transport: \
             in-process channels (ChannelTransport)"
        ),
        Some(n) => println!(
            "ring attention: {ranks} ranks simulated by streams of one GPU (cuda:{n}); no transport: each rank \
             reads the visiting K/V shard in place"
        ),
    }
    println!("{}", nccl_line());
    println!("zig-zag sharding: 2N = {} chunks, rank r holds chunks r and 2N-1-r", 2 * ranks);
    println!("{}, warmup {warmup}, reps {reps} (median); single-device = one call on the whole sequence", a.dtype);
    let mut failed = false;
    let pts = points(&args);
    for p in &pts {
        crate::bench::check_point(p, a.dtype, true, false, false)?;
    }
    for (i, p) in pts.iter().enumerate() {
        let seed = a.seed.wrapping_add(i as u64);
        let q = randn(&[p.b, p.sq, p.h, p.d], a.dtype, seed, 1.0);
        let k = randn(&[p.b, p.sk, p.hk, p.d], a.dtype, seed.wrapping_add(1), 1.0);
        let v = randn(&[p.b, p.sk, p.hk, p.d], a.dtype, seed.wrapping_add(2), 1.0);
        let dout = randn(&[p.b, p.sq, p.h, p.d], a.dtype, seed.wrapping_add(3), 1.0);
        let opts = AttnOptions { causal: p.causal, tuning: a.tuning.tuning()?, ..AttnOptions::default() };
        println!(
            "\npoint b={} h={}/{} s={} d={} causal={} ({} rows per rank)",
            p.b,
            p.h,
            p.hk,
            p.sq,
            p.d,
            p.causal as u8,
            p.sq.div_ceil(ranks)
        );
        let fail = |e: flashattn::Error| CliError::Failed(format!("ring: {e}"));
        for &mode in &a.modes {
            let bwd = mode == Mode::FwdBwd;
            let (mut ring_t, mut single_t) = (Vec::new(), Vec::new());
            let mut last = None;
            for it in 0..warmup + reps {
                let t0 = Instant::now();
                let r = ring_fwd(gpu, &q, &k, &v, &opts, ranks).map_err(fail)?;
                let g = if bwd {
                    let x = BackwardInputs { q: &q, k: &k, v: &v, o: &r.out.o, lse: &r.out.lse, dout: &dout };
                    Some(ring_bwd(gpu, &x, &opts, ranks).map_err(fail)?)
                } else {
                    None
                };
                let rt = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let s = flashattn::forward_on(device, &q, &k, &v, &opts).map_err(fail)?;
                let sg = if bwd {
                    let x = BackwardInputs { q: &q, k: &k, v: &v, o: &s.o, lse: &s.lse, dout: &dout };
                    Some(flashattn::backward_on(device, &x, &opts).map_err(fail)?)
                } else {
                    None
                };
                let st = t1.elapsed().as_secs_f64();
                if it >= warmup {
                    ring_t.push(rt);
                    single_t.push(st);
                }
                last = Some((r, g, s, sg));
            }
            let Some((r, g, s, sg)) = last else { continue };
            let (rm, sm) = (median(ring_t) * 1e3, median(single_t) * 1e3);
            let diff = [("o", worst_steps(&r.out.o, &s.o, &v, a.dtype))];
            let mut grad_diff = Vec::new();
            println!(
                "{}: ring {rm:.2} ms, single-device {sm:.2} ms (ring/single {:.2}x; simulated ranks share one device, \
                 so this is not a scaling figure)",
                mode_name(mode),
                rm / sm
            );
            println!(" forward per rank:");
            print_ranks(&r.stats);
            if let (Some(g), Some(sg)) = (g, sg) {
                println!(" backward per rank:");
                print_ranks(&g.stats);
                // Gradients are checked against the f64 oracle by the test suite; here against the
                // single-device call, whose D comes from P and dP where the ring's comes from the rounded O:
                // reported as the largest difference relative to the largest gradient element.
                for (n, x, y) in [("dq", &g.grads.dq, &sg.dq), ("dk", &g.grads.dk, &sg.dk), ("dv", &g.grads.dv, &sg.dv)]
                {
                    grad_diff.push((n, rel_to_max(x, y)));
                }
            }
            println!(
                " ring vs single-device: o differs by at most {:.2} x what rounding in {} allows",
                diff[0].1, a.dtype
            );
            if !grad_diff.is_empty() {
                let text: Vec<String> = grad_diff.iter().map(|(n, x)| format!("{n} {x:.1e}")).collect();
                println!(" ring vs single-device, max |difference| / max |gradient|: {}", text.join(", "));
            }
            if diff[0].1 > 1.0 {
                println!(" FAIL: o differs from the single-device result by more than rounding allows");
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn ring_fwd(
    gpu: Option<usize>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
    ranks: usize,
) -> flashattn::Result<RingForward> {
    match gpu {
        #[cfg(feature = "cuda")]
        Some(n) => flashattn::ring::ring_forward_cuda(n, q, k, v, opts, ranks),
        _ => ring_forward(q, k, v, opts, ranks),
    }
}

fn ring_bwd(
    gpu: Option<usize>,
    x: &BackwardInputs<&Tensor>,
    opts: &AttnOptions,
    ranks: usize,
) -> flashattn::Result<RingBackward> {
    match gpu {
        #[cfg(feature = "cuda")]
        Some(n) => flashattn::ring::ring_backward_cuda(n, x, opts, ranks),
        _ => ring_backward(x, opts, ranks),
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Fwd => "fwd",
        Mode::FwdBwd => "fwd_bwd",
    }
}
