//! One module per subcommand: each has an `Args` struct and a `run` function.

pub mod bench;
pub mod check_dfine;
pub mod demo;
pub mod detect;
pub mod enhance;
pub mod eval;
pub mod info;
pub mod loadgen;
pub mod report;
pub mod run;
pub mod selftest;
pub mod serve;
