//! One error type for every layer of the server, and its one mapping to HTTP status
//! codes and gRPC codes (Triton's choices), so no handler picks a status by hand.

use thiserror::Error;

/// A failed request or repository action; the message is shown to the client as is.
#[derive(Clone, Debug, Error)]
pub enum ServerError {
    /// Malformed request: bad JSON, wrong datatype or shape, truncated binary data.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown model or version.
    #[error("{0}")]
    NotFound(String),
    /// The model exists but is not loaded / not ready.
    #[error("{0}")]
    Unavailable(String),
    /// The model's queue is full (backpressure).
    #[error("{0}")]
    QueueFull(String),
    /// The request waited longer than its timeout.
    #[error("{0}")]
    Timeout(String),
    /// Request body larger than the configured limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Missing or wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// The model's runner failed.
    #[error("{0}")]
    Internal(String),
    /// A requested feature the server does not implement.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, ServerError>;

impl ServerError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        ServerError::InvalidArgument(msg.into())
    }

    /// HTTP status code as Triton answers it.
    pub fn http_status(&self) -> u16 {
        match self {
            ServerError::InvalidArgument(_) | ServerError::Unsupported(_) => 400,
            ServerError::Unauthorized(_) => 401,
            ServerError::NotFound(_) => 404,
            ServerError::PayloadTooLarge(_) => 413,
            ServerError::QueueFull(_) => 429,
            ServerError::Internal(_) => 500,
            ServerError::Unavailable(_) => 503,
            ServerError::Timeout(_) => 504,
        }
    }
}

impl From<aperture_engine::EngineError> for ServerError {
    fn from(e: aperture_engine::EngineError) -> Self {
        match e {
            aperture_engine::EngineError::Shape(_) | aperture_engine::EngineError::Invalid(_) => {
                ServerError::InvalidArgument(e.to_string())
            }
            other => ServerError::Internal(other.to_string()),
        }
    }
}

impl From<ServerError> for tonic::Status {
    fn from(e: ServerError) -> Self {
        let msg = e.to_string();
        match e {
            ServerError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            ServerError::NotFound(_) => tonic::Status::not_found(msg),
            ServerError::Unavailable(_) => tonic::Status::unavailable(msg),
            ServerError::QueueFull(_) => tonic::Status::resource_exhausted(msg),
            ServerError::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            ServerError::PayloadTooLarge(_) => tonic::Status::resource_exhausted(msg),
            ServerError::Unauthorized(_) => tonic::Status::unauthenticated(msg),
            ServerError::Internal(_) => tonic::Status::internal(msg),
            ServerError::Unsupported(_) => tonic::Status::unimplemented(msg),
        }
    }
}

impl axum::response::IntoResponse for ServerError {
    fn into_response(self) -> axum::response::Response {
        if self.http_status() >= 500 {
            tracing::warn!(error = %self, status = self.http_status(), "request failed");
        }
        let status = axum::http::StatusCode::from_u16(self.http_status())
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({ "error": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}
