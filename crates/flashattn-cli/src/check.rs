//! `flashattn check`: the classic demo. Random q, k, v; attention the naive way (the O(N²) formula in the
//! input precision) and the flash way on the chosen device; both compared with the `f64` oracle under the
//! spec's accuracy rule, with the time and the peak extra memory of each.

use crate::alloc::{human, measure};
use crate::common::{
    bytes_desc, elems, ensure_fits, max_abs_diff, ms, parse_device, parse_float_dtype, rand_uniform, randn,
    resolve_device, CliError, CliResult, DeviceArg, ScoreArgs,
};
use clap::Args;
use flashattn::accuracy::{self, Verdict};
use flashattn::reference;
use flashattn::{AttnOptions, BackwardInputs, DType, Device};
use std::process::ExitCode;
use std::time::Duration;

/// Flags of `flashattn check`.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Batch size.
    #[arg(long, short = 'b', default_value_t = 2)]
    pub batch: usize,
    /// Query sequence length.
    #[arg(long, short = 's', default_value_t = 128)]
    pub seqlen: usize,
    /// Key/value sequence length (default: --seqlen).
    #[arg(long)]
    pub seqlen_k: Option<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Key/value heads (MQA/GQA; default: --heads).
    #[arg(long)]
    pub heads_k: Option<usize>,
    /// Head dimension (of q and k).
    #[arg(long, short = 'd', default_value_t = 64)]
    pub dim: usize,
    /// Value head dimension (of v and o; default: --dim). The CUDA backend refuses one other than --dim.
    #[arg(long)]
    pub dv: Option<usize>,
    /// Element type: f16, bf16 or f32.
    #[arg(long, default_value = "f16", value_parser = parse_float_dtype)]
    pub dtype: DType,
    /// Mask, soft-capping and scale.
    #[command(flatten)]
    pub score: ScoreArgs,
    /// ALiBi with random slopes (uniform in [0, 0.3), one per batch and head).
    #[arg(long)]
    pub alibi: bool,
    /// A learnable sink with random logits (normal, standard deviation 2, one per query head; CPU backends).
    #[arg(long)]
    pub sink: bool,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Check the gradients too (dq, dk, dv; accuracy factor 3).
    #[arg(long)]
    pub backward: bool,
    /// The CUDA backend's dispatch and tuning choices.
    #[command(flatten)]
    pub tuning: crate::tuning::TuningArgs,
}

struct Measured {
    time: Duration,
    mem: usize,
}

fn row(name: &str, m: &Measured, note: &str) {
    println!("  {name:<14} {:>12} {:>16}   {note}", ms(m.time), human(m.mem));
}

fn mask_desc(a: &CheckArgs) -> String {
    let mut parts = Vec::new();
    if a.score.causal {
        parts.push("causal".to_string());
    }
    if let Some((l, r)) = a.score.window {
        parts.push(format!("window ({l},{r})"));
    }
    if a.score.softcap > 0.0 {
        parts.push(format!("softcap {}", a.score.softcap));
    }
    if a.sink {
        parts.push("sink".into());
    }
    if a.alibi {
        parts.push("alibi".into());
    }
    if parts.is_empty() {
        "no mask".into()
    } else {
        parts.join(", ")
    }
}

fn verdict_lines(vs: &[Verdict]) -> bool {
    let mut ok = true;
    for v in vs {
        println!("  {v}");
        ok &= v.pass;
    }
    ok
}

/// Largest working set of score matrices (`sq * sk` per head and worker thread, f64) for which `check`
/// runs the O(N²) oracle and naive baseline; above it only the flash result is computed and checked for
/// non-finite values.
pub const ORACLE_MAX_SCORE_BYTES: u128 = 4 << 30;

/// `check` without the oracle: flash alone, its outputs checked for NaN and infinities (the accuracy rule
/// needs the oracle, so it is not applied).
#[allow(clippy::too_many_arguments)]
fn flash_only(
    a: &CheckArgs,
    device: Device,
    q: &flashattn::Tensor,
    k: &flashattn::Tensor,
    v: &flashattn::Tensor,
    opts: &AttnOptions,
    why: &str,
) -> CliResult<ExitCode> {
    println!("oracle and naive baseline skipped (O(N²) memory): {why}");
    let (flash, t, m) = measure(|| flashattn::forward_on(device, q, k, v, opts));
    let flash = flash?;
    row(&format!("flash ({device})"), &Measured { time: t, mem: m }, "O(N): tiles, online softmax");
    let o_ok = flash.o.to_f32_vec().iter().all(|x| x.is_finite());
    let lse_ok = flash.lse.to_f32_vec().iter().all(|&x| !x.is_nan() && x != f32::INFINITY);
    let mut ok = o_ok && lse_ok;
    if a.backward {
        let dout = randn(flash.o.shape(), a.dtype, a.seed.wrapping_mul(4) + 3, 1.0);
        let x = BackwardInputs { q, k, v, o: &flash.o, lse: &flash.lse, dout: &dout };
        let g = flashattn::backward_on(device, &x, opts)?;
        ok &= [g.dq, g.dk, g.dv].iter().all(|t| t.to_f32_vec().iter().all(|x| x.is_finite()));
    }
    let pass = "SKIPPED accuracy rule (no oracle); flash outputs are finite";
    let fail = format!("FAIL: flash attention on {device} produced NaN or infinite outputs");
    outcome(ok, pass, &fail, "the flash outputs are not finite")
}

/// The end of a check: prints `pass` (success) or `fail` (then the command fails with `error`).
fn outcome(ok: bool, pass: &str, fail: &str, error: &str) -> CliResult<ExitCode> {
    if ok {
        println!("{pass}");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{fail}");
        Err(CliError::Failed(error.into()))
    }
}

/// Runs `flashattn check`.
pub fn main(a: CheckArgs) -> CliResult<ExitCode> {
    let (b, sq, h, d) = (a.batch, a.seqlen, a.heads, a.dim);
    let sk = a.seqlen_k.unwrap_or(sq);
    let hk = a.heads_k.unwrap_or(h);
    let dv = a.dv.unwrap_or(d);
    let (device, why) = resolve_device(a.device)?;
    let dims = if dv == d { format!("d={d}") } else { format!("d={d} dv={dv}") };
    println!(
        "flashattn check: b={b} sq={sq} sk={sk} h={h} hk={hk} {dims} {}, {}, seed {}",
        a.dtype,
        mask_desc(&a),
        a.seed
    );
    println!("device: {why}");

    // The options, head counts and head dim are validated on empty tensors of the same shapes (batch 0)
    // first, then every size is checked before anything proportional to it is allocated.
    {
        let empty = |s: usize, heads: usize, d: usize| flashattn::Tensor::from_f32(&[], &[0, s, heads, d], a.dtype);
        let (q0, k0, v0) = (empty(sq, h, d)?, empty(sk, hk, d)?, empty(sk, hk, dv)?);
        flashattn::problem::validate(&q0.view(), &k0.view(), &v0.view(), &a.score.options())?;
    }
    let (sz, nq, nk, nl) = (a.dtype.size() as u128, elems(&[b, sq, h, d]), elems(&[b, sk, hk, d]), elems(&[b, h, sq]));
    // v and o (dv and dout) have the value head dim.
    let (nv, no) = (elems(&[b, sk, hk, dv]), elems(&[b, sq, h, dv]));
    let bwd = a.backward as u128;
    // q, k, v and flash's o, lse (with --backward: dout, dq, dk, dv).
    let flash_bytes = (nq + nk + nv + no) * sz + nl * 4 + bwd * (nq + nk + nv + no) * sz;
    ensure_fits("this check", flash_bytes)?;
    // The oracle (f64) and the naive baseline (f32): their outputs, and per worker thread one head's score
    // matrix (about four with --backward).
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()) as u128;
    let ref_bytes = (no + nl) * 12 + bwd * (nq + nk + nv) * 12;
    let score_bytes = elems(&[sq, sk]) * 8 * (1 + 3 * bwd) * threads;
    let oracle_need = flash_bytes + ref_bytes + score_bytes;
    let oracle_skipped = if score_bytes > ORACLE_MAX_SCORE_BYTES {
        Some(format!(
            "their score matrices need {}, above the cap of {}",
            bytes_desc(score_bytes),
            bytes_desc(ORACLE_MAX_SCORE_BYTES)
        ))
    } else {
        ensure_fits("the O(N²) oracle", oracle_need).err().map(|e| e.to_string())
    };

    let q = randn(&[b, sq, h, d], a.dtype, a.seed.wrapping_mul(4), 1.0);
    let k = randn(&[b, sk, hk, d], a.dtype, a.seed.wrapping_mul(4) + 1, 1.0);
    let v = randn(&[b, sk, hk, dv], a.dtype, a.seed.wrapping_mul(4) + 2, 1.0);
    let mut opts = AttnOptions { tuning: a.tuning.tuning()?, ..a.score.options() };
    if a.alibi {
        opts.alibi_slopes = Some(rand_uniform(&[b, h], a.seed.wrapping_add(17), 0.3));
    }
    if a.sink {
        opts.sink = Some(randn(&[h], DType::F32, a.seed.wrapping_add(19), 2.0));
    }
    if a.dtype.is_fp8() {
        // FP8: descales uniform in [0.5, 2], [b, hk] each (the spec's sweep row).
        let descale = |n: u64| {
            let x: Vec<f32> =
                rand_uniform(&[b, hk], a.seed.wrapping_add(n), 1.5).to_f32_vec().iter().map(|x| x + 0.5).collect();
            flashattn::Tensor::from_f32(&x, &[b, hk], DType::F32)
        };
        opts = opts.descale(Some(descale(23)?), Some(descale(29)?), Some(descale(31)?));
        println!("FP8 (e4m3) inputs with random descales in [0.5, 2]; output bf16");
    }
    let p = flashattn::problem::validate(&q.view(), &k.view(), &v.view(), &opts)?;
    let (qs, ks, vs) = (q.view().data, k.view().data, v.view().data);
    if let Some(why) = oracle_skipped {
        return flash_only(&a, device, &q, &k, &v, &opts, &why);
    }

    // Oracle first (it also starts the thread pool, so neither timed run pays for that).
    let (oracle, t_oracle, m_oracle) = measure(|| reference::forward_f64(&p, qs, ks, vs));
    if matches!(device, Device::Cuda(_)) {
        // The first call compiles (or loads) the kernels: keep that out of the timing.
        flashattn::forward_on(device, &q, &k, &v, &opts)?;
    }
    let ((naive_o, naive_lse), t_naive, m_naive) = measure(|| reference::naive_forward(&p, qs, ks, vs));
    let (flash, t_flash, m_flash) = measure(|| flashattn::forward_on(device, &q, &k, &v, &opts));
    let flash = flash?;

    let out_bytes = flash.o.shape().iter().product::<usize>() * flash.o.dtype().size()
        + flash.lse.shape().iter().product::<usize>() * 4;
    let scores_bytes = sq * sk * 4;
    println!("forward ({} of outputs; one head's score matrix is {}):", human(out_bytes), human(scores_bytes));
    println!("  {:<14} {:>12} {:>16}", "", "time", "peak extra mem");
    row("naive", &Measured { time: t_naive, mem: m_naive }, "O(N²): materialises each head's scores");
    row(&format!("flash ({device})"), &Measured { time: t_flash, mem: m_flash }, "O(N): tiles, online softmax");
    row("oracle (f64)", &Measured { time: t_oracle, mem: m_oracle }, "reference for the accuracy rule");
    let (fo, flse) = (flash.o.to_f32_vec(), flash.lse.to_f32_vec());
    let (no, nlse) = (naive_o.to_f32_vec(), naive_lse.to_f32_vec());
    let oracle_o32: Vec<f32> = oracle.o.iter().map(|&x| x as f32).collect();
    let oracle_lse32: Vec<f32> = oracle.lse.iter().map(|&x| x as f32).collect();
    println!("  max |flash - naive|  = {:.3e} (o), {:.3e} (lse)", max_abs_diff(&fo, &no), max_abs_diff(&flse, &nlse));
    println!(
        "  max |flash - oracle| = {:.3e} (o), {:.3e} (lse)",
        max_abs_diff(&fo, &oracle_o32),
        max_abs_diff(&flse, &oracle_lse32)
    );
    println!(
        "  max |naive - oracle| = {:.3e} (o), {:.3e} (lse)",
        max_abs_diff(&no, &oracle_o32),
        max_abs_diff(&nlse, &oracle_lse32)
    );
    let factor = accuracy::o_factor(a.score.softcap > 0.0, a.alibi);
    if a.dtype == DType::F32 {
        println!(
            "accuracy rule (f32): |flash - f64| <= max(1e-4 x max|f64|, {factor} x |naive - f64| + 1e-5); \
             lse within max(1e-3, {factor} x the naive lse error):"
        );
    } else if a.dtype.is_fp8() {
        println!(
            "accuracy rule (FP8; naive: e4m3 probabilities): |flash - f64| <= {factor} x |naive - f64| + 1e-3; \
             lse within max(1e-3, {factor} x the naive lse error):"
        );
    } else {
        println!(
            "accuracy rule: |flash - f64| <= {factor} x |naive - f64| + 1e-5; \
             lse within max(1e-3, {factor} x the naive lse error):"
        );
    }
    let mut ok = verdict_lines(&[
        accuracy::compare("o", &fo, &oracle.o, &no, a.dtype, factor),
        accuracy::compare_lse_with_baseline(&flse, &oracle.lse, &nlse, factor),
    ]);

    if a.backward {
        let dout = randn(flash.o.shape(), a.dtype, a.seed.wrapping_mul(4) + 3, 1.0);
        let do_map = p.q_like_map(dout.layout());
        let dos = dout.view().data;
        let (og, t_og, m_og) = measure(|| reference::backward_f64(&p, qs, ks, vs, dos, &do_map));
        let x = BackwardInputs { q: &q, k: &k, v: &v, o: &flash.o, lse: &flash.lse, dout: &dout };
        if matches!(device, Device::Cuda(_)) {
            flashattn::backward_on(device, &x, &opts)?;
        }
        let (ng, t_ng, m_ng) = measure(|| reference::naive_backward(&p, qs, ks, vs, dos, &do_map));
        let (fg, t_fg, m_fg) = measure(|| flashattn::backward_on(device, &x, &opts));
        let fg = fg?;
        println!("backward:");
        println!("  {:<14} {:>12} {:>16}", "", "time", "peak extra mem");
        row("naive", &Measured { time: t_ng, mem: m_ng }, "O(N²)");
        row(&format!("flash ({device})"), &Measured { time: t_fg, mem: m_fg }, "O(N)");
        row("oracle (f64)", &Measured { time: t_og, mem: m_og }, "");
        let grads = [
            ("dq", fg.dq.to_f32_vec(), &ng.dq, &og.dq),
            ("dk", fg.dk.to_f32_vec(), &ng.dk, &og.dk),
            ("dv", fg.dv.to_f32_vec(), &ng.dv, &og.dv),
        ];
        for (name, f, n, o) in &grads {
            let o32: Vec<f32> = o.iter().map(|&x| x as f32).collect();
            println!(
                "  {name}: max |flash - naive| = {:.3e}, max |flash - oracle| = {:.3e}",
                max_abs_diff(f, n),
                max_abs_diff(f, &o32)
            );
        }
        if a.dtype == DType::F32 {
            println!(
                "accuracy rule (f32): |flash - f64| <= max(1e-4 x max|f64|, {} x |naive - f64| + 1e-5):",
                accuracy::GRAD_FACTOR
            );
        } else {
            println!("accuracy rule: |flash - f64| <= {} x |naive - f64| + 1e-5:", accuracy::GRAD_FACTOR);
        }
        let vs: Vec<Verdict> = grads
            .iter()
            .map(|(name, f, n, o)| accuracy::compare(name, f, o, n, a.dtype, accuracy::GRAD_FACTOR))
            .collect();
        ok &= verdict_lines(&vs);
    }

    let pass = format!("PASS: flash attention on {device} meets the spec's accuracy rule");
    let fail = format!("FAIL: flash attention on {device} breaks the spec's accuracy rule");
    outcome(ok, &pass, &fail, "the accuracy check failed")
}
