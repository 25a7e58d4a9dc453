//! Model definitions written against the engine's [`aperture_engine::Backend`]:
//! configuration, weight loading and mapping, and the forward graph.

pub mod dfine;
pub mod error;
pub mod registry;
pub mod restormer;
pub mod rng;

pub use error::{ModelError, WeightIssue};
pub use registry::{detect_architecture, load_runner, Architecture};
