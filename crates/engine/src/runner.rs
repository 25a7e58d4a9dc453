//! [`Runner`]: a loaded model ready to serve batched requests, independent of backend.
//! The CLI (`aperture run`), the benchmark and the server all drive models through it.

use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::HostTensor;

/// Name, element type and shape of one model input or output. `shape` excludes the
/// batch axis; `-1` marks a dimension that may vary between requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn new(name: &str, dtype: DType, shape: &[i64]) -> Self {
        Self {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        }
    }
}

/// Named tensors in and out of a model; every tensor is batched along axis 0.
pub type NamedTensors = Vec<(String, HostTensor)>;

/// A model loaded onto a backend with its weights prepared once.
pub trait Runner: Send + Sync {
    /// Architecture name, e.g. "restormer" or "dfine".
    fn architecture(&self) -> &str;
    /// Backend description, e.g. "cpu (2 threads)" or "cuda:0 NVIDIA H100 (fp16)".
    fn device(&self) -> String;
    fn inputs(&self) -> Vec<TensorSpec>;
    fn outputs(&self) -> Vec<TensorSpec>;
    /// Largest batch one `infer` call accepts (0: no limit beyond memory).
    fn max_batch_size(&self) -> usize;
    /// Runs one batch. Inputs are matched by name; outputs come back under the names
    /// of [`Runner::outputs`].
    fn infer(&self, inputs: &NamedTensors) -> Result<NamedTensors>;
    /// How many `infer` calls may usefully run at once on this runner: a GPU runner
    /// that uploads one batch while the previous one computes says 2, so a server
    /// gives one instance that many workers (sharing this runner and its memory).
    fn concurrency(&self) -> usize {
        1
    }
}
