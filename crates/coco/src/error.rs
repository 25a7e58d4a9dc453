//! Errors of loading COCO files and evaluating detections.

use std::path::PathBuf;

/// Everything that can go wrong while loading COCO data or evaluating it.
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    // Causes are exposed through `source()`, not repeated in the message: print the chain
    // (anyhow's `{:#}`) to see them.
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("in {path}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<CocoError>,
    },
    #[error("{what}: not valid JSON of the expected shape")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} has no `{field}` field")]
    MissingField { what: String, field: &'static str },
    #[error("{what}: `bbox` must be [x, y, width, height] (4 numbers), found {len} numbers")]
    BadBbox { what: String, len: usize },
    #[error("{what}: `{field}` is not a finite number")]
    NotFinite { what: String, field: &'static str },
    #[error("results must be a JSON array of detections [{{\"image_id\", \"category_id\", \"bbox\": [x, y, w, h], \"score\"}}, ...]")]
    ResultsNotAList,
    #[error("the results hold no detections (pycocotools refuses an empty results list too)")]
    EmptyResults,
    #[error("detection #{index} refers to image id {image_id}, which is not among the ground-truth images: the results do not belong to this ground-truth file")]
    UnknownImage { index: usize, image_id: i64 },
    #[error("the ground truth lists no {0}")]
    EmptyGroundTruth(&'static str),
    #[error("invalid evaluation parameters: {0}")]
    InvalidParams(String),
}

impl CocoError {
    /// Attach the file a problem was found in.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            e @ CocoError::Io { .. } => e,
            e => CocoError::InFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, CocoError>;
