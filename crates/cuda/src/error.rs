use aperture_engine::EngineError;
use thiserror::Error;

/// Errors of the CUDA backend. Each message says what failed and what to do about it.
#[derive(Debug, Error)]
pub enum CudaError {
    /// A CUDA library could not be found or loaded (the caller may fall back to CPU).
    #[error("no usable GPU: {0}")]
    Unavailable(String),
    #[error("CUDA driver call failed: {0}")]
    Driver(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("cuBLASLt failed: {0}")]
    Blas(String),
    #[error("invalid device ordinal {ordinal}: {count} CUDA device(s) present")]
    NoSuchDevice { ordinal: usize, count: usize },
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        use cudarc::driver::sys::CUresult;
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            CudaError::OutOfMemory(format!("{e:?}"))
        } else {
            CudaError::Driver(format!("{e:?}"))
        }
    }
}

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        CudaError::Blas(format!("{e:?}"))
    }
}

impl From<CudaError> for EngineError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::OutOfMemory(m) => EngineError::OutOfMemory(m),
            other => EngineError::Device(other.to_string()),
        }
    }
}

pub type CudaResult<T> = std::result::Result<T, CudaError>;
