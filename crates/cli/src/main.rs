//! `aperture`: run vision models fast on NVIDIA GPUs (and correctly on the CPU).

mod commands;
mod device;
mod gpu_runner;
mod logging;
mod nvml;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "aperture",
    version,
    about = "Inference engine and server for vision models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written on standard error (the level: RUST_LOG, default warn).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "APERTURE_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Build a seeded random-weight Restormer, enhance a generated image, write the result.
    Demo(commands::demo::DemoArgs),
    /// Print a model's architecture, parameter count, FLOPs and minimum bytes moved.
    Info(commands::info::InfoArgs),
    /// Run the raw model on tensors from a safetensors file (parity checks).
    Run(commands::run::RunArgs),
    /// Enhance an image or every image in a folder with a Restormer model.
    Enhance(commands::enhance::EnhanceArgs),
    /// Latency/throughput sweep over batch sizes and precisions; --check runs GPU parity first.
    Bench(commands::bench::BenchArgs),
    /// Evaluate COCO detections: the 12 standard bbox stats, identical to pycocotools.
    Eval(commands::eval::EvalArgs),
    /// Detect objects with a D-FINE model in images and folders (JSON and drawn boxes).
    Detect(commands::detect::DetectArgs),
    /// Check D-FINE on the GPU against the CPU backend and transformers; time it.
    CheckDfine(commands::check_dfine::CheckDfineArgs),
    /// Serve models over KServe v2 HTTP/gRPC (Triton-compatible) with dynamic batching.
    Serve(commands::serve::ServeArgs),
    /// Load generator for a running server: concurrency sweep, latency percentiles.
    Loadgen(commands::loadgen::LoadgenArgs),
    /// Measure every configuration (precision, batch, graphs, peers) with accuracy; write a markdown report with plots.
    Report(commands::report::ReportArgs),
    /// GPU self-checks against the CPU path (e.g. `selftest preprocess`).
    Selftest(commands::selftest::SelftestArgs),
}

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Demo(a) => commands::demo::run(a),
        Command::Info(a) => commands::info::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Enhance(a) => commands::enhance::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Detect(a) => commands::detect::run(a),
        Command::CheckDfine(a) => commands::check_dfine::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Loadgen(a) => commands::loadgen::run(a),
        Command::Report(a) => commands::report::run(a),
        Command::Selftest(a) => commands::selftest::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
