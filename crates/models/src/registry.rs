//! Recognising which architecture a model folder or weights file holds, and loading it
//! as a [`Runner`].

use std::path::Path;

use aperture_engine::{Backend, Runner};

use crate::error::{ModelError, Result};
use crate::restormer::{load_restormer, RestormerRunner};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Restormer,
    DFine,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Restormer => "restormer",
            Architecture::DFine => "dfine",
        }
    }
}

/// Reads `config.json` (beside a weights file, or inside a folder) for an
/// `architecture` / `architectures` / `model_type` entry; without one, recognises
/// Restormer by its parameter names.
/// The architecture names a `config.json` gives (`architecture`, `model_type`,
/// `architectures`), lower-cased.
pub(crate) fn named_architectures(v: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = ["architecture", "model_type"]
        .iter()
        .filter_map(|key| v.get(*key).and_then(|a| a.as_str()))
        .map(str::to_ascii_lowercase)
        .collect();
    if let Some(list) = v.get("architectures").and_then(|a| a.as_array()) {
        names.extend(
            list.iter()
                .filter_map(|a| a.as_str())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

pub fn detect_architecture(path: &Path) -> Result<Architecture> {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let config = dir.join("config.json");
    if let Ok(text) = std::fs::read_to_string(&config) {
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", config.display())))?;
        let names = named_architectures(&v);
        if names.iter().any(|n| n.contains("restormer")) {
            return Ok(Architecture::Restormer);
        }
        if names
            .iter()
            .any(|n| n.contains("d_fine") || n.contains("dfine"))
        {
            return Ok(Architecture::DFine);
        }
        if !names.is_empty() {
            return Err(ModelError::Config(format!(
                "{} describes an unsupported architecture ({}); supported: Restormer, D-FINE",
                config.display(),
                names.join(", ")
            )));
        }
    }
    let sd = aperture_weights::load(path)?;
    if sd.get("patch_embed.proj.weight").is_some() && sd.get("output.weight").is_some() {
        return Ok(Architecture::Restormer);
    }
    Err(ModelError::Config(format!(
        "cannot tell which architecture {} holds: add a config.json naming it",
        path.display()
    )))
}

/// Loads the model at `path` onto `backend`.
pub fn load_runner<B: Backend + 'static>(
    path: &Path,
    backend: B,
    max_batch_size: usize,
) -> Result<Box<dyn Runner>> {
    match detect_architecture(path)? {
        Architecture::Restormer => {
            let (config, sd) = load_restormer(path)?;
            Ok(Box::new(RestormerRunner::new(
                backend,
                config,
                &sd,
                max_batch_size,
            )?))
        }
        Architecture::DFine => {
            let snapshot = crate::dfine::load_dfine(path)?;
            Ok(Box::new(crate::dfine::DFineRunner::new(
                backend,
                &snapshot,
                max_batch_size,
            )?))
        }
    }
}
