//! `flashattn._flashattn`: the Python extension behind the `flashattn` package.
//!
//! It knows nothing of PyTorch: the Python front (`python/flashattn/`) describes each tensor as a tuple
//! `(address, dtype, shape, strides)` of memory that torch owns, and passes the device index (`-1` for host
//! memory) and the CUDA stream. Host tensors run the CPU backend over that memory; CUDA tensors run the
//! kernels on the caller's stream with every piece of metadata read from device memory and scratch in a
//! workspace the caller allocated. Nothing is copied, nothing synchronises. The GIL is released while a call
//! runs (a first call of a kernel variant compiles it, about a second).
//!
//! Errors become the exceptions torch raises for the same mistakes: a wrong dtype `TypeError`, other invalid
//! arguments and a cache overflow `ValueError`, an unsupported combination `NotImplementedError`, a device or
//! backend failure `RuntimeError`.

use flashattn::cuda::{
    self, BackwardTensors, DeviceKvCache, DeviceMeta, DeviceRotary, DeviceTensorRef, DeviceVarlen, DeviceWorkspace,
    ForwardTensors,
};
use flashattn::kvcache::{CacheSeqlens, KvCache, Rotary};
use flashattn::{
    AttnOptions, CpuSlice, CpuSliceMut, CpuStorage, DType, Error, Layout, Tensor, TensorView, TensorViewMut, VarLen,
};
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::ffi::c_void;

/// A tensor as the Python front describes it: address of element 0, dtype name, shape, strides (elements).
type PyTensor = (u64, String, Vec<usize>, Vec<usize>);
/// `(softmax_scale or None, causal, window_left, window_right, softcap, deterministic)`.
type PyOpts = (Option<f32>, bool, i64, i64, f32, bool);
/// `(cu_seqlens_q, cu_seqlens_k, seqused_k or None, max_seqlen_q, max_seqlen_k)`.
type PyVarlen = (PyTensor, PyTensor, Option<PyTensor>, usize, usize);
/// `(cos, sin, interleaved)`.
type PyRotary = (PyTensor, PyTensor, bool);
/// `(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, rotary)`.
type PyKv = (
    PyTensor,
    PyTensor,
    Option<PyTensor>,
    Option<PyTensor>,
    PyTensor,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyRotary>,
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        Error::InvalidArgument { expected, .. } if expected.starts_with("dtype") => PyTypeError::new_err(msg),
        Error::InvalidArgument { .. } | Error::CacheOverflow { .. } => PyValueError::new_err(msg),
        Error::Unsupported { .. } => PyNotImplementedError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

fn dtype(name: &str) -> PyResult<DType> {
    Ok(match name {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        "i32" => DType::I32,
        other => return Err(PyTypeError::new_err(format!("unsupported dtype {other}"))),
    })
}

fn dev(t: &PyTensor) -> PyResult<DeviceTensorRef> {
    Ok(DeviceTensorRef { ptr: t.0, dtype: dtype(&t.1)?, shape: t.2.clone(), strides: t.3.clone() })
}

fn layout(t: &PyTensor) -> PyResult<(Layout, usize)> {
    let l = Layout { shape: t.2.clone(), strides: t.3.clone(), offset: 0 };
    if l.strides.len() != l.shape.len() {
        return Err(PyValueError::new_err(format!("{} strides for {} dims", l.strides.len(), l.shape.len())));
    }
    let len =
        l.extent().ok_or_else(|| PyValueError::new_err(format!("a tensor of shape {:?} is too large", l.shape)))?;
    Ok((l, len))
}

/// A view of host memory that torch owns.
///
/// # Safety
/// `t` must describe live host memory of its dtype covering its shape and strides, not written while the
/// view lives.
unsafe fn host_view<'a>(t: &PyTensor) -> PyResult<TensorView<'a>> {
    let (l, len) = layout(t)?;
    let p = t.0 as usize;
    // SAFETY: the caller's contract; an empty tensor gets an empty slice (its address may be null).
    let data = unsafe {
        match dtype(&t.1)? {
            DType::F16 => CpuSlice::F16(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::BF16 => CpuSlice::BF16(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::F32 => CpuSlice::F32(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::I32 => CpuSlice::I32(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
        }
    };
    TensorView::new(data, l).map_err(to_py)
}

/// A writable view of host memory that torch owns.
///
/// # Safety
/// As for [`host_view`], and the memory is accessed through nothing else while the view lives.
unsafe fn host_view_mut<'a>(t: &PyTensor) -> PyResult<TensorViewMut<'a>> {
    let (l, len) = layout(t)?;
    let p = t.0 as usize;
    // SAFETY: the caller's contract.
    let data = unsafe {
        match dtype(&t.1)? {
            DType::F16 => {
                CpuSliceMut::F16(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(p as *mut _, len) })
            }
            DType::BF16 => {
                CpuSliceMut::BF16(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(p as *mut _, len) })
            }
            DType::F32 => {
                CpuSliceMut::F32(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(p as *mut _, len) })
            }
            DType::I32 => {
                CpuSliceMut::I32(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(p as *mut _, len) })
            }
        }
    };
    TensorViewMut::new(data, l).map_err(to_py)
}

/// The `i32` values of a small host tensor (metadata).
///
/// # Safety
/// As for [`host_view`].
unsafe fn host_i32(arg: &'static str, t: &PyTensor) -> PyResult<Vec<i32>> {
    // SAFETY: the caller's contract.
    let v = unsafe { host_view(t)? };
    v.to_i32_vec().ok_or_else(|| to_py(Error::invalid(arg, "dtype i32", v.dtype())))
}

/// A host tensor copied into an owned one (small metadata: ALiBi slopes, block tables).
///
/// # Safety
/// As for [`host_view`].
unsafe fn host_owned(t: &PyTensor) -> PyResult<Tensor> {
    // SAFETY: the caller's contract.
    let v = unsafe { host_view(t)? };
    let storage = match v.dtype() {
        DType::I32 => CpuStorage::I32(v.to_i32_vec().unwrap_or_default()),
        d => CpuStorage::from_f32(d, &v.to_f32_vec()),
    };
    Tensor::from_storage(storage, v.shape()).map_err(to_py)
}

fn options(o: PyOpts) -> AttnOptions {
    let (softmax_scale, causal, wl, wr, softcap, deterministic) = o;
    AttnOptions { softmax_scale, causal, window: (wl, wr), softcap, deterministic, ..Default::default() }
}

/// Host options: varlen offsets and ALiBi slopes read from host memory.
///
/// # Safety
/// As for [`host_view`], for every tensor given.
unsafe fn host_options(o: PyOpts, alibi: &Option<PyTensor>, varlen: &Option<PyVarlen>) -> PyResult<AttnOptions> {
    let mut a = options(o);
    // SAFETY: the caller's contract.
    unsafe {
        if let Some(t) = alibi {
            a.alibi_slopes = Some(host_owned(t)?);
        }
        if let Some((cq, ck, used, _, _)) = varlen {
            a.varlen = Some(VarLen {
                cu_seqlens_q: host_i32("cu_seqlens_q", cq)?,
                cu_seqlens_k: host_i32("cu_seqlens_k", ck)?,
                seqused_k: used.as_ref().map(|u| host_i32("seqused_k", u)).transpose()?,
            });
        }
    }
    Ok(a)
}

fn device_meta(alibi: &Option<PyTensor>, varlen: &Option<PyVarlen>) -> PyResult<DeviceMeta> {
    Ok(DeviceMeta {
        varlen: match varlen {
            Some((cq, ck, used, mq, mk)) => Some(DeviceVarlen {
                cu_seqlens_q: dev(cq)?,
                cu_seqlens_k: dev(ck)?,
                seqused_k: used.as_ref().map(dev).transpose()?,
                max_seqlen_q: *mq,
                max_seqlen_k: *mk,
            }),
            None => None,
        },
        alibi_slopes: alibi.as_ref().map(dev).transpose()?,
    })
}

fn device_index(device: i64) -> Option<usize> {
    usize::try_from(device).ok()
}

/// Attention forward: writes `o` and `lse` (allocated by the caller).
#[pyfunction]
#[pyo3(signature = (device, stream, q, k, v, o, lse, opts, alibi, varlen, sink=None))]
#[allow(clippy::too_many_arguments)]
fn fwd(
    py: Python<'_>,
    device: i64,
    stream: u64,
    q: PyTensor,
    k: PyTensor,
    v: PyTensor,
    o: PyTensor,
    lse: PyTensor,
    opts: PyOpts,
    alibi: Option<PyTensor>,
    varlen: Option<PyVarlen>,
    sink: Option<PyTensor>,
) -> PyResult<()> {
    match device_index(device) {
        None => {
            // SAFETY: the Python front passes live host tensors; o and lse are fresh and unaliased.
            let (qv, kv, vv, mut ov, mut lv, mut a) = unsafe {
                (
                    host_view(&q)?,
                    host_view(&k)?,
                    host_view(&v)?,
                    host_view_mut(&o)?,
                    host_view_mut(&lse)?,
                    host_options(opts, &alibi, &varlen)?,
                )
            };
            // SAFETY: a live host tensor.
            a.sink = sink.as_ref().map(|t| unsafe { host_owned(t) }).transpose()?;
            py.detach(|| flashattn::forward_into(&qv, &kv, &vv, &mut ov, &mut lv, &a)).map_err(to_py)
        }
        Some(n) => {
            no_device_sink(&sink)?;
            let (q, k, v, o, lse) = (dev(&q)?, dev(&k)?, dev(&v)?, dev(&o)?, dev(&lse)?);
            let meta = device_meta(&alibi, &varlen)?;
            let a = options(opts);
            let t = ForwardTensors { q: &q, k: &k, v: &v, o: &o, lse: &lse };
            // SAFETY: the Python front passes tensors of device n and torch's current stream of that device.
            py.detach(|| unsafe { cuda::forward_device(n, stream as *mut c_void, t, &a, &meta) }).map_err(to_py)
        }
    }
}

/// Bytes of CUDA workspace the backward of these shapes needs (0 for host tensors).
#[pyfunction]
#[pyo3(signature = (device, q, k, v, opts, alibi, varlen))]
fn bwd_workspace_bytes(
    device: i64,
    q: PyTensor,
    k: PyTensor,
    v: PyTensor,
    opts: PyOpts,
    alibi: Option<PyTensor>,
    varlen: Option<PyVarlen>,
) -> PyResult<usize> {
    if device < 0 {
        return Ok(0);
    }
    let meta = device_meta(&alibi, &varlen)?;
    cuda::backward_workspace_bytes(&dev(&q)?, &dev(&k)?, &dev(&v)?, &options(opts), &meta).map_err(to_py)
}

/// Attention backward: writes `dq`, `dk`, `dv` (allocated by the caller; with `seqused_k`, key rows past it
/// keep what they held: pass zeroed tensors), and with a `sink` its gradient into `dsink` (host tensors).
/// `whole_rows = false`: `o` and `lse` belong to a larger set of keys than this call's (a ring attention chunk
/// pair): no row takes the one-key shortcut, and the CPU reads `D` from `o` (see `backward_into_of`).
#[pyfunction]
#[pyo3(signature = (device, stream, t, opts, alibi, varlen, workspace, sink=None, dsink=None, whole_rows=true))]
#[allow(clippy::too_many_arguments)]
fn bwd(
    py: Python<'_>,
    device: i64,
    stream: u64,
    t: [PyTensor; 9],
    opts: PyOpts,
    alibi: Option<PyTensor>,
    varlen: Option<PyVarlen>,
    workspace: (u64, usize),
    sink: Option<PyTensor>,
    dsink: Option<PyTensor>,
    whole_rows: bool,
) -> PyResult<()> {
    let [q, k, v, o, lse, dout, dq, dk, dv] = t;
    match device_index(device) {
        None => {
            // SAFETY: live host tensors; the gradients are fresh and unaliased.
            let (qv, kv, vv, ov, lv, dov, mut dqv, mut dkv, mut dvv, mut a) = unsafe {
                (
                    host_view(&q)?,
                    host_view(&k)?,
                    host_view(&v)?,
                    host_view(&o)?,
                    host_view(&lse)?,
                    host_view(&dout)?,
                    host_view_mut(&dq)?,
                    host_view_mut(&dk)?,
                    host_view_mut(&dv)?,
                    host_options(opts, &alibi, &varlen)?,
                )
            };
            // SAFETY: live host tensors; dsink is fresh and unaliased.
            a.sink = sink.as_ref().map(|t| unsafe { host_owned(t) }).transpose()?;
            let mut dsv = dsink.as_ref().map(|t| unsafe { host_view_mut(t) }).transpose()?;
            py.detach(|| -> flashattn::Result<()> {
                let ds = flashattn::backward_into_of(
                    &qv, &kv, &vv, &ov, &lv, &dov, &mut dqv, &mut dkv, &mut dvv, &a, whole_rows,
                )?;
                match (ds, dsv.as_mut()) {
                    (Some(g), Some(out)) => copy_into(&g, out, "dsink"),
                    (Some(_), None) => Err(Error::invalid("dsink", "a tensor for the sink's gradient", "none")),
                    (None, _) => Ok(()),
                }
            })
            .map_err(to_py)
        }
        Some(n) => {
            no_device_sink(&sink)?;
            let d = [&q, &k, &v, &o, &lse, &dout, &dq, &dk, &dv].map(dev);
            let [q, k, v, o, lse, dout, dq, dk, dv] = d;
            let (q, k, v, o, lse, dout, dq, dk, dv) = (q?, k?, v?, o?, lse?, dout?, dq?, dk?, dv?);
            let meta = device_meta(&alibi, &varlen)?;
            let a = options(opts);
            let t = BackwardTensors {
                fwd: ForwardTensors { q: &q, k: &k, v: &v, o: &o, lse: &lse },
                dout: &dout,
                dq: &dq,
                dk: &dk,
                dv: &dv,
            };
            let ws = DeviceWorkspace { ptr: workspace.0, bytes: workspace.1 };
            // SAFETY: tensors of device n, torch's current stream, a workspace allocated by torch for this call.
            py.detach(|| unsafe { cuda::backward_device_of(n, stream as *mut c_void, t, &a, &meta, ws, whole_rows) })
                .map_err(to_py)
        }
    }
}

fn device_cache(kv: &PyKv, alibi: &Option<PyTensor>) -> PyResult<DeviceKvCache> {
    let (kc, vc, kn, vn, seqlens, bt, bidx, lpad, rot) = kv;
    Ok(DeviceKvCache {
        k_cache: dev(kc)?,
        v_cache: dev(vc)?,
        k_new: kn.as_ref().map(dev).transpose()?,
        v_new: vn.as_ref().map(dev).transpose()?,
        cache_seqlens: dev(seqlens)?,
        block_table: bt.as_ref().map(dev).transpose()?,
        cache_batch_idx: bidx.as_ref().map(dev).transpose()?,
        cache_leftpad: lpad.as_ref().map(dev).transpose()?,
        rotary: match rot {
            Some((cos, sin, interleaved)) => {
                Some(DeviceRotary { cos: dev(cos)?, sin: dev(sin)?, interleaved: *interleaved })
            }
            None => None,
        },
        alibi_slopes: alibi.as_ref().map(dev).transpose()?,
    })
}

/// Bytes of CUDA workspace a KV-cache call of these shapes needs (0 for host tensors).
#[pyfunction]
#[pyo3(signature = (device, q, kv, o, lse, opts, alibi))]
fn kvcache_workspace_bytes(
    device: i64,
    q: PyTensor,
    kv: PyKv,
    o: PyTensor,
    lse: PyTensor,
    opts: PyOpts,
    alibi: Option<PyTensor>,
) -> PyResult<usize> {
    let Some(n) = device_index(device) else { return Ok(0) };
    let cache = device_cache(&kv, &alibi)?;
    cuda::kvcache_workspace_bytes(n, &dev(&q)?, &cache, &dev(&o)?, &dev(&lse)?, &options(opts)).map_err(to_py)
}

/// KV-cache attention: appends `k_new`/`v_new` (rotated) into the cache in place, then writes `o` and `lse`.
/// On the CPU an append that would overflow raises and writes nothing; on CUDA the kernels check values in
/// device memory and refuse such a call without writing the cache (see the package's documentation).
#[pyfunction]
#[pyo3(signature = (device, stream, q, kv, o, lse, opts, alibi, workspace, sink=None))]
#[allow(clippy::too_many_arguments)]
fn kvcache(
    py: Python<'_>,
    device: i64,
    stream: u64,
    q: PyTensor,
    kv: PyKv,
    o: PyTensor,
    lse: PyTensor,
    opts: PyOpts,
    alibi: Option<PyTensor>,
    workspace: (u64, usize),
    sink: Option<PyTensor>,
) -> PyResult<()> {
    match device_index(device) {
        None => {
            let (kc, vc, kn, vn, seqlens, bt, bidx, lpad, rot) = &kv;
            // SAFETY: live host tensors; the caches are written in place through these views only, o and lse
            // are fresh.
            unsafe {
                let qv = host_view(&q)?;
                let mut cache = KvCache::new(
                    host_view_mut(kc)?,
                    host_view_mut(vc)?,
                    CacheSeqlens::PerSeq(host_i32("cache_seqlens", seqlens)?),
                );
                cache.k_new = kn.as_ref().map(|t| host_view(t)).transpose()?;
                cache.v_new = vn.as_ref().map(|t| host_view(t)).transpose()?;
                cache.block_table = bt.as_ref().map(|t| host_owned(t)).transpose()?;
                cache.cache_batch_idx = bidx.as_ref().map(|t| host_i32("cache_batch_idx", t)).transpose()?;
                cache.cache_leftpad = lpad.as_ref().map(|t| host_i32("cache_leftpad", t)).transpose()?;
                cache.rotary = match rot {
                    Some((cos, sin, interleaved)) => {
                        Some(Rotary { cos: host_view(cos)?, sin: host_view(sin)?, interleaved: *interleaved })
                    }
                    None => None,
                };
                let mut a = options(opts);
                if let Some(t) = &alibi {
                    a.alibi_slopes = Some(host_owned(t)?);
                }
                a.sink = sink.as_ref().map(|t| host_owned(t)).transpose()?;
                let mut ov = host_view_mut(&o)?;
                let mut lv = host_view_mut(&lse)?;
                py.detach(|| -> flashattn::Result<()> {
                    let out = flashattn::kvcache_forward(&qv, &mut cache, &a)?;
                    copy_into(&out.o, &mut ov, "o")?;
                    copy_into(&out.lse, &mut lv, "lse")
                })
                .map_err(to_py)
            }
        }
        Some(n) => {
            no_device_sink(&sink)?;
            let cache = device_cache(&kv, &alibi)?;
            let (q, o, lse) = (dev(&q)?, dev(&o)?, dev(&lse)?);
            let a = options(opts);
            let ws = DeviceWorkspace { ptr: workspace.0, bytes: workspace.1 };
            // SAFETY: tensors of device n, torch's current stream, a workspace allocated for this call (its
            // header is zeroed on the stream first).
            py.detach(|| unsafe {
                cuda::kvcache_forward_raw_uninit(n, stream as *mut c_void, &q, &cache, &o, &lse, ws, &a)
            })
            .map_err(to_py)
        }
    }
}

/// The CUDA kernels have no learnable sink: a CUDA call with one is refused (`NotImplementedError`).
fn no_device_sink(sink: &Option<PyTensor>) -> PyResult<()> {
    match sink {
        Some(_) => {
            Err(to_py(Error::Unsupported { backend: "cuda", what: "a learnable sink (CPU tensors run it)".into() }))
        }
        None => Ok(()),
    }
}

/// Copies a result into a contiguous caller tensor of the same shape and dtype.
fn copy_into(src: &Tensor, dst: &mut TensorViewMut<'_>, arg: &'static str) -> flashattn::Result<()> {
    if dst.shape() != src.shape() || dst.dtype() != src.dtype() {
        return Err(Error::invalid(arg, format!("{} {:?}", src.dtype(), src.shape()), format!("{:?}", dst.shape())));
    }
    match (src.storage(), &mut dst.data) {
        (CpuStorage::F16(s), CpuSliceMut::F16(d)) if d.len() == s.len() => d.copy_from_slice(s),
        (CpuStorage::BF16(s), CpuSliceMut::BF16(d)) if d.len() == s.len() => d.copy_from_slice(s),
        (CpuStorage::F32(s), CpuSliceMut::F32(d)) if d.len() == s.len() => d.copy_from_slice(s),
        _ => return Err(Error::invalid(arg, "a contiguous tensor", format!("strides {:?}", dst.layout.strides))),
    }
    Ok(())
}

/// The backends and why each is or is not usable, one line each.
#[pyfunction]
fn info(py: Python<'_>) -> Vec<(String, bool, String)> {
    py.detach(|| flashattn::backends::status().into_iter().map(|s| (s.name.to_string(), s.usable, s.detail)).collect())
}

/// Compiles every kernel variant for the given architectures into the disk cache (no GPU needed).
#[pyfunction]
fn precompile(py: Python<'_>, archs: Vec<String>) -> PyResult<Vec<String>> {
    py.detach(|| cuda::precompile(&archs)).map_err(to_py)
}

/// Adds folders to search for libnvrtc after the loader path (the NVIDIA wheels' `lib` folders).
#[pyfunction]
fn add_nvrtc_dirs(dirs: Vec<String>) {
    cuda::compile::add_nvrtc_dirs(&dirs.into_iter().map(Into::into).collect::<Vec<_>>());
}

/// Where libnvrtc was found, once looked for.
#[pyfunction]
fn nvrtc_location() -> Option<String> {
    cuda::compile::nvrtc_present().then(cuda::compile::nvrtc_location).flatten()
}

/// The kernel cache folder.
#[pyfunction]
fn cache_dir() -> String {
    cuda::cache::dir().display().to_string()
}

/// Calls `f(variant, cache_file)` before every kernel compile the disk cache cannot serve.
#[pyfunction]
fn set_compile_hook(f: Py<PyAny>) -> bool {
    cuda::cache::set_compile_hook(move |variant, file| {
        Python::attach(|py| {
            if let Err(e) = f.call1(py, (variant, file.display().to_string())) {
                e.print(py);
            }
        })
    })
}

/// Fills every output the backend writes with NaN before the kernels run (a test hook).
#[pyfunction]
fn set_poison_outputs(on: bool) {
    cuda::set_poison_outputs(on);
}

#[pymodule]
fn _flashattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fwd, m)?)?;
    m.add_function(wrap_pyfunction!(bwd, m)?)?;
    m.add_function(wrap_pyfunction!(bwd_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(kvcache, m)?)?;
    m.add_function(wrap_pyfunction!(kvcache_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(precompile, m)?)?;
    m.add_function(wrap_pyfunction!(add_nvrtc_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_location, m)?)?;
    m.add_function(wrap_pyfunction!(cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(set_compile_hook, m)?)?;
    m.add_function(wrap_pyfunction!(set_poison_outputs, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
