//! Ring attention on host tensors: each rank's part of the forward and backward ([`rank_forward`],
//! [`rank_backward`]), generic over the [`Transport`], and [`ring_forward`]/[`ring_backward`], which shard
//! whole tensors, run every rank in a thread of this process over [`ChannelTransport`]s and put the results
//! back together (simulated ranks: what the tests compare with the single-device result).
//!
//! Per step, every non-skipped (query chunk, key chunk) pair runs the CPU flash kernels on strided views of
//! the shards (no copy), with the pair's local mask from [`PairMask`]: the forward writes a partial `o` in
//! `f32` and its `lse`, merged into the rank's running result with [`merge_into`]; the backward uses the
//! global `o`, `lse` (so `P_ij = exp(s_ij - lse_i)` is the global probability) and `D = rowsum(dO ∘ O)` from
//! the global `o`, so each pair's dQ, dK, dV are exact partial sums. dQ accumulates at home; dK, dV
//! accumulate while travelling round the ring behind the K/V shard and arrive home after `N` hops.

use super::merge::merge_into;
use super::schedule::{LocalPair, PairMask, RingSchedule};
use super::transport::{channel_ring, ChannelTransport, Transport, PEER_GONE};
use crate::api::{BackwardInputs, ForwardOutput, Gradients};
use crate::cpu::flash::{self, BwdIn, BwdOut, FwdOut, Qkv};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::AttnOptions;
use crate::problem::{check_backward_inputs, validate, Problem};
use crate::semantics::Mask;
use crate::tensor::{CpuSliceMut, Layout, Tensor, TensorView};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// A rank's K/V shard, as it travels round the ring.
#[derive(Debug, Clone)]
pub struct KvShard {
    /// Keys, `[b, rows, hk, d]`.
    pub k: Tensor,
    /// Values, `[b, rows, hk, d]`.
    pub v: Tensor,
}

/// The dK/dV accumulated so far for one rank's K/V shard (`f32`, `[b, rows, hk, d]` row-major).
#[derive(Debug, Clone)]
pub struct DkvShard {
    /// dL/dk.
    pub dk: Vec<f32>,
    /// dL/dv.
    pub dv: Vec<f32>,
}

/// What one rank did in a ring call.
#[derive(Debug, Clone, PartialEq)]
pub struct RankStats {
    /// The rank.
    pub rank: usize,
    /// Chunk pairs computed (skipped ones not counted).
    pub pairs: usize,
    /// Visible (query, key) pairs computed, per sequence and head: the rank's share of the work.
    pub visible: u64,
    /// Seconds spent computing.
    pub compute_s: f64,
    /// Seconds spent waiting for blocks from the previous rank (not hidden behind compute).
    pub wait_s: f64,
}

impl RankStats {
    /// Nothing done yet by rank `rank`.
    pub fn new(rank: usize) -> Self {
        RankStats { rank, pairs: 0, visible: 0, compute_s: 0.0, wait_s: 0.0 }
    }
}

/// The result of [`ring_forward`]: the forward output, as the single-device call returns it, and what each
/// rank did.
#[derive(Debug, Clone)]
pub struct RingForward {
    /// Output and log-sum-exp of the whole sequence.
    pub out: ForwardOutput,
    /// One entry per rank.
    pub stats: Vec<RankStats>,
}

/// The result of [`ring_backward`].
#[derive(Debug, Clone)]
pub struct RingBackward {
    /// Gradients of the whole sequence.
    pub grads: Gradients,
    /// One entry per rank.
    pub stats: Vec<RankStats>,
}

/// The subset of [`AttnOptions`] ring attention supports: causal or not, a softmax scale, soft-capping.
/// ALiBi, sliding windows and varlen batches are refused with [`Error::Unsupported`] (their position
/// arithmetic across chunks is not implemented), and so is a learnable sink (it must join each row's
/// denominator once, not once per block pair).
pub(super) fn ring_mask(opts: &AttnOptions) -> Result<bool> {
    let unsupported = |what: &str| Error::Unsupported { backend: "ring", what: what.to_string() };
    if opts.alibi_slopes.is_some() {
        return Err(unsupported("ALiBi"));
    }
    if opts.varlen.is_some() {
        return Err(unsupported("varlen batches"));
    }
    if opts.sink.is_some() {
        return Err(unsupported("a learnable sink"));
    }
    match Mask::new(opts.causal, opts.window)? {
        Mask::NONE => Ok(false),
        Mask::CAUSAL => Ok(true),
        m => Err(unsupported(&format!("sliding window {m:?} (only causal or no mask)"))),
    }
}

fn dims(arg: &'static str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [b, s, h, d] => Ok([b, s, h, d]),
        ref s => Err(Error::invalid(arg, "rank 4 [b, seqlen, heads, d]", format!("shape {s:?}"))),
    }
}

/// A view of rows `rows` (dimension 1) of a `[b, s, heads, d]` tensor.
fn seq_view<'a>(t: &'a Tensor, rows: Range<usize>) -> Result<TensorView<'a>> {
    let mut layout = t.layout().clone();
    layout.offset += rows.start * layout.strides[1];
    layout.shape[1] = rows.len();
    TensorView::new(t.view().data, layout)
}

/// The options of one chunk pair's local call.
pub(super) fn local_opts(scale: f32, softcap: f32, mask: PairMask) -> AttnOptions {
    let right = match mask {
        PairMask::Partial { right, .. } => right as i64,
        _ => -1,
    };
    AttnOptions { softmax_scale: Some(scale), softcap, window: (-1, right), ..AttnOptions::default() }
}

/// `[b, h, n]` (lse layout) -> `[b, n, h]` (row order of `o`).
fn lse_to_rows(lse: &[f32], b: usize, h: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; lse.len()];
    for bi in 0..b {
        for hh in 0..h {
            for i in 0..n {
                out[(bi * n + i) * h + hh] = lse[(bi * h + hh) * n + i];
            }
        }
    }
    out
}

/// Refuses a value head dim `d_v` other than `d` with [`Error::Unsupported`]: the ring's shards, block
/// exchanges and merges are written for one head dim.
pub(super) fn same_value_dim(d: usize, d_v: usize) -> Result<()> {
    if d_v != d {
        return Err(Error::Unsupported {
            backend: "ring",
            what: format!("a value head dim d_v = {d_v} different from the query/key head dim d = {d}"),
        });
    }
    Ok(())
}

/// The checks every rank makes of its shards; returns `(b, h, hk, d)`.
fn check_shards(s: &RingSchedule, rank: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[usize; 4]> {
    if rank >= s.ranks() {
        return Err(Error::invalid("rank", format!("a rank below {}", s.ranks()), rank));
    }
    let [b, lq, h, d] = dims("q", q)?;
    let [bk, lk, hk, dk] = dims("k", k)?;
    if lq != s.q.rank_len(rank) {
        return Err(Error::invalid("q", format!("{} rows (rank {rank}'s shard)", s.q.rank_len(rank)), lq));
    }
    if lk != s.k.rank_len(rank) || bk != b || dk != d {
        return Err(Error::invalid(
            "k",
            format!("shape [{b}, {}, hk, {d}] (rank {rank}'s shard)", s.k.rank_len(rank)),
            format!("{:?}", k.shape()),
        ));
    }
    if v.shape().len() == 4 && v.shape()[..3] == k.shape()[..3] {
        same_value_dim(d, v.shape()[3])?;
    }
    if v.shape() != k.shape() {
        return Err(Error::invalid("v", format!("shape {:?} (as k)", k.shape()), format!("{:?}", v.shape())));
    }
    // Dtypes, head counts, head dim: checked as the whole problem would be.
    validate(&q.view(), &k.view(), &v.view(), &AttnOptions::default())?;
    Ok([b, h, hk, d])
}

/// What every rank checks first: the options' mask matches the schedule's, the shards fit it; returns
/// `[b, h, hk, d]` and the softmax scale and soft-cap.
fn rank_setup(
    sched: &RingSchedule,
    rank: usize,
    [q, k, v]: [&Tensor; 3],
    opts: &AttnOptions,
) -> Result<([usize; 4], f32, f32)> {
    let causal = ring_mask(opts)?;
    if causal != sched.causal {
        return Err(Error::invalid("opts", format!("causal = {} (as the schedule)", sched.causal), causal));
    }
    let dims = check_shards(sched, rank, q, k, v)?;
    let (scale, softcap) = scale_and_cap(q, k, v, opts)?;
    Ok((dims, scale, softcap))
}

/// Most simulated ranks [`ring_forward`] and [`ring_backward`] run: each rank is an OS thread that must run
/// alongside the others (they exchange blocks through channels), so the count is bounded.
pub const MAX_SIMULATED_RANKS: usize = 256;

/// The whole-tensor entry points' common start: the ring's mask, the problem, `extra` checks on it, the
/// schedule of `ranks` ranks.
pub(super) fn ring_plan(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
    ranks: usize,
    extra: impl FnOnce(&Problem) -> Result<()>,
) -> Result<(Problem, RingSchedule)> {
    if ranks > MAX_SIMULATED_RANKS {
        return Err(Error::invalid(
            "ranks",
            format!("at most {MAX_SIMULATED_RANKS} simulated ranks (one thread each)"),
            ranks,
        ));
    }
    let causal = ring_mask(opts)?;
    let p = validate(&q.view(), &k.view(), &v.view(), opts)?;
    same_value_dim(p.d, p.d_v)?;
    refuse_fp8(&p)?;
    extra(&p)?;
    let sched = RingSchedule::new(ranks, p.dense_sq, k.shape()[1], causal)?;
    Ok((p, sched))
}

/// The backward's common start: [`ring_plan`] with `extra` checks, then the checks of `o`, `lse`, `dout`;
/// returns the problem, the schedule and every input's shards (one per rank).
pub(super) fn ring_plan_backward(
    x: &BackwardInputs<&Tensor>,
    opts: &AttnOptions,
    ranks: usize,
    extra: impl FnOnce(&Problem) -> Result<()>,
) -> Result<(Problem, RingSchedule, BackwardInputs<Vec<Tensor>>)> {
    let (p, sched) = ring_plan(x.q, x.k, x.v, opts, ranks, |p| {
        extra(p)?;
        check_backward_inputs(p, &x.o.view(), &x.lse.view(), &x.dout.view())
    })?;
    let shards = BackwardInputs {
        q: sched.q.shard(x.q, 1)?,
        k: sched.k.shard(x.k, 1)?,
        v: sched.k.shard(x.v, 1)?,
        o: sched.q.shard(x.o, 1)?,
        lse: sched.q.shard(x.lse, 2)?,
        dout: sched.q.shard(x.dout, 1)?,
    };
    Ok((p, sched, shards))
}

/// The global problem's scale (default `1/sqrt(d)`) and soft-capping, validated.
fn scale_and_cap(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<(f32, f32)> {
    let mut o = opts.clone();
    o.causal = false;
    o.window = (-1, -1);
    let p: Problem = validate(&q.view(), &k.view(), &v.view(), &o)?;
    refuse_fp8(&p)?;
    Ok((p.scale, p.softcap))
}

/// Ring attention does not take FP8 inputs (the single-device forward does).
fn refuse_fp8(p: &Problem) -> Result<()> {
    if p.is_fp8() {
        return Err(Error::Unsupported {
            backend: "ring",
            what: format!("FP8 inputs (dtype {}): use the single-device forward", p.dtype),
        });
    }
    // The ring's output has the inputs' dtype (its partial outputs are merged in f32 and rounded once).
    if p.out_dtype != p.dtype {
        return Err(Error::Unsupported {
            backend: "ring",
            what: format!("out_dtype {} (the ring's output has the inputs' dtype, {})", p.out_dtype, p.dtype),
        });
    }
    Ok(())
}

/// Rank `rank`'s part of the ring forward. `q` is its query shard (`[b, rows, h, d]`, zig-zag rows of
/// [`RingSchedule::q`]), `k`, `v` its K/V shard. Returns its rows of `o` (`[b, rows, h, d]`) and `lse`
/// (`[b, h, rows]`), equal to those rows of the single-device forward.
pub fn rank_forward<T: Transport<Arc<KvShard>>>(
    sched: &RingSchedule,
    rank: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
    transport: &mut T,
) -> Result<(ForwardOutput, RankStats)> {
    let ([b, h, _hk, d], scale, softcap) = rank_setup(sched, rank, [q, k, v], opts)?;
    let n = sched.ranks();
    let q_rows = sched.q.rank_rows(rank);
    let q_local = [0..q_rows[0].len(), q_rows[0].len()..q_rows[0].len() + q_rows[1].len()];
    // Running results per query chunk: o `[b, cq, h, d]`, lse in the same row order.
    let mut acc: Vec<(Vec<f32>, Vec<f32>)> =
        q_local.iter().map(|r| (vec![0f32; b * r.len() * h * d], vec![f32::NEG_INFINITY; b * r.len() * h])).collect();
    let mut stats = RankStats::new(rank);
    let mut kv = Arc::new(KvShard { k: k.clone(), v: v.clone() });
    for step in 0..n {
        if step + 1 < n {
            transport.start(Arc::clone(&kv))?; // overlaps the compute below
        }
        let t0 = Instant::now();
        for (w, LocalPair { q_slot: qi, q: qr, k: kr }) in sched.pairs(rank, step)? {
            let (po, pl) = partial_forward(q, qr.clone(), &kv, kr, local_opts(scale, softcap, w.mask))?;
            let (o, l) = &mut acc[qi];
            merge_into(o, l, &po, &lse_to_rows(&pl, b, h, qr.len()), d)?;
            stats.pairs += 1;
            stats.visible += w.mask.visible(qr.len(), sched.k.chunk(w.kv_chunk).len());
        }
        stats.compute_s += t0.elapsed().as_secs_f64();
        if step + 1 < n {
            let t1 = Instant::now();
            kv = transport.finish()?;
            stats.wait_s += t1.elapsed().as_secs_f64();
        }
    }
    let lq = q_local[1].end;
    // NaN-filled: a row the assembly missed would fail every comparison.
    let mut o = vec![f32::NAN; b * lq * h * d];
    let mut lse = vec![f32::NAN; b * h * lq];
    for (qr, (ao, al)) in q_local.iter().zip(&acc) {
        let cq = qr.len();
        for bi in 0..b {
            for i in 0..cq {
                let src = (bi * cq + i) * h * d;
                let dst = (bi * lq + qr.start + i) * h * d;
                o[dst..dst + h * d].copy_from_slice(&ao[src..src + h * d]);
                for hh in 0..h {
                    lse[(bi * h + hh) * lq + qr.start + i] = al[(bi * cq + i) * h + hh];
                }
            }
        }
    }
    let out = ForwardOutput {
        o: Tensor::from_f32(&o, &[b, lq, h, d], q.dtype())?,
        lse: Tensor::from_f32(&lse, &[b, h, lq], DType::F32)?,
    };
    Ok((out, stats))
}

/// One chunk pair's forward: `o` in `f32` `[b, cq, h, d]` and `lse` `[b, h, cq]`.
fn partial_forward(
    q: &Tensor,
    qr: Range<usize>,
    kv: &KvShard,
    kr: Range<usize>,
    opts: AttnOptions,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (qv, kv_, vv) = (seq_view(q, qr)?, seq_view(&kv.k, kr.clone())?, seq_view(&kv.v, kr)?);
    let p = validate(&qv, &kv_, &vv, &opts)?;
    // Poisoned: the kernels must write every element.
    let mut o = vec![f32::NAN; p.total_q * p.h * p.d];
    let mut lse = vec![f32::NAN; p.total_q * p.h];
    let o_map = p.q_like_map(&Layout::contiguous(&p.o_shape()));
    let out = FwdOut { o: CpuSliceMut::F32(&mut o).raw(), o_map: &o_map, lse: CpuSliceMut::F32(&mut lse).raw() };
    flash::forward(&p, Qkv { q: qv.data, k: kv_.data, v: vv.data }, &out);
    Ok((o, lse))
}

/// Rank `rank`'s part of the ring backward. `x.q`, `x.o`, `x.dout` are its query-side shards (`[b, rows, h, d]`),
/// `x.lse` its `[b, h, rows]` shard of the global log-sum-exp, `x.k`, `x.v` its K/V shard. K/V travel over
/// `kv_transport` (overlapping the compute), the accumulated dK/dV of each shard over `grad_transport`.
/// Returns this rank's rows of dq, dk, dv.
pub fn rank_backward<T: Transport<Arc<KvShard>>, G: Transport<DkvShard>>(
    sched: &RingSchedule,
    rank: usize,
    x: &BackwardInputs<&Tensor>,
    opts: &AttnOptions,
    kv_transport: &mut T,
    grad_transport: &mut G,
) -> Result<(Gradients, RankStats)> {
    let &BackwardInputs { q, k, v, o, lse, dout } = x;
    let ([b, h, hk, d], scale, softcap) = rank_setup(sched, rank, [q, k, v], opts)?;
    let p = validate(&q.view(), &k.view(), &v.view(), &AttnOptions::default())?;
    check_backward_inputs(&p, &o.view(), &lse.view(), &dout.view())?;
    let n = sched.ranks();
    let lq = q.shape()[1];
    let q_rows = sched.q.rank_rows(rank);
    let q_local = [0..q_rows[0].len(), q_rows[0].len()..lq];
    // D = rowsum(dO ∘ O) of the global output, and lse, per query chunk in the chunk's `[b, h, cq]` layout.
    let (of, gf, lf) = (o.to_f32_vec(), dout.to_f32_vec(), lse.to_f32_vec());
    let per_chunk: Vec<(Vec<f32>, Vec<f32>)> = q_local
        .iter()
        .map(|qr| {
            let cq = qr.len();
            let mut l = vec![0f32; b * h * cq];
            let mut dl = vec![0f32; b * h * cq];
            for bi in 0..b {
                for hh in 0..h {
                    for i in 0..cq {
                        let row = ((bi * lq + qr.start + i) * h + hh) * d;
                        let x: f32 = of[row..row + d].iter().zip(&gf[row..row + d]).map(|(a, g)| a * g).sum();
                        dl[(bi * h + hh) * cq + i] = x;
                        l[(bi * h + hh) * cq + i] = lf[(bi * h + hh) * lq + qr.start + i];
                    }
                }
            }
            (l, dl)
        })
        .collect();
    let mut dq_acc: Vec<Vec<f32>> = q_local.iter().map(|r| vec![0f32; b * r.len() * h * d]).collect();
    let mut stats = RankStats::new(rank);
    let mut kv = Arc::new(KvShard { k: k.clone(), v: v.clone() });
    for step in 0..n {
        if step + 1 < n {
            kv_transport.start(Arc::clone(&kv))?;
        }
        let src = sched.source(rank, step);
        let lk = sched.k.rank_len(src);
        let mut dkv = DkvShard { dk: vec![0f32; b * lk * hk * d], dv: vec![0f32; b * lk * hk * d] };
        let t0 = Instant::now();
        for (w, LocalPair { q_slot: qi, q: qr, k: kr }) in sched.pairs(rank, step)? {
            let (l, dl) = &per_chunk[qi];
            let part = PartialBwd { q, dout, qr: qr.clone(), kv: &kv, kr: kr.clone(), lse: l, delta: dl };
            let (dq, dk, dv) = partial_backward(&part, local_opts(scale, softcap, w.mask))?;
            dq_acc[qi].iter_mut().zip(&dq).for_each(|(a, x)| *a += x);
            let nk = kr.len();
            for bi in 0..b {
                let dst = (bi * lk + kr.start) * hk * d;
                let src = bi * nk * hk * d;
                let len = nk * hk * d;
                dkv.dk[dst..dst + len].iter_mut().zip(&dk[src..src + len]).for_each(|(a, x)| *a += x);
                dkv.dv[dst..dst + len].iter_mut().zip(&dv[src..src + len]).for_each(|(a, x)| *a += x);
            }
            stats.pairs += 1;
            stats.visible += w.mask.visible(qr.len(), sched.k.chunk(w.kv_chunk).len());
        }
        stats.compute_s += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if step > 0 {
            // What the ranks before us added to this shard's dK/dV.
            let before = grad_transport.finish()?;
            if before.dk.len() != dkv.dk.len() || before.dv.len() != dkv.dv.len() {
                return Err(Error::Device(format!("ring rank {rank}: a dK/dV block of the wrong size arrived")));
            }
            dkv.dk.iter_mut().zip(&before.dk).for_each(|(a, x)| *a += x);
            dkv.dv.iter_mut().zip(&before.dv).for_each(|(a, x)| *a += x);
        }
        grad_transport.start(dkv)?; // the last hop takes each shard's dK/dV home
        if step + 1 < n {
            kv = kv_transport.finish()?;
        }
        stats.wait_s += t1.elapsed().as_secs_f64();
    }
    let t1 = Instant::now();
    let home = grad_transport.finish()?;
    stats.wait_s += t1.elapsed().as_secs_f64();
    let lk = k.shape()[1];
    if home.dk.len() != b * lk * hk * d || home.dv.len() != home.dk.len() {
        return Err(Error::Device(format!("ring rank {rank}: its dK/dV came home with the wrong size")));
    }
    let mut dq = vec![f32::NAN; b * lq * h * d];
    for (qr, acc) in q_local.iter().zip(&dq_acc) {
        let cq = qr.len();
        for bi in 0..b {
            let dst = (bi * lq + qr.start) * h * d;
            let src = bi * cq * h * d;
            dq[dst..dst + cq * h * d].copy_from_slice(&acc[src..src + cq * h * d]);
        }
    }
    let grads = Gradients {
        dq: Tensor::from_f32(&dq, q.shape(), q.dtype())?,
        dk: Tensor::from_f32(&home.dk, k.shape(), k.dtype())?,
        dv: Tensor::from_f32(&home.dv, v.shape(), v.dtype())?,
        dsink: None,
    };
    Ok((grads, stats))
}

/// One chunk pair of the backward.
struct PartialBwd<'a> {
    q: &'a Tensor,
    dout: &'a Tensor,
    qr: Range<usize>,
    kv: &'a KvShard,
    kr: Range<usize>,
    /// Global lse of the query chunk, `[b, h, cq]`.
    lse: &'a [f32],
    /// Global `D` of the query chunk, `[b, h, cq]`.
    delta: &'a [f32],
}

/// One chunk pair's backward: dq `[b, cq, h, d]`, dk and dv `[b, nk, hk, d]`, all `f32`.
fn partial_backward(x: &PartialBwd<'_>, opts: AttnOptions) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let qv = seq_view(x.q, x.qr.clone())?;
    let gv = seq_view(x.dout, x.qr.clone())?;
    let (kv, vv) = (seq_view(&x.kv.k, x.kr.clone())?, seq_view(&x.kv.v, x.kr.clone())?);
    let p = validate(&qv, &kv, &vv, &opts)?;
    let do_map = p.q_like_map(&gv.layout);
    let inp = BwdIn { dout: gv.data, do_map: &do_map, lse: x.lse, delta: Some(x.delta), whole_rows: false };
    // Poisoned: the kernels must write every element.
    let mut dq = vec![f32::NAN; p.total_q * p.h * p.d];
    let mut dk = vec![f32::NAN; p.total_k * p.hk * p.d];
    let mut dv = vec![f32::NAN; p.total_k * p.hk * p.d];
    let dq_map = p.q_like_map(&Layout::contiguous(&p.q_shape()));
    let k_shape = [p.batch, p.total_k / p.batch.max(1), p.hk, p.d];
    let dk_map = p.k_like_map(&Layout::contiguous(&k_shape));
    let out = BwdOut {
        dq: CpuSliceMut::F32(&mut dq).raw(),
        dq_map: &dq_map,
        dk: CpuSliceMut::F32(&mut dk).raw(),
        dk_map: &dk_map,
        dv: CpuSliceMut::F32(&mut dv).raw(),
        dv_map: &dk_map,
    };
    let _delta = flash::backward(&p, Qkv { q: qv.data, k: kv.data, v: vv.data }, &inp, &out);
    Ok((dq, dk, dv))
}

/// The first error of a failed ring: a rank's own error rather than its neighbours' "peer stopped" echoes.
fn root_cause(errs: Vec<Error>) -> Error {
    let echo = |e: &Error| matches!(e, Error::Device(m) if m.starts_with(PEER_GONE));
    let i = errs.iter().position(|e| !echo(e)).unwrap_or(0);
    errs.into_iter().nth(i).unwrap_or_else(|| Error::Device("ring: no rank ran".into()))
}

/// Runs `f(rank, transports...)` on `ranks` threads and collects the per-rank results in rank order.
fn run_ranks<R: Send, F>(ranks: usize, f: F) -> Result<Vec<R>>
where
    F: Fn(usize, &mut ChannelTransport<Arc<KvShard>>, &mut ChannelTransport<DkvShard>) -> Result<R> + Sync,
{
    let kv = channel_ring::<Arc<KvShard>>(ranks)?;
    let grads = channel_ring::<DkvShard>(ranks)?;
    let results: Vec<Result<R>> = std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = kv
            .into_iter()
            .zip(grads)
            .enumerate()
            .map(|(r, (mut tk, mut tg))| s.spawn(move || f(r, &mut tk, &mut tg)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(Error::Device(format!("ring rank {r} panicked")))))
            .collect()
    });
    let mut ok = Vec::with_capacity(ranks);
    let mut errs = Vec::new();
    for r in results {
        match r {
            Ok(x) => ok.push(x),
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() {
        Ok(ok)
    } else {
        Err(root_cause(errs))
    }
}

/// Ring attention forward of whole host tensors over `ranks` simulated ranks (threads of this process,
/// blocks passed through channels): zig-zag shards q, k, v, runs [`rank_forward`] on every rank, and puts
/// `o` and `lse` back in sequence order. The result equals [`crate::forward`]'s up to floating-point
/// rounding (the partial results merge in `f32`).
///
/// `q`: `[b, sq, h, d]`, `k`/`v`: `[b, sk, hk, d]`; options as for [`crate::forward`], restricted to no
/// mask or causal (bottom-right aligned), any scale, soft-capping.
pub fn ring_forward(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions, ranks: usize) -> Result<RingForward> {
    let (_, sched) = ring_plan(q, k, v, opts, ranks, |_| Ok(()))?;
    let (qs, ks, vs) = (sched.q.shard(q, 1)?, sched.k.shard(k, 1)?, sched.k.shard(v, 1)?);
    let per_rank = run_ranks(ranks, |r, tk, _| rank_forward(&sched, r, &qs[r], &ks[r], &vs[r], opts, tk))?;
    let (outs, stats): (Vec<ForwardOutput>, Vec<RankStats>) = per_rank.into_iter().unzip();
    let o = sched.q.unshard(&outs.iter().map(|x| x.o.clone()).collect::<Vec<_>>(), 1)?;
    let lse = sched.q.unshard(&outs.into_iter().map(|x| x.lse).collect::<Vec<_>>(), 2)?;
    Ok(RingForward { out: ForwardOutput { o, lse }, stats })
}

/// Ring attention backward of whole host tensors over `ranks` simulated ranks: gradients of q, k, v given
/// the forward's `o` and `lse` and the upstream gradient `dout`, equal to [`crate::backward`]'s up to
/// floating-point rounding. Options as for [`ring_forward`].
pub fn ring_backward(x: &BackwardInputs<&Tensor>, opts: &AttnOptions, ranks: usize) -> Result<RingBackward> {
    let (_, sched, shards) = ring_plan_backward(x, opts, ranks, |_| Ok(()))?;
    let per_rank = run_ranks(ranks, |r, tk, tg| rank_backward(&sched, r, &shards.map(|s| &s[r]), opts, tk, tg))?;
    let (grads, stats): (Vec<Gradients>, Vec<RankStats>) = per_rank.into_iter().unzip();
    let dq = sched.q.unshard(&grads.iter().map(|g| g.dq.clone()).collect::<Vec<_>>(), 1)?;
    let dk = sched.k.unshard(&grads.iter().map(|g| g.dk.clone()).collect::<Vec<_>>(), 1)?;
    let dv = sched.k.unshard(&grads.into_iter().map(|g| g.dv).collect::<Vec<_>>(), 1)?;
    Ok(RingBackward { grads: Gradients { dq, dk, dv, dsink: None }, stats })
}
