//! The spec's sweep as data, and one test body that runs a case on any device against the f64 oracle.
#![allow(dead_code)]

use flashattn::accuracy::{compare, compare_lse, o_factor, Verdict, GRAD_FACTOR};
use flashattn::problem::validate;
use flashattn::reference::{naive_f32, oracle_f64, Forward, Grads};
use flashattn::{AttnOptions, BackwardInputs, DType, Device, Tensor, VarLen};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

pub mod nonfinite;

pub type Rng64 = rand::rngs::StdRng;

/// A ring attention test case: dtype, head dim, query and key lengths, query and key/value heads, soft-capping.
#[derive(Debug, Clone, Copy)]
pub struct RingCase {
    pub dtype: DType,
    pub d: usize,
    pub sq: usize,
    pub sk: usize,
    pub h: usize,
    pub hk: usize,
    pub softcap: bool,
}

impl RingCase {
    /// Random `[q, k, v, dout]` of the case, batch 2 (`q` scaled by 8 with soft-capping, so that the cap
    /// matters), and its options (soft-cap 50 when the case has one).
    pub fn inputs(&self, r: &mut Rng64, causal: bool) -> ([Tensor; 4], AttnOptions) {
        let b = 2;
        let q = randn_tensor(r, &[b, self.sq, self.h, self.d], self.dtype, if self.softcap { 8.0 } else { 1.0 });
        let k = randn_tensor(r, &[b, self.sk, self.hk, self.d], self.dtype, 1.0);
        let v = randn_tensor(r, &[b, self.sk, self.hk, self.d], self.dtype, 1.0);
        let dout = randn_tensor(r, &[b, self.sq, self.h, self.d], self.dtype, 1.0);
        let opts = AttnOptions { causal, softcap: if self.softcap { 50.0 } else { 0.0 }, ..AttnOptions::default() };
        ([q, k, v, dout], opts)
    }
}

/// One line to stderr (shown with `--nocapture`, and kept next to a failing test's output).
pub fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// `FLASHATTN_REQUIRE_GPU=1`: GPU tests fail instead of skipping when no GPU is usable.
pub fn require_gpu() -> bool {
    std::env::var("FLASHATTN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Whether the GPU tests can run (then outputs are NaN-poisoned before every kernel); prints SKIP (or panics
/// under FLASHATTN_REQUIRE_GPU=1) when not.
#[cfg(feature = "cuda")]
pub fn gpu(test: &str) -> bool {
    let st = flashattn::cuda::status();
    if st.usable {
        flashattn::cuda::set_poison_outputs(true);
        return true;
    }
    if require_gpu() {
        panic!("{test}: FLASHATTN_REQUIRE_GPU=1 but the CUDA backend is not usable: {}", st.detail);
    }
    say(&format!("SKIP {test}: no usable CUDA device ({})", st.detail));
    false
}

/// The random numbers of a GPU test (from [`seed`]) when the GPU tests can run ([`gpu`]); `None` skips it.
#[cfg(feature = "cuda")]
pub fn gpu_rng(test: &str) -> Option<Rng64> {
    gpu(test).then(|| rng(seed()))
}

/// A fresh random seed per run, unless FLASHATTN_SEED pins one (printed with every failure).
pub fn seed() -> u64 {
    std::env::var("FLASHATTN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

pub fn rng(seed: u64) -> Rng64 {
    Rng64::seed_from_u64(seed)
}

pub fn randn(rng: &mut Rng64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = StandardNormal.sample(rng);
            scale * x
        })
        .collect::<Vec<f32>>()
}

pub fn randn_tensor(rng: &mut Rng64, shape: &[usize], dtype: DType, scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&randn(rng, n, scale), shape, dtype).unwrap()
}

pub const HEAD_DIMS: [usize; 12] = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256];
pub const SEQLENS: [(usize, usize); 17] = [
    (113, 203),
    (128, 217),
    (113, 211),
    (108, 256),
    (256, 512),
    (512, 256),
    (1024, 1024),
    (1023, 1024),
    (1024, 1023),
    (2048, 2048),
    (1, 147),
    (1, 239),
    (3, 799),
    (127, 512),
    (127, 513),
    (239, 1),
    (799, 3),
];
pub const HEADS: [(usize, usize); 3] = [(6, 6), (6, 2), (6, 1)];
/// The spec's FP8 row: these head dims, with [`FP8_VARIANTS`] and every head layout (GQA included).
pub const FP8_HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// The FP8 row's variants: no mask, causal, window, varlen.
pub const FP8_VARIANTS: [Variant; 4] = [Variant::Plain, Variant::Causal, Variant::Window, Variant::Varlen];
/// The spec's value head dims other than `d`: `(d, d_v)` pairs (DeepSeek-style 192/128, a narrower and a
/// wider value).
pub const VALUE_DIMS: [(usize, usize); 3] = [(192, 128), (128, 64), (64, 128)];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    Plain,
    Causal,
    Window,
    Alibi,
    Softcap,
    Varlen,
    /// A learnable sink (`randn(h) * 2`, a quarter of the time `+ 8` so that it dominates), with causal or a
    /// window part of the time. CPU backends only for now.
    Sink,
}

/// The variants every backend runs; the CPU backends run these and [`Variant::Sink`].
pub const VARIANTS: [Variant; 6] =
    [Variant::Plain, Variant::Causal, Variant::Window, Variant::Alibi, Variant::Softcap, Variant::Varlen];

#[derive(Debug, Clone)]
pub struct Case {
    pub dtype: DType,
    pub d: usize,
    /// The value head dim (v's, o's and dout's last dim); `d` unless set.
    pub d_v: usize,
    pub sq: usize,
    pub sk: usize,
    pub h: usize,
    pub hk: usize,
    pub batch: usize,
    pub variant: Variant,
    pub backward: bool,
    /// `AttnOptions::deterministic` (the GPU's fixed-order dQ; the CPU backward is always deterministic).
    pub deterministic: bool,
    /// `AttnOptions::tuning` (e.g. the CUDA kernel path).
    pub tuning: flashattn::Tuning,
}

impl Case {
    pub fn new(dtype: DType, d: usize, (sq, sk): (usize, usize), (h, hk): (usize, usize), variant: Variant) -> Self {
        Case::with_dv(dtype, (d, d), (sq, sk), (h, hk), variant)
    }

    /// A case whose value head dim `d_v` may differ from the query/key head dim `d`.
    pub fn with_dv(
        dtype: DType,
        (d, d_v): (usize, usize),
        (sq, sk): (usize, usize),
        (h, hk): (usize, usize),
        variant: Variant,
    ) -> Self {
        let batch = if sq * sk >= 1024 * 1023 { 2 } else { 4 };
        Case {
            dtype,
            d,
            d_v,
            sq,
            sk,
            h,
            hk,
            batch,
            variant,
            backward: false,
            deterministic: false,
            tuning: flashattn::Tuning::default(),
        }
    }
}

/// Inputs of a case: tensors and options, drawn fresh.
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub dout: Tensor,
    pub opts: AttnOptions,
}

pub fn make_inputs(c: &Case, rng: &mut Rng64) -> Inputs {
    let mut opts = AttnOptions { deterministic: c.deterministic, tuning: c.tuning.clone(), ..AttnOptions::default() };
    let q_scale = if c.variant == Variant::Softcap { 8.0 } else { 1.0 };
    let (qs, ks, vs, os) = if c.variant == Variant::Varlen {
        let lq: Vec<usize> = (0..c.batch).map(|_| rng.gen_range(0..=c.sq)).collect();
        let lk: Vec<usize> = (0..c.batch).map(|_| rng.gen_range(0..=c.sk)).collect();
        let cu = |l: &[usize]| {
            let mut v = vec![0i32];
            for &x in l {
                v.push(v.last().unwrap() + x as i32);
            }
            v
        };
        let (cq, ck) = (cu(&lq), cu(&lk));
        let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
        // seqused_k on half the batches.
        let seqused =
            if rng.gen_bool(0.5) { Some(lk.iter().map(|&l| rng.gen_range(0..=l) as i32).collect()) } else { None };
        opts.varlen = Some(VarLen { cu_seqlens_q: cq, cu_seqlens_k: ck, seqused_k: seqused });
        if rng.gen_bool(0.5) {
            opts.causal = true;
        }
        (vec![tq, c.h, c.d], vec![tk, c.hk, c.d], vec![tk, c.hk, c.d_v], vec![tq, c.h, c.d_v])
    } else {
        (
            vec![c.batch, c.sq, c.h, c.d],
            vec![c.batch, c.sk, c.hk, c.d],
            vec![c.batch, c.sk, c.hk, c.d_v],
            vec![c.batch, c.sq, c.h, c.d_v],
        )
    };
    match c.variant {
        Variant::Causal => opts.causal = true,
        Variant::Window => {
            let side = |rng: &mut Rng64| if rng.gen_bool(0.2) { -1 } else { rng.gen_range(0..c.sk.max(1) as i64) };
            opts.window = (side(rng), side(rng));
        }
        Variant::Alibi => {
            let per_batch = rng.gen_bool(0.5);
            let shape = if per_batch { vec![c.batch, c.h] } else { vec![c.h] };
            let n = shape.iter().product();
            let slopes: Vec<f32> = (0..n).map(|_| rng.gen::<f32>() * 0.3).collect();
            opts.alibi_slopes = Some(Tensor::from_f32(&slopes, &shape, DType::F32).unwrap());
            opts.causal = rng.gen_bool(0.5);
        }
        Variant::Softcap => opts.softcap = 50.0,
        Variant::Sink => {
            let lift = if rng.gen_bool(0.25) { 8.0 } else { 0.0 };
            let sink: Vec<f32> = randn(rng, c.h, 2.0).into_iter().map(|x| x + lift).collect();
            opts.sink = Some(Tensor::from_f32(&sink, &[c.h], c.dtype).unwrap());
            match rng.gen_range(0..3) {
                0 => opts.causal = true,
                1 => opts.window = (rng.gen_range(0..c.sk.max(1) as i64), rng.gen_range(-1..3)),
                _ => {}
            }
        }
        _ => {}
    }
    if c.dtype.is_fp8() {
        // Descales uniform in [0.5, 2], [b, hk] each (b = the number of sequences, also when varlen).
        let mut descale = || {
            let x: Vec<f32> = (0..c.batch * c.hk).map(|_| rng.gen_range(0.5f32..=2.0)).collect();
            Some(Tensor::from_f32(&x, &[c.batch, c.hk], DType::F32).unwrap())
        };
        opts.q_descale = descale();
        opts.k_descale = descale();
        opts.v_descale = descale();
    }
    let q = randn_tensor(rng, &qs, c.dtype, q_scale);
    let k = randn_tensor(rng, &ks, c.dtype, 1.0);
    let v = randn_tensor(rng, &vs, c.dtype, 1.0);
    // dout (for the backward, which FP8 inputs do not have) in the output's dtype.
    let dout = randn_tensor(rng, &os, if c.dtype.is_fp8() { DType::BF16 } else { c.dtype }, 1.0);
    Inputs { q, k, v, dout, opts }
}

/// Where one case's time went, in seconds (wall time of each step).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Drawing the inputs and validating them.
    pub inputs: f64,
    /// The f64 oracle (forward and, for a backward case, gradients).
    pub oracle: f64,
    /// The same-precision naive baseline (not needed for f32, whose rule has no baseline).
    pub naive: f64,
    /// The backend's forward.
    pub fwd: f64,
    /// The backend's backward.
    pub bwd: f64,
    /// Reading the outputs back and comparing them.
    pub compare: f64,
}

/// `add` for a struct of `f64` figures of one case: adds another case's, field by field.
macro_rules! add_fieldwise {
    ($ty:ident: $($field:ident),+) => {
        impl $ty {
            /// Adds another case's figures, field by field.
            pub fn add(&mut self, o: &$ty) {
                $(self.$field += o.$field;)+
            }
        }
    };
}

add_fieldwise!(Timing: inputs, oracle, naive, fwd, bwd, compare);

impl Timing {
    /// The sum of all steps.
    pub fn total(&self) -> f64 {
        self.inputs + self.oracle + self.naive + self.fwd + self.bwd + self.compare
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inputs {:.3}s oracle {:.3}s naive {:.3}s fwd {:.3}s bwd {:.3}s compare {:.3}s (total {:.3}s)",
            self.inputs,
            self.oracle,
            self.naive,
            self.fwd,
            self.bwd,
            self.compare,
            self.total()
        )
    }
}

/// Runs one case on `device` and returns every verdict (o, lse, and dq/dk/dv when `c.backward`).
pub fn run_case(device: Device, c: &Case, seed: u64) -> Result<Vec<Verdict>, String> {
    run_case_timed(device, c, seed).0
}

/// [`run_case`], also returning where the time went. The oracle and the baseline compute the forward and
/// the gradients together (sharing the scores); the f32 rule has no baseline, so f32 cases skip it.
pub fn run_case_timed(device: Device, c: &Case, seed: u64) -> (Result<Vec<Verdict>, String>, Timing) {
    let mut t = Timing::default();
    let r = run_case_inner(device, c, seed, &mut t);
    (r, t)
}

/// Seconds on the clock the timings use: wall time, or with FLASHATTN_CPU_CLOCK=1 the CPU time of the whole
/// process (user + system, from /proc/self/stat, 10 ms ticks), which a loaded machine inflates far less.
pub fn clock_seconds() -> f64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    if std::env::var_os("FLASHATTN_CPU_CLOCK").is_some_and(|v| v != "0") {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which ends with ')'): utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |x| x.1);
            let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
            if f.len() > 13 {
                return (f[11] + f[12]) / 100.0;
            }
        }
    }
    T0.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

/// Seconds since `t0` on [`clock_seconds`].
fn since(t0: f64) -> f64 {
    clock_seconds() - t0
}

fn run_case_inner(device: Device, c: &Case, seed: u64, t: &mut Timing) -> Result<Vec<Verdict>, String> {
    let clock = clock_seconds;
    let t0 = clock();
    let mut rng = rng(seed);
    let inp = make_inputs(c, &mut rng);
    let ctx = |e: flashattn::Error| format!("{c:?} seed {seed}: {e}");
    let p = validate(&inp.q.view(), &inp.k.view(), &inp.v.view(), &inp.opts).map_err(ctx)?;
    let (qd, kd, vd) = (inp.q.view().data, inp.k.view().data, inp.v.view().data);
    let do_map = p.q_like_map(inp.dout.layout());
    let dout = c.backward.then(|| (inp.dout.view().data, &do_map));
    t.inputs = since(t0);
    let t0 = clock();
    let (reference, g_ref) = oracle_f64(&p, qd, kd, vd, dout);
    t.oracle = since(t0);
    let t0 = clock();
    let (base, g_base) = if c.dtype == DType::F32 {
        // The f32 rule compares with the oracle alone (relative 1e-4): no baseline to compute.
        (Forward { o: Vec::new(), lse: Vec::new() }, None)
    } else {
        naive_f32(&p, qd, kd, vd, dout)
    };
    t.naive = since(t0);
    let t0 = clock();
    let out = match device {
        Device::Cpu => {
            // Poisoned outputs: an element the backend forgets to write fails the comparison.
            let mut o = Tensor::nan(&p.o_shape(), p.out_dtype);
            let mut lse = Tensor::nan(&p.lse_shape(), DType::F32);
            flashattn::forward_into(
                &inp.q.view(),
                &inp.k.view(),
                &inp.v.view(),
                &mut o.view_mut(),
                &mut lse.view_mut(),
                &inp.opts,
            )
            .map_err(ctx)?;
            flashattn::ForwardOutput { o, lse }
        }
        dev => flashattn::forward_on(dev, &inp.q, &inp.k, &inp.v, &inp.opts).map_err(ctx)?,
    };
    t.fwd = since(t0);
    let t0 = clock();
    let factor = o_factor(inp.opts.softcap > 0.0, inp.opts.alibi_slopes.is_some());
    let mut verdicts = vec![
        compare("o", &out.o.to_f32_vec(), &reference.o, &base.o, c.dtype, factor),
        compare_lse(&out.lse.to_f32_vec(), &reference.lse),
    ];
    t.compare = since(t0);
    if c.backward {
        let t0 = clock();
        let x = BackwardInputs { q: &inp.q, k: &inp.k, v: &inp.v, o: &out.o, lse: &out.lse, dout: &inp.dout };
        let g = match device {
            Device::Cpu => {
                let nan = |t: &Tensor| Tensor::nan(t.shape(), c.dtype);
                let mut g = flashattn::Gradients { dq: nan(&inp.q), dk: nan(&inp.k), dv: nan(&inp.v), dsink: None };
                g.dsink = flashattn::backward_into(&x.views(), g.views_mut(), &inp.opts).map_err(ctx)?;
                g
            }
            dev => flashattn::backward_on(dev, &x, &inp.opts).map_err(ctx)?,
        };
        t.bwd = since(t0);
        let t0 = clock();
        let g_ref = g_ref.expect("oracle gradients");
        let empty = Grads { dq: Vec::new(), dk: Vec::new(), dv: Vec::new(), dsink: Vec::new() };
        let g_base = g_base.unwrap_or(empty);
        verdicts.push(compare("dq", &g.dq.to_f32_vec(), &g_ref.dq, &g_base.dq, c.dtype, GRAD_FACTOR));
        verdicts.push(compare("dk", &g.dk.to_f32_vec(), &g_ref.dk, &g_base.dk, c.dtype, GRAD_FACTOR));
        verdicts.push(compare("dv", &g.dv.to_f32_vec(), &g_ref.dv, &g_base.dv, c.dtype, GRAD_FACTOR));
        if let Some(sink) = &inp.opts.sink {
            let ds = g.dsink.as_ref().ok_or_else(|| format!("{c:?} seed {seed}: no sink gradient"))?.to_f32_vec();
            // dsink comes in the sink's dtype: the baseline's is stored the same way (as its dq is in q's).
            let base: Vec<f32> = g_base.dsink.iter().map(|&x| sink.dtype().round(x)).collect();
            verdicts.push(compare("dsink", &ds, &g_ref.dsink, &base, c.dtype, GRAD_FACTOR));
        }
        t.compare += since(t0);
    }
    Ok(verdicts)
}

/// Which sweep to run: `quick` (CI default), `full` (the spec's whole sweep), from FLASHATTN_SWEEP.
pub fn sweep_level() -> String {
    std::env::var("FLASHATTN_SWEEP").unwrap_or_else(|_| "quick".into())
}

/// The cases of the sweep for `dtypes`.
/// - `full`: the whole cross product of the spec (hours of CPU time on a small machine).
/// - `medium`: one combination in 5 (coprime with the 7 variants, so every variant rotates through).
/// - `quick` (CI): one in 61, rotating so every head dim, shape, head layout and variant appears; cases whose
///   work (`batch * h * sq * sk * d`) exceeds a budget are swapped for the same case at a smaller shape, so the
///   whole CPU suite runs in minutes on two cores.
///
/// The value head dims of [`VALUE_DIMS`] (`d_v != d`) join the head dims of the cross product in `full` and
/// `medium`; `quick` runs each pair with every variant (sink included) on small shapes, rotating the head layout
/// (MHA, GQA, MQA) and the shape, so masks, varlen and grouped heads all meet a different value head dim.
pub fn cases(dtypes: &[DType], backward: bool) -> Vec<Case> {
    let level = sweep_level();
    let stride = match level.as_str() {
        "full" => 1,
        "medium" => 5,
        _ => 61,
    };
    let budget = if backward { 4e8 } else { 2e9 };
    let mut out = Vec::new();
    let mut n = 0usize;
    let quick = level != "full" && level != "medium";
    let dims: Vec<(usize, usize)> =
        HEAD_DIMS.iter().map(|&d| (d, d)).chain(if quick { Vec::new() } else { VALUE_DIMS.to_vec() }).collect();
    for &dtype in dtypes {
        for &(d, d_v) in &dims {
            for &shape in &SEQLENS {
                for &heads in &HEADS {
                    for variant in VARIANTS.into_iter().chain([Variant::Sink]) {
                        n += 1;
                        // Quick: one case in 61 (prime, so every dim/shape/head/variant rotates through).
                        if n % stride != 0 {
                            continue;
                        }
                        let mut c = Case::with_dv(dtype, (d, d_v), shape, heads, variant);
                        if level == "quick" && (c.batch * c.h * c.sq * c.sk * c.d) as f64 > budget {
                            // Same case on a smaller shape keeping `sk - sq` (the mask's diagonal offset).
                            let shrink = c.sq.max(c.sk).saturating_sub(300);
                            let shape = (c.sq.saturating_sub(shrink).max(1), c.sk.saturating_sub(shrink).max(1));
                            c = Case::with_dv(dtype, (d, d_v), shape, heads, variant);
                        }
                        c.backward = backward;
                        out.push(c);
                    }
                }
            }
        }
        if quick {
            out.extend(value_dim_cases(dtype, backward));
        }
    }
    out
}

/// The spec's FP8 row (e4m3 q, k, v with random descales in [0.5, 2], forward only): [`FP8_HEAD_DIMS`] x
/// [`FP8_VARIANTS`] x [`HEADS`] x the spec's shapes in `full` (one in 5 in `medium`); `quick` rotates the head
/// layout and a small shape of the spec's list through every head dim and variant (batch 2).
pub fn fp8_cases() -> Vec<Case> {
    let level = sweep_level();
    let mut out = Vec::new();
    if level == "full" || level == "medium" {
        let stride = if level == "full" { 1 } else { 5 };
        let mut n = 0usize;
        for &d in &FP8_HEAD_DIMS {
            for &shape in &SEQLENS {
                for &heads in &HEADS {
                    for variant in FP8_VARIANTS {
                        n += 1;
                        if n % stride == 0 {
                            out.push(Case::new(DType::E4M3, d, shape, heads, variant));
                        }
                    }
                }
            }
        }
        return out;
    }
    let shapes = [(113, 203), (128, 217), (1, 147), (239, 1), (127, 513), (256, 512)];
    for (di, &d) in FP8_HEAD_DIMS.iter().enumerate() {
        for (vi, variant) in FP8_VARIANTS.into_iter().enumerate() {
            for (hi, &heads) in HEADS.iter().enumerate() {
                let shape = shapes[(di * 5 + vi * 3 + hi) % shapes.len()];
                let mut c = Case::new(DType::E4M3, d, shape, heads, variant);
                c.batch = 2;
                out.push(c);
            }
        }
    }
    out
}

/// The quick sweep's rows for [`VALUE_DIMS`]: each `(d, d_v)` pair with every variant (sink included), the
/// head layout and a small shape of the spec's list rotating (a single query row, a single key, more keys
/// than queries and the reverse), batch 2.
pub fn value_dim_cases(dtype: DType, backward: bool) -> Vec<Case> {
    let shapes = [(113, 203), (128, 217), (1, 147), (239, 1), (127, 513)];
    let mut out = Vec::new();
    for (pi, &dims) in VALUE_DIMS.iter().enumerate() {
        for (vi, variant) in VARIANTS.into_iter().chain([Variant::Sink]).enumerate() {
            let heads = HEADS[(pi + vi) % HEADS.len()];
            let shape = shapes[(pi * 3 + vi) % shapes.len()];
            let mut c = Case::with_dv(dtype, dims, shape, heads, variant);
            c.batch = 2;
            c.backward = backward;
            out.push(c);
        }
    }
    out
}

/// Runs cases one after the other, printing one line per failure.
pub fn run_cases(device: Device, cases: &[Case]) -> Outcome {
    let mut o = Outcome::default();
    for c in cases {
        let (r, t) = check_one(device, c);
        o.timing.add(&t);
        o.record(r);
    }
    o
}

/// Runs one case with a fresh seed; prints a line per failure (and per case with FLASHATTN_VERBOSE).
fn check_one(device: Device, c: &Case) -> (Result<(), String>, Timing) {
    let s = seed();
    let (r, t) = run_case_timed(device, c, s);
    if std::env::var_os("FLASHATTN_VERBOSE").is_some() {
        eprintln!("{:>8.2}s {c:?} [{t}]", t.total());
    }
    let r = match r {
        Ok(v) if v.iter().all(|x| x.pass) => Ok(()),
        Ok(v) => {
            let bad: Vec<String> = v.iter().filter(|x| !x.pass).map(|x| x.to_string()).collect();
            Err(format!("FAIL {c:?} seed {s}: {}", bad.join("; ")))
        }
        Err(e) => Err(format!("ERROR {e}")),
    };
    if let Err(m) = &r {
        eprintln!("{m}");
    }
    (r, t)
}

// ---------------------------------------------------------------------------------------------------------
// Cost model, sharding and the parallel runner of the full sweep.

/// Visible (query, key) pairs of one `(sq, sk)` head under a bottom-right-aligned window (`None` =
/// unbounded side; causal is `(None, Some(0))`).
pub fn visible_pairs(sq: usize, sk: usize, left: Option<usize>, right: Option<usize>) -> f64 {
    let off = sk as i64 - sq as i64;
    let mut n = 0i64;
    for i in 0..sq as i64 {
        let lo = left.map_or(0, |l| (i + off - l as i64).max(0));
        let hi = right.map_or(sk as i64, |r| (i + off + r as i64 + 1).min(sk as i64));
        n += (hi - lo.min(sk as i64)).max(0);
    }
    n as f64
}

/// Projected work of one case: multiply-adds of each step (the products over visible pairs, `d` long)
/// and the visible pairs themselves (exp, rounding, masking per score).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Visible (query, key) pairs over every (sequence, head) (expected value for random variants).
    pub pairs: f64,
    /// Oracle multiply-adds (f64): S, O, and for backward dP, dQ, dK, dV.
    pub oracle: f64,
    /// Baseline multiply-adds (f32; 0 for f32 inputs).
    pub naive: f64,
    /// Backend forward multiply-adds (S, O).
    pub fwd: f64,
    /// Backend backward multiply-adds (the CPU backward recomputes S and dP twice: ~9 products).
    pub bwd: f64,
    /// Input and output elements (drawing, conversion, comparison).
    pub elems: f64,
}

/// Seconds per unit of [`Cost`] on one core, measured with `FLASHATTN_SWEEP_PROFILE=1` (see
/// docs/notes/cpu.md): oracle MAC, baseline MAC, backend forward MAC, backend backward MAC, pair, element.
pub const SECONDS_PER: [f64; 6] = [1.5e-10, 8.0e-11, 1.1e-10, 7.0e-11, 6.0e-8, 1.0e-8];

impl Cost {
    /// Projected single-core seconds, by [`SECONDS_PER`].
    pub fn seconds(&self) -> f64 {
        let w = SECONDS_PER;
        self.oracle * w[0]
            + self.naive * w[1]
            + self.fwd * w[2]
            + self.bwd * w[3]
            + self.pairs * w[4]
            + self.elems * w[5]
    }
}

add_fieldwise!(Cost: pairs, oracle, naive, fwd, bwd, elems);

impl Case {
    /// Expected visible pairs per (sequence, head), following the random draws of [`make_inputs`].
    pub fn expected_pairs(&self) -> f64 {
        let (sq, sk) = (self.sq, self.sk);
        let full = visible_pairs(sq, sk, None, None);
        let causal = visible_pairs(sq, sk, None, Some(0));
        match self.variant {
            Variant::Plain | Variant::Softcap => full,
            Variant::Causal => causal,
            // A third causal, a third a window (about as many pairs as causal: counted so), a third plain.
            Variant::Sink => (full + 2.0 * causal) / 3.0,
            Variant::Alibi => 0.5 * (full + causal),
            Variant::Window => {
                // Each side: unbounded with probability 0.2, else uniform in 0..sk (five quantiles).
                let sides: Vec<(f64, Option<usize>)> = std::iter::once((0.2, None))
                    .chain([0.1, 0.3, 0.5, 0.7, 0.9].iter().map(|u| (0.16, Some((u * sk as f64) as usize))))
                    .collect();
                let mut e = 0.0;
                for &(pl, l) in &sides {
                    for &(pr, r) in &sides {
                        e += pl * pr * visible_pairs(sq, sk, l, r);
                    }
                }
                e
            }
            // Lengths uniform in 0..=sq and 0..=sk (E[lq lk] = sq sk / 4), causal half the time.
            Variant::Varlen => 0.25 * 0.5 * (full + causal),
        }
    }

    /// The projected work of this case.
    pub fn cost(&self) -> Cost {
        let heads = (self.batch * self.h) as f64;
        let pairs = heads * self.expected_pairs();
        // The products run over d (S, dQ, dK) or d_v (O, dP, dV): their mean stands for both.
        let width = (self.d + self.d_v) as f64 / 2.0;
        let mac = pairs * width;
        let (oracle_units, bwd_units) = if self.backward { (6.0, 9.0) } else { (2.0, 0.0) };
        let naive = if self.dtype == DType::F32 { 0.0 } else { oracle_units * mac };
        let rows = (self.batch * (self.sq * self.h + 2 * self.sk * self.hk)) as f64;
        Cost { pairs, oracle: oracle_units * mac, naive, fwd: 2.0 * mac, bwd: bwd_units * mac, elems: rows * width }
    }
}

/// `FLASHATTN_SWEEP_SHARD=i/n` (0-based `i`), if set.
pub fn shard_spec() -> Option<(usize, usize)> {
    let s = std::env::var("FLASHATTN_SWEEP_SHARD").ok()?;
    let (i, n) = s.split_once('/').expect("FLASHATTN_SWEEP_SHARD is i/n");
    let (i, n): (usize, usize) = (i.trim().parse().expect("shard index"), n.trim().parse().expect("shard count"));
    assert!(n > 0 && i < n, "FLASHATTN_SWEEP_SHARD={s}: need 0 <= i < n");
    Some((i, n))
}

/// Splits `cases` into `n` shards of near-equal projected cost (largest case first onto the least loaded
/// shard; deterministic), each listed largest first.
pub fn shards(cases: &[Case], n: usize) -> Vec<Vec<Case>> {
    let mut order: Vec<(f64, usize)> = cases.iter().enumerate().map(|(i, c)| (c.cost().seconds(), i)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut load = vec![0f64; n];
    let mut out = vec![Vec::new(); n];
    for (cost, i) in order {
        let s = (0..n).min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b))).unwrap();
        load[s] += cost;
        out[s].push(cases[i].clone());
    }
    out
}

/// This process's share of `cases` (all of them without FLASHATTN_SWEEP_SHARD), largest first. With
/// FLASHATTN_SWEEP_SAMPLE=k only every k-th case is kept first (a systematic sample, to measure a small
/// part of a sweep and project the whole from it; never for a verdict on the sweep).
pub fn my_shard(cases: &[Case]) -> Vec<Case> {
    let sample: usize = std::env::var("FLASHATTN_SWEEP_SAMPLE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let cases: Vec<Case> =
        cases.iter().enumerate().filter(|(i, _)| i % sample.max(1) == 0).map(|x| x.1.clone()).collect();
    match shard_spec() {
        Some((i, n)) => shards(&cases, n).swap_remove(i),
        None => shards(&cases, 1).swap_remove(0),
    }
}

/// The outcome of a sweep.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Cases that passed.
    pub pass: usize,
    /// Cases that failed (or returned an error).
    pub fail: usize,
    /// One line per failure.
    pub msgs: Vec<String>,
    /// Time per step, summed over the cases.
    pub timing: Timing,
}

impl Outcome {
    /// Counts one case: passed, or failed with its line.
    pub fn record(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.pass += 1,
            Err(m) => {
                self.fail += 1;
                self.msgs.push(m);
            }
        }
    }

    /// Adds the outcome of more cases.
    pub fn add(&mut self, o: Outcome) {
        self.pass += o.pass;
        self.fail += o.fail;
        self.msgs.extend(o.msgs);
        self.timing.add(&o.timing);
    }

    /// `N passed, M failed`.
    pub fn counts(&self) -> String {
        format!("{} passed, {} failed", self.pass, self.fail)
    }

    /// Fails the test with every failure's line when a case failed.
    pub fn assert_passed(&self) {
        assert!(self.fail == 0, "{} failures:\n{}", self.fail, self.msgs.join("\n"));
    }

    /// Says `label: N passed, M failed`, then [`assert_passed`](Self::assert_passed).
    pub fn report(&self, label: &str) {
        say(&format!("{label}: {}", self.counts()));
        self.assert_passed();
    }
}

/// Runs `cases` on a pool of threads (cases in parallel, each also parallel inside), largest first, and
/// prints progress every tenth of the cases with FLASHATTN_PROGRESS.
pub fn run_cases_parallel(device: Device, cases: &[Case]) -> Outcome {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let mut sorted: Vec<&Case> = cases.iter().collect();
    sorted.sort_by(|a, b| b.cost().seconds().total_cmp(&a.cost().seconds()));
    let out = Mutex::new(Outcome::default());
    let done = AtomicUsize::new(0);
    let progress = std::env::var_os("FLASHATTN_PROGRESS").is_some();
    let t0 = std::time::Instant::now();
    let step = (cases.len() / 10).max(1);
    sorted.into_iter().par_bridge().for_each(|c| {
        let (r, t) = check_one(device, c);
        let mut o = out.lock().unwrap();
        o.timing.add(&t);
        o.record(r);
        let (pass, fail) = (o.pass, o.fail);
        drop(o);
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        if progress && (n % step == 0 || n == cases.len()) {
            eprintln!("  {n}/{} cases ({pass} passed, {fail} failed), {:.1}s", cases.len(), t0.elapsed().as_secs_f64());
        }
    });
    out.into_inner().unwrap()
}

/// Whether FLASHATTN_SWEEP_PLAN is set: print the plan (case counts, projected work) and run nothing.
pub fn plan_only() -> bool {
    std::env::var_os("FLASHATTN_SWEEP_PLAN").is_some_and(|v| v != "0")
}

/// Prints the plan of a sweep: case count, projected multiply-adds per step, projected core-seconds, and
/// the per-shard projection for FLASHATTN_SWEEP_SHARD's `n` (or 16).
pub fn print_plan(name: &str, cases: &[Case]) {
    let mut total = Cost::default();
    for c in cases {
        total.add(&c.cost());
    }
    let n = shard_spec().map_or(16, |s| s.1);
    let loads: Vec<f64> = shards(cases, n).iter().map(|s| s.iter().map(|c| c.cost().seconds()).sum()).collect();
    let max = loads.iter().cloned().fold(0.0, f64::max);
    let min = loads.iter().cloned().fold(f64::INFINITY, f64::min);
    let biggest = cases.iter().map(|c| c.cost().seconds()).fold(0.0, f64::max);
    println!(
        "plan {name}: {} cases; MAC oracle {:.3e} naive {:.3e} fwd {:.3e} bwd {:.3e}; pairs {:.3e}; elems {:.3e}; \
         projected {:.0} core-s; {n} shards: {:.0}..{:.0} core-s each; largest case {:.1} core-s",
        cases.len(),
        total.oracle,
        total.naive,
        total.fwd,
        total.bwd,
        total.pairs,
        total.elems,
        total.seconds(),
        min,
        max,
        biggest
    );
}
