//! The spec's sweep as data, and one test body that runs a case on any device against the f64 oracle.
#![allow(dead_code)]

use flashattn::accuracy::{compare, compare_lse, o_factor, Verdict, GRAD_FACTOR};
use flashattn::problem::validate;
use flashattn::reference::{backward_f64, forward_f64, naive_backward, naive_forward};
use flashattn::{AttnOptions, DType, Device, Tensor, VarLen};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

pub type Rng64 = rand::rngs::StdRng;

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

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    Plain,
    Causal,
    Window,
    Alibi,
    Softcap,
    Varlen,
}

pub const VARIANTS: [Variant; 6] =
    [Variant::Plain, Variant::Causal, Variant::Window, Variant::Alibi, Variant::Softcap, Variant::Varlen];

#[derive(Debug, Clone)]
pub struct Case {
    pub dtype: DType,
    pub d: usize,
    pub sq: usize,
    pub sk: usize,
    pub h: usize,
    pub hk: usize,
    pub batch: usize,
    pub variant: Variant,
    pub backward: bool,
}

impl Case {
    pub fn new(dtype: DType, d: usize, (sq, sk): (usize, usize), (h, hk): (usize, usize), variant: Variant) -> Self {
        let batch = if sq * sk >= 1024 * 1023 { 2 } else { 4 };
        Case { dtype, d, sq, sk, h, hk, batch, variant, backward: false }
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
    let mut opts = AttnOptions::default();
    let q_scale = if c.variant == Variant::Softcap { 8.0 } else { 1.0 };
    let (qs, ks) = if c.variant == Variant::Varlen {
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
        (vec![tq, c.h, c.d], vec![tk, c.hk, c.d])
    } else {
        (vec![c.batch, c.sq, c.h, c.d], vec![c.batch, c.sk, c.hk, c.d])
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
        _ => {}
    }
    let q = randn_tensor(rng, &qs, c.dtype, q_scale);
    let k = randn_tensor(rng, &ks, c.dtype, 1.0);
    let v = randn_tensor(rng, &ks, c.dtype, 1.0);
    let dout = randn_tensor(rng, &qs, c.dtype, 1.0);
    Inputs { q, k, v, dout, opts }
}

/// Runs one case on `device` and returns every verdict (o, lse, and dq/dk/dv when `c.backward`).
pub fn run_case(device: Device, c: &Case, seed: u64) -> Result<Vec<Verdict>, String> {
    let mut rng = rng(seed);
    let inp = make_inputs(c, &mut rng);
    let ctx = |e: flashattn::Error| format!("{c:?} seed {seed}: {e}");
    let p = validate(&inp.q.view(), &inp.k.view(), &inp.v.view(), &inp.opts).map_err(ctx)?;
    let (qd, kd, vd) = (inp.q.view().data, inp.k.view().data, inp.v.view().data);
    let reference = forward_f64(&p, qd, kd, vd);
    let (base_o, _) = naive_forward(&p, qd, kd, vd);
    let out = match device {
        Device::Cpu => {
            // Poisoned outputs: an element the backend forgets to write fails the comparison.
            let mut o = Tensor::nan(&p.o_shape(), p.dtype);
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
    let factor = o_factor(inp.opts.softcap > 0.0, inp.opts.alibi_slopes.is_some());
    let mut verdicts = vec![
        compare("o", &out.o.to_f32_vec(), &reference.o, &base_o.to_f32_vec(), c.dtype, factor),
        compare_lse(&out.lse.to_f32_vec(), &reference.lse),
    ];
    if c.backward {
        let do_map = p.q_like_map(inp.dout.layout());
        let g_ref = backward_f64(&p, qd, kd, vd, inp.dout.view().data, &do_map);
        let g_base = naive_backward(&p, qd, kd, vd, inp.dout.view().data, &do_map);
        let g = match device {
            Device::Cpu => {
                let mut dq = Tensor::nan(inp.q.shape(), c.dtype);
                let mut dk = Tensor::nan(inp.k.shape(), c.dtype);
                let mut dv = Tensor::nan(inp.v.shape(), c.dtype);
                flashattn::backward_into(
                    &inp.q.view(),
                    &inp.k.view(),
                    &inp.v.view(),
                    &out.o.view(),
                    &out.lse.view(),
                    &inp.dout.view(),
                    &mut dq.view_mut(),
                    &mut dk.view_mut(),
                    &mut dv.view_mut(),
                    &inp.opts,
                )
                .map_err(ctx)?;
                flashattn::Gradients { dq, dk, dv }
            }
            dev => flashattn::backward_on(dev, &inp.q, &inp.k, &inp.v, &out.o, &out.lse, &inp.dout, &inp.opts)
                .map_err(ctx)?,
        };
        verdicts.push(compare("dq", &g.dq.to_f32_vec(), &g_ref.dq, &g_base.dq, c.dtype, GRAD_FACTOR));
        verdicts.push(compare("dk", &g.dk.to_f32_vec(), &g_ref.dk, &g_base.dk, c.dtype, GRAD_FACTOR));
        verdicts.push(compare("dv", &g.dv.to_f32_vec(), &g_ref.dv, &g_base.dv, c.dtype, GRAD_FACTOR));
    }
    Ok(verdicts)
}

/// Which sweep to run: `quick` (CI default), `full` (the spec's whole sweep), from FLASHATTN_SWEEP.
pub fn sweep_level() -> String {
    std::env::var("FLASHATTN_SWEEP").unwrap_or_else(|_| "quick".into())
}

/// The cases of the sweep for `dtypes`.
/// - `full`: the whole cross product of the spec (hours of CPU time on a small machine).
/// - `medium`: one combination in 7, rotating, every shape included.
/// - `quick` (CI): one in 61, rotating so every head dim, shape, head layout and variant appears; cases whose
///   work (`batch * h * sq * sk * d`) exceeds a budget are swapped for the same case at a smaller shape, so the
///   whole CPU suite runs in minutes on two cores.
pub fn cases(dtypes: &[DType], backward: bool) -> Vec<Case> {
    let level = sweep_level();
    let stride = match level.as_str() {
        "full" => 1,
        "medium" => 7,
        _ => 61,
    };
    let budget = if backward { 4e8 } else { 2e9 };
    let mut out = Vec::new();
    let mut n = 0usize;
    for &dtype in dtypes {
        for &d in &HEAD_DIMS {
            for &shape in &SEQLENS {
                for &heads in &HEADS {
                    for &variant in &VARIANTS {
                        n += 1;
                        // Quick: one case in 61 (prime, so every dim/shape/head/variant rotates through).
                        if n % stride != 0 {
                            continue;
                        }
                        let mut c = Case::new(dtype, d, shape, heads, variant);
                        if level == "quick" && (c.batch * c.h * c.sq * c.sk * c.d) as f64 > budget {
                            // Same case on a smaller shape keeping `sk - sq` (the mask's diagonal offset).
                            let shrink = c.sq.max(c.sk).saturating_sub(300);
                            let shape = (c.sq.saturating_sub(shrink).max(1), c.sk.saturating_sub(shrink).max(1));
                            c = Case::new(dtype, d, shape, heads, variant);
                        }
                        c.backward = backward;
                        out.push(c);
                    }
                }
            }
        }
    }
    out
}

/// Runs cases, printing one line per failure; returns (passed, failed, failures).
pub fn run_cases(device: Device, cases: &[Case]) -> (usize, usize, Vec<String>) {
    let (mut pass, mut fail, mut msgs) = (0, 0, Vec::new());
    let verbose = std::env::var_os("FLASHATTN_VERBOSE").is_some();
    for c in cases {
        let s = seed();
        let t0 = std::time::Instant::now();
        let r = run_case(device, c, s);
        if verbose {
            eprintln!("{:>8.2}s {c:?}", t0.elapsed().as_secs_f64());
        }
        match r {
            Ok(v) if v.iter().all(|x| x.pass) => pass += 1,
            Ok(v) => {
                fail += 1;
                let bad: Vec<String> = v.iter().filter(|x| !x.pass).map(|x| x.to_string()).collect();
                let m = format!("FAIL {c:?} seed {s}: {}", bad.join("; "));
                eprintln!("{m}");
                msgs.push(m);
            }
            Err(e) => {
                fail += 1;
                eprintln!("ERROR {e}");
                msgs.push(e);
            }
        }
    }
    (pass, fail, msgs)
}
