//! KServe tensors <-> [`HostTensor`]: datatype names, little-endian raw bytes, JSON
//! numbers, and dtype-preserving batch concatenation / splitting.

use aperture_engine::{DType, HostTensor, TensorData};
use bytes::Bytes;
use half::{bf16, f16};
use zerocopy::IntoBytes;

use crate::error::{Result, ServerError};

/// KServe datatype string of an engine dtype ("FP32", "FP16", "BF16").
pub fn kserve_datatype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FP32",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
    }
}

/// Triton model-config datatype ("TYPE_FP32", ...).
pub fn config_datatype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "TYPE_FP32",
        DType::F16 => "TYPE_FP16",
        DType::BF16 => "TYPE_BF16",
    }
}

/// Parses a KServe datatype into an engine dtype, naming the tensor on failure.
pub fn parse_datatype(datatype: &str, tensor: &str) -> Result<DType> {
    match datatype {
        "FP32" => Ok(DType::F32),
        "FP16" => Ok(DType::F16),
        "BF16" => Ok(DType::BF16),
        other => Err(ServerError::invalid(format!(
            "input '{tensor}': datatype {other} is not supported (this server accepts FP32, FP16 and BF16)"
        ))),
    }
}

/// Converts a wire shape to tensor dims, refusing negative dims and absurd sizes.
pub fn shape_to_dims(shape: &[i64], tensor: &str) -> Result<Vec<usize>> {
    let mut total: usize = 1;
    let mut dims = Vec::with_capacity(shape.len());
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| {
            ServerError::invalid(format!(
                "input '{tensor}': negative dimension in shape {shape:?}"
            ))
        })?;
        total = total.checked_mul(d).ok_or_else(|| {
            ServerError::invalid(format!("input '{tensor}': shape {shape:?} is too large"))
        })?;
        dims.push(d);
    }
    // No tensor this large fits in memory; refusing here keeps every later size
    // computation (elements x bytes per element) free of overflow.
    if total > MAX_ELEMENTS {
        return Err(ServerError::invalid(format!(
            "input '{tensor}': shape {shape:?} declares {total} elements, more than the {MAX_ELEMENTS} allowed"
        )));
    }
    Ok(dims)
}

/// Largest element count a request tensor may declare (16 GiB of f32).
pub const MAX_ELEMENTS: usize = 1 << 32;

/// Bytes of a tensor of `dims` (dims already bounded by [`shape_to_dims`]).
pub fn byte_size(dims: &[usize], dtype: DType) -> usize {
    dims.iter()
        .product::<usize>()
        .saturating_mul(dtype.size_bytes())
}

/// Builds a tensor from little-endian raw bytes (binary extension, raw_input_contents).
pub fn tensor_from_bytes(
    name: &str,
    dims: Vec<usize>,
    dtype: DType,
    raw: &[u8],
) -> Result<HostTensor> {
    let mut fill = TensorFill::new(name, dims, dtype, raw.len())?;
    fill.write(raw);
    fill.finish()
}

/// A tensor being filled from little-endian bytes that arrive in pieces (an HTTP body's
/// frames): the typed storage is taken once (from [`crate::pool`]) and each piece is
/// copied straight into place.
#[derive(Debug)]
pub struct TensorFill {
    name: String,
    dims: Vec<usize>,
    data: TensorData,
    filled: usize,
}

impl TensorFill {
    /// Storage for `dims` of `dtype`; `declared` must be its exact byte size.
    pub fn new(name: &str, dims: Vec<usize>, dtype: DType, declared: usize) -> Result<Self> {
        let want = byte_size(&dims, dtype);
        if declared != want {
            return Err(ServerError::invalid(format!(
                "input '{name}': {declared} bytes of data given but shape {dims:?} of {} needs {want} bytes",
                kserve_datatype(dtype)
            )));
        }
        // Every byte is overwritten before `finish` accepts the tensor, so recycled
        // storage (already mapped: no page faults) is as good as zeroed storage.
        let data = crate::pool::take(dtype, want / dtype.size_bytes());
        Ok(Self {
            name: name.to_string(),
            dims,
            data,
            filled: 0,
        })
    }

    /// Bytes still missing.
    pub fn remaining(&self) -> usize {
        storage_bytes(&self.data).len() - self.filled
    }

    /// Copies the next bytes in; returns how many were taken (at most `remaining()`).
    pub fn write(&mut self, bytes: &[u8]) -> usize {
        let filled = self.filled;
        let dst = storage_bytes_mut(&mut self.data);
        let n = bytes.len().min(dst.len() - filled);
        if let (Some(d), Some(s)) = (dst.get_mut(filled..filled + n), bytes.get(..n)) {
            d.copy_from_slice(s);
        }
        self.filled += n;
        n
    }

    /// Fills every remaining byte at once through `fill` (e.g. a copy out of shared
    /// memory), so the bytes go straight into the tensor's storage.
    pub fn fill_with(&mut self, fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<()> {
        let filled = self.filled;
        let dst = storage_bytes_mut(&mut self.data);
        let len = dst.len();
        fill(dst.get_mut(filled..).unwrap_or_default())?;
        self.filled = len;
        Ok(())
    }

    /// The tensor, once every byte has arrived.
    pub fn finish(mut self) -> Result<HostTensor> {
        let missing = self.remaining();
        if missing != 0 {
            return Err(ServerError::invalid(format!(
                "unexpected end of binary data for input '{}': {missing} of its bytes are missing",
                self.name
            )));
        }
        // The bytes went in as stored little-endian; a no-op on little-endian hosts.
        if cfg!(target_endian = "big") {
            match &mut self.data {
                TensorData::F32(v) => v
                    .iter_mut()
                    .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits()))),
                TensorData::F16(v) => v
                    .iter_mut()
                    .for_each(|x| *x = f16::from_bits(u16::from_le(x.to_bits()))),
                TensorData::BF16(v) => v
                    .iter_mut()
                    .for_each(|x| *x = bf16::from_bits(u16::from_le(x.to_bits()))),
            }
        }
        Ok(HostTensor::new(self.dims, self.data)?)
    }
}

/// The storage's bytes in memory order (little-endian on little-endian hosts).
fn storage_bytes(data: &TensorData) -> &[u8] {
    match data {
        TensorData::F32(v) => v.as_bytes(),
        TensorData::F16(v) => v.as_bytes(),
        TensorData::BF16(v) => v.as_bytes(),
    }
}

fn storage_bytes_mut(data: &mut TensorData) -> &mut [u8] {
    match data {
        TensorData::F32(v) => v.as_mut_bytes(),
        TensorData::F16(v) => v.as_mut_bytes(),
        TensorData::BF16(v) => v.as_mut_bytes(),
    }
}

/// Builds a tensor from f64 numbers (JSON data or typed gRPC contents).
pub fn tensor_from_numbers(
    name: &str,
    dims: Vec<usize>,
    dtype: DType,
    values: Vec<f64>,
) -> Result<HostTensor> {
    let want: usize = dims.iter().product();
    if values.len() != want {
        return Err(ServerError::invalid(format!(
            "input '{name}': {} values given but shape {dims:?} needs {want}",
            values.len()
        )));
    }
    let data = match dtype {
        DType::F32 => TensorData::F32(values.iter().map(|&v| v as f32).collect()),
        DType::F16 => TensorData::F16(values.iter().map(|&v| f16::from_f64(v)).collect()),
        DType::BF16 => TensorData::BF16(values.iter().map(|&v| bf16::from_f64(v)).collect()),
    };
    Ok(HostTensor::new(dims, data)?)
}

/// Little-endian raw bytes of a tensor (a copy; see [`tensor_into_bytes`] for none).
pub fn tensor_to_bytes(t: &HostTensor) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        return storage_bytes(t.data()).to_vec();
    }
    match t.data() {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Runs `f` over the tensor's little-endian bytes (its storage on little-endian hosts,
/// so no copy is made there).
pub fn with_le_bytes<R>(t: &HostTensor, f: impl FnOnce(&[u8]) -> R) -> R {
    if cfg!(target_endian = "little") {
        f(storage_bytes(t.data()))
    } else {
        f(&tensor_to_bytes(t))
    }
}

/// Little-endian raw bytes of a tensor without copying them on little-endian hosts:
/// the returned [`Bytes`] owns the tensor, views its storage, and hands the storage to
/// [`crate::pool`] once the last view is gone (the answer is written).
pub fn tensor_into_bytes(t: HostTensor) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::from_owner(StorageBytes(Some(t)))
    } else {
        Bytes::from(tensor_to_bytes(&t))
    }
}

/// A tensor seen as its storage bytes (only used where those are little-endian).
struct StorageBytes(Option<HostTensor>);

impl AsRef<[u8]> for StorageBytes {
    fn as_ref(&self) -> &[u8] {
        self.0
            .as_ref()
            .map(|t| storage_bytes(t.data()))
            .unwrap_or_default()
    }
}

impl Drop for StorageBytes {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            crate::pool::give(t.into_data());
        }
    }
}

/// Flattens nested JSON arrays of numbers (KServe allows both flat and nested data).
pub fn flatten_json_numbers(
    name: &str,
    value: &serde_json::Value,
    out: &mut Vec<f64>,
) -> Result<()> {
    match value {
        serde_json::Value::Array(items) => {
            for item in items {
                flatten_json_numbers(name, item, out)?;
            }
            Ok(())
        }
        serde_json::Value::Number(n) => {
            let v = n.as_f64().ok_or_else(|| {
                ServerError::invalid(format!("input '{name}': number {n} is out of range"))
            })?;
            out.push(v);
            Ok(())
        }
        other => Err(ServerError::invalid(format!(
            "input '{name}': data must hold numbers, found {}",
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Concatenates tensors of one dtype along axis 0, keeping the dtype: one copy per part
/// into storage from [`crate::pool`] (usually memory that is already mapped).
pub fn concat_batch(parts: &[&HostTensor]) -> Result<HostTensor> {
    let first = parts
        .first()
        .ok_or_else(|| ServerError::Internal("empty batch".into()))?;
    let inner = first.shape().get(1..).unwrap_or(&[]);
    let mut rows = 0;
    for p in parts {
        if p.shape().get(1..).unwrap_or(&[]) != inner || p.dtype() != first.dtype() {
            return Err(ServerError::Internal(format!(
                "cannot batch tensors of shapes {:?} and {:?}",
                first.shape(),
                p.shape()
            )));
        }
        rows += p.shape().first().copied().unwrap_or(0);
    }
    let mut shape = vec![rows];
    shape.extend_from_slice(inner);
    let total = parts.iter().map(|p| p.numel()).sum();
    let mut data = crate::pool::take(first.dtype(), total);
    let mut at = 0;
    {
        let dst = storage_bytes_mut(&mut data);
        for p in parts {
            let src = storage_bytes(p.data());
            if let Some(d) = dst.get_mut(at..at + src.len()) {
                d.copy_from_slice(src);
            }
            at += src.len();
        }
    }
    Ok(HostTensor::new(shape, data)?)
}

/// Splits a batched tensor into consecutive pieces of `rows[i]` rows each (copies into
/// storage from [`crate::pool`]).
pub fn split_rows(t: &HostTensor, rows: &[usize]) -> Result<Vec<HostTensor>> {
    let total = t.shape().first().copied().unwrap_or(0);
    if rows.iter().sum::<usize>() != total {
        return Err(ServerError::Internal(format!(
            "model returned {total} rows for a batch of {}",
            rows.iter().sum::<usize>()
        )));
    }
    let per_row = t.numel().checked_div(total).unwrap_or(0);
    let elem = t.dtype().size_bytes();
    let src = storage_bytes(t.data());
    let mut out = Vec::with_capacity(rows.len());
    let mut start = 0;
    for &r in rows {
        let mut shape = t.shape().to_vec();
        if let Some(first) = shape.first_mut() {
            *first = r;
        }
        let mut data = crate::pool::take(t.dtype(), r * per_row);
        let piece = src
            .get(start * per_row * elem..(start + r) * per_row * elem)
            .ok_or_else(|| ServerError::Internal("output rows out of range".into()))?;
        storage_bytes_mut(&mut data).copy_from_slice(piece);
        out.push(HostTensor::new(shape, data)?);
        start += r;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_each_dtype() {
        let t = HostTensor::from_f32(vec![2, 2], vec![1.0, -2.0, 0.5, 3.25]).unwrap();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let c = t.to_dtype(dt);
            let raw = tensor_to_bytes(&c);
            assert_eq!(raw.len(), 4 * dt.size_bytes());
            let back = tensor_from_bytes("x", vec![2, 2], dt, &raw).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn wrong_byte_count_is_a_clear_error() {
        let err = tensor_from_bytes("IN", vec![2, 2], DType::F32, &[0u8; 12]).unwrap_err();
        assert!(err.to_string().contains("needs 16 bytes"), "{err}");
    }

    #[test]
    fn nested_json_flattens_and_rejects_strings() {
        let v: serde_json::Value = serde_json::from_str("[[1, 2], [3, 4.5]]").unwrap();
        let mut out = Vec::new();
        flatten_json_numbers("x", &v, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.5]);
        let v: serde_json::Value = serde_json::from_str("[1, \"a\"]").unwrap();
        assert!(flatten_json_numbers("x", &v, &mut Vec::new()).is_err());
    }

    #[test]
    fn concat_and_split_keep_dtype_and_rows() {
        let a = HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0])
            .unwrap()
            .to_dtype(DType::F16);
        let b = HostTensor::from_f32(vec![2, 2], vec![3.0, 4.0, 5.0, 6.0])
            .unwrap()
            .to_dtype(DType::F16);
        let ab = concat_batch(&[&a, &b]).unwrap();
        assert_eq!(ab.shape(), &[3, 2]);
        assert_eq!(ab.dtype(), DType::F16);
        let parts = split_rows(&ab, &[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
        assert!(split_rows(&ab, &[1, 1]).is_err());
    }

    #[test]
    fn negative_and_huge_shapes_are_refused() {
        assert!(shape_to_dims(&[-1, 3], "x").is_err());
        assert!(shape_to_dims(&[i64::MAX, i64::MAX], "x").is_err());
        let err = shape_to_dims(&[1 << 20, 1 << 20], "x").unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }
}
