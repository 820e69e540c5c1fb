//! `flashattn bench`: the shape grids of `shared/bench/torch_baselines.py` (standard, decode, quick) or one
//! custom shape, flash and optionally the naive formula, with a progress bar, a table of ms, TFLOP/s
//! (KV GB/s for decode) and peak extra memory, JSON and an SVG plot on request.
//!
//! FLOPs follow the baselines: forward `4·b·h·sq·sk·d`, halved when causal; forward+backward 3.5x that.
//!
//! On CUDA the inputs and outputs of a point live in device memory for the whole point
//! ([`flashattn::cuda::DeviceAttention`]): only the kernels are timed, with CUDA events around each run, the
//! L2 cache flushed before each run (as triton's `do_bench`, which `torch_baselines.py` uses). On the CPU a
//! run is a whole `forward_on`/`backward_on` call, timed on the host clock.

use crate::alloc::{human, measure};
use crate::common::{
    elems, ensure_fits, parse_device, parse_float_dtype, parse_seqlen, randn, resolve_device, CliError, CliResult,
    DeviceArg,
};
use crate::plot::{line_chart, Series};
use clap::{Args, ValueEnum};
use flashattn::{reference, AttnOptions, BackwardInputs, DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The shape grids.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Grid {
    /// 16k tokens (batch x seqlen), hidden 2048, seqlen 512..16k, d 64/128/256, causal and not.
    Standard,
    /// One query token against KV caches of 4k/32k/128k, b 1/8/32 (b*sk <= 32*32768), GQA 32/8, d 128.
    Decode,
    /// A few points of the standard grid: seqlen 1k and 8k, d 128.
    Quick,
    /// Llama-style GQA: 32 query / 8 key-value heads, d 128, 16k tokens (batch x seqlen), seqlen 512..16k, causal
    /// and not.
    Gqa,
}

/// What is timed.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Forward pass.
    #[value(name = "fwd")]
    #[serde(rename = "fwd")]
    Fwd,
    /// Forward then backward pass.
    #[value(name = "fwd_bwd")]
    #[serde(rename = "fwd_bwd")]
    FwdBwd,
}

fn grid_name(g: Grid) -> &'static str {
    match g {
        Grid::Standard => "standard",
        Grid::Decode => "decode",
        Grid::Quick => "quick",
        Grid::Gqa => "gqa",
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fwd => "fwd",
            Mode::FwdBwd => "fwd_bwd",
        }
    }
}

fn parse_shape(s: &str) -> Result<[usize; 4], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>().or_else(|_| parse_seqlen(x)))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("expected B,H,S,D (e.g. 1,8,4096,128), got `{s}`"))?;
    v.try_into().map_err(|_| format!("expected four numbers B,H,S,D, got `{s}`"))
}

/// Flags of `flashattn bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Shape grid (the same shapes as shared/bench/torch_baselines.py).
    #[arg(long, value_enum, default_value_t = Grid::Standard)]
    pub grid: Grid,
    /// One custom point B,H,S,D (batch, heads, seqlen, head dim) instead of a grid.
    #[arg(long, value_parser = parse_shape)]
    pub shape: Option<[usize; 4]>,
    /// Sequence lengths (comma-separated, `4k` allowed): replaces the grid's (cache lengths for decode).
    #[arg(long, value_delimiter = ',', value_parser = parse_seqlen)]
    pub seqlens: Vec<usize>,
    /// Head dims (comma-separated): replaces the grid's.
    #[arg(long, value_delimiter = ',')]
    pub dims: Vec<usize>,
    /// Causal settings to run: 0, 1 or 0,1 (default: both on grids, 0 with --shape).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(0..=1))]
    pub causal: Vec<u8>,
    /// Modes: fwd, fwd_bwd (comma-separated; decode is forward only).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fwd,fwd_bwd")]
    pub modes: Vec<Mode>,
    /// Element type: bf16, f16 or f32 (f32: CPU only).
    #[arg(long, default_value = "bf16", value_parser = parse_float_dtype)]
    pub dtype: DType,
    /// The KV cache's element type of the decode grid on CUDA: `e4m3` (FP8 cache, unit descales, with a
    /// 16-bit `--dtype` q); default: `--dtype`.
    #[arg(long, value_parser = parse_float_dtype)]
    pub kv_dtype: Option<DType>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Untimed runs before timing (default: 1 on the CPU; on CUDA, as many as fill 25 ms, as triton's `do_bench`).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Timed runs; the median is reported (default: 3 on the CPU; on CUDA, as many as fill 100 ms, as triton's
    /// `do_bench`, so that sustained-power clocks match what `torch_baselines.py` measures for the peers).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Overrides the batch size of every point.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Overrides the query heads of every point.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Overrides the key/value heads of every point (default: as the grid; --heads with --shape).
    #[arg(long)]
    pub heads_k: Option<usize>,
    /// Also benchmark the naive formula (O(N²) memory) at the same points, on the CPU.
    #[arg(long)]
    pub naive: bool,
    /// Write every measurement to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot of TFLOP/s against seqlen (KV GB/s against cache length for decode).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Random seed of the inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ring attention (context parallelism) over this many ranks instead of the grid: per-rank work and
    /// time, and the difference from the single-device result (simulated ranks on the CPU in this build).
    /// Default point: --shape 1,4,2048,64 --causal 1.
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Decode grid on CUDA: page sizes to measure as well as the unpaged cache (comma-separated, e.g.
    /// `16,256`; rows `flashattn/pageN`, block table shuffled).
    #[arg(long, value_delimiter = ',')]
    pub page_size: Vec<usize>,
    /// JSON of `torch_baselines.py` from the same machine and run: its fa2/cudnn figures at the same points
    /// are printed next to ours (as ratios), stored in the JSON rows (`peers`) and plotted (fa2, dashed).
    #[arg(long)]
    pub baselines: Option<PathBuf>,
    /// Deterministic backward (bit-reproducible dQ, `AttnOptions::deterministic`).
    #[arg(long)]
    pub deterministic: bool,
    /// The CUDA backend's dispatch and tuning choices.
    #[command(flatten)]
    pub tuning: crate::tuning::TuningArgs,
}

/// One shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads.
    pub hk: usize,
    /// Query length.
    pub sq: usize,
    /// Key length.
    pub sk: usize,
    /// Head dim.
    pub d: usize,
    /// Causal mask.
    pub causal: bool,
}

impl Point {
    /// Forward FLOPs as the baselines count them: `4·b·h·sq·sk·d`, halved when causal.
    pub fn fwd_flops(&self) -> f64 {
        let f = 4.0 * (self.b * self.h * self.sq * self.sk * self.d) as f64;
        if self.causal {
            f / 2.0
        } else {
            f
        }
    }
    fn kv_bytes(&self, dtype: DType) -> f64 {
        2.0 * (self.b * self.sk * self.hk * self.d * dtype.size()) as f64
    }
}

/// The points of a run, in the baselines' order.
pub fn points(a: &BenchArgs) -> Vec<Point> {
    let causals: Vec<bool> = if !a.causal.is_empty() {
        a.causal.iter().map(|&c| c == 1).collect()
    } else if a.shape.is_some() {
        vec![false]
    } else {
        vec![false, true]
    };
    let mut pts = Vec::new();
    if let Some([b, h, s, d]) = a.shape {
        for &causal in &causals {
            pts.push(Point { b, h, hk: a.heads_k.unwrap_or(h), sq: s, sk: s, d, causal });
        }
        return pts;
    }
    match a.grid {
        Grid::Decode => {
            let sks = if a.seqlens.is_empty() { vec![4096, 32768, 131072] } else { a.seqlens.clone() };
            let dims = if a.dims.is_empty() { vec![128] } else { a.dims.clone() };
            for b in [1usize, 8, 32] {
                for &sk in &sks {
                    if b * sk <= 32 * 32768 {
                        for &d in &dims {
                            pts.push(Point { b, h: 32, hk: 8, sq: 1, sk, d, causal: false });
                        }
                    }
                }
            }
        }
        Grid::Gqa => {
            let seqs = if a.seqlens.is_empty() { vec![512, 1024, 2048, 4096, 8192, 16384] } else { a.seqlens.clone() };
            let dims = if a.dims.is_empty() { vec![128] } else { a.dims.clone() };
            for &d in &dims {
                for &causal in &causals {
                    for &s in &seqs {
                        pts.push(Point { b: (16384 / s.max(1)).max(1), h: 32, hk: 8, sq: s, sk: s, d, causal });
                    }
                }
            }
        }
        Grid::Standard | Grid::Quick => {
            let (seqs, dims) = if a.grid == Grid::Standard {
                (vec![512, 1024, 2048, 4096, 8192, 16384], vec![64, 128, 256])
            } else {
                (vec![1024, 8192], vec![128])
            };
            let seqs = if a.seqlens.is_empty() { seqs } else { a.seqlens.clone() };
            let dims = if a.dims.is_empty() { dims } else { a.dims.clone() };
            for &d in &dims {
                for &causal in &causals {
                    for &s in &seqs {
                        let h = (2048 / d.max(1)).max(1);
                        pts.push(Point { b: (16384 / s.max(1)).max(1), h, hk: h, sq: s, sk: s, d, causal });
                    }
                }
            }
        }
    }
    for p in &mut pts {
        if let Some(b) = a.batch {
            p.b = b;
        }
        if let Some(h) = a.heads {
            if p.hk == p.h && a.heads_k.is_none() {
                p.hk = h;
            }
            p.h = h;
        }
        if let Some(hk) = a.heads_k {
            p.hk = hk;
        }
    }
    pts
}

/// One measurement (a row of the table and of the JSON file).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `flashattn` or `naive`.
    pub backend: String,
    /// Where it ran.
    pub device: String,
    /// `fwd` or `fwd_bwd`.
    pub mode: &'static str,
    /// Element type.
    pub dtype: String,
    /// The shape.
    #[serde(flatten)]
    pub point: Point,
    /// Median time in milliseconds (`None` when the point failed).
    pub ms: Option<f64>,
    /// Fastest time in milliseconds.
    pub ms_min: Option<f64>,
    /// TFLOP/s at the median time.
    pub tflops: Option<f64>,
    /// Bytes of K and V read per millisecond / 1e6 (GB/s).
    pub kv_gbps: Option<f64>,
    /// Highest allocation level during a timed run minus the level before it (host memory, outputs included;
    /// CPU runs only: on CUDA the outputs are device memory allocated once per point).
    pub peak_extra_bytes: Option<usize>,
    /// Bytes of the outputs the call returns (o, lse; dq, dk, dv), part of `peak_extra_bytes`.
    pub output_bytes: Option<usize>,
    /// Why the point failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    /// The kernels that ran (CUDA): family, architecture, variants and tile configurations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Peers' TFLOP/s (KV GB/s for decode) at the same point and mode, from `--baselines` (`fa2`, `cudnn`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub peers: BTreeMap<String, f64>,
    /// Decode on CUDA: rows per page of a paged cache (`None`: unpaged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    /// Decode on CUDA: the cache stores each head's rows contiguously (as `[b, hk, s, d]`, the layout the
    /// PyTorch peers use) instead of token-major `[b, s, hk, d]`.
    pub head_major: bool,
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    opts: AttnOptions,
}

fn inputs(p: &Point, dtype: DType, seed: u64, mode_bwd: bool, tuning: &flashattn::Tuning) -> Inputs {
    let s = seed.wrapping_mul(4);
    Inputs {
        q: randn(&[p.b, p.sq, p.h, p.d], dtype, s, 1.0),
        k: randn(&[p.b, p.sk, p.hk, p.d], dtype, s + 1, 1.0),
        v: randn(&[p.b, p.sk, p.hk, p.d], dtype, s + 2, 1.0),
        dout: if mode_bwd { randn(&[p.b, p.sq, p.h, p.d], dtype, s + 3, 1.0) } else { Tensor::zeros(&[0], dtype) },
        opts: AttnOptions { causal: p.causal, tuning: tuning.clone(), ..Default::default() },
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Flash,
    Naive,
}

/// Runs one call of `imp` in `mode`; returns the bytes of what it returned.
fn call(imp: Impl, mode: Mode, device: Device, x: &Inputs) -> Result<usize, String> {
    let bytes = |ts: &[&Tensor]| ts.iter().map(|t| t.shape().iter().product::<usize>() * t.dtype().size()).sum();
    match imp {
        Impl::Flash => {
            let out = flashattn::forward_on(device, &x.q, &x.k, &x.v, &x.opts).map_err(|e| e.to_string())?;
            let mut n = bytes(&[&out.o, &out.lse]);
            if mode == Mode::FwdBwd {
                let b = BackwardInputs { q: &x.q, k: &x.k, v: &x.v, o: &out.o, lse: &out.lse, dout: &x.dout };
                let g = flashattn::backward_on(device, &b, &x.opts).map_err(|e| e.to_string())?;
                n += bytes(&[&g.dq, &g.dk, &g.dv]);
            }
            Ok(n)
        }
        Impl::Naive => {
            let p = flashattn::problem::validate(&x.q.view(), &x.k.view(), &x.v.view(), &x.opts)
                .map_err(|e| e.to_string())?;
            let (qs, ks, vs) = (x.q.view().data, x.k.view().data, x.v.view().data);
            let (o, lse) = reference::naive_forward(&p, qs, ks, vs);
            let mut n = bytes(&[&o, &lse]);
            if mode == Mode::FwdBwd {
                let map = p.q_like_map(x.dout.layout());
                let g = reference::naive_backward(&p, qs, ks, vs, x.dout.view().data, &map);
                n += (g.dq.len() + g.dk.len() + g.dv.len()) * 4;
            }
            Ok(n)
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn empty_row(imp: Impl, mode: Mode, device: Device, p: &Point, dtype: DType) -> Row {
    Row {
        backend: if imp == Impl::Flash { "flashattn".into() } else { "naive".into() },
        device: device.to_string(),
        mode: mode.name(),
        dtype: dtype.to_string(),
        point: *p,
        ms: None,
        ms_min: None,
        tflops: None,
        kv_gbps: None,
        peak_extra_bytes: None,
        output_bytes: None,
        err: None,
        kernel: None,
        peers: BTreeMap::new(),
        page_size: None,
        head_major: false,
    }
}

/// Fills the timing fields of `row` from per-run milliseconds.
fn set_times(row: &mut Row, mode: Mode, dtype: DType, mut times: Vec<f64>) {
    let p = row.point;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let med = median(&mut times);
    let flops = p.fwd_flops() * if mode == Mode::FwdBwd { 3.5 } else { 1.0 };
    row.ms = Some(med);
    row.ms_min = Some(min);
    row.tflops = Some(flops / med / 1e9);
    row.kv_gbps = Some(p.kv_bytes(dtype) / med / 1e6);
}

#[allow(clippy::too_many_arguments)]
fn bench_one(
    imp: Impl,
    mode: Mode,
    device: Device,
    p: &Point,
    dtype: DType,
    x: &Inputs,
    warmup: usize,
    reps: usize,
) -> Row {
    let run_device = if imp == Impl::Naive { Device::Cpu } else { device };
    let mut row = empty_row(imp, mode, run_device, p, dtype);
    let result = (|| -> Result<(), String> {
        for _ in 0..warmup {
            call(imp, mode, run_device, x)?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            call(imp, mode, run_device, x)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        set_times(&mut row, mode, dtype, times);
        // Memory from one more call, untimed, that starts without the workspace the CPU backend keeps between
        // calls (the timed calls above reuse it, as repeated calls of one shape do).
        let (r, _, peak): (Result<usize, String>, Duration, usize) = measure(|| call(imp, mode, run_device, x));
        row.peak_extra_bytes = Some(peak);
        row.output_bytes = Some(r?);
        Ok(())
    })();
    if let Err(e) = result {
        row.err = Some(e);
    }
    row
}

/// The CUDA path: every point's tensors resident on the device, kernels timed with CUDA events.
#[cfg(feature = "cuda")]
mod gpu {
    use super::{empty_row, median, set_times, Impl, Inputs, Mode, Point, Row};
    use flashattn::cuda::{self, compile::padded_head_dim, DeviceAttention, Pass, Variant};
    use flashattn::{DType, Device};

    /// Compiles (or loads from the disk cache) the kernel variants the points use, in parallel, so the
    /// timing loop never waits for NVRTC. Returns the architecture and a summary line.
    pub fn precompile(
        n: usize,
        pts: &[Point],
        dtype: DType,
        bwd: bool,
        decode: bool,
        tuning: &flashattn::Tuning,
    ) -> Result<(String, String), String> {
        let arch = cuda::device_arch(n).map_err(|e| e.to_string())?;
        let mut vs = Vec::new();
        for p in pts {
            let Some(hd) = padded_head_dim(p.d) else { continue };
            let bf16 = dtype == DType::BF16;
            if decode {
                vs.push(cuda::compile::kv_variant(hd, bf16, false, false, false, p.d % 8 == 0));
                continue;
            }
            for pass in if bwd { vec![Pass::Fwd, Pass::Bwd] } else { vec![Pass::Fwd] } {
                vs.push(Variant { mask: p.causal, aligned16: p.d % 8 == 0, ..Variant::plain(pass, hd, bf16) });
            }
            // The Hopper forward (skipped by precompile_variants on other architectures).
            if let Some(h90) = cuda::sm90_head_dim(p.d) {
                // With the tile shape the launch will pick (192 rows at d64, 176 keys at d128 from 8k keys...).
                let v = Variant { mask: p.causal, ..Variant::plain(Pass::FwdSm90, h90, bf16) };
                vs.push(cuda::sm90_tile(v, p.sk, tuning));
            }
            if let (true, Some(h90)) = (bwd, cuda::sm90_bwd_head_dim(p.d)) {
                vs.push(Variant { mask: p.causal, ..Variant::plain(Pass::BwdSm90, h90, bf16) });
                // Its preprocess and dQ conversion come from bwd.cu at the same padded head dim.
                vs.push(Variant { mask: p.causal, ..Variant::plain(Pass::Bwd, h90, bf16) });
            }
        }
        // The compile-time tuning of the calls (extra NVRTC options, KV stages), as the launches will ask for it.
        let mut vs: Vec<Variant> = vs.into_iter().map(|v| v.tuned(tuning)).collect();
        vs.sort();
        vs.dedup();
        let t0 = std::time::Instant::now();
        let reports = cuda::precompile_variants(std::slice::from_ref(&arch), &vs).map_err(|e| e.to_string())?;
        let cached = reports.iter().filter(|r| r.cached).count();
        let summary = format!(
            "{} kernel variant(s) for {arch} ready ({} compiled, {cached} from the disk cache) in {:.1} s",
            reports.len(),
            reports.len() - cached,
            t0.elapsed().as_secs_f64()
        );
        Ok((arch, summary))
    }

    /// How many runs a CUDA measurement makes.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub enum Reps {
        /// Given counts (`--warmup`, `--reps`).
        Fixed { warmup: usize, reps: usize },
        /// As `torch_baselines.py` calls triton's `do_bench`: five runs, each with its 256 MiB L2 flush, estimate
        /// one run's time, then as many untimed runs as fill 25 ms and timed runs as fill 100 ms (forward+backward:
        /// 10 and 50 ms), at least 10 and at most 5000 of each. The GPU then runs as long and as hot as under the
        /// peers' harness: with a few runs the heavy points finish before the clocks drop under sustained power
        /// and read faster than the peers' harness would measure them (docs/BENCHMARKS.md, 2026-12-06).
        DoBench,
    }

    impl Reps {
        /// `(warmup, reps)` for `mode`, given one run's time with its flush from `estimate` (five runs, ms).
        pub fn counts(
            self,
            mode: Mode,
            estimate: impl FnOnce() -> flashattn::Result<Vec<f64>>,
        ) -> flashattn::Result<(usize, usize)> {
            match self {
                Reps::Fixed { warmup, reps } => Ok((warmup, reps.max(1))),
                Reps::DoBench => {
                    let (warmup_ms, rep_ms) = if mode == Mode::FwdBwd { (10.0, 50.0) } else { (25.0, 100.0) };
                    let mut t = estimate()?;
                    let one = median(&mut t).max(1e-3);
                    let n = |ms: f64| ((ms / one).ceil() as usize).clamp(10, 5000);
                    Ok((n(warmup_ms), n(rep_ms)))
                }
            }
        }
    }

    /// Times decode attention over a device-resident KV cache (`cuda::KvDecodeBench`, the device-native
    /// KV-cache path: split-KV kernels reading K/V straight from the cache), unpaged and with each page
    /// size: `warmup` untimed and `reps` timed calls between CUDA events, L2 flushed before each.
    #[allow(clippy::too_many_arguments)]
    pub fn bench_decode(
        n: usize,
        p: &Point,
        dtype: DType,
        kv_dtype: DType,
        pages: &[usize],
        seed: u64,
        warmup: usize,
        reps: usize,
        tuning: &flashattn::Tuning,
    ) -> Vec<Row> {
        let mut out = Vec::new();
        let layouts = std::iter::once(None).chain(pages.iter().map(|&x| Some(x)));
        for (page, head_major) in layouts.flat_map(|pg| [(pg, false), (pg, true)]) {
            let mut r = empty_row(Impl::Flash, Mode::Fwd, Device::Cuda(n), p, dtype);
            if kv_dtype != dtype {
                r.dtype = format!("{dtype}/kv {kv_dtype}");
            }
            r.page_size = page;
            r.head_major = head_major;
            r.backend = match (page, head_major) {
                (None, false) => "flashattn".into(),
                (None, true) => "flashattn/hm".into(),
                (Some(ps), false) => format!("flashattn/page{ps}"),
                (Some(ps), true) => format!("flashattn/page{ps}/hm"),
            };
            let res = cuda::KvDecodeBench::new(
                n, p.b, p.h, p.hk, p.sq, p.sk, p.d, dtype, kv_dtype, page, head_major, seed, tuning,
            )
            .and_then(|mut kb| {
                let t = kb.time(warmup, reps)?;
                let st = kb.status()?;
                if st != 0 {
                    return Err(flashattn::Error::Device(format!("KV status {st}")));
                }
                Ok((t, kb.splits()))
            });
            match res {
                Ok((t, splits)) => {
                    // The bytes moved are the cache's: GB/s counts its element size.
                    set_times(&mut r, Mode::Fwd, kv_dtype, t);
                    r.kernel = Some(format!(
                        "kvcache.cu kv_attn ({splits} key split(s), merged by the last split), {}, {}",
                        page.map_or("unpaged".to_string(), |ps| format!("pages of {ps}")),
                        if head_major { "head-major rows" } else { "token-major rows ([.., s, hk, d] contiguous)" }
                    ));
                }
                Err(e) => r.err = Some(e.to_string()),
            }
            out.push(r);
        }
        out
    }

    /// Times every mode of one point: q/k/v/dO uploaded and o/lse/dq/dk/dv allocated once, then `warmup`
    /// untimed and `reps` timed runs, each between two CUDA events (forward, or forward then backward).
    #[allow(clippy::too_many_arguments)]
    pub fn bench_point(n: usize, p: &Point, dtype: DType, x: &Inputs, modes: &[Mode], runs: Reps) -> Vec<Row> {
        let mut rows: Vec<Row> = modes.iter().map(|&m| empty_row(Impl::Flash, m, Device::Cuda(n), p, dtype)).collect();
        let bwd = modes.contains(&Mode::FwdBwd);
        let mut att = match DeviceAttention::new(n, &x.q, &x.k, &x.v, bwd.then_some(&x.dout), &x.opts) {
            Ok(a) => a,
            Err(e) => {
                for r in &mut rows {
                    r.err = Some(e.to_string());
                }
                return rows;
            }
        };
        let kernel = att.kernel_path().ok();
        for (r, &mode) in rows.iter_mut().zip(modes) {
            let step = |a: &DeviceAttention| match mode {
                Mode::Fwd => a.forward(),
                Mode::FwdBwd => a.forward().and_then(|_| a.backward()),
            };
            // The estimate times each run with its flush (the first call allocates the flush buffer).
            let estimate = |att: &mut DeviceAttention| {
                att.time(1, 1, true, step)?;
                att.time(0, 5, false, |a| a.flush_l2().and_then(|_| step(a)))
            };
            let times =
                runs.counts(mode, || estimate(&mut att)).and_then(|(warmup, reps)| att.time(warmup, reps, true, step));
            match times {
                Ok(t) => {
                    set_times(r, mode, dtype, t);
                    r.output_bytes = Some(att.output_bytes(mode == Mode::FwdBwd));
                    r.kernel = kernel.clone();
                }
                Err(e) => r.err = Some(e.to_string()),
            }
        }
        if let Err(e) = att.synchronize() {
            for r in rows.iter_mut().filter(|r| r.err.is_none()) {
                r.err = Some(e.to_string());
            }
        }
        rows
    }
}

/// Reads the rows of a `torch_baselines.py` JSON file (an array of objects).
fn load_baselines(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--baselines: cannot read {}: {e}", path.display()))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        format!("--baselines: {} is not a torch_baselines.py JSON (an array of rows): {e}", path.display())
    })?;
    if let Some(i) = rows.iter().position(|r| !r.is_object()) {
        return Err(format!("--baselines: row {i} of {} is not a JSON object", path.display()));
    }
    Ok(rows)
}

/// Checks one point before its tensors are allocated: every size at least 1, and the host memory of its
/// inputs and outputs (and the naive formula's score matrices) available. `device_inputs`: the inputs live
/// on the device only (decode on CUDA), so no host memory is needed for them.
pub(crate) fn check_point(p: &Point, dtype: DType, bwd: bool, naive: bool, device_inputs: bool) -> CliResult<()> {
    let desc = format!("point b={} h={}/{} s={}/{} d={}", p.b, p.h, p.hk, p.sq, p.sk, p.d);
    for (flag, n) in [("--batch", p.b), ("--heads", p.h), ("--heads-k", p.hk), ("--seqlens", p.sq), ("--dims", p.d)] {
        if n == 0 {
            return Err(CliError::Input(format!("{desc}: {flag} must be at least 1, got 0")));
        }
    }
    if device_inputs {
        return Ok(());
    }
    let sz = dtype.size() as u128;
    let (nq, nk, nl) = (elems(&[p.b, p.sq, p.h, p.d]), elems(&[p.b, p.sk, p.hk, p.d]), elems(&[p.b, p.h, p.sq]));
    let b = bwd as u128;
    let mut bytes = (2 * nq + 2 * nk) * sz + nl * 4 + b * (2 * nq + 2 * nk) * sz;
    if naive {
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()) as u128;
        bytes += elems(&[p.sq, p.sk]) * 4 * (1 + 3 * b) * threads;
    }
    ensure_fits(&desc, bytes)
}

/// Adds the fa2/cudnn figures of the baselines' rows at each of our points to `rows` (`peers`). Returns how
/// many of our rows found a peer.
fn attach_peers(base: &[serde_json::Value], rows: &mut [Row], decode: bool) -> usize {
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    let mut found = 0;
    for r in rows.iter_mut().filter(|r| r.backend == "flashattn") {
        let p = r.point;
        let dtype = if r.dtype == "f16" { "fp16" } else { r.dtype.as_str() };
        for b in base {
            let backend = b.get("backend").and_then(|x| x.as_str()).unwrap_or("");
            if !matches!(backend, "fa2" | "cudnn") {
                continue;
            }
            let same = b.get("mode").and_then(|x| x.as_str()) == Some(r.mode)
                && b.get("dtype").and_then(|x| x.as_str()) == Some(dtype)
                && b.get("causal").and_then(|x| x.as_bool()) == Some(p.causal)
                && [("b", p.b), ("h", p.h), ("hk", p.hk), ("sq", p.sq), ("sk", p.sk), ("d", p.d)]
                    .iter()
                    .all(|&(k, v)| num(b, k) == Some(v as f64));
            if let (true, Some(y)) = (same, num(b, if decode { "kv_gbps" } else { "tflops" })) {
                r.peers.insert(backend.to_string(), y);
            }
        }
        found += !r.peers.is_empty() as usize;
    }
    found
}

fn peer_table(rows: &[Row], decode: bool) {
    let metric = if decode { "KV GB/s" } else { "TFLOP/s" };
    println!(
        "
flashattn vs peers ({metric}, peers from --baselines):"
    );
    println!(
        "{:>4} {:>6} {:<7} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "d", "causal", "mode", "sq", "sk", "flashattn", "fa2", "cudnn", "ours/fa2", "ours/cudnn"
    );
    for r in rows.iter().filter(|r| r.backend == "flashattn" && !r.peers.is_empty()) {
        let ours = if decode { r.kv_gbps } else { r.tflops };
        let (fa2, cudnn) = (r.peers.get("fa2").copied(), r.peers.get("cudnn").copied());
        let ratio = |peer: Option<f64>| match (ours, peer) {
            (Some(o), Some(p)) if p > 0.0 => format!("{:.2}", o / p),
            _ => "-".into(),
        };
        let p = &r.point;
        println!(
            "{:>4} {:>6} {:<7} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10}",
            p.d,
            p.causal as u8,
            r.mode,
            p.sq,
            p.sk,
            fmt_num(ours),
            fmt_num(fa2),
            fmt_num(cudnn),
            ratio(fa2),
            ratio(cudnn)
        );
    }
}

/// Decode on CUDA: per point and cache layout, KV GB/s unpaged, as a fraction of the copy bandwidth,
/// against cuDNN, and each page size against unpaged.
fn decode_summary(rows: &[Row], copy: Option<f64>) {
    println!("\ndecode summary (KV GB/s; copy = device-to-device copy bandwidth of this run, read + write):");
    println!(
        "{:<12} {:>4} {:>7} {:>9} {:>9} {:>10} {:>8} {:>12} {:>13}",
        "layout", "b", "sk", "flashattn", "cudnn", "ours/cudnn", "of copy", "page16/unpag", "page256/unpag"
    );
    for hm in [false, true] {
        for r in rows.iter().filter(|r| r.page_size.is_none() && r.head_major == hm && r.err.is_none()) {
            let p = r.point;
            let paged = |ps: usize| {
                rows.iter()
                    .find(|x| x.page_size == Some(ps) && x.head_major == hm && x.point == p)
                    .and_then(|x| Some(x.kv_gbps? / r.kv_gbps?))
                    .map_or("-".into(), |v| format!("{v:.3}"))
            };
            let cudnn = rows
                .iter()
                .find(|x| x.backend == "flashattn" && x.point == p)
                .and_then(|x| x.peers.get("cudnn").copied());
            println!(
                "{:<12} {:>4} {:>7} {:>9} {:>9} {:>10} {:>8} {:>12} {:>13}",
                if hm { "head-major" } else { "token-major" },
                p.b,
                p.sk,
                fmt_num(r.kv_gbps),
                fmt_num(cudnn),
                match (r.kv_gbps, cudnn) {
                    (Some(o), Some(c)) if c > 0.0 => format!("{:.2}", o / c),
                    _ => "-".into(),
                },
                match (r.kv_gbps, copy) {
                    (Some(o), Some(c)) if c > 0.0 => format!("{:.1}%", 100.0 * o / c),
                    _ => "-".into(),
                },
                paged(16),
                paged(256)
            );
        }
    }
}

fn fmt_num(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.1}"),
        Some(v) if v >= 1.0 => format!("{v:.2}"),
        Some(v) if v > 0.0 => {
            // three significant digits for small numbers (CPU TFLOP/s)
            let digits = (2 - v.log10().floor() as i32).clamp(2, 9) as usize;
            format!("{v:.digits$}")
        }
        Some(v) => format!("{v}"),
    }
}

fn table(rows: &[Row], decode: bool) {
    let metric = if decode { "KV GB/s" } else { "TFLOP/s" };
    println!(
        "{:<9} {:<7} {:<5} {:>4} {:>6} {:>4} {:>6} {:>6} {:>7} {:>10} {:>9} {:>11} {:>11}",
        "backend", "mode", "dtype", "d", "causal", "b", "h/hk", "sq", "sk", "ms", metric, "peak extra", "workspace"
    );
    for r in rows {
        let p = &r.point;
        let tail = match &r.err {
            Some(e) => format!("error: {e}"),
            None => format!(
                "{:>10} {:>9} {:>11} {:>11}",
                fmt_num(r.ms),
                fmt_num(if decode { r.kv_gbps } else { r.tflops }),
                r.peak_extra_bytes.map_or("-".into(), human),
                match (r.peak_extra_bytes, r.output_bytes) {
                    (Some(pk), Some(o)) => human(pk.saturating_sub(o)),
                    _ => "-".into(),
                }
            ),
        };
        println!(
            "{:<9} {:<7} {:<5} {:>4} {:>6} {:>4} {:>6} {:>6} {:>7} {}",
            r.backend,
            r.mode,
            r.dtype,
            p.d,
            p.causal as u8,
            p.b,
            format!("{}/{}", p.h, p.hk),
            p.sq,
            p.sk,
            tail
        );
    }
}

fn comparisons(rows: &[Row]) {
    let mut printed = false;
    for f in rows.iter().filter(|r| r.backend == "flashattn" && r.err.is_none()) {
        let Some(n) = rows.iter().find(|r| r.backend == "naive" && r.point == f.point && r.mode == f.mode) else {
            continue;
        };
        let (Some(fm), Some(nm), Some(fp), Some(np)) = (f.ms, n.ms, f.peak_extra_bytes, n.peak_extra_bytes) else {
            continue;
        };
        if !printed {
            println!("\nflash vs naive (peak extra memory includes the outputs both return):");
            printed = true;
        }
        let p = &f.point;
        println!(
            "  b={} h={} s={} d={} causal={} {}: flash is {:.2}x as fast; peak extra memory flash {} vs naive {} (naive/flash = {:.1}x)",
            p.b,
            p.h,
            p.sk,
            p.d,
            p.causal as u8,
            f.mode,
            nm / fm,
            human(fp),
            human(np),
            np as f64 / fp.max(1) as f64
        );
    }
}

#[derive(Serialize)]
struct Report<'a> {
    version: &'static str,
    device: String,
    device_reason: String,
    grid: Option<Grid>,
    /// Untimed and timed runs per measurement; `None` where the time-based rule chose them per point.
    warmup: Option<usize>,
    reps: Option<usize>,
    flops: &'static str,
    timing: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernels: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baselines: Option<String>,
    /// Device-to-device copy bandwidth measured in the same run (GB/s, read + write; decode on CUDA).
    #[serde(skip_serializing_if = "Option::is_none")]
    copy_gbps: Option<f64>,
    rows: &'a [Row],
}

fn plot(path: &PathBuf, rows: &[Row], decode: bool, title: &str) -> CliResult<()> {
    let mut series: Vec<Series> = Vec::new();
    let mut configs: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.err.is_none()) {
        let p = &r.point;
        let (config, x, y) = if decode {
            (format!("b={} {}", p.b, r.mode), p.sk as f64, r.kv_gbps.unwrap_or(f64::NAN))
        } else {
            (format!("d={} causal={} {}", p.d, p.causal as u8, r.mode), p.sk as f64, r.tflops.unwrap_or(f64::NAN))
        };
        let color = configs.iter().position(|c| *c == config).unwrap_or_else(|| {
            configs.push(config.clone());
            configs.len() - 1
        });
        let label = format!("{} {config}", r.backend);
        match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push((x, y)),
            None => series.push(Series { label, points: vec![(x, y)], color, dashed: r.backend == "naive" }),
        }
        // The peer the targets are set against (PyTorch's FlashAttention-2), dashed in the same color.
        if let Some(&py) = r.peers.get("fa2") {
            let label = format!("torch fa2 {config}");
            match series.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push((x, py)),
                None => series.push(Series { label, points: vec![(x, py)], color, dashed: true }),
            }
        }
    }
    let (xl, yl) = if decode { ("KV cache length", "KV GB/s") } else { ("sequence length", "TFLOP/s") };
    let svg = line_chart(title, xl, yl, &series);
    std::fs::write(path, svg).map_err(|e| CliError::Input(format!("cannot write {}: {e}", path.display())))
}

/// Runs `flashattn bench`.
pub fn main(a: BenchArgs) -> CliResult<ExitCode> {
    if let Some(ranks) = a.ranks {
        return crate::ring_bench::main(&a, ranks);
    }
    let (device, why) = resolve_device(a.device)?;
    let tuning = a.tuning.tuning()?;
    let is_cpu = device == Device::Cpu;
    let warmup = a.warmup.unwrap_or(if is_cpu { 1 } else { 10 });
    let reps = a.reps.unwrap_or(if is_cpu { 3 } else { 30 }).max(1);
    let decode = a.shape.is_none() && a.grid == Grid::Decode;
    // CUDA: do_bench's rule unless a count is given (decode keeps 10 + 30 runs).
    let timed = !is_cpu && !decode && a.warmup.is_none() && a.reps.is_none();
    #[cfg(feature = "cuda")]
    let runs = if timed { gpu::Reps::DoBench } else { gpu::Reps::Fixed { warmup, reps } };
    let mut modes = a.modes.clone();
    modes.dedup();
    if decode && modes.contains(&Mode::FwdBwd) {
        modes.retain(|&m| m == Mode::Fwd);
        if modes.is_empty() {
            return Err(CliError::Input("the decode grid is forward only: use --modes fwd".into()));
        }
    }
    if a.page_size.contains(&0) {
        return Err(CliError::Input("--page-size: expected page sizes >= 1, got 0".into()));
    }
    // The baselines file is read and parsed before anything runs: a bad file is an input error.
    let peers = a.baselines.as_deref().map(load_baselines).transpose().map_err(CliError::Input)?;
    let pts = points(&a);
    if pts.is_empty() {
        return Err(CliError::Input("no point to run: check --seqlens, --dims and --causal".into()));
    }
    for p in &pts {
        check_point(p, a.dtype, modes.contains(&Mode::FwdBwd), a.naive, decode && device != Device::Cpu)?;
    }
    let impls: Vec<Impl> = if a.naive { vec![Impl::Flash, Impl::Naive] } else { vec![Impl::Flash] };
    #[cfg(feature = "cuda")]
    let gpu_n = match device {
        Device::Cuda(n) => Some(n),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    let gpu_n: Option<usize> = None;
    let timing = if gpu_n.is_some() {
        "CUDA: inputs and outputs resident on the device (uploaded/allocated once per point), each run timed \
         with CUDA events around the kernels only, L2 flushed (256 MiB memset) before each run"
    } else {
        "CPU: each run is a whole forward_on/backward_on call, host clock"
    };
    println!("device: {why}");
    let counts = if timed {
        "as torch_baselines.py's do_bench: runs filling 25 ms untimed, then 100 ms timed (fwd_bwd: 10, 50 ms)"
            .to_string()
    } else {
        format!("warmup {warmup}, reps {reps}")
    };
    println!(
        "{} point(s) x {} mode(s){}, {}, {counts} (median reported)",
        pts.len(),
        modes.len(),
        if a.naive { " x {flash, naive}" } else { "" },
        a.dtype,
    );
    println!("timing: {timing}");
    #[allow(unused_mut)]
    let mut kernels = None;
    #[cfg(feature = "cuda")]
    if let Some(n) = gpu_n {
        let (arch, summary) = gpu::precompile(n, &pts, a.dtype, modes.contains(&Mode::FwdBwd), decode, &tuning)
            .map_err(CliError::Failed)?;
        println!("kernels: {}", flashattn::cuda::kernel_family(&arch, &tuning));
        println!("{summary}");
        kernels = Some(flashattn::cuda::kernel_family(&arch, &tuning));
    }
    #[allow(unused_mut)]
    let mut copy_gbps = None;
    #[cfg(feature = "cuda")]
    if let (Some(n), true) = (gpu_n, decode) {
        match flashattn::cuda::kvcache::copy_gbps(n, 1 << 30, 20) {
            Ok(g) => {
                println!("device copy bandwidth (1 GiB device-to-device, read + write, median of 20): {g:.1} GB/s");
                copy_gbps = Some(g);
            }
            Err(e) => println!("device copy bandwidth not measured: {e}"),
        }
    }
    let total = (pts.len() * modes.len() * impls.len() * if decode { 2 + 2 * a.page_size.len() } else { 1 }) as u64;
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("valid template")
            .progress_chars("##-"),
    );
    let mut rows = Vec::new();
    for (i, p) in pts.iter().enumerate() {
        // Decode on CUDA fills its inputs on the device: no host tensors (they would be gigabytes).
        let host_inputs = !(decode && gpu_n.is_some());
        let x = if host_inputs {
            let mut x = inputs(p, a.dtype, a.seed.wrapping_add(i as u64), modes.contains(&Mode::FwdBwd), &tuning);
            x.opts.deterministic = a.deterministic;
            x
        } else {
            let z = Point { b: 0, ..*p };
            inputs(&z, a.dtype, 0, false, &tuning)
        };
        #[cfg(feature = "cuda")]
        if let Some(n) = gpu_n {
            pb.set_message(format!(
                "flash {} b={} h={}/{} s={}/{} d={} causal={}",
                modes.iter().map(|m| m.name()).collect::<Vec<_>>().join("+"),
                p.b,
                p.h,
                p.hk,
                p.sq,
                p.sk,
                p.d,
                p.causal as u8
            ));
            let rows_here = if decode {
                let kv = a.kv_dtype.unwrap_or(a.dtype);
                gpu::bench_decode(n, p, a.dtype, kv, &a.page_size, a.seed.wrapping_add(i as u64), warmup, reps, &tuning)
            } else {
                gpu::bench_point(n, p, a.dtype, &x, &modes, runs)
            };
            for r in rows_here {
                if let Some(e) = &r.err {
                    pb.println(format!("point failed: {e}"));
                }
                rows.push(r);
                pb.inc(1);
            }
        }
        for &mode in &modes {
            for &imp in &impls {
                if imp == Impl::Flash && gpu_n.is_some() {
                    continue;
                }
                pb.set_message(format!(
                    "{} {} b={} h={}/{} s={}/{} d={} causal={}",
                    if imp == Impl::Flash { "flash" } else { "naive" },
                    mode.name(),
                    p.b,
                    p.h,
                    p.hk,
                    p.sq,
                    p.sk,
                    p.d,
                    p.causal as u8
                ));
                let r = bench_one(imp, mode, device, p, a.dtype, &x, warmup, reps);
                if let Some(e) = &r.err {
                    pb.println(format!("point failed: {e}"));
                }
                rows.push(r);
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let mut baselines = None;
    if let (Some(path), Some(peers)) = (&a.baselines, &peers) {
        let found = attach_peers(peers, &mut rows, decode);
        baselines = Some(format!("{} ({found} of our rows matched)", path.display()));
    }
    table(&rows, decode);
    comparisons(&rows);
    if rows.iter().any(|r| !r.peers.is_empty()) {
        peer_table(&rows, decode);
    }
    if decode && gpu_n.is_some() {
        decode_summary(&rows, copy_gbps);
    }
    if let Some(path) = &a.json {
        let report = Report {
            version: env!("CARGO_PKG_VERSION"),
            device: device.to_string(),
            device_reason: why.clone(),
            grid: if a.shape.is_some() { None } else { Some(a.grid) },
            warmup: (!timed).then_some(warmup),
            reps: (!timed).then_some(reps),
            flops: "fwd 4*b*h*sq*sk*d (halved when causal); fwd_bwd 3.5x fwd",
            timing,
            kernels: kernels.clone(),
            baselines: baselines.clone(),
            copy_gbps,
            rows: &rows,
        };
        let s = serde_json::to_string_pretty(&report).map_err(|e| CliError::Failed(e.to_string()))?;
        crate::common::write_atomic(path, s.as_bytes())
            .map_err(|e| CliError::Input(format!("cannot write {}: {e}", path.display())))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "flashattn {} on {device}, {}",
            a.shape.map_or(format!("{} grid", grid_name(a.grid)), |_| "custom shape".into()),
            a.dtype
        );
        plot(path, &rows, decode, &title)?;
        println!("wrote {}", path.display());
    }
    if rows.iter().any(|r| r.err.is_some()) {
        return Err(CliError::Failed("some points failed (see the table)".into()));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        T::parse_from(std::iter::once("bench").chain(extra.iter().copied())).a
    }

    #[test]
    fn grids_match_the_baselines() {
        assert_eq!(points(&args(&[])).len(), 36);
        let dec = points(&args(&["--grid", "decode"]));
        assert_eq!(dec.len(), 8);
        assert!(dec.iter().all(|p| p.b * p.sk <= 32 * 32768 && p.h == 32 && p.hk == 8 && p.sq == 1));
        let q = points(&args(&["--grid", "quick"]));
        assert_eq!(q.len(), 4);
        assert_eq!(q[0], Point { b: 16, h: 16, hk: 16, sq: 1024, sk: 1024, d: 128, causal: false });
        let g = points(&args(&["--grid", "gqa"]));
        assert_eq!(g.len(), 12);
        assert_eq!(g[0], Point { b: 32, h: 32, hk: 8, sq: 512, sk: 512, d: 128, causal: false });
        assert_eq!(g[11], Point { b: 1, h: 32, hk: 8, sq: 16384, sk: 16384, d: 128, causal: true });
        let one = points(&args(&["--shape", "1,8,4k,128"]));
        assert_eq!(one, vec![Point { b: 1, h: 8, hk: 8, sq: 4096, sk: 4096, d: 128, causal: false }]);
        let f = points(&args(&["--seqlens", "512,1k", "--dims", "64", "--causal", "1", "--heads", "4"]));
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|p| p.causal && p.d == 64 && p.h == 4 && p.hk == 4));
        assert_eq!(Point { b: 1, h: 1, hk: 1, sq: 2, sk: 2, d: 1, causal: true }.fwd_flops(), 8.0);
    }
}
