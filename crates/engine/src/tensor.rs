use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{EngineError, Result};

/// Typed element storage of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }
}

/// A dense, row-major tensor in host memory (weights, model inputs and outputs).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl HostTensor {
    /// Builds a tensor, checking that the element count matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(EngineError::Shape(format!(
                "shape {shape:?} holds {expected} elements but {} were given",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, TensorData::F32(data))
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: TensorData::F32(vec![0.0; n]),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Takes the storage out (e.g. to reuse a large buffer).
    pub fn into_data(self) -> TensorData {
        self.data
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Returns the f32 storage when the tensor already is f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Converts (or copies) the elements to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Returns an f32 copy of this tensor.
    pub fn to_f32(&self) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: TensorData::F32(self.to_f32_vec()),
        }
    }

    /// Converts to the given dtype (round to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        let v = self.to_f32_vec();
        let data = match dtype {
            DType::F32 => TensorData::F32(v),
            DType::F16 => TensorData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => TensorData::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        HostTensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// Same elements, new shape of equal size.
    pub fn reshape(mut self, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(EngineError::Shape(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.numel()
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Concatenates tensors along axis 0 (e.g. NCHW images into one batch); the
    /// other axes must agree.
    pub fn concat_batch(parts: &[HostTensor]) -> Result<HostTensor> {
        let first = parts
            .first()
            .ok_or_else(|| EngineError::Invalid("nothing to concatenate".into()))?;
        let inner = &first.shape[1..];
        let mut data = Vec::new();
        let mut n = 0;
        for p in parts {
            if &p.shape[1..] != inner {
                return Err(EngineError::Shape(format!(
                    "cannot batch tensors of shapes {:?} and {:?}",
                    first.shape, p.shape
                )));
            }
            n += p.shape[0];
            data.extend(p.to_f32_vec());
        }
        let mut shape = first.shape.clone();
        shape[0] = n;
        HostTensor::from_f32(shape, data)
    }

    /// Splits the leading axis into single items.
    pub fn split_batch(&self) -> Vec<HostTensor> {
        let n = self.shape.first().copied().unwrap_or(0);
        if n == 0 {
            return Vec::new();
        }
        let per = self.numel() / n;
        let v = self.to_f32_vec();
        let mut shape = self.shape.clone();
        shape[0] = 1;
        v.chunks(per.max(1))
            .map(|c| HostTensor {
                shape: shape.clone(),
                data: TensorData::F32(c.to_vec()),
            })
            .collect()
    }
}

/// Relative L2 distance ||a - b|| / ||b||, computed in f64. Returns infinity on a length
/// mismatch and NaN if either side holds a NaN, so such outputs never pass a tolerance.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_wrong_element_count() {
        let err = HostTensor::from_f32(vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert!(err.to_string().contains("6 elements"), "{err}");
    }

    #[test]
    fn dtype_round_trip_is_close() {
        let t = HostTensor::from_f32(vec![4], vec![0.1, -2.5, 3.0, 1e-3]).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let back = t.to_dtype(dt).to_f32_vec();
            assert!(relative_l2(&back, &t.to_f32_vec()) < 1e-2, "{dt}");
        }
    }

    #[test]
    fn relative_l2_flags_nan_and_length() {
        assert!(relative_l2(&[f32::NAN], &[1.0]).is_nan());
        assert!(relative_l2(&[1.0], &[1.0, 2.0]).is_infinite());
        assert_eq!(relative_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    }

    #[test]
    fn batch_concat_and_split_round_trip() {
        let a = HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
        let b = HostTensor::from_f32(vec![1, 2], vec![3.0, 4.0]).unwrap();
        let ab = HostTensor::concat_batch(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(ab.shape(), &[2, 2]);
        assert_eq!(ab.split_batch(), vec![a, b]);
    }
}
