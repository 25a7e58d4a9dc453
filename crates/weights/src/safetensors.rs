//! The safetensors format: an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}` and
//! the raw little-endian data, offsets relative to the end of the header.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use aperture_engine::HostTensor;
use serde_json::{json, Map, Value};

use crate::elem::{decode, encode, ElemType};
use crate::error::{Result, WeightsError};

/// Headers above this size are rejected before allocating (real ones are kilobytes).
const MAX_HEADER: u64 = 100 << 20;

/// True when `head` (the first bytes of a file of `file_len` bytes) starts like a
/// safetensors file: a plausible header length followed by `{`.
pub(crate) fn looks_like_safetensors(head: &[u8], file_len: u64) -> bool {
    let Some(len_bytes) = head.get(..8) else {
        return false;
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(b);
    (2..=MAX_HEADER).contains(&n) && head.get(8) == Some(&b'{') && n <= file_len.saturating_sub(8)
}

/// Parses a whole safetensors file held in memory.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, HostTensor>> {
    let bad = |reason: String| WeightsError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(bad(format!(
            "file is {} bytes, too short for the 8-byte header length (truncated?)",
            bytes.len()
        )));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(b);
    let available = (bytes.len() - 8) as u64;
    if header_len > available {
        return Err(bad(format!(
            "header claims {header_len} bytes but only {available} follow the length field (truncated or not safetensors)"
        )));
    }
    let header_end = 8 + header_len as usize;
    let header_bytes = &bytes[8..header_end];
    let header: Value = serde_json::from_slice(header_bytes)
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(entries) = header else {
        return Err(bad("header is not a JSON object".into()));
    };
    let data = &bytes[header_end..];
    let mut out = BTreeMap::new();
    for (name, info) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let t = parse_entry(path, name, info, data)?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

fn parse_entry(path: &Path, name: &str, info: &Value, data: &[u8]) -> Result<HostTensor> {
    let bad = |reason: String| WeightsError::Safetensors {
        path: path.to_path_buf(),
        reason: format!("tensor '{name}': {reason}"),
    };
    let dtype = info
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing \"dtype\"".into()))?;
    let ty = ElemType::from_safetensors(dtype).ok_or_else(|| WeightsError::UnsupportedDType {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: dtype.to_string(),
    })?;
    let shape_json = info
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing \"shape\"".into()))?;
    let mut shape = Vec::with_capacity(shape_json.len());
    for d in shape_json {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| bad(format!("invalid dimension {d}")))?;
        shape.push(d);
    }
    let offsets = info
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing \"data_offsets\"".into()))?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => match (b.as_u64(), e.as_u64()) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => return Err(bad(format!("invalid data_offsets {offsets:?}"))),
        },
        _ => {
            return Err(bad(format!(
                "data_offsets must hold two numbers, got {offsets:?}"
            )))
        }
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let nbytes = numel
        .checked_mul(ty.size())
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if end - begin != nbytes as u64 {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets span {} bytes",
            end - begin
        )));
    }
    if end > data.len() as u64 {
        return Err(bad(format!(
            "data_offsets end at byte {end} but the data section holds only {} bytes (file truncated?)",
            data.len()
        )));
    }
    let slice = &data[begin as usize..end as usize];
    HostTensor::new(shape, decode(slice, ty, false)).map_err(|e| bad(e.to_string()))
}

/// Reads a safetensors file.
pub(crate) fn read(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).map_err(|e| WeightsError::io(path, e))?;
    parse(path, &bytes)
}

/// Writes tensors (in key order, each in its own dtype) as a safetensors file.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, t) in tensors {
        let nbytes = t.numel() * t.dtype().size_bytes();
        let ty = ElemType::from_dtype(t.dtype());
        header.insert(
            name.clone(),
            json!({ "dtype": ty.safetensors_name(), "shape": t.shape(), "data_offsets": [offset, offset + nbytes] }),
        );
        offset += nbytes;
    }
    let mut header_bytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| WeightsError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let io = |e| WeightsError::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    for t in tensors.values() {
        w.write_all(&encode(t.data())).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}
