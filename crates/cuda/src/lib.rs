//! The CUDA backend: cudarc (loaded at run time), kernels compiled by NVRTC for the
//! GPU at hand and cached on disk, cuBLASLt for matrix products, a caching allocator
//! and CUDA graphs.
//!
//! The binary starts without CUDA: [`cuda_available`] and [`CudaBackend::new`] probe
//! the driver, NVRTC and cuBLASLt without panicking and report what is missing.
//!
//! ```
//! use aperture_cuda::{cuda_available, CudaBackend};
//! use aperture_engine::Precision;
//! match CudaBackend::new(0, Precision::Fp16) {
//!     Ok(gpu) => println!("running on {}", gpu.device_name()),
//!     Err(e) => { assert!(!cuda_available() || !e.to_string().is_empty()); println!("{e}") }
//! }
//! ```

mod attention;
mod backend;
mod conv;
mod conv_aggregate;
mod conv_concat;
mod conv_concat_check;
mod conv_igemm;
mod conv_small;
mod copy_rows;
mod cudnn_conv;
mod depthwise;
mod depthwise_mma;
pub mod detection;
mod driver;
mod error;
mod front;
mod gemm;
mod graph;
mod graph_shape;
pub mod kernels;
pub mod nvrtc;
mod pinned;
mod plan;
mod pool;
pub mod preprocess;
mod profile;
pub mod selftest;
mod transfer;

pub use backend::{ConvWeights, CudaBackend, CudaParam, CudaTensor};
pub use driver::{device_count, Event};
pub use error::{CudaError, CudaResult};
pub use graph::{ArenaSize, CudaGraph, GraphCache};
pub use pool::{DeviceBuffer, MemStats};
pub use preprocess::{GpuPreprocessor, PreprocessSpec, Preprocessor, TensorLayout};
pub use profile::{OpStat, Profiler};

/// Whether a CUDA driver with at least one device, NVRTC and cuBLASLt can be loaded.
/// Never panics.
pub fn cuda_available() -> bool {
    driver::probe().is_ok()
}

/// Why CUDA is not available, or `None` when it is.
pub fn unavailable_reason() -> Option<String> {
    driver::probe().err().map(|e| e.to_string())
}

/// Deterministic test values in [0, 1) (a 64-bit linear congruential stream from `seed`).
#[cfg(test)]
pub(crate) fn test_uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_engine::Precision;

    #[test]
    fn new_reports_a_clear_error_without_a_gpu() {
        // On machines with a GPU this checks nothing more than that new() answers.
        match CudaBackend::new(0, Precision::Fp32) {
            Ok(_) => assert!(cuda_available()),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    !cuda_available() || msg.contains("NVRTC") || msg.contains("CUDA"),
                    "{msg}"
                );
                if !cuda_available() {
                    assert!(msg.contains("no usable GPU"), "{msg}");
                }
            }
        }
    }

    #[test]
    fn unavailable_reason_agrees_with_cuda_available() {
        assert_eq!(unavailable_reason().is_none(), cuda_available());
    }

    #[test]
    fn out_of_memory_maps_to_the_engine_error() {
        let e: aperture_engine::EngineError = CudaError::OutOfMemory("x".into()).into();
        assert!(matches!(e, aperture_engine::EngineError::OutOfMemory(_)));
    }
}
