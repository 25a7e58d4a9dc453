//! `aperture check-dfine`: D-FINE on the CUDA backend against the CPU backend and
//! against transformers' outputs (a golden file), per operation and for the whole model,
//! in every precision, plus eager timings and a per-operation profile. One command on
//! the GPU machine; see docs/dfine-gpu.md.

mod model;
mod ops;
mod pixels;
mod postprocess;
mod selection;

pub(crate) use model::align;

use std::path::PathBuf;

use anyhow::{bail, Context};
use aperture_cuda::CudaBackend;
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, Precision};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args)]
pub struct CheckDfineArgs {
    /// D-FINE model folder (config.json + model.safetensors); without it only the
    /// per-operation checks run.
    #[arg(long)]
    model: Option<PathBuf>,
    /// transformers' outputs for the X config (tests/fixtures/dfine/x/golden.safetensors):
    /// pixel values are regenerated with the fixture's generator.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// Precisions to run on the GPU.
    #[arg(long, value_delimiter = ',', default_value = "fp32,bf16,fp16")]
    precisions: Vec<Precision>,
    /// Batch sizes compared against the CPU backend (random 640x640 inputs).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batches: Vec<usize>,
    /// Batch sizes timed (eager forward passes, host copies included).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    time_batches: Vec<usize>,
    /// Timed iterations per batch size.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Input side (square images).
    #[arg(long, default_value_t = 640)]
    size: usize,
    /// Largest relative L2 error accepted for fp32 (tf32 off).
    #[arg(long, default_value_t = 1e-4)]
    fp32_tolerance: f64,
    /// Write every number as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: CheckDfineArgs) -> anyhow::Result<()> {
    if let Some(reason) = aperture_cuda::unavailable_reason() {
        bail!("check-dfine needs a CUDA GPU: {reason}");
    }
    let mut report = serde_json::Map::new();
    let mut failures = Vec::new();

    // 1. Operations, every precision against the CPU backend.
    let cpu = CpuBackend::new();
    let want = ops::run_ops(&cpu)?;
    let mut op_rows = Vec::new();
    println!("== operations: CUDA vs CPU (relative L2) ==");
    for &p in &args.precisions {
        let gpu = CudaBackend::new(0, p).context("cannot open the GPU")?;
        gpu.set_poison(true);
        let got = match ops::run_ops(&gpu) {
            Ok(g) => g,
            Err(e) => {
                println!("{p:>5} operations FAILED: {e}");
                failures.push(format!("operations in {p}: {e}"));
                continue;
            }
        };
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            let err = relative_l2(&g.to_f32_vec(), &w.to_f32_vec());
            let nan = g.to_f32_vec().iter().any(|v| v.is_nan())
                && !w.to_f32_vec().iter().any(|v| v.is_nan());
            let pass = !nan && (p != Precision::Fp32 || err <= args.fp32_tolerance);
            if !pass {
                failures.push(format!(
                    "{name} in {p}: relative L2 {err:.3e}{}",
                    if nan { " (NaN: unwritten output)" } else { "" }
                ));
            }
            println!(
                "{p:>5} {name:<36} {err:.3e} {}",
                if pass { "ok" } else { "FAIL" }
            );
            op_rows
                .push(json!({"precision": p.to_string(), "op": name, "rel_l2": err, "pass": pass}));
        }
        match aperture_cuda::selftest::concat_parity(&gpu, 17) {
            Ok(rows) => {
                for row in rows {
                    let pass = row.passed();
                    if !pass {
                        failures.push(format!(
                            "{} in {p}: relative L2 {:.3e} (tolerance {:.1e})",
                            row.case, row.rel_l2, row.tolerance
                        ));
                    }
                    println!(
                        "{p:>5} {:<36} {:.3e} {}",
                        row.case,
                        row.rel_l2,
                        if pass { "ok" } else { "FAIL" }
                    );
                    op_rows.push(json!({"precision": p.to_string(), "op": row.case,
                        "rel_l2": row.rel_l2, "pass": pass}));
                }
            }
            Err(e) => {
                println!("{p:>5} in-place concatenations FAILED: {e}");
                failures.push(format!("in-place concatenations in {p}: {e}"));
            }
        }
        match selection::check(&gpu, p) {
            Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
            Err(e) => {
                println!("{p:>5} query selection FAILED: {e:#}");
                failures.push(format!("query selection in {p}: {e:#}"));
            }
        }
    }
    report.insert("ops".into(), Value::Array(op_rows));

    // 1b. Post-processing on the GPU (top-k detections) against the CPU's post_process.
    println!("== post-processing: CUDA top-k detections vs CPU post_process ==");
    let mut post_rows = Vec::new();
    for &p in &args.precisions {
        let gpu = CudaBackend::new(0, p).context("cannot open the GPU")?;
        match postprocess::check_random(&gpu, p, &mut failures) {
            Ok(rows) => post_rows.extend(rows),
            Err(e) => {
                println!("{p:>5} post-processing FAILED: {e:#}");
                failures.push(format!("post-processing in {p}: {e:#}"));
            }
        }
    }
    report.insert("postprocess".into(), Value::Array(post_rows));

    // 2. The whole model.
    if let Some(dir) = &args.model {
        let m = model::check_model(&args, dir, &mut failures)?;
        report.insert("model".into(), m);
    }
    report.insert("failures".into(), json!(failures));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(report))?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!(
            "{} check(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    println!("all checks passed");
    Ok(())
}
