//! Device memory: buffers uploaded from host tensors, outputs downloaded back, and the raw form that takes
//! a framework's device pointers, strides and stream.

use super::runtime::dev_err;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{CpuSlice, CpuStorage, Layout, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use std::sync::Arc;

/// A tensor as a kernel sees it: the address of element 0 and the batch, row and head strides (elements).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DevView {
    pub ptr: u64,
    pub batch: i64,
    pub row: i64,
    pub head: i64,
}

impl DevView {
    /// From a layout (`[b, s, h, d]`, or `[total, h, d]` when varlen) at address `base` of element 0 of the
    /// buffer.
    pub(crate) fn from_layout(base: u64, elem: usize, l: &Layout) -> Self {
        let s = &l.strides;
        let ptr = base + (l.offset * elem) as u64;
        match s.len() {
            4 => DevView { ptr, batch: s[0] as i64, row: s[1] as i64, head: s[2] as i64 },
            3 => DevView { ptr, batch: 0, row: s[0] as i64, head: s[1] as i64 },
            // lse and other flat buffers: only the address is used.
            _ => DevView { ptr, batch: 0, row: 0, head: 0 },
        }
    }

    /// Whether 16-byte vector accesses are valid: the address is 16-byte aligned and every stride is a
    /// multiple of 16 bytes.
    pub(crate) fn aligned16(&self, elem: usize) -> bool {
        let e = elem as i64;
        self.ptr % 16 == 0 && [self.batch, self.row, self.head].iter().all(|&s| (s * e) % 16 == 0)
    }
}

/// Device memory owned by the backend, with the layout of the tensor it holds.
pub(crate) struct DevTensor {
    pub buf: CudaSlice<u8>,
    pub layout: Layout,
    pub dtype: DType,
}

impl DevTensor {
    /// The address of the buffer's first byte.
    pub(crate) fn base(&self, stream: &CudaStream) -> u64 {
        self.buf.device_ptr(stream).0
    }
    /// The kernel's view of this tensor.
    pub(crate) fn view(&self, stream: &CudaStream) -> DevView {
        DevView::from_layout(self.base(stream), self.dtype.size(), &self.layout)
    }
    /// Bytes of the buffer.
    pub(crate) fn bytes(&self) -> usize {
        self.buf.len()
    }
}

fn as_bytes(s: CpuSlice<'_>) -> &[u8] {
    // SAFETY: f16/bf16/f32/i32/e4m3 (a `repr(transparent)` byte) are plain old data without padding; the byte slice covers exactly the
    // same memory.
    unsafe {
        match s {
            CpuSlice::F16(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)),
            CpuSlice::BF16(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)),
            CpuSlice::F32(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)),
            CpuSlice::I32(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)),
            CpuSlice::E4M3(v) => std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)),
        }
    }
}

/// Uploads the part of a host buffer a strided layout covers, keeping the strides (the offset is kept
/// modulo 8 elements so 16-byte alignment carries over).
pub(crate) fn upload(stream: &Arc<CudaStream>, data: CpuSlice<'_>, layout: &Layout) -> Result<DevTensor> {
    let dtype = data.dtype();
    let elem = dtype.size();
    let extent = layout.extent().unwrap_or(0);
    let lo = if extent == 0 { 0 } else { layout.offset - layout.offset % 8 };
    let bytes = &as_bytes(data)[lo * elem..extent.max(lo) * elem];
    let buf = if bytes.is_empty() {
        // Keep a real allocation so the pointer is valid (never dereferenced).
        stream.alloc_zeros::<u8>(16)
    } else {
        stream.clone_htod(bytes)
    }
    .map_err(|e| dev_err("copying a tensor to the device", e))?;
    let layout = Layout { shape: layout.shape.clone(), strides: layout.strides.clone(), offset: layout.offset - lo };
    Ok(DevTensor { buf, layout, dtype })
}

/// Uploads a small `i32`/`f32` vector.
pub(crate) fn upload_vec<T: cudarc::driver::DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        return stream.alloc_zeros::<u8>(16).map_err(|e| dev_err("allocating", e)).and_then(|_| {
            // SAFETY: a 4-element allocation that nothing reads (empty input).
            unsafe { stream.alloc::<T>(4) }.map_err(|e| dev_err("allocating", e))
        });
    }
    stream.clone_htod(v).map_err(|e| dev_err("copying to the device", e))
}

/// Allocates a contiguous output of `shape`, poisoned (NaN) when `poisoned` (the test hook), else zeroed.
pub(crate) fn alloc_out(stream: &Arc<CudaStream>, shape: &[usize], dtype: DType, poisoned: bool) -> Result<DevTensor> {
    let layout = Layout::contiguous(shape);
    let bytes = (layout.numel() * dtype.size()).max(16);
    let buf = if poisoned {
        // SAFETY: filled right below, before anything reads it.
        let b = unsafe { stream.alloc::<u8>(bytes) }.map_err(|e| dev_err("allocating an output", e))?;
        super::launch::poison(b.device_ptr(stream).0, bytes, stream.cu_stream())?;
        b
    } else {
        stream.alloc_zeros::<u8>(bytes).map_err(|e| dev_err("allocating an output", e))?
    };
    Ok(DevTensor { buf, layout, dtype })
}

/// Copies a contiguous device tensor back into a host [`Tensor`] (waits for the stream).
pub(crate) fn download(stream: &Arc<CudaStream>, t: &DevTensor) -> Result<Tensor> {
    let n = t.layout.numel();
    let mut bytes = vec![0u8; t.bytes()];
    stream.memcpy_dtoh(&t.buf, &mut bytes[..]).map_err(|e| dev_err("copying a result to the host", e))?;
    stream.synchronize().map_err(|e| dev_err("running the kernels", e))?;
    let bytes = &bytes[..n * t.dtype.size()];
    let storage = match t.dtype {
        DType::F16 => {
            CpuStorage::F16(bytes.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())
        }
        DType::BF16 => {
            CpuStorage::BF16(bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())
        }
        DType::F32 => {
            CpuStorage::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        }
        DType::I32 => {
            CpuStorage::I32(bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect())
        }
        DType::E4M3 => CpuStorage::E4M3(bytes.iter().map(|&c| crate::dtype::F8E4M3(c)).collect()),
    };
    Tensor::from_storage(storage, &t.layout.shape)
}

/// A tensor in CUDA device memory that the caller owns (a framework's tensor): its address, element type,
/// shape and strides in elements (the last dimension contiguous). Used by [`super::forward_raw`] and
/// [`super::backward_raw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTensorRef {
    /// Device address of element `[0, 0, ...]` (a `CUdeviceptr`).
    pub ptr: u64,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides in elements, one per dimension.
    pub strides: Vec<usize>,
}

impl DeviceTensorRef {
    /// A contiguous tensor at `ptr`.
    pub fn contiguous(ptr: u64, dtype: DType, shape: &[usize]) -> Self {
        DeviceTensorRef { ptr, dtype, shape: shape.to_vec(), strides: Layout::contiguous(shape).strides }
    }
    /// The layout (offset 0: `ptr` already points at the first element).
    pub fn layout(&self) -> Layout {
        Layout { shape: self.shape.clone(), strides: self.strides.clone(), offset: 0 }
    }
    pub(crate) fn view(&self) -> DevView {
        DevView::from_layout(self.ptr, self.dtype.size(), &self.layout())
    }
    pub(crate) fn check(&self, arg: &'static str, shape: &[usize], dtype: DType, output: bool) -> Result<()> {
        if self.shape != shape {
            return Err(Error::invalid(arg, format!("shape {shape:?}"), format!("{:?}", self.shape)));
        }
        if self.dtype != dtype {
            return Err(Error::invalid(arg, format!("dtype {dtype}"), self.dtype));
        }
        if self.strides.len() != self.shape.len() {
            return Err(Error::invalid(arg, format!("{} strides", self.shape.len()), self.strides.len()));
        }
        if let (Some(&n), Some(&s)) = (self.shape.last(), self.strides.last()) {
            if n > 1 && s != 1 {
                return Err(Error::invalid(arg, "a contiguous last dimension (stride 1)", format!("stride {s}")));
            }
        }
        if self.ptr == 0 && self.shape.iter().product::<usize>() > 0 {
            return Err(Error::invalid(arg, "a non-null device pointer", "null"));
        }
        if self.ptr % self.dtype.size() as u64 != 0 {
            return Err(Error::invalid(arg, format!("an address aligned to {} bytes", self.dtype.size()), self.ptr));
        }
        if output && !self.layout().is_non_overlapping() {
            return Err(Error::invalid(arg, "a layout whose elements do not overlap", format!("{:?}", self.strides)));
        }
        Ok(())
    }
}

/// The tensors of a forward call: inputs `q`, `k`, `v`; outputs `o` (q's shape, its own strides) and `lse`
/// (`f32`, contiguous `[b, h, sq]`, varlen `[h, total_q]`).
#[derive(Debug, Clone, Copy)]
pub struct ForwardTensors<'a> {
    /// Queries.
    pub q: &'a DeviceTensorRef,
    /// Keys.
    pub k: &'a DeviceTensorRef,
    /// Values.
    pub v: &'a DeviceTensorRef,
    /// Output.
    pub o: &'a DeviceTensorRef,
    /// Log-sum-exp of each row's scores.
    pub lse: &'a DeviceTensorRef,
}

/// The tensors of a backward call: the forward's inputs and outputs, `dout`, and the gradients written
/// (`dq`, `dk`, `dv` with their own strides; key rows past `seqused_k` are not written; `dsink` with a sink).
#[derive(Debug, Clone, Copy)]
pub struct BackwardTensors<'a> {
    /// The forward's tensors (`o` and `lse` as it wrote them).
    pub fwd: ForwardTensors<'a>,
    /// Gradient of the output.
    pub dout: &'a DeviceTensorRef,
    /// Gradient of `q`: `q`'s dtype, or f32 (then `dk` and `dv` are f32 too: partial gradients a caller sums
    /// before one rounding, as ring attention does).
    pub dq: &'a DeviceTensorRef,
    /// Gradient of `k`, in `dq`'s dtype.
    pub dk: &'a DeviceTensorRef,
    /// Gradient of `v`, in `dq`'s dtype.
    pub dv: &'a DeviceTensorRef,
    /// Gradient of the learnable sink, `f32 [h]` contiguous: required exactly when
    /// [`super::DeviceMeta::sink`] is given.
    pub dsink: Option<&'a DeviceTensorRef>,
}
