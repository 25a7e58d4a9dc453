//! Loading a D-FINE snapshot folder (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`) and serving it through the engine's [`Runner`] trait:
//! input `pixel_values` (NCHW f32), outputs `logits` and `pred_boxes`.

use std::path::{Path, PathBuf};

use aperture_engine::cpu::CpuBackend;
use aperture_engine::{Backend, DType, EngineError, HostTensor, NamedTensors, Runner, TensorSpec};
use aperture_weights::StateDict;

use super::config::DFineConfig;
use super::model::DFine;
use super::postprocess::ImageProcessorConfig;
use crate::error::{ModelError, Result};

/// A D-FINE snapshot read from disk.
pub struct DFineSnapshot {
    pub config: DFineConfig,
    pub processor: ImageProcessorConfig,
    pub weights: StateDict,
}

fn folder_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    }
}

/// Reads `config.json` (required), `preprocessor_config.json` (defaults when absent)
/// and the weights from a folder or a weights file beside them. Official D-FINE
/// checkpoints (`.pth` with the original repository's names) are renamed on the fly.
pub fn load_dfine(path: &Path) -> Result<DFineSnapshot> {
    let dir = folder_of(path);
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        ModelError::Config(format!(
            "cannot read {}: {e} (a D-FINE model folder needs the HF config.json)",
            cfg_path.display()
        ))
    })?;
    let config = DFineConfig::from_json(&text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", cfg_path.display())))?;
    let pp = dir.join("preprocessor_config.json");
    let processor = match std::fs::read_to_string(&pp) {
        Ok(t) => ImageProcessorConfig::from_json(&t)
            .map_err(|e| ModelError::Config(format!("{}: {e}", pp.display())))?,
        Err(_) => ImageProcessorConfig::default(),
    };
    let mut weights = aperture_weights::load(path)?;
    if super::original::is_original(&weights) {
        weights = super::original::to_hf_names(weights)?;
    }
    Ok(DFineSnapshot {
        config,
        processor,
        weights,
    })
}

/// D-FINE prepared on a backend.
pub struct DFineRunner<B: Backend> {
    backend: B,
    model: DFine<B>,
    processor: ImageProcessorConfig,
    max_batch_size: usize,
}

impl<B: Backend> DFineRunner<B> {
    pub fn new(backend: B, snapshot: &DFineSnapshot, max_batch_size: usize) -> Result<Self> {
        let model = DFine::prepare(&backend, snapshot.config.clone(), &snapshot.weights)?;
        Ok(Self {
            backend,
            model,
            processor: snapshot.processor.clone(),
            max_batch_size,
        })
    }

    pub fn config(&self) -> &DFineConfig {
        self.model.config()
    }

    /// Reduces query selection to the `queries` best queries (see
    /// [`DFine::set_num_queries`]).
    pub fn set_num_queries(&mut self, queries: usize) -> Result<()> {
        self.model.set_num_queries(queries)
    }

    /// The prepared model (e.g. to capture its forward pass in a CUDA graph).
    pub fn model(&self) -> &DFine<B> {
        &self.model
    }

    /// The backend the model runs on (for timing, profiling and memory counters).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn processor(&self) -> &ImageProcessorConfig {
        &self.processor
    }

    /// `pixel_values` NCHW f32 -> (`logits [B, Q, C]`, `pred_boxes [B, Q, 4]`).
    pub fn detect(&self, pixel_values: &HostTensor) -> Result<(HostTensor, HostTensor)> {
        let s = pixel_values.shape();
        if s.len() != 4 || s[1] != 3 {
            return Err(ModelError::Input(format!(
                "pixel_values must be [batch, 3, height, width], got {s:?}"
            )));
        }
        let b = &self.backend;
        let out = self.model.forward(b, &b.upload_nchw(pixel_values)?)?;
        let (n, q, c) = (s[0], self.model.num_queries(), self.config().num_labels);
        let logits = b.download_nhwc(&out.logits)?.reshape(vec![n, q, c])?;
        let boxes = b.download_nhwc(&out.boxes)?.reshape(vec![n, q, 4])?;
        Ok((logits, boxes))
    }
}

/// Loads the D-FINE model at `path` on the CPU backend.
pub fn load_dfine_runner(path: &Path) -> Result<Box<dyn Runner>> {
    let snapshot = load_dfine(path)?;
    Ok(Box::new(DFineRunner::new(CpuBackend::new(), &snapshot, 0)?))
}

impl<B: Backend> Runner for DFineRunner<B> {
    fn architecture(&self) -> &str {
        "dfine"
    }

    fn device(&self) -> String {
        self.backend.name()
    }

    fn inputs(&self) -> Vec<TensorSpec> {
        let (h, w) = self
            .processor
            .size
            .map_or((-1, -1), |(h, w)| (h as i64, w as i64));
        vec![TensorSpec::new("pixel_values", DType::F32, &[3, h, w])]
    }

    fn outputs(&self) -> Vec<TensorSpec> {
        let (q, c) = (
            self.model.num_queries() as i64,
            self.config().num_labels as i64,
        );
        vec![
            TensorSpec::new("logits", DType::F32, &[q, c]),
            TensorSpec::new("pred_boxes", DType::F32, &[q, 4]),
        ]
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        let (logits, boxes) = self.detect(pixel_values_input(inputs)?)?;
        Ok(vec![
            ("logits".into(), logits),
            ("pred_boxes".into(), boxes),
        ])
    }
}

/// The `pixel_values` input, or the only input whatever its name.
pub fn pixel_values_input(inputs: &NamedTensors) -> aperture_engine::Result<&HostTensor> {
    match inputs.iter().find(|(n, _)| n == "pixel_values") {
        Some((_, t)) => Ok(t),
        None if inputs.len() == 1 => Ok(&inputs[0].1),
        None => Err(EngineError::Invalid(
            "D-FINE needs an input named 'pixel_values'".into(),
        )),
    }
}
