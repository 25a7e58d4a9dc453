use std::path::PathBuf;

/// Everything that can go wrong while reading or writing weights. Every variant names
/// the file involved so the message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is empty (0 bytes); expected a safetensors file, a PyTorch checkpoint or a model folder")]
    Empty { path: PathBuf },

    #[error("{path} is not a weights file: {what}")]
    UnknownFormat { path: PathBuf, what: String },

    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: tensor '{tensor}' has dtype {dtype}, which cannot be loaded (supported: F32, F16, BF16, F64 and integer/bool types)")]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{path}: invalid PyTorch checkpoint archive: {reason}")]
    Zip { path: PathBuf, reason: String },

    /// `part` is the pickle's container: `data.pkl` in zip archives, the file itself in legacy ones.
    #[error("{path}: cannot unpickle {part} at byte {offset}: {reason}")]
    Pickle {
        path: PathBuf,
        part: &'static str,
        offset: usize,
        reason: String,
    },

    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{path}: tensor '{tensor}': {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{path}: shard '{shard}' listed in the index is missing")]
    MissingShard { path: PathBuf, shard: String },

    #[error("{path}: {reason}")]
    Folder { path: PathBuf, reason: String },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl WeightsError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = WeightsError> = std::result::Result<T, E>;
