//! Restormer (Zamir et al., CVPR 2022): image restoration transformer with
//! channel-wise (transposed) attention. Parameter names follow the published code.

mod config;
mod cost;
pub mod enhance;
mod model;
mod params;
mod runner;
mod widen;

pub use config::{LayerNormType, RestormerConfig};
pub use cost::{forward_cost, RestormerCost};
pub use model::Restormer;
pub use params::{check_weights, parameter_count, parameter_shapes, random_state_dict};
pub use runner::{load_restormer, single_input, RestormerRunner};
