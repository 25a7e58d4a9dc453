//! Triton-compatible KServe v2 inference server with dynamic batching.
//!
//! Models reach the server through [`aperture_engine::Runner`]; a [`RunnerFactory`]
//! (usually an [`ArchitectureRegistry`]) turns a model folder's `config.toml` into
//! runners. The server speaks KServe v2 over HTTP/REST (axum) and gRPC (tonic), batches
//! requests dynamically per model, and exports Prometheus metrics.
//!
//! The repository and batcher work without the network layers too:
//!
//! ```
//! use std::sync::Arc;
//! use aperture_engine::HostTensor;
//! use aperture_server::{ArchitectureRegistry, InferRequest, ModelConfig, ModelSource, Repository};
//!
//! let rt = tokio::runtime::Runtime::new().unwrap();
//! rt.block_on(async {
//!     let repo = Repository::new(None, Arc::new(ArchitectureRegistry::with_builtins()));
//!     let mut cfg = ModelConfig::with_architecture("add_sub");
//!     cfg.input_size = Some(vec![2]);
//!     repo.add_source("simple", ModelSource::Inline { config: Box::new(cfg), dir: ".".into() });
//!     repo.load("simple").await.unwrap();
//!
//!     let x = HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
//!     let req = InferRequest {
//!         inputs: vec![("INPUT0".into(), x.clone()), ("INPUT1".into(), x)],
//!         ..Default::default()
//!     };
//!     let out = repo.get("simple", None).unwrap().infer(req).await.unwrap();
//!     assert_eq!(out[0].0, "OUTPUT0");
//!     assert_eq!(out[0].1.to_f32_vec(), vec![2.0, 4.0]);
//! });
//! ```

pub mod batcher;
pub mod builtin;
pub mod config;
pub mod connections;
pub mod echo;
pub mod error;
pub mod factory;
pub mod image;
pub mod logging;
pub mod model;
pub mod pool;
pub mod repository;
pub mod shm;
pub mod stats;
pub mod tensor_io;
pub mod trace;

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
pub use server::{
    run_until_signal, shutdown_signal, GrpcCompression, ServeOptions, Server, Shared,
};
pub mod loadgen;
