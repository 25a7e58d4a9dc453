//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading, writing or transforming images.
///
/// Each variant names the file (or `<memory>` for in-memory buffers) so a user
/// processing a folder knows which input to look at.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: file is empty")]
    Empty { path: PathBuf },

    #[error("{path}: file is {size} bytes, over the limit of {limit} bytes")]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error(
        "{path}: image is {width}x{height} ({pixels} pixels), over the limit of {limit} pixels; \
         raise the pixel limit if this is intended"
    )]
    TooManyPixels {
        path: PathBuf,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },

    #[error("{path}: image has zero width or height ({width}x{height})")]
    ZeroSize {
        path: PathBuf,
        width: u32,
        height: u32,
    },

    #[error("{path}: not a supported image (expected PNG, JPEG or WebP content)")]
    UnknownFormat { path: PathBuf },

    #[error("{path}: corrupt or truncated image: {detail}")]
    Corrupt { path: PathBuf, detail: String },

    #[error("{path}: unsupported image: {detail}")]
    Unsupported { path: PathBuf, detail: String },

    #[error("{path}: unknown output format '{extension}'; use .png, .jpg or .jpeg")]
    UnknownOutputFormat { path: PathBuf, extension: String },

    #[error("{path}: cannot encode image: {detail}")]
    Encode { path: PathBuf, detail: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Placeholder path used in errors for images decoded from memory.
pub(crate) fn memory_path() -> PathBuf {
    PathBuf::from("<memory>")
}
