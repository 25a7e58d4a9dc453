//! The safetensors format: an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}` and
//! the raw little-endian data, offsets relative to the end of the header.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
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

/// Where one tensor lies in the data section, after validation.
struct Entry {
    name: String,
    ty: ElemType,
    shape: Vec<usize>,
    begin: u64,
    len: usize,
}

/// Reads a safetensors file one tensor at a time, so peak memory stays near the
/// size of the decoded tensors rather than twice the file.
pub(crate) fn read(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bad = |reason: String| WeightsError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let io = |e| WeightsError::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    if file_len == 0 {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes, too short for the 8-byte header length (truncated?)"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io)?;
    let header_len = u64::from_le_bytes(len_bytes);
    let available = file_len - 8;
    if header_len > available {
        return Err(bad(format!(
            "header claims {header_len} bytes but only {available} follow the length field (truncated or not safetensors)"
        )));
    }
    if header_len > MAX_HEADER {
        return Err(bad(format!(
            "header of {header_len} bytes is implausibly large"
        )));
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    file.read_exact(&mut header_bytes).map_err(io)?;
    let header: Value = serde_json::from_slice(&header_bytes)
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(items) = header else {
        return Err(bad("header is not a JSON object".into()));
    };
    let data_start = 8 + header_len;
    let data_len = available - header_len;
    let mut entries = Vec::with_capacity(items.len());
    for (name, info) in &items {
        if name != "__metadata__" {
            entries.push(parse_entry(path, name, info, data_len)?);
        }
    }
    // File order keeps the reads sequential.
    entries.sort_by_key(|e| e.begin);
    let mut out = BTreeMap::new();
    let mut buf = Vec::new();
    for e in entries {
        buf.resize(e.len, 0);
        file.seek(SeekFrom::Start(data_start + e.begin))
            .map_err(io)?;
        file.read_exact(&mut buf).map_err(io)?;
        let t = HostTensor::new(e.shape, decode(&buf, e.ty, false))
            .map_err(|err| bad(format!("tensor '{}': {err}", e.name)))?;
        out.insert(e.name, t);
    }
    Ok(out)
}

fn parse_entry(path: &Path, name: &str, info: &Value, data_len: u64) -> Result<Entry> {
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
    if end > data_len {
        return Err(bad(format!(
            "data_offsets end at byte {end} but the data section holds only {data_len} bytes (file truncated?)"
        )));
    }
    Ok(Entry {
        name: name.to_string(),
        ty,
        shape,
        begin,
        len: nbytes,
    })
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
