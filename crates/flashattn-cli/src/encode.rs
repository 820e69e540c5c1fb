//! The safetensors encoding of `flashattn run`'s outputs. The CLI's tests include this file too, to write their
//! input files and to compare the outputs byte for byte with the library's results.

use flashattn::{CpuStorage, Layout, Tensor};
use safetensors::{Dtype, SafeTensorError};

/// Bytes of a tensor's elements in logical order, little-endian, with the safetensors dtype.
pub fn to_bytes(t: &Tensor) -> (Dtype, Vec<u8>) {
    let c = if t.layout() == &Layout::contiguous(t.shape()) { None } else { Some(t.to_dtype(t.dtype())) };
    let t = c.as_ref().unwrap_or(t);
    match t.storage() {
        CpuStorage::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        CpuStorage::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
        CpuStorage::BF16(v) => (Dtype::BF16, v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
        CpuStorage::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        CpuStorage::E4M3(v) => (Dtype::F8_E4M3, v.iter().map(|x| x.0).collect()),
    }
}

/// The bytes of a safetensors file holding the named tensors.
pub fn serialize(tensors: &[(&str, &Tensor)]) -> Result<Vec<u8>, SafeTensorError> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dt, bytes) = to_bytes(t);
            (n.to_string(), dt, t.shape().to_vec(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(n, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None)
}
