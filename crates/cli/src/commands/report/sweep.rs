//! The measuring run: which device, the progress bar, timing helpers, and the
//! Restormer sweep (precision x batch x CUDA graphs on/off, accuracy vs fp32).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use aperture_cuda::{CudaBackend, CudaTensor, GraphCache};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{Backend, EngineError, HostTensor, Precision};
use aperture_models::restormer::{load_restormer, Restormer, RestormerConfig};
use aperture_models::{detect_architecture, Architecture};
use aperture_weights::StateDict;
use indicatif::{ProgressBar, ProgressStyle};

use super::accuracy::image_error;
use super::doc::{OpPoint, Profile, Report, Row};
use super::roofline::Ceilings;
use super::{dfine, environment, parse_batches, parse_precisions, peers, served, ReportArgs};

/// What every model sweep needs.
pub struct Plan {
    pub gpu: Option<usize>,
    pub precisions: Vec<Precision>,
    pub batches: Vec<usize>,
    pub iters: usize,
    pub warmup: usize,
    pub bar: ProgressBar,
    /// Where the report goes: what has been measured is written there after each
    /// precision, so a run that is stopped keeps it.
    pub out: PathBuf,
    pub ceilings: Ceilings,
}

impl Plan {
    /// Writes the rows measured so far into the output folder, marked as partial (a
    /// complete run replaces the files). A failure to write is reported and ignored.
    pub fn save_partial(&self, report: &Report, done: &str) {
        let mut partial = report.clone();
        partial.notes.push(format!(
            "Partial report: written after {done} while the run went on; a run that finishes replaces it."
        ));
        if let Err(e) = super::write(&partial, &self.out, self.ceilings) {
            eprintln!("warning: could not write the partial report: {e:#}");
        }
    }

    /// The precision the served rows use: fp16 on the GPU when swept, else the last
    /// swept precision; fp32 on the CPU.
    pub fn served_precision(&self) -> Precision {
        match self.gpu {
            None => Precision::Fp32,
            Some(_) if self.precisions.contains(&Precision::Fp16) => Precision::Fp16,
            Some(_) => self.precisions.last().copied().unwrap_or(Precision::Fp32),
        }
    }
}

/// Latency statistics over `ms` (nearest-rank percentiles, as `aperture bench`).
pub fn row_from_times(
    engine: &str,
    precision: &str,
    variant: &str,
    batch: usize,
    ms: &[f64],
) -> Row {
    let mut s = ms.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len().max(1) as f64;
    let mean = s.iter().sum::<f64>() / n;
    let std = (s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let pct = |p: f64| {
        let i = ((p / 100.0 * n).ceil() as usize).clamp(1, s.len().max(1)) - 1;
        s.get(i).copied()
    };
    Row {
        engine: engine.into(),
        precision: precision.into(),
        batch,
        variant: variant.into(),
        images_per_s: if mean > 0.0 {
            batch as f64 / (mean / 1e3)
        } else {
            0.0
        },
        mean_ms: Some(mean),
        std_ms: Some(std),
        p50_ms: pct(50.0),
        p95_ms: pct(95.0),
        p99_ms: pct(99.0),
        ..Row::default()
    }
}

/// Wall-clock milliseconds of `iters` calls after `warmup` untimed ones.
pub fn wall_times(
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms)
}

/// `n` deterministic images in [0, 1): image i depends only on (seed, i), so the
/// first image of every batch is the same and accuracy compares like with like.
pub fn images(n: usize, c: usize, h: usize, w: usize, seed: u64) -> anyhow::Result<HostTensor> {
    let mut data = Vec::with_capacity(n * c * h * w);
    for i in 0..n {
        let mut s = (seed ^ (i as u64 + 1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        data.extend((0..c * h * w).map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        }));
    }
    Ok(HostTensor::from_f32(vec![n, c, h, w], data)?)
}

pub fn first_image(t: &HostTensor) -> Vec<f32> {
    let v = t.to_f32_vec();
    let per = t.shape().first().map_or(v.len(), |&n| v.len() / n.max(1));
    v.into_iter().take(per).collect()
}

fn engine_err(e: aperture_models::ModelError) -> EngineError {
    match e {
        aperture_models::ModelError::Engine(e) => e,
        other => EngineError::Invalid(other.to_string()),
    }
}

pub fn measure(args: &ReportArgs) -> anyhow::Result<Report> {
    let model = args
        .model
        .as_ref()
        .context("--model is required (or --from to render existing results)")?;
    if !model.exists() {
        bail!("--model {}: no such file or folder", model.display());
    }
    let batches = parse_batches(&args.batches)?;
    let precisions = parse_precisions(&args.precisions)?;
    let gpu = match args.device.as_str() {
        "cpu" => None,
        "cuda" => match aperture_cuda::unavailable_reason() {
            Some(reason) => bail!("--device cuda: {reason}"),
            None => Some(args.gpu),
        },
        "auto" => aperture_cuda::unavailable_reason()
            .is_none()
            .then_some(args.gpu),
        other => bail!("unknown --device '{other}' (auto, cpu or cuda)"),
    };
    let arch = detect_architecture(model)
        .with_context(|| format!("cannot tell the architecture of {}", model.display()))?;
    let mut report = Report {
        date: crate::commands::bench::utc_now(),
        ..Report::default()
    };
    report
        .header
        .push(("aperture".into(), env!("CARGO_PKG_VERSION").into()));
    if let Some(c) = environment::git_commit() {
        report.header.push(("built from commit".into(), c));
    }
    match gpu {
        Some(ordinal) => {
            let be = CudaBackend::new(ordinal, Precision::Fp32).context("opening the GPU")?;
            report.device = be.device_name().to_string();
            if let Some((driver, cuda)) = environment::gpu_versions() {
                report.header.push(("driver".into(), driver));
                report.header.push(("CUDA".into(), cuda));
            }
        }
        None => report.device = format!("CPU: {}", environment::cpu_model()),
    }
    report.header.push((
        "command".into(),
        format!("`{}`", environment::command_line()),
    ));
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let plan = Plan {
        gpu,
        precisions,
        batches,
        iters: args.iters,
        warmup: args.warmup,
        bar,
        out: args.out.clone(),
        ceilings: Ceilings {
            tflops: args.peak_tflops,
            gbs: args.bandwidth_gbs,
        },
    };
    match arch {
        Architecture::Restormer => restormer(args, model, &plan, &mut report)?,
        Architecture::DFine => dfine::sweep(args, model, &plan, &mut report)?,
    }
    plan.bar.finish_and_clear();
    Ok(report)
}

fn restormer(
    args: &ReportArgs,
    model: &std::path::Path,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (cfg, sd) =
        load_restormer(model).with_context(|| format!("loading {}", model.display()))?;
    let size = args.size.unwrap_or(512);
    let label = model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    report.model = format!("restormer ({label}) {size}x{size}");
    match plan.gpu {
        None => restormer_cpu(&cfg, &sd, size, plan, report)?,
        Some(ordinal) => {
            restormer_gpu(&cfg, &sd, size, ordinal, plan, report)?;
            if !args.no_peers {
                peers::restormer(model, size, plan, report);
            }
        }
    }
    let shape = vec![cfg.inp_channels as i64, size as i64, size as i64];
    served::measure(
        model,
        "restormer",
        plan,
        plan.served_precision(),
        shape,
        (args.serve_ms, args.serve_clients.max(1)),
        report,
    );
    Ok(())
}

fn restormer_cpu(
    cfg: &RestormerConfig,
    sd: &StateDict,
    size: usize,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let skipped: Vec<&str> = plan
        .precisions
        .iter()
        .filter(|p| **p != Precision::Fp32)
        .map(|p| p.as_str())
        .collect();
    if !skipped.is_empty() {
        report.notes.push(format!(
            "The CPU backend computes in fp32 only: {} not measured.",
            skipped.join(", ")
        ));
    }
    report.notes.push(
        "CPU run: no CUDA graphs (eager passes only), no peak-memory counter, no per-operation profile (so no roofline chart).".into(),
    );
    report
        .notes
        .push("PyTorch peers run only on the GPU (tools/torch_peers.py needs CUDA).".into());
    plan.bar.set_length(plan.batches.len() as u64);
    let cpu = CpuBackend::new();
    let m = Restormer::prepare(&cpu, cfg.clone(), sd)?;
    let mut reference: Option<Vec<f32>> = None;
    for &b in &plan.batches {
        plan.bar.set_message(format!("cpu fp32 batch {b}"));
        let x = cpu.upload_nchw(&images(b, cfg.inp_channels, size, size, 0)?)?;
        let mut y = None;
        let ms = wall_times(plan.warmup.min(1), plan.iters, || {
            y = Some(m.forward(&cpu, &x)?);
            Ok(())
        })?;
        let mut row = row_from_times("aperture", "fp32", "eager", b, &ms);
        if let Some(y) = y {
            let out = first_image(&cpu.download_nchw(&y)?);
            let r = reference.get_or_insert_with(|| out.clone());
            let e = image_error(&out, r);
            (row.rel_l1, row.rel_l2, row.psnr_db) =
                (Some(e.rel_l1), Some(e.rel_l2), Some(e.psnr_db));
        }
        report.rows.push(row);
        plan.bar.inc(1);
    }
    Ok(())
}

fn restormer_gpu(
    cfg: &RestormerConfig,
    sd: &StateDict,
    size: usize,
    ordinal: usize,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    plan.bar
        .set_length((plan.precisions.len() * plan.batches.len() * 2) as u64);
    let mut reference: Option<Vec<f32>> = None;
    for &p in &plan.precisions {
        let be = CudaBackend::new(ordinal, p).context("opening the GPU")?;
        let m = Restormer::prepare(&be, cfg.clone(), sd)?;
        let fwd = |b: &CudaBackend, x: &CudaTensor| m.forward(b, x).map_err(engine_err);
        let mut profiled_batch = None;
        for &b in &plan.batches {
            let x = images(b, cfg.inp_channels, size, size, 0)?;
            for graphs in [true, false] {
                let variant = if graphs { "graph" } else { "eager" };
                plan.bar.set_message(format!("{p} batch {b} {variant}"));
                be.memory().reset_peak();
                let result = (|| -> anyhow::Result<(Vec<f64>, Vec<f32>)> {
                    if graphs {
                        let cache = GraphCache::new();
                        let y = cache.infer(&be, &x, fwd)?;
                        for _ in 0..plan.warmup {
                            cache.replay(&be, x.shape())?;
                        }
                        be.synchronize()?;
                        let mut ms = Vec::new();
                        for _ in 0..plan.iters.max(1) {
                            let start = be.record_event()?;
                            cache.replay(&be, x.shape())?;
                            let end = be.record_event()?;
                            ms.push(f64::from(end.elapsed_ms(&start)?));
                        }
                        Ok((ms, first_image(&y)))
                    } else {
                        let t = be.upload_nchw(&x)?;
                        let mut y = m.forward(&be, &t)?;
                        for _ in 0..plan.warmup {
                            y = m.forward(&be, &t)?;
                        }
                        be.synchronize()?;
                        let mut ms = Vec::new();
                        for _ in 0..plan.iters.max(1) {
                            let start = be.record_event()?;
                            y = m.forward(&be, &t)?;
                            let end = be.record_event()?;
                            ms.push(f64::from(end.elapsed_ms(&start)?));
                        }
                        Ok((ms, first_image(&be.download_nchw(&y)?)))
                    }
                })();
                let peak = be.memory().peak_reserved() as f64 / (1u64 << 30) as f64;
                match result {
                    Ok((ms, out)) => {
                        let mut row = row_from_times("aperture", p.as_str(), variant, b, &ms);
                        row.peak_gib = Some(peak);
                        let r = reference.get_or_insert_with(|| out.clone());
                        let e = image_error(&out, r);
                        (row.rel_l1, row.rel_l2, row.psnr_db) =
                            (Some(e.rel_l1), Some(e.rel_l2), Some(e.psnr_db));
                        report.rows.push(row);
                        if b <= 8 {
                            profiled_batch = Some(b);
                        }
                    }
                    Err(e) => report
                        .notes
                        .push(format!("{p} batch {b} ({variant}) failed: {e:#}")),
                }
                be.trim_memory()?;
                plan.bar.inc(1);
            }
        }
        if let Some(b) = profiled_batch {
            let t = be.upload_nchw(&images(b, cfg.inp_channels, size, size, 0)?)?;
            match profile_pass(&be, || Ok(m.forward(&be, &t).map(|_| ())?)) {
                Ok(ops) => report.profiles.push(Profile {
                    title: format!("{p} batch {b}, one eager pass"),
                    ops,
                }),
                Err(e) => report.notes.push(format!("{p} profile failed: {e:#}")),
            }
        }
        plan.save_partial(report, &format!("{p}"));
    }
    report.notes.push(
        "GPU latencies are device time between CUDA events around a graph replay or an eager pass (host copies excluded); peak GiB is the backend's peak reserved memory.".into(),
    );
    Ok(())
}

/// One pass of `run` with the backend's per-operation profiler on (after an untimed
/// pass, so that plans and kernels are ready).
pub fn profile_pass(
    be: &CudaBackend,
    run: impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<OpPoint>> {
    run()?;
    be.synchronize()?;
    be.profiler().set_enabled(true);
    let result = run();
    be.profiler().set_enabled(false);
    let stats = be.profiler().take()?;
    result?;
    be.trim_memory()?;
    Ok(stats
        .into_iter()
        .map(|s| OpPoint {
            name: s.name,
            calls: s.calls,
            ms: s.ms,
            flops: s.flops,
            bytes: s.bytes,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_report_holds_the_rows_so_far_and_says_it_is_partial() {
        let out = std::env::temp_dir().join(format!("aperture-partial-{}", std::process::id()));
        let plan = Plan {
            gpu: None,
            precisions: vec![Precision::Fp32],
            batches: vec![1],
            iters: 1,
            warmup: 0,
            bar: ProgressBar::hidden(),
            out: out.clone(),
            ceilings: Ceilings {
                tflops: 100.0,
                gbs: 1000.0,
            },
        };
        let mut report = Report {
            model: "restormer (tiny) 64x64".into(),
            device: "CPU".into(),
            ..Report::default()
        };
        report
            .rows
            .push(row_from_times("aperture", "fp32", "eager", 1, &[2.0, 2.5]));
        plan.save_partial(&report, "fp32");
        let readme = std::fs::read_to_string(out.join("README.md")).expect("README written");
        let json = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
        let _ = std::fs::remove_dir_all(&out);
        assert!(
            readme.contains("Partial report: written after fp32"),
            "{readme}"
        );
        assert!(json.contains("\"fp32\""), "{json}");
        // The caller's report is unchanged: the final write carries no partial note.
        assert!(report.notes.is_empty());
    }
}
