//! Aperture's engine core: host tensors, the [`Backend`] abstraction every model is
//! written against, and the CPU reference backend.
//!
//! Activations live in NHWC layout on every backend. Models call the backend's
//! operations (some of them fused, e.g. [`Backend::channel_attention`]); each fused
//! operation has a plain CPU twin that is the oracle for the GPU kernels.
//!
//! ```
//! use aperture_engine::{cpu::CpuBackend, Backend, HostTensor};
//! let cpu = CpuBackend::new();
//! let x = HostTensor::from_f32(vec![1, 2, 2, 2], (0..8).map(|v| v as f32).collect()).unwrap();
//! let t = cpu.upload_nchw(&x).unwrap();
//! let back = cpu.download_nchw(&t).unwrap();
//! assert_eq!(back.to_f32_vec(), x.to_f32_vec());
//! ```

pub mod backend;
pub mod conv_nodes;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod runner;
pub mod tensor;
pub mod trace;

pub use backend::{Activation, Backend, ConvSpec, FrontHalf, NormProduct};
pub use conv_nodes::{eval_conv_nodes, ConvNode, NodeRef, NodeSource};
pub use dtype::{DType, Precision};
pub use error::{EngineError, Result};
pub use runner::{NamedTensors, Runner, TensorSpec};
pub use tensor::{relative_l2, HostTensor, TensorData};
