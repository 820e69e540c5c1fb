//! A small tensor type for callers with nothing else, and borrowed views so frameworks can pass their own
//! memory without copies.
//!
//! Layout is `shape` + `strides` (in elements) + `offset` into a flat buffer. The attention functions need
//! only the last dimension contiguous; every other stride is free (a view into a packed QKV buffer works).

use crate::dtype::{DType, F8E4M3};
use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory.
    #[default]
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Whether the backend of a kind of device can be used on this machine, and why not when not (what
/// [`crate::backends::status`] reports for each backend).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    /// `cpu` or `cuda`.
    pub name: &'static str,
    /// Whether it can run now.
    pub usable: bool,
    /// What it found (devices, versions, cache folder) or why it cannot run.
    pub detail: String,
}

/// Host storage of one of the supported dtypes.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    /// `f16` elements.
    F16(Vec<f16>),
    /// `bf16` elements.
    BF16(Vec<bf16>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// FP8 `e4m3` elements ([`F8E4M3`]).
    E4M3(Vec<F8E4M3>),
}

/// A borrowed host slice of one of the supported dtypes.
#[derive(Debug, Clone, Copy)]
pub enum CpuSlice<'a> {
    /// `f16` elements.
    F16(&'a [f16]),
    /// `bf16` elements.
    BF16(&'a [bf16]),
    /// `f32` elements.
    F32(&'a [f32]),
    /// `i32` elements.
    I32(&'a [i32]),
    /// FP8 `e4m3` elements ([`F8E4M3`]).
    E4M3(&'a [F8E4M3]),
}

/// A mutably borrowed host slice of one of the supported dtypes.
#[derive(Debug)]
pub enum CpuSliceMut<'a> {
    /// `f16` elements.
    F16(&'a mut [f16]),
    /// `bf16` elements.
    BF16(&'a mut [bf16]),
    /// `f32` elements.
    F32(&'a mut [f32]),
    /// `i32` elements.
    I32(&'a mut [i32]),
    /// FP8 `e4m3` elements ([`F8E4M3`]).
    E4M3(&'a mut [F8E4M3]),
}

macro_rules! dispatch {
    ($e:expr, $v:ident => $body:expr) => {
        match $e {
            Self::F16($v) => $body,
            Self::BF16($v) => $body,
            Self::F32($v) => $body,
            Self::I32($v) => $body,
            Self::E4M3($v) => $body,
        }
    };
}

/// `len` and `is_empty` of the host element containers ([`CpuStorage`], [`CpuSlice`], [`CpuSliceMut`]),
/// which all have the same variants.
macro_rules! len_methods {
    () => {
        /// Number of elements.
        pub fn len(&self) -> usize {
            dispatch!(self, v => v.len())
        }
        /// Whether there are no elements.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
    };
}

impl CpuStorage {
    /// Zero-filled storage of `len` elements.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::I32 => CpuStorage::I32(vec![0; len]),
            DType::E4M3 => CpuStorage::E4M3(vec![F8E4M3(0); len]),
        }
    }
    /// Storage holding `values` rounded to `dtype` (`i32` truncates).
    pub fn from_f32(dtype: DType, values: &[f32]) -> Self {
        match dtype {
            DType::F16 => CpuStorage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F32 => CpuStorage::F32(values.to_vec()),
            DType::I32 => CpuStorage::I32(values.iter().map(|&x| x as i32).collect()),
            DType::E4M3 => CpuStorage::E4M3(values.iter().map(|&x| F8E4M3::from_f32(x)).collect()),
        }
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }
    len_methods!();
    /// Borrows the storage.
    pub fn as_slice(&self) -> CpuSlice<'_> {
        match self {
            CpuStorage::F16(v) => CpuSlice::F16(v),
            CpuStorage::BF16(v) => CpuSlice::BF16(v),
            CpuStorage::F32(v) => CpuSlice::F32(v),
            CpuStorage::I32(v) => CpuSlice::I32(v),
            CpuStorage::E4M3(v) => CpuSlice::E4M3(v),
        }
    }
    /// Borrows the storage mutably.
    pub fn as_slice_mut(&mut self) -> CpuSliceMut<'_> {
        match self {
            CpuStorage::F16(v) => CpuSliceMut::F16(v),
            CpuStorage::BF16(v) => CpuSliceMut::BF16(v),
            CpuStorage::F32(v) => CpuSliceMut::F32(v),
            CpuStorage::I32(v) => CpuSliceMut::I32(v),
            CpuStorage::E4M3(v) => CpuSliceMut::E4M3(v),
        }
    }
}

impl<'a> CpuSlice<'a> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CpuSlice::F16(_) => DType::F16,
            CpuSlice::BF16(_) => DType::BF16,
            CpuSlice::F32(_) => DType::F32,
            CpuSlice::I32(_) => DType::I32,
            CpuSlice::E4M3(_) => DType::E4M3,
        }
    }
    len_methods!();
    /// Element `i` as `f32` (`i32` converts). Panics if out of bounds: callers index validated layouts.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            CpuSlice::F16(v) => v[i].to_f32(),
            CpuSlice::BF16(v) => v[i].to_f32(),
            CpuSlice::F32(v) => v[i],
            CpuSlice::I32(v) => v[i] as f32,
            CpuSlice::E4M3(v) => v[i].to_f32(),
        }
    }
    /// Copies `out.len()` contiguous elements starting at `start` into `out` as `f32`.
    #[inline]
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            CpuSlice::F16(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, x)| *o = x.to_f32()),
            CpuSlice::BF16(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, x)| *o = x.to_f32()),
            CpuSlice::F32(v) => out.copy_from_slice(&v[start..start + n]),
            CpuSlice::I32(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, x)| *o = *x as f32),
            CpuSlice::E4M3(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, x)| *o = x.to_f32()),
        }
    }
    /// The `i32` elements, if this is an `i32` slice.
    pub fn as_i32(&self) -> Option<&'a [i32]> {
        match *self {
            CpuSlice::I32(v) => Some(v),
            _ => None,
        }
    }
    /// The `f32` elements, if this is an `f32` slice.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match *self {
            CpuSlice::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CpuSliceMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }
    len_methods!();
    /// Reborrows immutably.
    pub fn as_slice(&self) -> CpuSlice<'_> {
        match self {
            CpuSliceMut::F16(v) => CpuSlice::F16(v),
            CpuSliceMut::BF16(v) => CpuSlice::BF16(v),
            CpuSliceMut::F32(v) => CpuSlice::F32(v),
            CpuSliceMut::I32(v) => CpuSlice::I32(v),
            CpuSliceMut::E4M3(v) => CpuSlice::E4M3(v),
        }
    }
    /// Reborrows mutably for a shorter lifetime.
    pub fn reborrow(&mut self) -> CpuSliceMut<'_> {
        match self {
            CpuSliceMut::F16(v) => CpuSliceMut::F16(v),
            CpuSliceMut::BF16(v) => CpuSliceMut::BF16(v),
            CpuSliceMut::F32(v) => CpuSliceMut::F32(v),
            CpuSliceMut::I32(v) => CpuSliceMut::I32(v),
            CpuSliceMut::E4M3(v) => CpuSliceMut::E4M3(v),
        }
    }
    /// A raw, shareable pointer for backends that write disjoint elements from several threads.
    pub(crate) fn raw(&mut self) -> RawMut {
        match self {
            CpuSliceMut::F16(v) => RawMut { ptr: v.as_mut_ptr() as *mut u8, len: v.len(), dtype: DType::F16 },
            CpuSliceMut::BF16(v) => RawMut { ptr: v.as_mut_ptr() as *mut u8, len: v.len(), dtype: DType::BF16 },
            CpuSliceMut::F32(v) => RawMut { ptr: v.as_mut_ptr() as *mut u8, len: v.len(), dtype: DType::F32 },
            CpuSliceMut::I32(v) => RawMut { ptr: v.as_mut_ptr() as *mut u8, len: v.len(), dtype: DType::I32 },
            CpuSliceMut::E4M3(v) => RawMut { ptr: v.as_mut_ptr() as *mut u8, len: v.len(), dtype: DType::E4M3 },
        }
    }
}

/// A raw pointer to a mutably borrowed host buffer, shared between worker threads that write disjoint
/// elements. Every write is bounds-checked against `len`.
#[derive(Clone, Copy)]
pub(crate) struct RawMut {
    ptr: *mut u8,
    len: usize,
    dtype: DType,
}

// SAFETY: a `RawMut` is only created from a `&mut` borrow that outlives its use, and the backends write
// disjoint elements from each thread (validated: output views never overlap themselves).
unsafe impl Send for RawMut {}
unsafe impl Sync for RawMut {}

impl RawMut {
    /// Writes `vals` (rounded to the buffer's dtype) at `start..start + vals.len()`.
    #[inline]
    pub(crate) fn write_f32(&self, start: usize, vals: &[f32]) {
        assert!(start + vals.len() <= self.len, "internal: write out of bounds");
        // SAFETY: bounds checked above; the dtype matches the pointer's provenance; threads write disjoint
        // ranges (see the `Send`/`Sync` note).
        unsafe {
            match self.dtype {
                DType::F16 => self.write_with(start, vals, f16::from_f32),
                DType::BF16 => self.write_with(start, vals, bf16::from_f32),
                DType::F32 => {
                    let p = (self.ptr as *mut f32).add(start);
                    std::ptr::copy_nonoverlapping(vals.as_ptr(), p, vals.len());
                }
                DType::I32 => self.write_with(start, vals, |x| x as i32),
                DType::E4M3 => self.write_with(start, vals, F8E4M3::from_f32),
            }
        }
    }

    /// Writes `vals` converted by `cvt` at `start..start + vals.len()` of a buffer of `T`.
    ///
    /// # Safety
    /// `T` is the buffer's element type and the range is in bounds (as [`RawMut::write_f32`] checks).
    #[inline(always)]
    unsafe fn write_with<T>(&self, start: usize, vals: &[f32], cvt: impl Fn(f32) -> T) {
        let p = (self.ptr as *mut T).add(start);
        for (i, &x) in vals.iter().enumerate() {
            *p.add(i) = cvt(x);
        }
    }
}

/// Shape, strides (elements) and offset of a strided tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Extent of each dimension.
    pub shape: Vec<usize>,
    /// Step in elements of each dimension.
    pub strides: Vec<usize>,
    /// Element offset of index `[0, 0, ...]`.
    pub offset: usize,
}

impl Layout {
    /// A row-major contiguous layout. Strides saturate at `usize::MAX` (only reachable for a shape with a
    /// zero dim, whose strides are never used, or one whose element count overflows, which is refused).
    pub fn contiguous(shape: &[usize]) -> Self {
        let mut strides = vec![0; shape.len()];
        let mut s = 1usize;
        for (st, &n) in strides.iter_mut().zip(shape).rev() {
            *st = s;
            s = s.saturating_mul(n);
        }
        Layout { shape: shape.to_vec(), strides, offset: 0 }
    }
    /// Number of elements (saturating at `usize::MAX`).
    pub fn numel(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape.iter().fold(1usize, |a, &n| a.saturating_mul(n))
    }
    /// One past the largest element index reachable (the buffer length needed); 0 when empty; `None` when
    /// it, or the element count, overflows `usize`.
    pub fn extent(&self) -> Option<usize> {
        if self.numel() == 0 {
            return Some(0);
        }
        self.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n))?;
        let mut last = self.offset;
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            last = last.checked_add((n - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }
    /// Whether distinct indices map to distinct elements (needed for outputs).
    pub fn is_non_overlapping(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut dims: Vec<(usize, usize)> =
            self.shape.iter().copied().zip(self.strides.iter().copied()).filter(|&(n, _)| n > 1).collect();
        dims.sort_by_key(|&(_, s)| s);
        let mut span = 1usize;
        for (n, s) in dims {
            if s < span {
                return false;
            }
            span = match s.checked_mul(n) {
                Some(v) => v,
                None => return false,
            };
        }
        true
    }
    /// Element index of a multi-index (no bounds check beyond debug assertions).
    #[inline]
    pub fn index(&self, idx: &[usize]) -> usize {
        debug_assert_eq!(idx.len(), self.shape.len());
        self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
    }
}

/// An owned host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    storage: CpuStorage,
    layout: Layout,
}

impl Tensor {
    /// A zero-filled contiguous tensor.
    ///
    /// Panics when the element count or byte size overflows, or the allocation fails; [`Tensor::try_zeros`]
    /// returns an error instead.
    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        Self::try_zeros(shape, dtype).unwrap_or_else(|e| panic!("Tensor::zeros: {e}"))
    }
    /// A zero-filled contiguous tensor, or an error (argument `shape`) when its element count or byte size
    /// overflows or the memory cannot be allocated; the error states the bytes needed.
    pub fn try_zeros(shape: &[usize], dtype: DType) -> Result<Self> {
        Self::try_filled(shape, dtype, 0.0, 0)
    }
    /// A tensor filled with NaN (or `i32::MIN`): used to poison outputs in tests.
    ///
    /// Panics when the element count or byte size overflows, or the allocation fails; [`Tensor::try_nan`]
    /// returns an error instead.
    pub fn nan(shape: &[usize], dtype: DType) -> Self {
        Self::try_nan(shape, dtype).unwrap_or_else(|e| panic!("Tensor::nan: {e}"))
    }
    /// [`Tensor::nan`], or an error (argument `shape`) as [`Tensor::try_zeros`].
    pub fn try_nan(shape: &[usize], dtype: DType) -> Result<Self> {
        Self::try_filled(shape, dtype, f32::NAN, i32::MIN)
    }
    fn try_filled(shape: &[usize], dtype: DType, x: f32, xi: i32) -> Result<Self> {
        let n = checked_len(shape, dtype)?;
        fn fill<T: Clone>(n: usize, x: T, shape: &[usize], dtype: DType) -> Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| {
                Error::invalid(
                    "shape",
                    "a tensor that can be allocated",
                    format!("{shape:?} of {dtype}: {} bytes could not be allocated", n * dtype.size()),
                )
            })?;
            v.resize(n, x);
            Ok(v)
        }
        let storage = match dtype {
            DType::F16 => CpuStorage::F16(fill(n, f16::from_f32(x), shape, dtype)?),
            DType::BF16 => CpuStorage::BF16(fill(n, bf16::from_f32(x), shape, dtype)?),
            DType::F32 => CpuStorage::F32(fill(n, x, shape, dtype)?),
            DType::I32 => CpuStorage::I32(fill(n, xi, shape, dtype)?),
            DType::E4M3 => CpuStorage::E4M3(fill(n, F8E4M3::from_f32(x), shape, dtype)?),
        };
        Ok(Tensor { storage, layout: Layout::contiguous(shape) })
    }
    /// A contiguous tensor holding `values` rounded to `dtype`.
    pub fn from_f32(values: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        let layout = contiguous_of("values", values.len(), shape)?;
        Ok(Tensor { storage: CpuStorage::from_f32(dtype, values), layout })
    }
    /// A contiguous `i32` tensor.
    pub fn from_i32(values: Vec<i32>, shape: &[usize]) -> Result<Self> {
        Self::from_storage(CpuStorage::I32(values), shape)
    }
    /// A contiguous tensor over existing storage.
    pub fn from_storage(storage: CpuStorage, shape: &[usize]) -> Result<Self> {
        let layout = contiguous_of("storage", storage.len(), shape)?;
        Ok(Tensor { storage, layout })
    }
    /// A tensor over existing storage with an explicit strided layout.
    pub fn from_storage_strided(storage: CpuStorage, layout: Layout) -> Result<Self> {
        check_layout("storage", &layout, storage.len())?;
        Ok(Tensor { storage, layout })
    }
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.layout.shape
    }
    /// The strides, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.layout.strides
    }
    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    /// Where the data lives (always the host for an owned [`Tensor`]).
    pub fn device(&self) -> Device {
        Device::Cpu
    }
    /// The underlying storage.
    pub fn storage(&self) -> &CpuStorage {
        &self.storage
    }
    /// Borrows the tensor as a view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView { data: self.storage.as_slice(), layout: self.layout.clone() }
    }
    /// Borrows the tensor as a mutable view.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        TensorViewMut { data: self.storage.as_slice_mut(), layout: self.layout.clone() }
    }
    /// Every element in logical (row-major) order, as `f32`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }
    /// A contiguous copy converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        Tensor::from_f32(&self.to_f32_vec(), self.shape(), dtype).expect("shape matches")
    }
}

/// The element count of `shape`, checked: it and its size in bytes of `dtype` must fit in `isize` (the
/// most any allocation can hold). Error argument `shape`.
pub fn checked_len(shape: &[usize], dtype: DType) -> Result<usize> {
    if shape.contains(&0) {
        return Ok(0);
    }
    let n = shape.iter().try_fold(1u128, |a, &n| a.checked_mul(n as u128));
    let bytes = n.and_then(|n| n.checked_mul(dtype.size() as u128));
    match (n, bytes) {
        (Some(n), Some(b)) if b <= isize::MAX as u128 => Ok(n as usize),
        _ => Err(Error::invalid(
            "shape",
            format!("at most {} bytes", isize::MAX),
            format!("{shape:?} of {dtype}: {} bytes", bytes.map_or("more than 2^128".to_string(), |b| b.to_string())),
        )),
    }
}

/// The contiguous layout of `shape` for `len` elements given as argument `arg`, or an error when `shape` holds
/// another number of elements.
fn contiguous_of(arg: &'static str, len: usize, shape: &[usize]) -> Result<Layout> {
    let layout = Layout::contiguous(shape);
    if layout.numel() != len {
        return Err(Error::invalid(arg, format!("{} elements for shape {shape:?}", layout.numel()), len));
    }
    Ok(layout)
}

fn check_layout(arg: &'static str, layout: &Layout, len: usize) -> Result<()> {
    if layout.shape.len() != layout.strides.len() {
        return Err(Error::invalid(arg, format!("{} strides", layout.shape.len()), layout.strides.len()));
    }
    match layout.extent() {
        Some(e) if e <= len => Ok(()),
        Some(e) => Err(Error::invalid(arg, format!("a buffer of at least {e} elements"), len)),
        None => Err(Error::invalid(arg, "a layout whose extent fits in usize", "an overflowing layout")),
    }
}

/// The constructors and accessors that [`TensorView`] and [`TensorViewMut`] share (both are `data` of the
/// slice type `$slice` and a `layout`).
macro_rules! view_methods {
    ($slice:ident) => {
        /// A view over `data` with a strided layout; checks that every element is in bounds.
        pub fn new(data: $slice<'a>, layout: Layout) -> Result<Self> {
            check_layout("view", &layout, data.len())?;
            Ok(Self { data, layout })
        }
        /// A contiguous view of `shape` over the front of `data`.
        pub fn contiguous(data: $slice<'a>, shape: &[usize]) -> Result<Self> {
            Self::new(data, Layout::contiguous(shape))
        }
        /// The shape.
        pub fn shape(&self) -> &[usize] {
            &self.layout.shape
        }
        /// The element type.
        pub fn dtype(&self) -> DType {
            self.data.dtype()
        }
        /// Where the data lives.
        pub fn device(&self) -> Device {
            Device::Cpu
        }
    };
}

/// A borrowed, strided, read-only tensor.
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    /// The borrowed elements.
    pub data: CpuSlice<'a>,
    /// Where the tensor's elements are in `data`.
    pub layout: Layout,
}

impl<'a> TensorView<'a> {
    view_methods!(CpuSlice);
    /// The strides, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.layout.strides
    }
    /// Every element in logical (row-major) order, as `f32`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let n = self.layout.numel();
        let mut out = Vec::with_capacity(n);
        let rank = self.layout.shape.len();
        if n == 0 {
            return out;
        }
        let mut idx = vec![0usize; rank];
        for _ in 0..n {
            out.push(self.data.get_f32(self.layout.index(&idx)));
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < self.layout.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
    /// Every element in logical order as `i32`, if the dtype is `i32`.
    pub fn to_i32_vec(&self) -> Option<Vec<i32>> {
        let v = self.data.as_i32()?;
        let mut t = self.clone();
        t.data = CpuSlice::I32(v);
        Some(t.to_f32_vec().into_iter().map(|x| x as i32).collect())
    }
}

/// A borrowed, strided, writable tensor.
#[derive(Debug)]
pub struct TensorViewMut<'a> {
    /// The borrowed elements.
    pub data: CpuSliceMut<'a>,
    /// Where the tensor's elements are in `data`.
    pub layout: Layout,
}

impl<'a> TensorViewMut<'a> {
    view_methods!(CpuSliceMut);
    /// A read-only view of the same elements.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView { data: self.data.as_slice(), layout: self.layout.clone() }
    }
    /// Reborrows for a shorter lifetime.
    pub fn reborrow(&mut self) -> TensorViewMut<'_> {
        TensorViewMut { data: self.data.reborrow(), layout: self.layout.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_extent_and_overlap() {
        let l = Layout::contiguous(&[2, 3, 4]);
        assert_eq!(l.strides, vec![12, 4, 1]);
        assert_eq!(l.extent(), Some(24));
        assert!(l.is_non_overlapping());
        let overlapping = Layout { shape: vec![3, 4], strides: vec![2, 1], offset: 0 };
        assert!(!overlapping.is_non_overlapping());
        let packed_q = Layout { shape: vec![2, 5, 4, 8], strides: vec![5 * 3 * 32, 96, 8, 1], offset: 0 };
        assert!(packed_q.is_non_overlapping());
    }

    #[test]
    fn view_bounds_are_checked() {
        let t = Tensor::zeros(&[10], DType::F32);
        let bad = Layout { shape: vec![3, 4], strides: vec![4, 1], offset: 0 };
        let err = TensorView::new(t.view().data, bad).unwrap_err();
        assert_eq!(err.arg(), Some("view"));
    }

    #[test]
    fn strided_read_in_logical_order() {
        let t = Tensor::from_f32(&(0..6).map(|x| x as f32).collect::<Vec<_>>(), &[2, 3], DType::F32).unwrap();
        let tr = TensorView::new(t.view().data, Layout { shape: vec![3, 2], strides: vec![1, 3], offset: 0 }).unwrap();
        assert_eq!(tr.to_f32_vec(), vec![0., 3., 1., 4., 2., 5.]);
    }
}
