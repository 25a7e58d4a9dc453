//! Built-in runners for tests, benchmarks of the server itself, and smoke checks:
//! `identity` (OUTPUT0 = INPUT0) and `add_sub` (Triton's "simple" model:
//! OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1).
//!
//! Both read `[parameters] delay_us` (simulated compute time per batch), and take their
//! per-item shape from `input_size` (default `[16]`).

use std::time::Duration;

use aperture_engine::{
    DType, EngineError, HostTensor, NamedTensors, Runner, TensorData, TensorSpec,
};

fn find<'a>(inputs: &'a NamedTensors, name: &str) -> aperture_engine::Result<&'a HostTensor> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| EngineError::Invalid(format!("missing input {name}")))
}

/// A copy of `t` in storage from [`crate::pool`] (an identity over large tensors then
/// costs a memcpy, not fresh pages; the server returns that storage to the pool).
fn copy_pooled(t: &HostTensor) -> aperture_engine::Result<HostTensor> {
    let mut data = crate::pool::take(t.dtype(), t.numel());
    match (&mut data, t.data()) {
        (TensorData::F32(d), TensorData::F32(s)) => d.copy_from_slice(s),
        (TensorData::F16(d), TensorData::F16(s)) => d.copy_from_slice(s),
        (TensorData::BF16(d), TensorData::BF16(s)) => d.copy_from_slice(s),
        _ => return Ok(t.clone()),
    }
    HostTensor::new(t.shape().to_vec(), data)
}

/// Returns its input unchanged (after an optional simulated delay).
pub struct IdentityRunner {
    dims: Vec<i64>,
    dtype: DType,
    delay: Duration,
}

impl IdentityRunner {
    pub fn new(dims: Vec<i64>, dtype: DType, delay: Duration) -> Self {
        Self { dims, dtype, delay }
    }
}

impl Runner for IdentityRunner {
    fn architecture(&self) -> &str {
        "identity"
    }
    fn device(&self) -> String {
        "cpu".into()
    }
    fn inputs(&self) -> Vec<TensorSpec> {
        vec![TensorSpec::new("INPUT0", self.dtype, &self.dims)]
    }
    fn outputs(&self) -> Vec<TensorSpec> {
        vec![TensorSpec::new("OUTPUT0", self.dtype, &self.dims)]
    }
    fn max_batch_size(&self) -> usize {
        0
    }
    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let input = find(inputs, "INPUT0")?;
        Ok(vec![("OUTPUT0".into(), copy_pooled(input)?)])
    }
}

/// Element-wise sum and difference of two FP32 inputs.
pub struct AddSubRunner {
    dims: Vec<i64>,
    delay: Duration,
}

impl AddSubRunner {
    pub fn new(dims: Vec<i64>, delay: Duration) -> Self {
        Self { dims, delay }
    }
}

impl Runner for AddSubRunner {
    fn architecture(&self) -> &str {
        "add_sub"
    }
    fn device(&self) -> String {
        "cpu".into()
    }
    fn inputs(&self) -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("INPUT0", DType::F32, &self.dims),
            TensorSpec::new("INPUT1", DType::F32, &self.dims),
        ]
    }
    fn outputs(&self) -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("OUTPUT0", DType::F32, &self.dims),
            TensorSpec::new("OUTPUT1", DType::F32, &self.dims),
        ]
    }
    fn max_batch_size(&self) -> usize {
        0
    }
    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let a = find(inputs, "INPUT0")?;
        let b = find(inputs, "INPUT1")?;
        if a.shape() != b.shape() {
            return Err(EngineError::Shape(format!(
                "INPUT0 {:?} vs INPUT1 {:?}",
                a.shape(),
                b.shape()
            )));
        }
        let (av, bv) = (a.to_f32_vec(), b.to_f32_vec());
        let sum = av.iter().zip(&bv).map(|(x, y)| x + y).collect();
        let diff = av.iter().zip(&bv).map(|(x, y)| x - y).collect();
        Ok(vec![
            (
                "OUTPUT0".into(),
                HostTensor::from_f32(a.shape().to_vec(), sum)?,
            ),
            (
                "OUTPUT1".into(),
                HostTensor::from_f32(a.shape().to_vec(), diff)?,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_computes_both_outputs() {
        let r = AddSubRunner::new(vec![2], Duration::ZERO);
        let a = HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
        let b = HostTensor::from_f32(vec![1, 2], vec![0.5, 4.0]).unwrap();
        let out = r
            .infer(&vec![("INPUT1".into(), b), ("INPUT0".into(), a)])
            .unwrap();
        assert_eq!(out[0].1.to_f32_vec(), vec![1.5, 6.0]);
        assert_eq!(out[1].1.to_f32_vec(), vec![0.5, -2.0]);
    }
}
