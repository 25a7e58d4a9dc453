use thiserror::Error;

/// Errors raised by the engine. Every variant carries a message a user can act on.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Shorthand for returning a shape error with a formatted message.
#[macro_export]
macro_rules! shape_err {
    ($($arg:tt)*) => { $crate::error::EngineError::Shape(format!($($arg)*)) };
}
