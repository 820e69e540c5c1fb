//! Entry points for frameworks (PyTorch, candle): every tensor, the varlen offsets, `seqused_k` and the ALiBi
//! slopes are device memory the caller owns, and the backward's scratch lives in the caller's workspace.
//! Nothing here allocates, copies metadata to or from the host, or synchronises, so a call can be captured in
//! a CUDA graph (once its kernels are loaded: run it once before capture).
//!
//! The kernels read the metadata where they need it; the host knows only shapes and the two maximum
//! sequence lengths, which size the grid (as in FlashAttention-2's `max_seqlen_q`/`max_seqlen_k`).

use super::bwd;
use super::call::{
    check_backward_tensors, check_forward_tensors, extent_bytes, poison_forward_outputs, raw_problem,
    refuse_host_input, BwdArgs, FwdArgs,
};
use super::fwd;
use super::kvcache::DeviceWorkspace;
use super::launch;
use super::runtime;
use super::tensor::{BackwardTensors, DeviceTensorRef, ForwardTensors};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::{AttnOptions, VarLen};
use crate::problem::{Alibi, Problem};
use crate::tensor::Layout;
use std::ffi::c_void;

/// Variable-length batches with the offsets in device memory: `q` is `[total_q, h, d]`, `k`/`v` `[total_k, hk,
/// d]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceVarlen {
    /// `i32 [b + 1]`: sequence `i`'s queries are rows `cu_seqlens_q[i]..cu_seqlens_q[i + 1]`.
    pub cu_seqlens_q: DeviceTensorRef,
    /// `i32 [b + 1]`, likewise for keys and values.
    pub cu_seqlens_k: DeviceTensorRef,
    /// `i32 [b]`: only the first `seqused_k[i]` keys of sequence `i` are used.
    pub seqused_k: Option<DeviceTensorRef>,
    /// The longest query sequence (sizes the grid: longer sequences are cut short there).
    pub max_seqlen_q: usize,
    /// The longest key sequence.
    pub max_seqlen_k: usize,
}

/// Per-call metadata in device memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMeta {
    /// Variable-length batches (instead of [`AttnOptions::varlen`], which is host memory).
    pub varlen: Option<DeviceVarlen>,
    /// ALiBi slopes, `f32 [h]` or `[b, h]` (instead of [`AttnOptions::alibi_slopes`]).
    pub alibi_slopes: Option<DeviceTensorRef>,
    /// Learnable sink logits, `f32 [h]` contiguous (instead of [`AttnOptions::sink`], which is host memory).
    /// The forward folds it in; the backward writes its gradient to [`BackwardTensors::dsink`].
    pub sink: Option<DeviceTensorRef>,
}

fn check_meta_vec(arg: &'static str, t: &DeviceTensorRef, dtype: DType, shape: &[usize]) -> Result<()> {
    t.check(arg, shape, dtype, false)?;
    if shape.iter().product::<usize>() > 1 && t.strides != Layout::contiguous(shape).strides {
        return Err(Error::invalid(arg, "a contiguous tensor", format!("strides {:?}", t.strides)));
    }
    Ok(())
}

/// Validates a call whose metadata is in device memory: shapes, dtypes and options as
/// [`crate::problem::validate`] does, and the metadata's shapes and dtypes. Values in device memory are the
/// kernels' to read.
pub(crate) fn device_problem(
    q: &DeviceTensorRef,
    k: &DeviceTensorRef,
    v: &DeviceTensorRef,
    opts: &AttnOptions,
    meta: &DeviceMeta,
) -> Result<Problem> {
    if meta.varlen.is_some() && opts.varlen.is_some() {
        return Err(Error::invalid("varlen", "offsets in device memory or in the options, not both", "both"));
    }
    if meta.alibi_slopes.is_some() && opts.alibi_slopes.is_some() {
        return Err(Error::invalid("alibi_slopes", "slopes in device memory or in the options, not both", "both"));
    }
    refuse_host_input(opts.sink.is_some(), "sink", "a device sink in DeviceMeta::sink", "a host sink")?;
    let mut host = opts.clone();
    let mut batch_of_varlen = None;
    if let Some(vl) = &meta.varlen {
        let entries = vl.cu_seqlens_q.shape.first().copied().unwrap_or(0);
        if vl.cu_seqlens_q.shape.len() != 1 || entries == 0 {
            return Err(Error::invalid(
                "cu_seqlens_q",
                "an i32 vector of batch + 1 >= 1 entries",
                format!("shape {:?}", vl.cu_seqlens_q.shape),
            ));
        }
        let b = entries - 1;
        check_meta_vec("cu_seqlens_q", &vl.cu_seqlens_q, DType::I32, &[b + 1])?;
        check_meta_vec("cu_seqlens_k", &vl.cu_seqlens_k, DType::I32, &[b + 1])?;
        if let Some(u) = &vl.seqused_k {
            check_meta_vec("seqused_k", u, DType::I32, &[b])?;
        }
        if q.shape.len() != 3 || k.shape.len() != 3 {
            return Err(Error::invalid("q", "rank 3 [total, heads, d] (varlen)", format!("shape {:?}", q.shape)));
        }
        // Host stand-ins that pass validation: every row in the first sequence. Only their shapes matter.
        let stand_in = |total: usize| -> Vec<i32> {
            let mut cu = vec![total as i32; b + 1];
            cu[0] = 0;
            cu
        };
        if q.shape[0] > i32::MAX as usize || k.shape[0] > i32::MAX as usize {
            return Err(Error::invalid("q", format!("at most {} rows", i32::MAX), q.shape[0].max(k.shape[0])));
        }
        host.varlen =
            Some(VarLen { cu_seqlens_q: stand_in(q.shape[0]), cu_seqlens_k: stand_in(k.shape[0]), seqused_k: None });
        batch_of_varlen = Some(b);
    }
    let mut per_batch = false;
    if let Some(a) = &meta.alibi_slopes {
        let h = q.shape.get(q.shape.len().wrapping_sub(2)).copied().unwrap_or(0);
        let b = batch_of_varlen.unwrap_or_else(|| q.shape.first().copied().unwrap_or(0));
        match a.shape.as_slice() {
            [n] if *n == h => {}
            [bb, n] if *bb == b && *n == h => per_batch = true,
            s => return Err(Error::invalid("alibi_slopes", format!("shape [{h}] or [{b}, {h}]"), format!("{s:?}"))),
        }
        check_meta_vec("alibi_slopes", a, DType::F32, &a.shape.clone())?;
        host.alibi_slopes = None;
    }
    if let Some(sk) = &meta.sink {
        let h = q.shape.get(q.shape.len().wrapping_sub(2)).copied().unwrap_or(0);
        check_meta_vec("sink", sk, DType::F32, &[h])?;
    }
    let mut p = raw_problem(q, k, v, &host)?;
    if meta.alibi_slopes.is_some() {
        p.alibi = Some(Alibi { slopes: Vec::new(), per_batch });
    }
    if meta.sink.is_some() {
        // Its presence is what the host needs (the backward's sink variant, its dsink check); its values stay on
        // the device.
        p.sink = Some(Vec::new());
    }
    if let Some(vl) = &meta.varlen {
        let (sq, sk) = (vl.max_seqlen_q.min(p.total_q), vl.max_seqlen_k.min(p.total_k));
        p.seqlen_q = vec![sq; p.batch];
        p.seqlen_k = vec![sk; p.batch];
        p.cu_seqlens = None;
        // The paths that read seqused_k are chosen by its presence; its values stay on the device.
        p.seqused_k = vl.seqused_k.as_ref().map(|_| Vec::new());
    }
    Ok(p)
}

fn meta_ptrs(meta: &DeviceMeta, a: &mut FwdArgs) {
    if let Some(vl) = &meta.varlen {
        a.cu_q = vl.cu_seqlens_q.ptr;
        a.cu_k = vl.cu_seqlens_k.ptr;
        a.seqused_k = vl.seqused_k.as_ref().map_or(0, |t| t.ptr);
    }
    a.alibi = meta.alibi_slopes.as_ref().map_or(0, |t| t.ptr);
    a.sink = meta.sink.as_ref().map_or(0, |t| t.ptr);
}

/// Forward pass over device memory the caller owns, metadata included, on the caller's stream.
///
/// # Safety
/// Every pointer (tensors and metadata) must be device memory of CUDA device `n` (primary context) covering
/// its shape and strides; the varlen offsets must be non-decreasing, start at 0 and end at the tensors' row
/// counts; `stream` must be a stream of that context or null; the caller keeps the memory alive and the
/// outputs unaliased until the stream has run the kernels.
pub unsafe fn forward_device(
    n: usize,
    stream: *mut c_void,
    t: ForwardTensors<'_>,
    opts: &AttnOptions,
    meta: &DeviceMeta,
) -> Result<()> {
    let p = device_problem(t.q, t.k, t.v, opts, meta)?;
    check_forward_tensors(&p, &t)?;
    let gpu = runtime::gpu(n)?;
    gpu.run("the CUDA forward", || {
        let s = stream as cudarc::driver::sys::CUstream;
        let mut a = FwdArgs::of(&t);
        meta_ptrs(meta, &mut a);
        poison_forward_outputs(&p, &t, s)?;
        fwd::run(&gpu, s, &p, &a, a.aligned16(p.dtype.size()))
    })
}

/// Bytes of workspace a [`backward_device`] call of these shapes and options needs (a pure function of the
/// shapes: no device is touched).
pub fn backward_workspace_bytes(
    q: &DeviceTensorRef,
    k: &DeviceTensorRef,
    v: &DeviceTensorRef,
    opts: &AttnOptions,
    meta: &DeviceMeta,
) -> Result<usize> {
    let p = device_problem(q, k, v, opts, meta)?;
    Ok(bwd::workspace_layout(&p, opts.deterministic)?.bytes)
}

/// Backward pass over device memory the caller owns, on the caller's stream, with the scratch buffers in
/// `workspace` (at least [`backward_workspace_bytes`], 256-byte aligned; its contents need not be zero).
/// `whole_rows` names the owner of `o` and `lse`: `true` (the normal backward), they come from this call's keys,
/// and a row that sees one key takes the exact shortcut `dS = 0`; `false`, from a larger set of keys of which
/// this call holds a part (one chunk pair of ring attention, whose `lse` is the whole row's), so every row takes
/// the general formula.
///
/// # Safety
/// As for [`forward_device`], and `workspace` is device memory of that device used by nothing else until the
/// stream has run the kernels.
pub unsafe fn backward_device(
    n: usize,
    stream: *mut c_void,
    t: BackwardTensors<'_>,
    opts: &AttnOptions,
    meta: &DeviceMeta,
    workspace: DeviceWorkspace,
    whole_rows: bool,
) -> Result<()> {
    let softmax = if whole_rows { bwd::Softmax::Whole } else { bwd::Softmax::Part };
    let p = device_problem(t.fwd.q, t.fwd.k, t.fwd.v, opts, meta)?;
    check_backward_tensors(&p, &t)?;
    workspace.check(bwd::workspace_layout(&p, opts.deterministic)?.bytes)?;
    let gpu = runtime::gpu(n)?;
    gpu.run("the CUDA backward", || {
        let s = gpu.borrowed_stream(stream);
        let mut a = BwdArgs::of(&t);
        meta_ptrs(meta, &mut a.fwd);
        if launch::poison_outputs(&p.tuning) {
            // Key rows past seqused_k are left as the caller had them.
            let mut grads = if p.seqused_k.is_some() { vec![t.dq] } else { vec![t.dq, t.dk, t.dv] };
            grads.extend(t.dsink);
            for g in grads {
                launch::poison(g.ptr, extent_bytes(g), s.cu_stream())?;
            }
        }
        bwd::run(&gpu, &s, &p, &a, a.aligned16(p.dtype.size()), opts.deterministic, softmax, Some(workspace.ptr))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, shape: &[usize]) -> DeviceTensorRef {
        DeviceTensorRef::contiguous(0x1000, dtype, shape)
    }

    fn varlen(b: usize) -> DeviceVarlen {
        DeviceVarlen {
            cu_seqlens_q: t(DType::I32, &[b + 1]),
            cu_seqlens_k: t(DType::I32, &[b + 1]),
            seqused_k: None,
            max_seqlen_q: 70,
            max_seqlen_k: 90,
        }
    }

    #[test]
    fn device_varlen_problem_keeps_shapes_and_maxima() {
        let (q, k) = (t(DType::BF16, &[100, 8, 64]), t(DType::BF16, &[120, 2, 64]));
        let meta = DeviceMeta { varlen: Some(varlen(3)), alibi_slopes: Some(t(DType::F32, &[3, 8])), sink: None };
        let p = device_problem(&q, &k, &k, &AttnOptions::default(), &meta).unwrap();
        assert!(p.varlen && p.cu_seqlens.is_none() && p.seqused_k.is_none());
        assert_eq!((p.batch, p.h, p.hk, p.total_q, p.total_k), (3, 8, 2, 100, 120));
        assert_eq!((p.max_seqlen_q(), p.max_seqlen_k()), (70, 90));
        assert_eq!(p.lse_shape(), vec![8, 100]);
        assert!(p.alibi.as_ref().is_some_and(|a| a.per_batch && a.slopes.is_empty()));
        // A maximum above the rows there are is cut to them.
        let mut vl = varlen(3);
        vl.max_seqlen_q = 10_000;
        vl.seqused_k = Some(t(DType::I32, &[3]));
        let p =
            device_problem(&q, &k, &k, &AttnOptions::default(), &DeviceMeta { varlen: Some(vl), ..Default::default() })
                .unwrap();
        assert_eq!(p.max_seqlen_q(), 100);
        assert!(p.seqused_k.is_some(), "seqused_k's presence picks the paths that read it");
    }

    #[test]
    fn device_metadata_errors_name_the_argument() {
        let (q, k) = (t(DType::F16, &[100, 8, 64]), t(DType::F16, &[120, 8, 64]));
        let opts = AttnOptions::default();
        let arg = |meta: DeviceMeta, o: &AttnOptions| device_problem(&q, &k, &k, o, &meta).unwrap_err().arg();
        let mut vl = varlen(2);
        vl.cu_seqlens_k = t(DType::I32, &[4]);
        assert_eq!(arg(DeviceMeta { varlen: Some(vl), ..Default::default() }, &opts), Some("cu_seqlens_k"));
        let mut vl = varlen(2);
        vl.cu_seqlens_q = t(DType::F32, &[3]);
        assert_eq!(arg(DeviceMeta { varlen: Some(vl), ..Default::default() }, &opts), Some("cu_seqlens_q"));
        let mut vl = varlen(2);
        vl.seqused_k = Some(t(DType::I32, &[3]));
        assert_eq!(arg(DeviceMeta { varlen: Some(vl), ..Default::default() }, &opts), Some("seqused_k"));
        let meta = DeviceMeta { varlen: Some(varlen(2)), alibi_slopes: Some(t(DType::F32, &[4])), sink: None };
        assert_eq!(arg(meta, &opts), Some("alibi_slopes"));
        let meta = DeviceMeta { varlen: Some(varlen(2)), alibi_slopes: Some(t(DType::F16, &[8])), sink: None };
        assert_eq!(arg(meta, &opts), Some("alibi_slopes"));
        // A device sink is f32 [h], contiguous; a host sink is refused by name (device calls copy nothing).
        let sink = |t_: DeviceTensorRef| DeviceMeta { varlen: Some(varlen(2)), sink: Some(t_), ..Default::default() };
        assert_eq!(arg(sink(t(DType::F16, &[8])), &opts), Some("sink"));
        assert_eq!(arg(sink(t(DType::F32, &[4])), &opts), Some("sink"));
        let mut strided = t(DType::F32, &[8]);
        strided.strides = vec![2];
        assert_eq!(arg(sink(strided), &opts), Some("sink"));
        let host_sink = AttnOptions { sink: Some(crate::tensor::Tensor::zeros(&[8], DType::F32)), ..opts.clone() };
        assert_eq!(arg(DeviceMeta::default(), &host_sink), Some("sink"));
        let host = AttnOptions {
            varlen: Some(VarLen { cu_seqlens_q: vec![0, 100], cu_seqlens_k: vec![0, 120], seqused_k: None }),
            ..AttnOptions::default()
        };
        assert_eq!(arg(DeviceMeta { varlen: Some(varlen(1)), ..Default::default() }, &host), Some("varlen"));
        // f32 is the CPU backend's only: the CUDA entry points refuse it as unsupported, not as invalid.
        let q32 = t(DType::F32, &[2, 16, 8, 64]);
        let e = device_problem(&q32, &q32, &q32, &opts, &DeviceMeta::default()).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    }

    /// A value head dim other than `d` passes every device-memory entry point's validation where its padded pair
    /// of dims is one the kernels are compiled for (192/128, 128/64, 64/128, and dims that pad to them), and the
    /// backward's workspace is the one of its query/key head dim; any other pair is refused as unsupported, naming
    /// `d_v`, before any device work.
    #[test]
    fn device_calls_take_the_compiled_value_head_dims() {
        let opts = AttnOptions::default();
        for (d, d_v) in [(192, 128), (128, 64), (64, 128), (180, 100), (100, 40)] {
            let (q, k, v) =
                (t(DType::BF16, &[2, 16, 8, d]), t(DType::BF16, &[2, 32, 2, d]), t(DType::BF16, &[2, 32, 2, d_v]));
            let p = device_problem(&q, &k, &v, &opts, &DeviceMeta::default()).unwrap();
            assert_eq!((p.d, p.d_v), (d, d_v));
            assert!(super::super::call::raw_problem(&q, &k, &v, &opts).is_ok());
            let same = device_problem(&q, &k, &k, &opts, &DeviceMeta::default()).unwrap();
            let ws = backward_workspace_bytes(&q, &k, &v, &opts, &DeviceMeta::default()).unwrap();
            assert_eq!(ws, bwd::workspace_layout(&same, false).unwrap().bytes, "({d}, {d_v})");
        }
        let unsupported = |r: Result<Problem>, d_v: usize| match r {
            Err(Error::Unsupported { backend: "cuda", what }) => {
                assert!(what.contains(&format!("d_v = {d_v}")), "{what}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        };
        for (d, d_v) in [(192, 64), (256, 128), (64, 32), (100, 120)] {
            let (q, k, v) =
                (t(DType::BF16, &[2, 16, 8, d]), t(DType::BF16, &[2, 32, 2, d]), t(DType::BF16, &[2, 32, 2, d_v]));
            unsupported(device_problem(&q, &k, &v, &opts, &DeviceMeta::default()), d_v);
            // The raw entry points' validation (forward_raw, backward_raw).
            unsupported(super::super::call::raw_problem(&q, &k, &v, &opts), d_v);
            assert!(backward_workspace_bytes(&q, &k, &v, &opts, &DeviceMeta::default()).is_err());
        }
    }

    /// A device sink passes validation: the forward reads its pointer; the backward's workspace grows by the
    /// partial dsink sums ([b, h, ceil(sk / 64), 8] f32), and a backward call needs an f32 [h] dsink exactly when
    /// there is a sink (checked before any device work).
    #[test]
    fn device_sink_in_forward_and_backward() {
        let q = t(DType::BF16, &[2, 16, 8, 64]);
        let meta = DeviceMeta { sink: Some(t(DType::F32, &[8])), ..Default::default() };
        let opts = AttnOptions::default();
        let p = device_problem(&q, &q, &q, &opts, &meta).unwrap();
        assert!(p.sink.is_some());
        let mut a = FwdArgs::default();
        meta_ptrs(&meta, &mut a);
        assert_eq!(a.sink, 0x1000);
        let with = backward_workspace_bytes(&q, &q, &q, &opts, &meta).unwrap();
        let without = backward_workspace_bytes(&q, &q, &q, &opts, &DeviceMeta::default()).unwrap();
        assert!(with >= without + 2 * 8 * 8 * 4, "{with} vs {without}");
        let (o, lse) = (t(DType::BF16, &[2, 16, 8, 64]), t(DType::F32, &[2, 8, 16]));
        let ws = DeviceWorkspace { ptr: 0x10000, bytes: with };
        let fwd = ForwardTensors { q: &q, k: &q, v: &q, o: &o, lse: &lse };
        let arg = |dsink: Option<&DeviceTensorRef>, meta: &DeviceMeta| {
            let tens = BackwardTensors { fwd, dout: &o, dq: &q, dk: &q, dv: &q, dsink };
            // SAFETY: every case is refused by validation before any pointer is used.
            match unsafe { backward_device(0, std::ptr::null_mut(), tens, &opts, meta, ws, true) } {
                Err(Error::InvalidArgument { arg, .. }) => Some(arg),
                _ => None,
            }
        };
        assert_eq!(arg(None, &meta), Some("dsink"));
        assert_eq!(arg(Some(&t(DType::BF16, &[8])), &meta), Some("dsink"));
        assert_eq!(arg(Some(&t(DType::F32, &[4])), &meta), Some("dsink"));
        assert_eq!(arg(Some(&t(DType::F32, &[8])), &DeviceMeta::default()), Some("dsink"));
    }

    #[test]
    fn backward_workspace_is_a_pure_function_of_the_shapes() {
        let q = t(DType::BF16, &[2, 300, 8, 96]);
        let k = t(DType::BF16, &[2, 500, 2, 96]);
        let plain = backward_workspace_bytes(&q, &k, &k, &AttnOptions::default(), &DeviceMeta::default()).unwrap();
        let det = AttnOptions { deterministic: true, ..AttnOptions::default() };
        let with_counters = backward_workspace_bytes(&q, &k, &k, &det, &DeviceMeta::default()).unwrap();
        // D and the log2 lse: f32 [h, rows]; the dQ accumulator: f32 [rows, h, 128] (96 runs as 128).
        let rows = 2 * 300;
        let at_least = 2 * (8 * rows * 4) + rows * 8 * 128 * 4;
        assert!(plain >= at_least && plain % 256 == 0, "{plain} < {at_least}");
        // Deterministic mode adds one i32 counter per (batch, head, 16-row query block).
        assert!(with_counters >= plain + 2 * 8 * 300usize.div_ceil(16) * 4);
        let layout =
            bwd::workspace_layout(&device_problem(&q, &k, &k, &det, &DeviceMeta::default()).unwrap(), true).unwrap();
        for off in [layout.dpsum, layout.lse_log2, layout.dq_accum, layout.sem] {
            assert_eq!(off % 256, 0, "every buffer starts 256-byte aligned");
        }
        assert!(layout.sem + layout.sem_bytes <= layout.bytes);
    }
}
