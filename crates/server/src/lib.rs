//! Triton-compatible KServe v2 inference server with dynamic batching.
//!
//! Models reach the server through [`aperture_engine::Runner`]; a [`RunnerFactory`]
//! (usually an [`ArchitectureRegistry`]) turns a model folder's `config.toml` into
//! runners. The server speaks KServe v2 over HTTP/REST (axum) and gRPC (tonic), batches
//! requests dynamically per model, and exports Prometheus metrics.

pub mod batcher;
pub mod builtin;
pub mod config;
pub mod echo;
pub mod error;
pub mod factory;
pub mod image;
pub mod model;
pub mod repository;
pub mod stats;
pub mod tensor_io;

pub use config::ModelConfig;
pub use error::{Result, ServerError};
pub use factory::{ArchitectureRegistry, BuildError, ModelContext, RunnerFactory};
pub use image::{ImageAdapter, PlanarImage, PlanarImageAdapter};
pub use model::{InferRequest, LoadedModel};
pub use repository::{ModelSource, Repository};
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod server;

pub use metrics::GpuMetrics;
pub use server::{run_until_signal, shutdown_signal, ServeOptions, Server, Shared};
pub mod loadgen;
