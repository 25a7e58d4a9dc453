//! Loading a Restormer from disk and serving it through the engine's [`Runner`] trait.

use std::path::{Path, PathBuf};

use aperture_engine::{Backend, DType, EngineError, HostTensor, NamedTensors, Runner, TensorSpec};
use aperture_weights::StateDict;

use super::config::RestormerConfig;
use super::model::Restormer;
use crate::error::{ModelError, Result};

/// Reads the weights at `path` (a weights file or a folder holding one) and the
/// configuration: `config.json` beside the weights when present, else inferred from
/// the weight shapes.
pub fn load_restormer(path: &Path) -> Result<(RestormerConfig, StateDict)> {
    let sd = aperture_weights::load(path)?;
    let dir: PathBuf = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let config_path = dir.join("config.json");
    let config = if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            ModelError::Config(format!("cannot read {}: {e}", config_path.display()))
        })?;
        check_architecture(&text, &config_path)?;
        RestormerConfig::from_json(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", config_path.display())))?
    } else {
        RestormerConfig::infer_from_weights(&sd)?
    };
    Ok((config, sd))
}

/// Refuses a `config.json` that names another architecture.
fn check_architecture(text: &str, path: &Path) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    let names = crate::registry::named_architectures(&v);
    if names.is_empty() || names.iter().any(|n| n.contains("restormer")) {
        return Ok(());
    }
    Err(ModelError::Config(format!(
        "{} describes a '{}' model, not a Restormer",
        path.display(),
        names.join(", ")
    )))
}

/// A Restormer prepared on a backend, answering batched NCHW requests.
pub struct RestormerRunner<B: Backend> {
    backend: B,
    model: Restormer<B>,
    max_batch_size: usize,
}

impl<B: Backend> RestormerRunner<B> {
    pub fn new(
        backend: B,
        config: RestormerConfig,
        sd: &StateDict,
        max_batch_size: usize,
    ) -> Result<Self> {
        let model = Restormer::prepare(&backend, config, sd)?;
        Ok(Self {
            backend,
            model,
            max_batch_size,
        })
    }

    pub fn config(&self) -> &RestormerConfig {
        self.model.config()
    }

    /// Enhances an NCHW f32 batch (height and width multiples of 8).
    pub fn enhance(&self, x: &HostTensor) -> Result<HostTensor> {
        let t = self.backend.upload_nchw(x)?;
        let y = self.model.forward(&self.backend, &t)?;
        Ok(self.backend.download_nchw(&y)?)
    }
}

impl<B: Backend> Runner for RestormerRunner<B> {
    fn architecture(&self) -> &str {
        "restormer"
    }

    fn device(&self) -> String {
        self.backend.name()
    }

    fn inputs(&self) -> Vec<TensorSpec> {
        vec![TensorSpec::new(
            "x",
            DType::F32,
            &[self.config().inp_channels as i64, -1, -1],
        )]
    }

    fn outputs(&self) -> Vec<TensorSpec> {
        vec![TensorSpec::new(
            "y",
            DType::F32,
            &[self.config().out_channels as i64, -1, -1],
        )]
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        let y = self.enhance(single_input(inputs)?)?;
        Ok(vec![("y".to_string(), y)])
    }
}

/// Restormer's one image input, whatever its name.
pub fn single_input(inputs: &NamedTensors) -> aperture_engine::Result<&HostTensor> {
    match inputs.as_slice() {
        [(_, x)] => Ok(x),
        _ => Err(EngineError::Invalid(format!(
            "Restormer takes exactly one input tensor (NCHW float32), got {}",
            inputs.len()
        ))),
    }
}
