//! Reading tensors from safetensors files, PyTorch checkpoints and HF snapshot folders.
//!
//! [`load`] takes a file or a folder and returns a [`StateDict`] of named
//! [`HostTensor`]s. The file format is recognised by its first bytes:
//!
//! - **safetensors**: F32/F16/BF16 tensors keep their type; F64, integer and bool
//!   tensors become f32; other types (F8, complex) are an error naming the tensor.
//! - **`torch.save` checkpoints**, read natively: the zip format (torch >= 1.6) and
//!   the older flat format (`_use_new_zipfile_serialization=False`). A small pickle
//!   machine rebuilds the object graph without running any Python. The weights are the
//!   bare state dict, or the dict found under the first of [`WRAPPER_KEYS`]
//!   (`model_state_dict`, `state_dict`, `params_ema`, `params`, `model`, `ema`).
//!   Non-tensor entries (epoch, optimizer state) are ignored.
//! - **folders**: `model.safetensors`, a sharded `model.safetensors.index.json`,
//!   `pytorch_model.bin` (or its index), or a single weights file.
//!
//! A leading `module.` (from `nn.DataParallel`) is stripped from every name.
//!
//! ```
//! use std::collections::BTreeMap;
//! use aperture_engine::HostTensor;
//! let dir = std::env::temp_dir().join(format!("aperture-weights-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("w.safetensors");
//! let mut tensors = BTreeMap::new();
//! tensors.insert("conv.weight".to_string(), HostTensor::from_f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
//! aperture_weights::save_safetensors(&path, &tensors).unwrap();
//! let sd = aperture_weights::load(&path).unwrap();
//! assert_eq!(sd.get("conv.weight").unwrap().shape(), &[2, 2]);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

mod detect;
mod elem;
mod error;
mod pickle;
mod safetensors;
mod snapshot;
mod torch;
mod torch_legacy;
mod unwrap;

use std::collections::BTreeMap;
use std::path::Path;

pub use aperture_engine::HostTensor;
pub use error::WeightsError;
pub use safetensors::save_safetensors;
pub use serde_json;
pub use snapshot::{read_json_config, FOLDER_FILES};
pub use unwrap::WRAPPER_KEYS;

use detect::{detect, Format};
use error::Result;

/// Named tensors, ordered by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    tensors: BTreeMap<String, HostTensor>,
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_tensors(tensors: BTreeMap<String, HostTensor>) -> Self {
        Self { tensors }
    }

    pub fn into_tensors(self) -> BTreeMap<String, HostTensor> {
        self.tensors
    }

    pub fn tensors(&self) -> &BTreeMap<String, HostTensor> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor out (handy for consuming loaders that then report leftovers).
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &HostTensor)> {
        self.tensors.iter()
    }

    pub fn insert(&mut self, name: String, t: HostTensor) {
        self.tensors.insert(name, t);
    }

    /// Writes the tensors as a safetensors file.
    pub fn save_safetensors(&self, path: &Path) -> std::result::Result<(), WeightsError> {
        save_safetensors(path, &self.tensors)
    }

    /// Total number of elements over all tensors.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(HostTensor::numel).sum()
    }
}

impl IntoIterator for StateDict {
    type Item = (String, HostTensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, HostTensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

/// Loads weights from a file (safetensors or torch.save zip, told apart by content)
/// or from a model folder.
pub fn load(path: &Path) -> std::result::Result<StateDict, WeightsError> {
    let raw = if path.is_dir() {
        snapshot::read_dir(path)?
    } else {
        load_file_raw(path)?
    };
    finish(path, raw)
}

/// Loads a safetensors file.
pub fn load_safetensors(path: &Path) -> std::result::Result<StateDict, WeightsError> {
    finish(path, safetensors::read(path)?)
}

/// Loads a `torch.save` checkpoint: the zip format (torch >= 1.6) or the legacy one.
pub fn load_torch(path: &Path) -> std::result::Result<StateDict, WeightsError> {
    let raw = match detect(path) {
        Ok(Format::TorchLegacy) => torch_legacy::read(path)?,
        _ => torch::read(path)?,
    };
    finish(path, raw)
}

/// One file, format by magic bytes, names as stored.
pub(crate) fn load_file_raw(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    match detect(path)? {
        Format::Safetensors => safetensors::read(path),
        Format::TorchZip => torch::read(path),
        Format::TorchLegacy => torch_legacy::read(path),
    }
}

/// Strips the `module.` prefix that `nn.DataParallel` adds, refusing to merge two
/// tensors into one name.
fn finish(path: &Path, raw: BTreeMap<String, HostTensor>) -> Result<StateDict> {
    if !raw.keys().any(|k| k.starts_with("module.")) {
        return Ok(StateDict::from_tensors(raw));
    }
    let mut out = BTreeMap::new();
    for (name, t) in raw {
        let stripped = name
            .strip_prefix("module.")
            .map(str::to_string)
            .unwrap_or_else(|| name.clone());
        if out.insert(stripped.clone(), t).is_some() {
            return Err(WeightsError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("'{stripped}' appears both with and without the 'module.' prefix"),
            });
        }
    }
    Ok(StateDict::from_tensors(out))
}
