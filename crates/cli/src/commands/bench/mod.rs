//! `aperture bench`: latency and throughput of a Restormer or a D-FINE model per
//! (precision, batch) on the CPU or a GPU, with an accuracy column against the CPU
//! backend's fp32 output, optional parity checks (`--check`, Restormer) and a
//! per-operation profile. The architecture comes from the model's config.json.

mod dfine;
mod pixels;
mod report;
mod restormer;
mod sweep;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aperture_cuda::CudaBackend;
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{Backend, Precision};
use aperture_models::{detect_architecture, Architecture};
use clap::Args;

pub use report::utc_now;
use report::{print_table, Row};
use sweep::{BenchModel, Settings};

#[derive(Args)]
pub struct BenchArgs {
    /// Restormer or D-FINE weights (a file, or a folder with config.json, which names
    /// the architecture).
    #[arg(long, conflicts_with = "demo_config")]
    model: Option<PathBuf>,
    /// Random weights of a named configuration instead of --model (base).
    #[arg(long)]
    demo_config: Option<String>,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Precisions to sweep (comma separated): fp32, tf32, fp16, bf16.
    #[arg(long, default_value = "fp16", value_delimiter = ',')]
    precision: Vec<Precision>,
    /// Batch sizes to sweep (comma separated).
    #[arg(long, default_value = "1,2,4,8,16,32,64", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Image height (and width unless --width is given). Default: 512 for Restormer,
    /// the size of D-FINE's preprocessor_config.json (640 when it gives none).
    #[arg(long)]
    size: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Timed iterations per (precision, batch), after --warmup untimed ones.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Per-operation time share and achieved rates (one eager pass per row; GPU only).
    #[arg(long)]
    profile: bool,
    /// Restormer: parity first, every GPU operation against the CPU backend, then the
    /// whole model against the CPU backend and against each --reference. (D-FINE:
    /// `aperture check-dfine`.)
    #[arg(long)]
    check: bool,
    /// safetensors files holding an input "x" (NCHW) and a reference output "y".
    #[arg(long)]
    reference: Vec<PathBuf>,
    /// Plan each graph's memory from a dry run of the forward pass instead of an eager
    /// one (lower peak memory).
    #[arg(long)]
    dry_plan: bool,
    /// Skip the accuracy column (it runs the CPU backend once).
    #[arg(long)]
    no_accuracy: bool,
    /// D-FINE: keep only this many of the model's queries (query selection at run
    /// time); the CPU reference uses the same count.
    #[arg(long)]
    queries: Option<usize>,
    /// D-FINE on the GPU: post-processing (sigmoid, top-k, corners) inside the timed
    /// graph, as `aperture detect` runs it; the host would receive K rows per image.
    #[arg(long)]
    postprocess: bool,
    /// D-FINE on the GPU: time from 8-bit pixels of this source size (WIDTHxHEIGHT,
    /// e.g. 640x480; synthetic images) to detection rows: the pixels' copy in, the
    /// preprocessing (resize to the model's input, rescale, normalise), the forward
    /// pass, the post-processing and the rows' copy out, all in one graph replay.
    /// Implies --postprocess.
    #[arg(long, value_name = "WxH", value_parser = pixels::parse_size)]
    preprocess: Option<(usize, usize)>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl BenchArgs {
    /// (height, width) from --size/--width, else the architecture's default.
    fn dims(&self, default_h: usize, default_w: usize) -> (usize, usize) {
        match self.size {
            Some(h) => (h, self.width.unwrap_or(h)),
            None => (default_h, self.width.unwrap_or(default_w)),
        }
    }
}

/// What one architecture's bench hands back for printing.
pub struct Outcome {
    /// Model description with the input size, e.g. "dfine (x) 640x640".
    model: String,
    rows: Vec<Row>,
    /// Failed parity checks (--check).
    failures: usize,
}

/// A model's name for the report: its file or folder name without extension.
fn label(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The rows for `args.device`: on the CPU, fp32 eager passes; on the GPU, CUDA graph
/// replays per precision. The accuracy reference is the CPU backend's fp32 output for
/// the first image (batch 1), computed once.
fn measure<C: BenchModel, G: BenchModel>(
    args: &BenchArgs,
    chw: (usize, usize, usize),
    cpu: impl FnOnce() -> anyhow::Result<C>,
    gpu: impl Fn(Precision) -> anyhow::Result<G>,
) -> anyhow::Result<Vec<Row>> {
    let settings = Settings {
        batches: &args.batch,
        warmup: args.warmup,
        iters: args.iters,
        profile: args.profile,
        seed: args.seed,
        chw,
    };
    match args.device.as_str() {
        "cpu" => {
            let skipped: Vec<&str> = args
                .precision
                .iter()
                .filter(|p| **p != Precision::Fp32)
                .map(|p| p.as_str())
                .collect();
            if !skipped.is_empty() {
                eprintln!(
                    "the CPU backend computes in fp32 only: {} not measured",
                    skipped.join(", ")
                );
            }
            if args.profile {
                eprintln!("--profile needs the GPU (the CPU backend has no profiler)");
            }
            let model = cpu()?;
            let reference = match args.no_accuracy {
                true => None,
                false => Some(sweep::reference(&model, &settings)?),
            };
            sweep::batches(&model, Precision::Fp32, &settings, reference.as_deref())
        }
        "cuda" => {
            if let Some(reason) = aperture_cuda::unavailable_reason() {
                bail!("--device cuda: {reason}");
            }
            let reference = if args.no_accuracy {
                None
            } else {
                eprintln!("computing the CPU reference output for the accuracy column...");
                Some(sweep::reference(&cpu()?, &settings)?)
            };
            let mut rows = Vec::new();
            for &p in &args.precision {
                // A precision that cannot be prepared fails its rows; the others still run.
                match gpu(p) {
                    Ok(model) => {
                        rows.extend(sweep::batches(&model, p, &settings, reference.as_deref())?)
                    }
                    Err(e) => {
                        eprintln!("{p}: {e:#}");
                        rows.extend(
                            args.batch
                                .iter()
                                .map(|&b| Row::failed("aperture", p.as_str(), b, format!("{e:#}"))),
                        );
                    }
                }
            }
            Ok(rows)
        }
        other => bail!("unknown --device '{other}' (cpu or cuda)"),
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs positive sizes, e.g. 1,2,4");
    }
    let arch = match &args.model {
        Some(path) => detect_architecture(path)
            .with_context(|| format!("cannot tell the architecture of {}", path.display()))?,
        None => Architecture::Restormer,
    };
    if args.preprocess.is_some() {
        if args.device != "cuda" {
            bail!("--preprocess times the GPU graph: it needs --device cuda");
        }
        if arch != Architecture::DFine || args.model.is_none() {
            bail!("--preprocess is for D-FINE models (--model with a D-FINE config.json)");
        }
    }
    let outcome = match (arch, &args.model) {
        (Architecture::DFine, Some(path)) => dfine::run(&args, path)?,
        _ => restormer::run(&args)?,
    };
    let device = match args.device.as_str() {
        "cuda" => CudaBackend::new(args.gpu, Precision::Fp32)
            .map(|b| b.device_name().to_string())
            .unwrap_or_else(|_| "cuda".into()),
        _ => CpuBackend::new().name(),
    };
    let doc = report::to_json(&device, &utc_now(), &outcome.model, &outcome.rows);
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("\n{}, {device}", outcome.model);
        print_table(&outcome.rows);
    }
    if outcome.failures > 0 {
        bail!("{} parity check(s) failed (see above)", outcome.failures);
    }
    Ok(())
}
