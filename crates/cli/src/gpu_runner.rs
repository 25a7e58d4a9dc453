//! Models on the CUDA backend served through captured CUDA graphs: per input shape,
//! one graph holds the whole forward pass; a request is copy in, replay, copy out.

use std::sync::atomic::{AtomicBool, Ordering};

use aperture_cuda::detection::MultiGraphCache;
use aperture_cuda::{CudaBackend, CudaTensor, GraphCache};
use aperture_engine::{Backend, DType, EngineError, HostTensor, NamedTensors, Runner, TensorSpec};
use aperture_models::dfine::{pixel_values_input, DFineRunner};
use aperture_models::restormer::{single_input, Restormer, RestormerConfig};
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
        let x = single_input(inputs)?;
        let forward = |b: &CudaBackend, t: &CudaTensor| Ok(self.model.forward(b, t)?);
        let y = self.graphs.infer(&self.backend, x, forward)?;
        Ok(vec![("y".to_string(), y)])
    }
}

/// D-FINE on the GPU through one CUDA graph per input shape, captured on first use
/// (`aperture check-dfine` checks replays against eager passes). Falls back to eager
/// passes if a capture fails.
pub struct GraphDFine {
    runner: DFineRunner<CudaBackend>,
    graphs: MultiGraphCache,
    eager: AtomicBool,
}

impl GraphDFine {
    pub fn new(runner: DFineRunner<CudaBackend>) -> Self {
        Self {
            runner,
            graphs: MultiGraphCache::new(),
            eager: AtomicBool::new(false),
        }
    }

    pub fn runner(&self) -> &DFineRunner<CudaBackend> {
        &self.runner
    }

    /// NCHW pixels -> (`logits [B, Q, C]`, `pred_boxes [B, Q, 4]`).
    pub fn detect(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> {
        let s = pixels.shape();
        if !self.eager.load(Ordering::Relaxed) && s.len() == 4 && s[1] == 3 {
            match self.replay(pixels) {
                Ok(out) => return Ok(out),
                Err(e) => {
                    tracing::warn!("CUDA graph capture failed ({e:#}); running eagerly");
                    self.eager.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok(self.runner.detect(pixels)?)
    }

    fn replay(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> {
        let model = self.runner.model();
        let forward =
            |b: &CudaBackend, x: &CudaTensor| -> aperture_engine::Result<Vec<CudaTensor>> {
                let o = model.forward(b, x)?;
                Ok(vec![o.logits, o.boxes])
            };
        let outs = self.graphs.infer(self.runner.backend(), pixels, forward)?;
        let [logits, boxes] = <[HostTensor; 2]>::try_from(outs)
            .map_err(|_| anyhow::anyhow!("the captured forward pass gave other outputs"))?;
        let (n, q) = (pixels.shape()[0], model.num_queries());
        let c = self.runner.config().num_labels;
        Ok((
            logits.reshape(vec![n, q, c])?,
            boxes.reshape(vec![n, q, 4])?,
        ))
    }
}

impl Runner for GraphDFine {
    fn architecture(&self) -> &str {
        self.runner.architecture()
    }

    fn device(&self) -> String {
        self.runner.device()
    }

    fn inputs(&self) -> Vec<TensorSpec> {
        self.runner.inputs()
    }

    fn outputs(&self) -> Vec<TensorSpec> {
        self.runner.outputs()
    }

    fn max_batch_size(&self) -> usize {
        self.runner.max_batch_size()
    }

    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        let x = pixel_values_input(inputs)?;
        let (logits, boxes) = self
            .detect(x)
            .map_err(|e| EngineError::Device(format!("{e:#}")))?;
        Ok(vec![
            ("logits".to_string(), logits),
            ("pred_boxes".to_string(), boxes),
        ])
    }
}
