//! Element types found in weight files and their decoding into engine tensors.
//!
//! f32, f16 and bf16 keep their storage type; every other supported type (f64,
//! integers, bool) is converted to f32 so that buffers such as BatchNorm's
//! `num_batches_tracked` load alongside the weights.

use aperture_engine::{DType, TensorData};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ElemType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl ElemType {
    pub(crate) fn size(self) -> usize {
        match self {
            ElemType::F64 | ElemType::I64 | ElemType::U64 => 8,
            ElemType::F32 | ElemType::I32 | ElemType::U32 => 4,
            ElemType::F16 | ElemType::BF16 | ElemType::I16 | ElemType::U16 => 2,
            ElemType::I8 | ElemType::U8 | ElemType::Bool => 1,
        }
    }

    /// Parses a safetensors header dtype string.
    pub(crate) fn from_safetensors(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => ElemType::F64,
            "F32" => ElemType::F32,
            "F16" => ElemType::F16,
            "BF16" => ElemType::BF16,
            "I64" => ElemType::I64,
            "I32" => ElemType::I32,
            "I16" => ElemType::I16,
            "I8" => ElemType::I8,
            "U64" => ElemType::U64,
            "U32" => ElemType::U32,
            "U16" => ElemType::U16,
            "U8" => ElemType::U8,
            "BOOL" => ElemType::Bool,
            _ => return None,
        })
    }

    /// Maps a legacy torch storage class name (`torch.FloatStorage`, ...) to its type.
    pub(crate) fn from_torch_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => ElemType::F64,
            "FloatStorage" => ElemType::F32,
            "HalfStorage" => ElemType::F16,
            "BFloat16Storage" => ElemType::BF16,
            "LongStorage" => ElemType::I64,
            "IntStorage" => ElemType::I32,
            "ShortStorage" => ElemType::I16,
            "CharStorage" => ElemType::I8,
            "ByteStorage" => ElemType::U8,
            "BoolStorage" => ElemType::Bool,
            "UInt16Storage" => ElemType::U16,
            "UInt32Storage" => ElemType::U32,
            "UInt64Storage" => ElemType::U64,
            _ => return None,
        })
    }

    /// The safetensors spelling, used when writing files.
    pub(crate) fn safetensors_name(self) -> &'static str {
        match self {
            ElemType::F64 => "F64",
            ElemType::F32 => "F32",
            ElemType::F16 => "F16",
            ElemType::BF16 => "BF16",
            ElemType::I64 => "I64",
            ElemType::I32 => "I32",
            ElemType::I16 => "I16",
            ElemType::I8 => "I8",
            ElemType::U64 => "U64",
            ElemType::U32 => "U32",
            ElemType::U16 => "U16",
            ElemType::U8 => "U8",
            ElemType::Bool => "BOOL",
        }
    }

    pub(crate) fn from_dtype(d: DType) -> Self {
        match d {
            DType::F32 => ElemType::F32,
            DType::F16 => ElemType::F16,
            DType::BF16 => ElemType::BF16,
        }
    }
}

/// Reads one element's bytes as little-endian, swapping first when the source is
/// big-endian (only old torch archives written on big-endian hosts).
fn le<const N: usize>(chunk: &[u8], big_endian: bool) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&chunk[..N]);
    if big_endian {
        b.reverse();
    }
    b
}

/// Decodes densely packed elements. `bytes.len()` must be a multiple of the element
/// size (callers check sizes against the header before calling).
pub(crate) fn decode(bytes: &[u8], ty: ElemType, big_endian: bool) -> TensorData {
    let n = ty.size();
    let chunks = bytes.chunks_exact(n);
    match ty {
        ElemType::F32 => TensorData::F32(
            chunks
                .map(|c| f32::from_le_bytes(le(c, big_endian)))
                .collect(),
        ),
        ElemType::F16 => TensorData::F16(
            chunks
                .map(|c| f16::from_le_bytes(le(c, big_endian)))
                .collect(),
        ),
        ElemType::BF16 => TensorData::BF16(
            chunks
                .map(|c| bf16::from_le_bytes(le(c, big_endian)))
                .collect(),
        ),
        _ => TensorData::F32(chunks.map(|c| to_f32(c, ty, big_endian)).collect()),
    }
}

fn to_f32(c: &[u8], ty: ElemType, be: bool) -> f32 {
    match ty {
        ElemType::F64 => f64::from_le_bytes(le(c, be)) as f32,
        ElemType::F32 => f32::from_le_bytes(le(c, be)),
        ElemType::F16 => f16::from_le_bytes(le(c, be)).to_f32(),
        ElemType::BF16 => bf16::from_le_bytes(le(c, be)).to_f32(),
        ElemType::I64 => i64::from_le_bytes(le(c, be)) as f32,
        ElemType::I32 => i32::from_le_bytes(le(c, be)) as f32,
        ElemType::I16 => i16::from_le_bytes(le(c, be)) as f32,
        ElemType::I8 => i8::from_le_bytes(le(c, be)) as f32,
        ElemType::U64 => u64::from_le_bytes(le(c, be)) as f32,
        ElemType::U32 => u32::from_le_bytes(le(c, be)) as f32,
        ElemType::U16 => u16::from_le_bytes(le(c, be)) as f32,
        ElemType::U8 | ElemType::Bool => c[0] as f32,
    }
}

/// Serialises tensor storage as little-endian bytes.
pub(crate) fn encode(data: &TensorData) -> Vec<u8> {
    match data {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_bools_become_f32() {
        let bytes: Vec<u8> = [-3i64, 7].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            decode(&bytes, ElemType::I64, false),
            TensorData::F32(vec![-3.0, 7.0])
        );
        assert_eq!(
            decode(&[1, 0, 1], ElemType::Bool, false),
            TensorData::F32(vec![1.0, 0.0, 1.0])
        );
        let bytes: Vec<u8> = [0.5f64].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            decode(&bytes, ElemType::F64, false),
            TensorData::F32(vec![0.5])
        );
    }

    #[test]
    fn big_endian_is_swapped() {
        let bytes = 1.5f32.to_be_bytes();
        assert_eq!(
            decode(&bytes, ElemType::F32, true),
            TensorData::F32(vec![1.5])
        );
    }

    #[test]
    fn half_types_keep_storage() {
        let v = [f16::from_f32(0.25), f16::from_f32(-2.0)];
        let bytes = encode(&TensorData::F16(v.to_vec()));
        assert_eq!(
            decode(&bytes, ElemType::F16, false),
            TensorData::F16(v.to_vec())
        );
    }
}
