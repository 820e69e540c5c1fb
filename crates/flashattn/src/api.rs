//! The public entry points: validate once, then hand the [`Problem`] to a backend.

use crate::cpu::flash::{self, BwdIn, BwdOut, FwdOut, Qkv};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::AttnOptions;
use crate::problem::{check_backward_inputs, check_output, validate, Problem};
use crate::tensor::{Device, Tensor, TensorView, TensorViewMut};

/// The result of a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Attention output: q's shape with v's head dim `d_v` last, q's dtype.
    pub o: Tensor,
    /// Log-sum-exp of each row's scores, `f32` `[b, h, sq]` (varlen: `[h, total_q]`); `-inf` for a row
    /// that sees no key.
    pub lse: Tensor,
}

/// The result of a backward pass.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// dL/dq, q's shape and dtype.
    pub dq: Tensor,
    /// dL/dk, k's shape and dtype.
    pub dk: Tensor,
    /// dL/dv, v's shape and dtype.
    pub dv: Tensor,
    /// dL/dsink, the sink's shape and dtype, when the options have a sink ([`AttnOptions::sink`]).
    pub dsink: Option<Tensor>,
}

fn require_cpu(arg: &'static str, dev: Device) -> Result<()> {
    match dev {
        Device::Cpu => Ok(()),
        other => Err(Error::invalid(arg, "a tensor on the cpu device for this entry point", other)),
    }
}

/// Attention forward pass: `o = softmax(scale * q kᵀ + bias, masked) v` and its log-sum-exp.
///
/// FP8: q, k, v may all be [`DType::E4M3`], each with a descale factor ([`AttnOptions::q_descale`], ...): the
/// values used are `x * x_descale`, and `o` is bf16 (or [`AttnOptions::out_dtype`]). The backward pass refuses
/// FP8 inputs.
///
/// `q`: `[b, sq, h, d]`, `k`: `[b, sk, hk, d]`, `v`: `[b, sk, hk, d_v]` (or `[total, heads, d]` and
/// `[total, hk, d_v]` with [`AttnOptions::varlen`]); `o` is `[b, sq, h, d_v]`. The value head dim `d_v` may
/// differ from `d` (the default scale uses `d`).
///
/// ```
/// use flashattn::{forward, AttnOptions, DType, Tensor};
/// let q = Tensor::from_f32(&vec![0.5; 2 * 3 * 4 * 8], &[2, 3, 4, 8], DType::F16)?;
/// let k = Tensor::from_f32(&vec![0.25; 2 * 5 * 2 * 8], &[2, 5, 2, 8], DType::F16)?;
/// let out = forward(&q, &k, &k, &AttnOptions::default().causal())?;
/// assert_eq!(out.o.shape(), &[2, 3, 4, 8]);
/// assert_eq!(out.lse.shape(), &[2, 4, 3]);
/// # Ok::<(), flashattn::Error>(())
/// ```
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<ForwardOutput> {
    let p = validate(&q.view(), &k.view(), &v.view(), opts)?;
    let mut o = Tensor::try_zeros(&p.o_shape(), p.out_dtype)?;
    let mut lse = Tensor::try_zeros(&p.lse_shape(), DType::F32)?;
    run_forward(&p, &q.view(), &k.view(), &v.view(), &mut o.view_mut(), &mut lse.view_mut())?;
    Ok(ForwardOutput { o, lse })
}

/// Forward pass into caller-provided outputs (a framework's own memory; any non-overlapping strides with a
/// contiguous last dim for `o`, contiguous `f32` for `lse`).
pub fn forward_into(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    o: &mut TensorViewMut<'_>,
    lse: &mut TensorViewMut<'_>,
    opts: &AttnOptions,
) -> Result<()> {
    let p = validate(q, k, v, opts)?;
    run_forward(&p, q, k, v, o, lse)
}

fn check_lse(lse: &TensorViewMut<'_>, p: &Problem) -> Result<()> {
    check_output("lse", &lse.layout, lse.data.len(), lse.dtype(), &p.lse_shape(), DType::F32)?;
    if lse.layout != crate::tensor::Layout::contiguous(&p.lse_shape()) {
        return Err(Error::invalid("lse", "a contiguous tensor", format!("strides {:?}", lse.layout.strides)));
    }
    Ok(())
}

pub(crate) fn run_forward(
    p: &Problem,
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    o: &mut TensorViewMut<'_>,
    lse: &mut TensorViewMut<'_>,
) -> Result<()> {
    require_cpu("q", q.device())?;
    check_output("o", &o.layout, o.data.len(), o.dtype(), &p.o_shape(), p.out_dtype)?;
    check_lse(lse, p)?;
    let o_map = p.q_like_map(&o.layout);
    let out = FwdOut { o: o.data.raw(), o_map: &o_map, lse: lse.data.raw() };
    flash::forward(p, Qkv { q: q.data, k: k.data, v: v.data }, &out);
    Ok(())
}

/// What the backward pass reads: the forward's inputs `q`, `k`, `v`, its output `o` and log-sum-exp `lse`,
/// and the upstream gradient `dout` (shaped like `o`). `T` is `&Tensor` for the entry points that take whole
/// host tensors ([`backward`], [`crate::backward_on`], ring attention) and [`TensorView`] for those that take
/// borrowed memory ([`backward_into`]).
///
/// ```
/// use flashattn::{backward, forward, AttnOptions, BackwardInputs, DType, Tensor};
/// let q = Tensor::from_f32(&vec![0.5; 3 * 2 * 8], &[1, 3, 2, 8], DType::F32)?;
/// let opts = AttnOptions::default();
/// let out = forward(&q, &q, &q, &opts)?;
/// let grads = backward(&BackwardInputs { q: &q, k: &q, v: &q, o: &out.o, lse: &out.lse, dout: &out.o }, &opts)?;
/// assert_eq!(grads.dq.shape(), q.shape());
/// # Ok::<(), flashattn::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<T> {
    /// Queries, as given to the forward.
    pub q: T,
    /// Keys, as given to the forward.
    pub k: T,
    /// Values, as given to the forward.
    pub v: T,
    /// The forward's output.
    pub o: T,
    /// The forward's log-sum-exp.
    pub lse: T,
    /// dL/do, shaped like `o`.
    pub dout: T,
}

impl<T> BackwardInputs<T> {
    /// Each tensor through `f`, in the order q, k, v, o, lse, dout.
    pub fn map<'s, U>(&'s self, mut f: impl FnMut(&'s T) -> U) -> BackwardInputs<U> {
        match self.try_map(|t| Ok::<U, std::convert::Infallible>(f(t))) {
            Ok(x) => x,
            Err(never) => match never {},
        }
    }

    /// Each tensor through `f`, which may fail, in the order q, k, v, o, lse, dout: the first error is returned
    /// (and `f` is not called again).
    pub fn try_map<'s, U, E>(
        &'s self,
        mut f: impl FnMut(&'s T) -> std::result::Result<U, E>,
    ) -> std::result::Result<BackwardInputs<U>, E> {
        Ok(BackwardInputs {
            q: f(&self.q)?,
            k: f(&self.k)?,
            v: f(&self.v)?,
            o: f(&self.o)?,
            lse: f(&self.lse)?,
            dout: f(&self.dout)?,
        })
    }
}

impl<'a> BackwardInputs<&'a Tensor> {
    /// Views of the tensors (what [`backward_into`] takes).
    pub fn views(&self) -> BackwardInputs<TensorView<'a>> {
        self.map(|t| t.view())
    }
}

/// Where the backward pass writes: caller-provided gradient buffers (any non-overlapping strides with a
/// contiguous last dim), each of its input's shape, all three in the inputs' dtype or all three f32 (partial
/// gradients summed by the caller before one rounding, as ring attention does; on every backend). The gradient
/// of a learnable sink is returned.
#[derive(Debug)]
pub struct GradientsMut<'a> {
    /// dL/dq, q's shape; q's dtype or f32.
    pub dq: TensorViewMut<'a>,
    /// dL/dk, k's shape; the dtype of dq.
    pub dk: TensorViewMut<'a>,
    /// dL/dv, v's shape; the dtype of dq.
    pub dv: TensorViewMut<'a>,
}

impl Gradients {
    /// Zeroed gradients shaped and typed like `q`, `k`, `v` (no `dsink`).
    fn zeros_like(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        Ok(Gradients {
            dq: Tensor::try_zeros(q.shape(), q.dtype())?,
            dk: Tensor::try_zeros(k.shape(), k.dtype())?,
            dv: Tensor::try_zeros(v.shape(), v.dtype())?,
            dsink: None,
        })
    }

    /// Writable views of `dq`, `dk`, `dv`.
    pub fn views_mut(&mut self) -> GradientsMut<'_> {
        GradientsMut { dq: self.dq.view_mut(), dk: self.dk.view_mut(), dv: self.dv.view_mut() }
    }
}

/// Attention backward pass: gradients of `q`, `k`, `v` given the forward's `o` and `lse` and the upstream
/// gradient `dout` (shaped like `o`). Use the same options as the forward call.
pub fn backward(x: &BackwardInputs<&Tensor>, opts: &AttnOptions) -> Result<Gradients> {
    let mut g = Gradients::zeros_like(x.q, x.k, x.v)?;
    g.dsink = backward_into(&x.views(), g.views_mut(), opts)?;
    Ok(g)
}

/// Backward pass into caller-provided gradient buffers. Returns the gradient of a learnable sink
/// ([`AttnOptions::sink`], in its dtype) when the options have one: `dsink_h = -sum over the rows i of head h
/// of exp(sink_h - lse_i) D_i`, accumulated in `f64`, with `D_i = dO_i · O_i` as the backward computes it
/// (for f16/bf16 inputs from the recomputed probabilities, not the rounded `o`; for f32 from `o`).
pub fn backward_into(
    x: &BackwardInputs<TensorView<'_>>,
    grads: GradientsMut<'_>,
    opts: &AttnOptions,
) -> Result<Option<Tensor>> {
    backward_into_of(x, grads, opts, true)
}

/// [`backward_into`] with the owner of `o` and `lse` named. `whole_rows = true`: they come from this call's keys
/// (the normal backward). `whole_rows = false`: from a larger set of keys of which this call holds a part (one
/// chunk pair of ring attention, whose `lse` is the whole row's). `D = rowsum(dO ∘ O)` is then read from `o` and
/// `dout`, since recomputing it from this call's probabilities (what the normal backward does, for accuracy)
/// would sum over this call's keys only; the pair's dq, dk, dv are then exact partial sums of the whole row's.
pub fn backward_into_of(
    x: &BackwardInputs<TensorView<'_>>,
    grads: GradientsMut<'_>,
    opts: &AttnOptions,
    whole_rows: bool,
) -> Result<Option<Tensor>> {
    let BackwardInputs { q, k, v, o, lse, dout } = x;
    let GradientsMut { mut dq, mut dk, mut dv } = grads;
    let p = validate(q, k, v, opts)?;
    p.refuse_fp8("the backward pass")?;
    require_cpu("q", q.device())?;
    check_backward_inputs(&p, o, lse, dout)?;
    let grad = crate::problem::gradient_dtype(p.dtype, dq.dtype());
    check_output("dq", &dq.layout, dq.data.len(), dq.dtype(), q.shape(), grad)?;
    check_output("dk", &dk.layout, dk.data.len(), dk.dtype(), k.shape(), grad)?;
    check_output("dv", &dv.layout, dv.data.len(), dv.dtype(), v.shape(), grad)?;
    let lse_vec = lse.to_f32_vec();
    let do_map = p.q_like_map(&dout.layout);
    let (dq_map, dk_map, dv_map) = (p.q_like_map(&dq.layout), p.k_like_map(&dk.layout), p.k_like_map(&dv.layout));
    // `D` from `o` where the call sees only part of each row's keys, and for f32 inputs, whose `o` carries no
    // rounding that matters next to the f32 products (this also spares the backward its first sweep over the
    // key tiles, which recomputes `P` and `dP` only to sum `D`); f16/bf16 recompute it (their rounded `o` would
    // be the largest error of the backward).
    let from_o = !whole_rows || p.dtype == DType::F32;
    let given = from_o.then(|| row_dots(&p, o, dout, &do_map));
    let inp = BwdIn { dout: dout.data, do_map: &do_map, lse: &lse_vec, delta: given.as_deref(), whole_rows };
    zero_unused_rows(&p, &mut dk, &dk_map, p.d);
    zero_unused_rows(&p, &mut dv, &dv_map, p.d_v);
    let out = BwdOut {
        dq: dq.data.raw(),
        dq_map: &dq_map,
        dk: dk.data.raw(),
        dk_map: &dk_map,
        dv: dv.data.raw(),
        dv_map: &dv_map,
    };
    let delta = flash::backward(&p, Qkv { q: q.data, k: k.data, v: v.data }, &inp, &out);
    let (Some(sink), Some(t)) = (&p.sink, &opts.sink) else { return Ok(None) };
    // Summed in f64 (b * sq terms per head), in a fixed order.
    let mut ds = vec![0f64; p.h];
    for seq in 0..p.batch {
        for (head, acc) in ds.iter_mut().enumerate() {
            for i in 0..p.seqlen_q[seq] {
                let r = p.lse_index(seq, head, i);
                *acc -= ((sink[head] - lse_vec[r]).exp() * delta[r]) as f64;
            }
        }
    }
    let ds: Vec<f32> = ds.iter().map(|&x| x as f32).collect();
    Tensor::from_f32(&ds, &[p.h], t.dtype()).map(Some)
}

/// `D = rowsum(dO ∘ O)` in `f32`, in [`Problem::lse_shape`] order.
fn row_dots(p: &Problem, o: &TensorView<'_>, dout: &TensorView<'_>, do_map: &crate::problem::RowMap) -> Vec<f32> {
    use rayon::prelude::*;
    let o_map = p.q_like_map(&o.layout);
    let dv = o.shape().last().copied().unwrap_or(0);
    // One task per (sequence, head): the f32 backward reads every `D` here before its own parallel work starts.
    let pairs: Vec<(usize, usize)> = (0..p.batch).flat_map(|seq| (0..p.h).map(move |head| (seq, head))).collect();
    let dots: Vec<Vec<f32>> = pairs
        .par_iter()
        .map(|&(seq, head)| {
            let (mut a, mut g) = (vec![0f32; dv], vec![0f32; dv]);
            (0..p.seqlen_q[seq])
                .map(|i| {
                    o.data.read_f32(o_map.at(seq, i, head), &mut a);
                    dout.data.read_f32(do_map.at(seq, i, head), &mut g);
                    a.iter().zip(&g).map(|(x, y)| x * y).sum()
                })
                .collect()
        })
        .collect();
    let mut d = vec![0f32; p.h * p.total_q];
    for (&(seq, head), row) in pairs.iter().zip(dots) {
        for (i, x) in row.into_iter().enumerate() {
            d[p.lse_index(seq, head, i)] = x;
        }
    }
    d
}

/// Zeroes the rows (of `width` elements: `d` for dk, `d_v` for dv) of a k-like tensor that the backward does
/// not write: keys past `seqused_k` get no gradient.
fn zero_unused_rows(p: &Problem, t: &mut TensorViewMut<'_>, map: &crate::problem::RowMap, width: usize) {
    let Some((_, ck)) = &p.cu_seqlens else { return }; // dense: every key row is written
    let raw = t.data.raw();
    let zeros = vec![0f32; width];
    for (seq, w) in ck.windows(2).enumerate() {
        for r in p.seqlen_k[seq]..(w[1] - w[0]) as usize {
            for h in 0..p.hk {
                raw.write_f32(map.at(seq, r, h), &zeros);
            }
        }
    }
}
