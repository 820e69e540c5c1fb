//! `flashattn._flashattn`: the Python extension behind the `flashattn` package.
//!
//! It takes `torch.Tensor` objects and reads what it needs of each through its Python attributes (address,
//! dtype, shape, strides, device): it links neither libtorch nor libcudart, so one wheel serves every torch
//! and CUDA driver. Host tensors run the CPU backend over torch's memory; CUDA tensors run the kernels on
//! their device's current stream with every piece of metadata read from device memory, and scratch from
//! torch's caching allocator (a `new_empty` of bytes held until the kernels are enqueued: the allocator is
//! stream-ordered; eager KV-cache calls keep theirs for the next call on the same stream, see `kv_workspace`).
//! Nothing is copied, nothing synchronises. The GIL is released while a call runs (a first
//! call of a kernel variant compiles it, about a second).
//!
//! Every tensor argument is read and checked here, once: this layer is the per-call host cost of the
//! package, so the Python front does no per-tensor work of its own.
//!
//! Errors become the exceptions torch raises for the same mistakes: a wrong dtype or a non-tensor
//! `TypeError`, other invalid arguments and a cache overflow `ValueError`, an unsupported combination
//! `NotImplementedError`, tensors on different devices and device or backend failures `RuntimeError`.

use flashattn::cuda::{
    self, BackwardTensors, DeviceKvCache, DeviceMeta, DeviceRotary, DeviceTensorRef, DeviceVarlen, DeviceWorkspace,
    ForwardTensors,
};
use flashattn::kvcache::{CacheSeqlens, KvCache, Rotary};
use flashattn::{
    AttnOptions, BackwardInputs, CpuSlice, CpuSliceMut, CpuStorage, DType, Error, GradientsMut, Layout, Tensor,
    TensorView, TensorViewMut, VarLen,
};
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};
use std::ffi::c_void;

/// A tensor as read from a `torch.Tensor`: address of element 0, dtype, shape, strides (elements) and
/// device index (`-1` for host memory).
struct Tens {
    ptr: u64,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    device: i64,
}

/// What the extension uses of torch, looked up once.
struct Torch {
    tensor: Py<PyType>,
    dtypes: Vec<(Py<PyAny>, DType)>,
    /// `{"dtype": torch.uint8}`: the keyword arguments of a workspace's `new_empty`.
    bytes_kw: Py<PyDict>,
    /// `{"dtype": torch.float32}`: the keyword arguments of an `lse`'s `new_empty`.
    f32_kw: Py<PyDict>,
    /// `torch.empty_like`.
    empty_like: Py<PyAny>,
    /// `torch._C._cuda_getCurrentRawStream` (what torch's compiled code calls), when this torch has it.
    raw_stream: Option<Py<PyAny>>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

fn torch(py: Python<'_>) -> PyResult<&'static Torch> {
    TORCH.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let dt = |name: &str| -> PyResult<Py<PyAny>> { Ok(torch.getattr(name)?.unbind()) };
        let bytes_kw = PyDict::new(py);
        bytes_kw.set_item("dtype", torch.getattr("uint8")?)?;
        let f32_kw = PyDict::new(py);
        f32_kw.set_item("dtype", torch.getattr("float32")?)?;
        let raw_stream = torch.getattr("_C")?.getattr("_cuda_getCurrentRawStream").ok().map(Bound::unbind);
        Ok(Torch {
            tensor: torch.getattr("Tensor")?.cast_into::<PyType>()?.unbind(),
            dtypes: [
                (dt("float16")?, DType::F16),
                (dt("bfloat16")?, DType::BF16),
                (dt("float32")?, DType::F32),
                (dt("int32")?, DType::I32),
            ]
            .into_iter()
            // FP8 inputs (forward only, CPU tensors for now), where this torch has the dtype.
            .chain(dt("float8_e4m3fn").ok().map(|d| (d, DType::E4M3)))
            .collect(),
            bytes_kw: bytes_kw.unbind(),
            f32_kw: f32_kw.unbind(),
            empty_like: torch.getattr("empty_like")?.unbind(),
            raw_stream,
        })
    })
}

/// Reads the tensor argument `name`.
fn read(py: Python<'_>, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Tens> {
    let t = torch(py)?;
    let dtype = match obj.getattr(intern!(py, "dtype")) {
        Ok(dt) => t.dtypes.iter().find(|(d, _)| d.bind(py).is(&dt)).map(|&(_, d)| d),
        Err(_) => None,
    };
    let Some(dtype) = dtype else {
        // The slow path: say what is wrong (not a tensor, or a dtype the kernels do not take).
        if !obj.is_instance(t.tensor.bind(py))? {
            let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
            return Err(PyTypeError::new_err(format!("invalid argument `{name}`: expected a torch.Tensor, got {ty}")));
        }
        return Err(PyTypeError::new_err(format!(
            "invalid argument `{name}`: expected dtype float16, bfloat16, float32 (CPU only), float8_e4m3fn (CPU, \
             forward only) or int32 (metadata), got {}",
            obj.getattr(intern!(py, "dtype"))?
        )));
    };
    // A CUDA tensor's index, -1 for host memory; any other device (meta, XPU, MPS, ...) is refused: its
    // get_device() can look like a CUDA index.
    let device: i64 = if obj.getattr(intern!(py, "is_cuda"))?.extract::<bool>()? {
        obj.call_method0(intern!(py, "get_device"))?.extract()?
    } else if obj.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
        -1
    } else {
        let on = obj.getattr(intern!(py, "device"))?;
        return Err(PyRuntimeError::new_err(format!(
            "invalid argument `{name}`: expected a CPU or CUDA tensor, got one on {on}"
        )));
    };
    Ok(Tens {
        ptr: obj.call_method0(intern!(py, "data_ptr"))?.extract()?,
        dtype,
        shape: obj.getattr(intern!(py, "shape"))?.extract()?,
        strides: obj.call_method0(intern!(py, "stride"))?.extract()?,
        device,
    })
}

fn read_opt(py: Python<'_>, name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Tens>> {
    obj.map(|o| read(py, name, o)).transpose()
}

fn device_name(d: i64) -> String {
    if d < 0 {
        "cpu".into()
    } else {
        format!("cuda:{d}")
    }
}

/// Every tensor on `q`'s device (a CPU tensor of metadata with CUDA `q` is refused too).
fn same_device(q: &Tens, others: &[(&str, Option<&Tens>)]) -> PyResult<()> {
    for (name, t) in others {
        if let Some(t) = t {
            if t.device != q.device {
                return Err(PyRuntimeError::new_err(format!(
                    "invalid argument `{name}`: expected a tensor on {} (as q), got one on {}",
                    device_name(q.device),
                    device_name(t.device)
                )));
            }
        }
    }
    Ok(())
}

/// [`same_device`] for `others` and the varlen metadata, if any.
fn check_devices(q: &Tens, others: &[(&str, Option<&Tens>)], vl: &Option<Varlen>) -> PyResult<()> {
    same_device(q, others)?;
    match vl {
        Some(vl) => same_device(q, &vl.tensors()),
        None => Ok(()),
    }
}

/// The current CUDA stream of device `n`, as torch's raw handle (an integer: a pointer cannot cross into the
/// GIL-free closure).
fn current_stream(py: Python<'_>, n: usize) -> PyResult<u64> {
    let raw: u64 = match &torch(py)?.raw_stream {
        Some(f) => f.call1(py, (n,))?.extract(py)?,
        None => py
            .import("torch")?
            .getattr("cuda")?
            .call_method1("current_stream", (n,))?
            .getattr("cuda_stream")?
            .extract()?,
    };
    Ok(raw)
}

/// `bytes` of scratch from torch's caching allocator on `like`'s device (`None` for zero bytes). The tensor
/// must live until the kernels that use it are enqueued.
fn scratch<'py>(py: Python<'py>, like: &Bound<'py, PyAny>, bytes: usize) -> PyResult<Option<Bound<'py, PyAny>>> {
    if bytes == 0 {
        return Ok(None);
    }
    let kw = torch(py)?.bytes_kw.bind(py);
    like.call_method(intern!(py, "new_empty"), ((bytes,),), Some(kw)).map(Some)
}

/// `out` (`torch.empty_like(q)`: q's dtype, shape and strides where q is dense; a value head dim of its own:
/// contiguous) and `lse` (float32 `(b, h, sq)`, contiguous) of a KV-cache call, allocated here and described
/// without reading them back (only their addresses and out's strides are asked for).
fn kv_outputs<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    qt: &Tens,
    d_v: usize,
) -> PyResult<(Bound<'py, PyAny>, Tens, Bound<'py, PyAny>, Tens)> {
    let t = torch(py)?;
    let &[b, sq, h, d] = qt.shape.as_slice() else {
        return Err(PyValueError::new_err(format!(
            "invalid argument `q`: expected rank 4 (batch, seqlen_q, nheads, headdim), got shape {:?}",
            qt.shape
        )));
    };
    let out = if d_v == d {
        t.empty_like.bind(py).call1((q,))?
    } else {
        q.call_method1(intern!(py, "new_empty"), ((b, sq, h, d_v),))?
    };
    let lse = q.call_method(intern!(py, "new_empty"), ((b, h, sq),), Some(t.f32_kw.bind(py)))?;
    let ot = Tens {
        ptr: out.call_method0(intern!(py, "data_ptr"))?.extract()?,
        dtype: qt.dtype,
        shape: vec![b, sq, h, d_v],
        strides: out.call_method0(intern!(py, "stride"))?.extract()?,
        device: qt.device,
    };
    let lt = Tens {
        ptr: lse.call_method0(intern!(py, "data_ptr"))?.extract()?,
        dtype: DType::F32,
        shape: vec![b, h, sq],
        strides: vec![h * sq, sq, 1],
        device: qt.device,
    };
    Ok((out, ot, lse, lt))
}

/// A KV-cache workspace kept for the next call on the same device and stream (see [`kv_workspace`]).
struct KeptWorkspace {
    device: usize,
    /// The stream it is kept for; `None` for a graph capture's, which is never kept.
    stream: Option<u64>,
    /// The torch tensor that owns the memory.
    _buf: Py<PyAny>,
    ptr: u64,
    bytes: usize,
}

/// The workspaces of eager KV-cache calls not in use right now, at most one per (device, stream) and
/// [`KEPT_MAX`] in all.
static KEPT: std::sync::Mutex<Vec<KeptWorkspace>> = std::sync::Mutex::new(Vec::new());
const KEPT_MAX: usize = 16;

/// The workspace of a KV-cache call of `bytes` on device `n` and `stream`: the call's own for as long as it holds
/// it (the tensor inside keeps the memory alive). Outside graph capture it is the one the previous call on this
/// device and stream left ([`return_workspace`]) when that is large enough, checked out of [`KEPT`] so that no
/// other call can use or free it meanwhile (a second thread on the same stream gets fresh memory); calls on one
/// stream run in order and each zeroes the header first. This saves a caching-allocator round trip per decode
/// step. A stream that is capturing a CUDA graph always gets fresh memory from torch (the graph's pool), and its
/// workspace is not kept: a replay may outlive anything kept here.
fn kv_workspace(
    py: Python<'_>,
    like: &Bound<'_, PyAny>,
    n: usize,
    stream: u64,
    bytes: usize,
) -> PyResult<(DeviceWorkspace, Option<KeptWorkspace>)> {
    if bytes == 0 {
        return Ok((DeviceWorkspace { ptr: 0, bytes: 0 }, None));
    }
    // SAFETY: torch's current stream of device n.
    let capturing = unsafe { cuda::runtime::stream_is_capturing(n, stream as *mut c_void) }.map_err(to_py)?;
    if !capturing {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = kept.iter().position(|w| w.device == n && w.stream == Some(stream) && w.bytes >= bytes) {
            let w = kept.swap_remove(i);
            return Ok((DeviceWorkspace { ptr: w.ptr, bytes: w.bytes }, Some(w)));
        }
    }
    let buf = scratch(py, like, bytes)?.expect("bytes > 0");
    let ptr = buf.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let w = KeptWorkspace { device: n, stream: (!capturing).then_some(stream), _buf: buf.unbind(), ptr, bytes };
    Ok((DeviceWorkspace { ptr, bytes }, Some(w)))
}

/// Gives a call's workspace back once its kernels are enqueued: kept for the next call on its stream (replacing
/// a smaller one there), or released to torch's cache, which hands it out again on that stream only, after the
/// kernels already enqueued. A graph capture's workspace is never kept.
fn return_workspace(w: Option<KeptWorkspace>) {
    let Some(w) = w.filter(|w| w.stream.is_some()) else { return };
    let dropped = {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        match kept.iter().position(|k| k.device == w.device && k.stream == w.stream) {
            Some(i) if kept[i].bytes >= w.bytes => Some(w),
            Some(i) => Some(std::mem::replace(&mut kept[i], w)),
            None => {
                let old = (kept.len() >= KEPT_MAX).then(|| kept.remove(0));
                kept.push(w);
                old
            }
        }
    };
    // Released with the lock free (a tensor's release calls into torch).
    drop(dropped);
}

/// Releases every kept KV-cache workspace to torch's caching allocator (`flashattn.release_workspaces()`, e.g.
/// before `torch.cuda.empty_cache()`).
#[pyfunction]
fn release_workspaces() {
    let all = std::mem::take(&mut *KEPT.lock().unwrap_or_else(|e| e.into_inner()));
    drop(all);
}

fn workspace_of(py: Python<'_>, buf: &Option<Bound<'_, PyAny>>, bytes: usize) -> PyResult<DeviceWorkspace> {
    Ok(match buf {
        Some(b) => DeviceWorkspace { ptr: b.call_method0(intern!(py, "data_ptr"))?.extract()?, bytes },
        None => DeviceWorkspace { ptr: 0, bytes: 0 },
    })
}

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        Error::InvalidArgument { expected, .. } if expected.starts_with("dtype") => PyTypeError::new_err(msg),
        Error::InvalidArgument { .. } | Error::CacheOverflow { .. } => PyValueError::new_err(msg),
        Error::Unsupported { .. } => PyNotImplementedError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

fn dev(t: &Tens) -> DeviceTensorRef {
    DeviceTensorRef { ptr: t.ptr, dtype: t.dtype, shape: t.shape.clone(), strides: t.strides.clone() }
}

fn layout(t: &Tens) -> PyResult<(Layout, usize)> {
    let l = Layout { shape: t.shape.clone(), strides: t.strides.clone(), offset: 0 };
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
unsafe fn host_view<'a>(t: &Tens) -> PyResult<TensorView<'a>> {
    let (l, len) = layout(t)?;
    let p = t.ptr as usize;
    // SAFETY: the caller's contract; an empty tensor gets an empty slice (its address may be null).
    let data = unsafe {
        match t.dtype {
            DType::F16 => CpuSlice::F16(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::BF16 => CpuSlice::BF16(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::F32 => CpuSlice::F32(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::I32 => CpuSlice::I32(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
            DType::E4M3 => CpuSlice::E4M3(if len == 0 { &[] } else { std::slice::from_raw_parts(p as *const _, len) }),
        }
    };
    TensorView::new(data, l).map_err(to_py)
}

/// A writable view of host memory that torch owns.
///
/// # Safety
/// As for [`host_view`], and the memory is accessed through nothing else while the view lives.
unsafe fn host_view_mut<'a>(t: &Tens) -> PyResult<TensorViewMut<'a>> {
    let (l, len) = layout(t)?;
    let p = t.ptr as usize;
    // SAFETY: the caller's contract.
    let data = unsafe {
        match t.dtype {
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
            DType::E4M3 => {
                CpuSliceMut::E4M3(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(p as *mut _, len) })
            }
        }
    };
    TensorViewMut::new(data, l).map_err(to_py)
}

/// The `i32` values of a small host tensor (metadata).
///
/// # Safety
/// As for [`host_view`].
unsafe fn host_i32(arg: &'static str, t: &Tens) -> PyResult<Vec<i32>> {
    // SAFETY: the caller's contract.
    let v = unsafe { host_view(t)? };
    v.to_i32_vec().ok_or_else(|| to_py(Error::invalid(arg, "dtype i32", v.dtype())))
}

/// A host tensor copied into an owned one (small metadata: ALiBi slopes, block tables, sinks).
///
/// # Safety
/// As for [`host_view`].
unsafe fn host_owned(t: &Tens) -> PyResult<Tensor> {
    // SAFETY: the caller's contract.
    let v = unsafe { host_view(t)? };
    let storage = match v.dtype() {
        DType::I32 => CpuStorage::I32(v.to_i32_vec().unwrap_or_default()),
        d => CpuStorage::from_f32(d, &v.to_f32_vec()),
    };
    Tensor::from_storage(storage, v.shape()).map_err(to_py)
}

/// The options every entry point takes, as FlashAttention names them.
struct Opts {
    softmax_scale: Option<f32>,
    causal: bool,
    window: (i64, i64),
    softcap: f32,
    deterministic: bool,
    fp8: Fp8,
}

/// FP8 arguments: the descales (FlashAttention-3's `q_descale`, `k_descale`, `v_descale`) and the output dtype.
#[derive(Default)]
struct Fp8 {
    descale: [Option<Tens>; 3],
    /// `out`'s dtype when the caller chose it (`out_dtype=`) or the inputs are FP8; `None` otherwise.
    out_dtype: Option<DType>,
}

impl Fp8 {
    /// Reads the FP8 arguments; `fp8` says whether q or the keys are FP8, `out_set` whether the caller passed
    /// `out_dtype` (then the library checks it against the inputs).
    fn read(
        py: Python<'_>,
        descale: [Option<&Bound<'_, PyAny>>; 3],
        fp8: bool,
        out_set: bool,
        out: &Tens,
    ) -> PyResult<Self> {
        let [q, k, v] = descale;
        Ok(Fp8 {
            descale: [read_opt(py, "q_descale", q)?, read_opt(py, "k_descale", k)?, read_opt(py, "v_descale", v)?],
            out_dtype: (fp8 || out_set).then_some(out.dtype),
        })
    }

    fn tensors(&self) -> [(&'static str, Option<&Tens>); 3] {
        let [q, k, v] = &self.descale;
        [("q_descale", q.as_ref()), ("k_descale", k.as_ref()), ("v_descale", v.as_ref())]
    }

    /// CUDA tensors: FP8 `dtypes` (q, k, v, new rows) and `q_descale` are not there yet (before any device work);
    /// `k_descale`/`v_descale` are, for the e4m3 KV caches (`kv_cache`: the caller leaves the caches' dtypes out).
    fn refuse_on_cuda(&self, dtypes: &[DType], kv_cache: bool) -> PyResult<()> {
        let descale = if kv_cache { self.descale[0].is_some() } else { self.descale.iter().any(Option::is_some) };
        if dtypes.iter().any(|d| d.is_fp8()) || descale {
            let what = if kv_cache {
                "FP8 (float8_e4m3fn) q or new rows: CPU tensors only for now (e4m3 caches with a 16-bit q run)"
            } else {
                "FP8 (float8_e4m3fn) inputs: CPU tensors only for now"
            };
            return Err(to_py(Error::Unsupported { backend: "cuda", what: what.into() }));
        }
        Ok(())
    }
}

impl Opts {
    fn attn(&self) -> AttnOptions {
        AttnOptions {
            softmax_scale: self.softmax_scale,
            causal: self.causal,
            window: self.window,
            softcap: self.softcap,
            deterministic: self.deterministic,
            out_dtype: self.fp8.out_dtype,
            ..Default::default()
        }
    }
}

/// Varlen metadata: `cu_seqlens_q`, `cu_seqlens_k`, `seqused_k`, `max_seqlen_q`, `max_seqlen_k`.
struct Varlen {
    cu_q: Tens,
    cu_k: Tens,
    used: Option<Tens>,
    max_q: usize,
    max_k: usize,
}

/// Reads the varlen arguments (all `None` for padded batches).
fn read_varlen(
    py: Python<'_>,
    cu_q: Option<&Bound<'_, PyAny>>,
    cu_k: Option<&Bound<'_, PyAny>>,
    used: Option<&Bound<'_, PyAny>>,
    max_q: usize,
    max_k: usize,
) -> PyResult<Option<Varlen>> {
    match (cu_q, cu_k) {
        (None, None) => Ok(None),
        (Some(cq), Some(ck)) => Ok(Some(Varlen {
            cu_q: read(py, "cu_seqlens_q", cq)?,
            cu_k: read(py, "cu_seqlens_k", ck)?,
            used: read_opt(py, "seqused_k", used)?,
            max_q,
            max_k,
        })),
        (Some(_), None) => Err(PyValueError::new_err(
            "invalid argument `cu_seqlens_k`: expected a tensor with `cu_seqlens_q`, got None",
        )),
        (None, Some(_)) => Err(PyValueError::new_err(
            "invalid argument `cu_seqlens_q`: expected a tensor with `cu_seqlens_k`, got None",
        )),
    }
}

impl Varlen {
    fn tensors(&self) -> [(&'static str, Option<&Tens>); 3] {
        [("cu_seqlens_q", Some(&self.cu_q)), ("cu_seqlens_k", Some(&self.cu_k)), ("seqused_k", self.used.as_ref())]
    }
}

/// Host options: varlen offsets, ALiBi slopes and the sink read from host memory.
///
/// # Safety
/// As for [`host_view`], for every tensor given.
unsafe fn host_options(
    o: &Opts,
    alibi: &Option<Tens>,
    varlen: &Option<Varlen>,
    sink: &Option<Tens>,
) -> PyResult<AttnOptions> {
    let mut a = o.attn();
    // SAFETY: the caller's contract.
    unsafe {
        a.alibi_slopes = alibi.as_ref().map(|t| host_owned(t)).transpose()?;
        a.sink = sink.as_ref().map(|t| host_owned(t)).transpose()?;
        let [qd, kd, vd] = &o.fp8.descale;
        a.q_descale = qd.as_ref().map(|t| host_owned(t)).transpose()?;
        a.k_descale = kd.as_ref().map(|t| host_owned(t)).transpose()?;
        a.v_descale = vd.as_ref().map(|t| host_owned(t)).transpose()?;
        if let Some(vl) = varlen {
            a.varlen = Some(VarLen {
                cu_seqlens_q: host_i32("cu_seqlens_q", &vl.cu_q)?,
                cu_seqlens_k: host_i32("cu_seqlens_k", &vl.cu_k)?,
                seqused_k: vl.used.as_ref().map(|u| host_i32("seqused_k", u)).transpose()?,
            });
        }
    }
    Ok(a)
}

fn device_meta(alibi: &Option<Tens>, varlen: &Option<Varlen>, sink: &Option<Tens>) -> DeviceMeta {
    DeviceMeta {
        varlen: varlen.as_ref().map(|vl| DeviceVarlen {
            cu_seqlens_q: dev(&vl.cu_q),
            cu_seqlens_k: dev(&vl.cu_k),
            seqused_k: vl.used.as_ref().map(dev),
            max_seqlen_q: vl.max_q,
            max_seqlen_k: vl.max_k,
        }),
        alibi_slopes: alibi.as_ref().map(dev),
        sink: sink.as_ref().map(dev),
    }
}

fn device_index(device: i64) -> Option<usize> {
    usize::try_from(device).ok()
}

/// The arguments [`fwd`] and [`bwd`] share, in one tuple after their tensors (in the ops' own order):
/// `(alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
/// window_left, window_right, softcap)`.
#[derive(FromPyObject)]
struct Shared<'py>(
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    usize,
    usize,
    Option<f32>,
    bool,
    i64,
    i64,
    f32,
);

impl Shared<'_> {
    /// Reads the ALiBi slopes and the varlen arguments.
    fn tensors(&self, py: Python<'_>) -> PyResult<(Option<Tens>, Option<Varlen>)> {
        let Shared(alibi, cu_q, cu_k, used, max_q, max_k, ..) = self;
        let alibi = read_opt(py, "alibi_slopes", alibi.as_ref())?;
        Ok((alibi, read_varlen(py, cu_q.as_ref(), cu_k.as_ref(), used.as_ref(), *max_q, *max_k)?))
    }

    /// The score options, with `deterministic` and the FP8 arguments given.
    fn opts(&self, deterministic: bool, fp8: Fp8) -> Opts {
        let &Shared(.., softmax_scale, causal, window_left, window_right, softcap) = self;
        Opts { softmax_scale, causal, window: (window_left, window_right), softcap, deterministic, fp8 }
    }
}

/// The forward's tensors `(q, k, v, out, lse)`, one tuple in [`fwd`] (which writes `out` and `lse`) and [`bwd`]
/// (which reads them), as [`ForwardTensors`] holds them on the device.
#[derive(FromPyObject)]
struct FwdArgs<'py>(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);

/// [`FwdArgs`] read.
struct FwdTens {
    q: Tens,
    k: Tens,
    v: Tens,
    o: Tens,
    lse: Tens,
}

impl FwdArgs<'_> {
    /// Reads the five tensors, named as the ops name them.
    fn read(&self, py: Python<'_>) -> PyResult<FwdTens> {
        let FwdArgs(q, k, v, out, lse) = self;
        let q = read(py, "q", q)?;
        let (k, v) = (read(py, "k", k)?, read(py, "v", v)?);
        let (o, lse) = (read(py, "out", out)?, read(py, "softmax_lse", lse)?);
        Ok(FwdTens { q, k, v, o, lse })
    }
}

impl FwdTens {
    /// `k`, `v`, `out` and `lse` by name, for the check that every tensor is on `q`'s device.
    fn others(&self) -> [(&'static str, Option<&Tens>); 4] {
        [("k", Some(&self.k)), ("v", Some(&self.v)), ("out", Some(&self.o)), ("softmax_lse", Some(&self.lse))]
    }

    /// The device views of `q`, `k`, `v`, `out`, `lse`.
    fn dev(&self) -> [DeviceTensorRef; 5] {
        [&self.q, &self.k, &self.v, &self.o, &self.lse].map(dev)
    }
}

/// Attention forward: writes `out` and `lse` (allocated by the caller: `out` like q, `lse` float32
/// `(b, h, sq)` or `(h, total_q)` for varlen).
#[pyfunction]
#[pyo3(signature = (
    tensors, shared, learnable_sink=None, q_descale=None, k_descale=None, v_descale=None, out_dtype_set=false,
))]
#[allow(clippy::too_many_arguments)]
fn fwd(
    py: Python<'_>,
    tensors: FwdArgs<'_>,
    shared: Shared<'_>,
    learnable_sink: Option<&Bound<'_, PyAny>>,
    q_descale: Option<&Bound<'_, PyAny>>,
    k_descale: Option<&Bound<'_, PyAny>>,
    v_descale: Option<&Bound<'_, PyAny>>,
    out_dtype_set: bool,
) -> PyResult<()> {
    let x = tensors.read(py)?;
    let fp8 = x.q.dtype.is_fp8() || x.k.dtype.is_fp8();
    let fp8 = Fp8::read(py, [q_descale, k_descale, v_descale], fp8, out_dtype_set, &x.o)?;
    let (alibi, vl) = shared.tensors(py)?;
    let sink = read_opt(py, "learnable_sink", learnable_sink)?;
    same_device(&x.q, &x.others())?;
    check_devices(&x.q, &[("alibi_slopes", alibi.as_ref()), ("learnable_sink", sink.as_ref())], &vl)?;
    same_device(&x.q, &fp8.tensors())?;
    if x.q.device >= 0 {
        fp8.refuse_on_cuda(&[x.q.dtype, x.k.dtype, x.v.dtype], false)?;
    }
    let o = shared.opts(false, fp8);
    match device_index(x.q.device) {
        None => {
            // SAFETY: live host tensors of torch's; out and lse are fresh and unaliased.
            let (qv, kv, vv, mut ov, mut lv, a) = unsafe {
                (
                    host_view(&x.q)?,
                    host_view(&x.k)?,
                    host_view(&x.v)?,
                    host_view_mut(&x.o)?,
                    host_view_mut(&x.lse)?,
                    host_options(&o, &alibi, &vl, &sink)?,
                )
            };
            py.detach(|| flashattn::forward_into(&qv, &kv, &vv, &mut ov, &mut lv, &a)).map_err(to_py)
        }
        Some(n) => {
            let [q, k, v, o_, l] = x.dev();
            let meta = device_meta(&alibi, &vl, &sink);
            let a = o.attn();
            let stream = current_stream(py, n)?;
            let t = ForwardTensors { q: &q, k: &k, v: &v, o: &o_, lse: &l };
            // SAFETY: tensors of device n (checked above), its current stream.
            py.detach(|| unsafe { cuda::forward_device(n, stream as *mut c_void, t, &a, &meta) }).map_err(to_py)
        }
    }
}

/// Attention backward: writes `dq`, `dk`, `dv` (allocated by the caller, any strides with a contiguous last
/// dim; with `seqused_k`, key rows past it keep what they held: pass zeroed tensors), and with a sink its
/// gradient into `dsink` (host tensors). CUDA scratch comes from torch's caching allocator.
/// `whole_rows = false`: `out` and `lse` belong to a larger set of keys than this call's (a ring attention
/// chunk pair): no row takes the one-key shortcut, and the CPU reads `D` from `out` (see `backward_into_of`).
#[pyfunction]
#[pyo3(signature = (
    dout, tensors, dq, dk, dv, shared, deterministic, learnable_sink=None, dsink=None, whole_rows=true,
))]
#[allow(clippy::too_many_arguments)]
fn bwd(
    py: Python<'_>,
    dout: &Bound<'_, PyAny>,
    tensors: FwdArgs<'_>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    shared: Shared<'_>,
    deterministic: bool,
    learnable_sink: Option<&Bound<'_, PyAny>>,
    dsink: Option<&Bound<'_, PyAny>>,
    whole_rows: bool,
) -> PyResult<()> {
    let x = tensors.read(py)?;
    let dot = read(py, "dout", dout)?;
    let (dqt, dkt, dvt) = (read(py, "dq", dq)?, read(py, "dk", dk)?, read(py, "dv", dv)?);
    let (alibi, vl) = shared.tensors(py)?;
    let sink = read_opt(py, "learnable_sink", learnable_sink)?;
    let dsink = read_opt(py, "dsink", dsink)?;
    same_device(&x.q, &x.others())?;
    let others = [
        ("dout", Some(&dot)),
        ("dq", Some(&dqt)),
        ("dk", Some(&dkt)),
        ("dv", Some(&dvt)),
        ("alibi_slopes", alibi.as_ref()),
        ("learnable_sink", sink.as_ref()),
        ("dsink", dsink.as_ref()),
    ];
    check_devices(&x.q, &others, &vl)?;
    let o = shared.opts(deterministic, Fp8::default());
    match device_index(x.q.device) {
        None => {
            // SAFETY: live host tensors of torch's; the gradients are fresh and unaliased.
            let (x, grads, a) = unsafe {
                (
                    BackwardInputs { q: &x.q, k: &x.k, v: &x.v, o: &x.o, lse: &x.lse, dout: &dot }
                        .try_map(|t| host_view(t))?,
                    GradientsMut { dq: host_view_mut(&dqt)?, dk: host_view_mut(&dkt)?, dv: host_view_mut(&dvt)? },
                    host_options(&o, &alibi, &vl, &sink)?,
                )
            };
            // SAFETY: a live host tensor, fresh and unaliased.
            let mut dsv = dsink.as_ref().map(|t| unsafe { host_view_mut(t) }).transpose()?;
            py.detach(|| -> flashattn::Result<()> {
                let ds = flashattn::backward_into_of(&x, grads, &a, whole_rows)?;
                match (ds, dsv.as_mut()) {
                    (Some(g), Some(out)) => copy_into(&g, out, "dsink"),
                    (Some(_), None) => Err(Error::invalid("dsink", "a tensor for the sink's gradient", "none")),
                    (None, _) => Ok(()),
                }
            })
            .map_err(to_py)
        }
        Some(n) => {
            let [qd, kd, vd, od, ld] = x.dev();
            let [dod, dqd, dkd, dvd] = [&dot, &dqt, &dkt, &dvt].map(dev);
            // The op always passes a `dsink` buffer (empty without a sink); the device API takes one exactly when
            // there is a sink.
            let dsd = dsink.as_ref().filter(|_| sink.is_some()).map(dev);
            let meta = device_meta(&alibi, &vl, &sink);
            let a = o.attn();
            let bytes = cuda::backward_workspace_bytes(&qd, &kd, &vd, &a, &meta).map_err(to_py)?;
            let buf = scratch(py, &tensors.0, bytes)?;
            let ws = workspace_of(py, &buf, bytes)?;
            let stream = current_stream(py, n)?;
            let fwd = ForwardTensors { q: &qd, k: &kd, v: &vd, o: &od, lse: &ld };
            let t = BackwardTensors { fwd, dout: &dod, dq: &dqd, dk: &dkd, dv: &dvd, dsink: dsd.as_ref() };
            // SAFETY: tensors of device n (checked above), its current stream, a workspace of torch's that
            // lives until the kernels are enqueued (`buf`).
            py.detach(|| unsafe { cuda::backward_device(n, stream as *mut c_void, t, &a, &meta, ws, whole_rows) })
                .map_err(to_py)
        }
    }
}
/// KV-cache attention: appends `k`/`v` (rotated) into the cache in place, then writes `out` and `lse` and
/// returns them: the caller's (with `out_dtype_set`: an `out_dtype` of their own), or, both None, allocated
/// here (q's dtype; see [`kv_outputs`]). `num_splits` (CUDA): the number of key splits, 0 for the plan's choice.
/// On the CPU an append that would overflow raises and writes nothing; on CUDA the kernels check values in
/// device memory and refuse such a call without writing the cache (see the package's documentation).
#[pyfunction]
#[pyo3(signature = (
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, rotary_cos,
    rotary_sin, rotary_interleaved, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
    learnable_sink, out, lse, num_splits=0, q_descale=None, k_descale=None, v_descale=None, out_dtype_set=false,
))]
#[allow(clippy::too_many_arguments)]
fn kvcache<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    k: Option<&Bound<'_, PyAny>>,
    v: Option<&Bound<'_, PyAny>>,
    cache_seqlens: &Bound<'_, PyAny>,
    block_table: Option<&Bound<'_, PyAny>>,
    cache_batch_idx: Option<&Bound<'_, PyAny>>,
    cache_leftpad: Option<&Bound<'_, PyAny>>,
    rotary_cos: Option<&Bound<'_, PyAny>>,
    rotary_sin: Option<&Bound<'_, PyAny>>,
    rotary_interleaved: bool,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    softmax_scale: Option<f32>,
    causal: bool,
    window_left: i64,
    window_right: i64,
    softcap: f32,
    learnable_sink: Option<&Bound<'_, PyAny>>,
    out: Option<&Bound<'py, PyAny>>,
    lse: Option<&Bound<'py, PyAny>>,
    num_splits: usize,
    q_descale: Option<&Bound<'_, PyAny>>,
    k_descale: Option<&Bound<'_, PyAny>>,
    v_descale: Option<&Bound<'_, PyAny>>,
    out_dtype_set: bool,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let qt = read(py, "q", q)?;
    let (kc, vc) = (read(py, "k_cache", k_cache)?, read(py, "v_cache", v_cache)?);
    let (kn, vn) = (read_opt(py, "k", k)?, read_opt(py, "v", v)?);
    let seqlens = read(py, "cache_seqlens", cache_seqlens)?;
    let bt = read_opt(py, "block_table", block_table)?;
    let bidx = read_opt(py, "cache_batch_idx", cache_batch_idx)?;
    let lpad = read_opt(py, "cache_leftpad", cache_leftpad)?;
    let cos = read_opt(py, "rotary_cos", rotary_cos)?;
    let sin = read_opt(py, "rotary_sin", rotary_sin)?;
    let alibi = read_opt(py, "alibi_slopes", alibi_slopes)?;
    let sink = read_opt(py, "learnable_sink", learnable_sink)?;
    let (out, ot, lse, lt) =
        match (out, lse) {
            (Some(o), Some(l)) => (o.clone(), read(py, "out", o)?, l.clone(), read(py, "softmax_lse", l)?),
            (None, None) if !out_dtype_set && !qt.dtype.is_fp8() => {
                let d_v = vc.shape.last().copied().unwrap_or(0);
                kv_outputs(py, q, &qt, d_v)?
            }
            _ => return Err(PyValueError::new_err(
                "invalid argument `out`: expected `out` and `softmax_lse` both given, or both None (a 16-bit or f32 q \
                 without out_dtype)",
            )),
        };
    same_device(
        &qt,
        &[
            ("k_cache", Some(&kc)),
            ("v_cache", Some(&vc)),
            ("k", kn.as_ref()),
            ("v", vn.as_ref()),
            ("rotary_cos", cos.as_ref()),
            ("rotary_sin", sin.as_ref()),
            ("cache_seqlens", Some(&seqlens)),
            ("cache_batch_idx", bidx.as_ref()),
            ("cache_leftpad", lpad.as_ref()),
            ("block_table", bt.as_ref()),
            ("alibi_slopes", alibi.as_ref()),
            ("learnable_sink", sink.as_ref()),
            ("out", Some(&ot)),
            ("softmax_lse", Some(&lt)),
        ],
    )?;
    let rot = match (cos, sin) {
        (None, None) => None,
        (Some(c), Some(s)) => Some((c, s)),
        _ => {
            return Err(PyValueError::new_err(
                "invalid argument `rotary_sin`: expected `rotary_cos` and `rotary_sin` both given or both None",
            ))
        }
    };
    // v_cache a view of k_cache's first d_v columns: the values are read from the key cache (no copy; the CUDA
    // kernels refuse it as not implemented), and appending `k` appends them, so `v` must be None.
    let key_prefix = cache_values(&kc, &vc)?;
    match (key_prefix, &kn, &vn) {
        (Some(d_v), _, Some(v)) => {
            return Err(PyValueError::new_err(format!(
                "invalid argument `v`: expected None when v_cache is k_cache[..., :{d_v}] (the values are the first \
                 {d_v} columns of the keys: appending `k` appends them), got a tensor of shape {:?}",
                v.shape
            )))
        }
        (None, Some(_), None) => {
            return Err(PyValueError::new_err(
                "invalid argument `v`: expected `k` and `v` both given or both None (or `v` None when v_cache is \
                 k_cache[..., :d_v], a view of the keys' first columns)",
            ))
        }
        _ => {}
    }
    let fp8 = qt.dtype.is_fp8() || kc.dtype.is_fp8();
    let fp8 = Fp8::read(py, [q_descale, k_descale, v_descale], fp8, out_dtype_set, &ot)?;
    same_device(&qt, &fp8.tensors())?;
    if qt.device >= 0 {
        // CUDA decodes from e4m3 caches (with their k/v descales) for a 16-bit q; FP8 q or new rows stay CPU-only.
        let mut dts = vec![qt.dtype];
        dts.extend(kn.iter().chain(&vn).map(|t| t.dtype));
        fp8.refuse_on_cuda(&dts, true)?;
    }
    let o = Opts { softmax_scale, causal, window: (window_left, window_right), softcap, deterministic: false, fp8 };
    let ran: PyResult<()> = match device_index(qt.device) {
        None => {
            // SAFETY: live host tensors of torch's; the caches are written in place through these views only (one
            // view of k_cache when v_cache is its first columns: `cache_values` refused any other overlap), out and
            // lse are fresh.
            unsafe {
                let qv = host_view(&qt)?;
                let seqlens = CacheSeqlens::PerSeq(host_i32("cache_seqlens", &seqlens)?);
                let mut cache = match key_prefix {
                    Some(d_v) => KvCache::key_prefix_values(host_view_mut(&kc)?, d_v, seqlens),
                    None => KvCache::new(host_view_mut(&kc)?, host_view_mut(&vc)?, seqlens),
                };
                cache.k_new = kn.as_ref().map(|t| host_view(t)).transpose()?;
                cache.v_new = vn.as_ref().map(|t| host_view(t)).transpose()?;
                cache.block_table = bt.as_ref().map(|t| host_owned(t)).transpose()?;
                cache.cache_batch_idx = bidx.as_ref().map(|t| host_i32("cache_batch_idx", t)).transpose()?;
                cache.cache_leftpad = lpad.as_ref().map(|t| host_i32("cache_leftpad", t)).transpose()?;
                cache.rotary = match &rot {
                    Some((c, s)) => {
                        Some(Rotary { cos: host_view(c)?, sin: host_view(s)?, interleaved: rotary_interleaved })
                    }
                    None => None,
                };
                let a = host_options(&o, &alibi, &None, &sink)?;
                let mut ov = host_view_mut(&ot)?;
                let mut lv = host_view_mut(&lt)?;
                py.detach(|| -> flashattn::Result<()> {
                    let res = flashattn::kvcache_forward(&qv, &mut cache, &a)?;
                    copy_into(&res.o, &mut ov, "out")?;
                    copy_into(&res.lse, &mut lv, "softmax_lse")
                })
                .map_err(to_py)
            }
        }
        Some(n) => {
            let cache = DeviceKvCache {
                k_cache: dev(&kc),
                v_cache: dev(&vc),
                k_new: kn.as_ref().map(dev),
                v_new: vn.as_ref().map(dev),
                cache_seqlens: dev(&seqlens),
                block_table: bt.as_ref().map(dev),
                cache_batch_idx: bidx.as_ref().map(dev),
                cache_leftpad: lpad.as_ref().map(dev),
                rotary: rot.as_ref().map(|(c, s)| DeviceRotary {
                    cos: dev(c),
                    sin: dev(s),
                    interleaved: rotary_interleaved,
                }),
                alibi_slopes: alibi.as_ref().map(dev),
                sink: sink.as_ref().map(dev),
                k_descale: o.fp8.descale[1].as_ref().map(dev),
                v_descale: o.fp8.descale[2].as_ref().map(dev),
            };
            let (qd, od, ld) = (dev(&qt), dev(&ot), dev(&lt));
            let mut a = o.attn();
            // FlashAttention's `num_splits`: 0 lets the plan choose; n fixes the key splits (clamped to the
            // kernels' limit).
            a.tuning.num_splits = num_splits;
            let call = cuda::KvCall::new(n, &qd, &cache, &od, &ld, &a).map_err(to_py)?;
            let stream = current_stream(py, n)?;
            let (ws, held) = kv_workspace(py, q, n, stream, call.workspace_bytes())?;
            // SAFETY: tensors of device n (checked above), its current stream, a workspace of torch's that this
            // call alone holds until its kernels are enqueued (`held`) and that is used on this stream only; its
            // header is zeroed on the stream first.
            let ran = py.detach(|| unsafe { call.enqueue(stream as *mut c_void, ws, true) }).map_err(to_py);
            return_workspace(held);
            ran
        }
    };
    ran?;
    Ok((out, lse))
}

/// How `v_cache` sits in memory beside `k_cache` (both on one device): apart (`None`), or as the first `d_v`
/// columns of each key row, `Some(d_v)`: the same address, dtype and strides, and `k_cache`'s shape but for a last
/// dim `d_v <= d` (MLA's `v_cache = k_cache[..., :d_v]`, read zero-copy as `Values::KeyPrefix`). Any other overlap
/// is refused (`ValueError`): the caches are written in place, and through two aliased views an append would write
/// values into keys (or the reverse).
fn cache_values(kc: &Tens, vc: &Tens) -> PyResult<Option<usize>> {
    let prefix = vc.ptr == kc.ptr
        && vc.dtype == kc.dtype
        && kc.shape.len() == 4
        && vc.shape.len() == 4
        && vc.shape[..3] == kc.shape[..3]
        && vc.strides == kc.strides
        && (1..=kc.shape[3]).contains(&vc.shape[3]);
    if prefix {
        return Ok(Some(vc.shape[3]));
    }
    // Byte spans `[ptr, ptr + extent)`; an empty tensor (extent 0) overlaps nothing.
    let span = |t: &Tens| -> PyResult<(u64, u64)> {
        let (_, len) = layout(t)?;
        Ok((t.ptr, t.ptr.saturating_add((len * t.dtype.size()) as u64)))
    };
    let ((k0, k1), (v0, v1)) = (span(kc)?, span(vc)?);
    if k0 < k1 && v0 < v1 && k0 < v1 && v0 < k1 {
        return Err(PyValueError::new_err(format!(
            "invalid argument `v_cache`: expected memory apart from k_cache's, or a view of k_cache's first d_v \
             columns (k_cache[..., :d_v]: the same data_ptr and strides, shape {:?} + [d_v <= {}]), got one that \
             overlaps k_cache (shape {:?}, strides {:?}, data_ptr offset {} bytes)",
            &kc.shape[..kc.shape.len().min(3)],
            kc.shape.last().copied().unwrap_or(0),
            vc.shape,
            vc.strides,
            vc.ptr as i128 - kc.ptr as i128
        )));
    }
    Ok(None)
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
    m.add_function(wrap_pyfunction!(kvcache, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(release_workspaces, m)?)?;
    m.add_function(wrap_pyfunction!(precompile, m)?)?;
    m.add_function(wrap_pyfunction!(add_nvrtc_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_location, m)?)?;
    m.add_function(wrap_pyfunction!(cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(set_compile_hook, m)?)?;
    m.add_function(wrap_pyfunction!(set_poison_outputs, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
