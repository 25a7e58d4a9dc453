//! D-FINE (HF `DFineForObjectDetection`): HGNetV2 backbone, hybrid encoder, query
//! selection and an FDR decoder, configured from HF's `config.json` and loaded from
//! HF snapshot folders.
//!
//! ```no_run
//! use aperture_models::dfine::{load_dfine, post_process, DFineRunner};
//! use aperture_engine::{cpu::CpuBackend, HostTensor};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let snap = load_dfine(std::path::Path::new("dfine_x_coco"))?;
//! let runner = DFineRunner::new(CpuBackend::new(), &snap, 0)?;
//! let pixels = HostTensor::zeros(vec![1, 3, 640, 640]);
//! let (logits, boxes) = runner.detect(&pixels)?;
//! let dets = post_process(&logits.to_f32_vec(), &boxes.to_f32_vec(), snap.config.num_labels, 0.5, (480, 640))?;
//! # let _ = dets; Ok(()) }
//! ```

mod backbone;
mod blocks;
pub mod config;
mod decoder;
mod encoder;
pub mod golden;
mod model;
pub mod original;
pub mod postprocess;
mod runner;
mod weights;

#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod x_tests;

pub use config::{BackboneConfig, DFineConfig};
pub use decoder::weighting_function;
pub use encoder::position_embedding;
pub use model::{anchors, DFine};
pub use postprocess::{coco_category_id, post_process, Detection, ImageProcessorConfig};
pub use runner::{load_dfine, load_dfine_runner, pixel_values_input, DFineRunner, DFineSnapshot};
pub use weights::{fold_batch_norm, merge_repvgg};
