//! Restormer on the CUDA backend served through captured CUDA graphs: per input shape,
//! one graph holds the whole forward pass; a request is copy in, replay, copy out.

use aperture_cuda::{CudaBackend, CudaTensor, GraphCache};
use aperture_engine::{Backend, DType, EngineError, NamedTensors, Runner, TensorSpec};
use aperture_models::restormer::{Restormer, RestormerConfig};
use aperture_models::ModelError;
use aperture_weights::StateDict;

pub struct GraphRestormer {
    backend: CudaBackend,
    model: Restormer<CudaBackend>,
    graphs: GraphCache,
    max_batch_size: usize,
}

impl GraphRestormer {
    pub fn new(
        backend: CudaBackend,
        config: RestormerConfig,
        sd: &StateDict,
        max_batch_size: usize,
    ) -> Result<Self, ModelError> {
        let model = Restormer::prepare(&backend, config, sd)?;
        Ok(Self {
            backend,
            model,
            graphs: GraphCache::new(),
            max_batch_size,
        })
    }
}

fn engine_error(e: ModelError) -> EngineError {
    match e {
        ModelError::Engine(e) => e,
        other => EngineError::Invalid(other.to_string()),
    }
}

impl Runner for GraphRestormer {
    fn architecture(&self) -> &str {
        "restormer"
    }

    fn device(&self) -> String {
        self.backend.name()
    }

    fn inputs(&self) -> Vec<TensorSpec> {
        let c = self.model.config().inp_channels as i64;
        vec![TensorSpec::new("x", DType::F32, &[c, -1, -1])]
    }

    fn outputs(&self) -> Vec<TensorSpec> {
        let c = self.model.config().out_channels as i64;
        vec![TensorSpec::new("y", DType::F32, &[c, -1, -1])]
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        let [(_, x)] = inputs.as_slice() else {
            return Err(EngineError::Invalid(format!(
                "Restormer takes exactly one input tensor (NCHW float32), got {}",
                inputs.len()
            )));
        };
        let forward =
            |b: &CudaBackend, t: &CudaTensor| self.model.forward(b, t).map_err(engine_error);
        let y = self.graphs.infer(&self.backend, x, forward)?;
        Ok(vec![("y".to_string(), y)])
    }
}
