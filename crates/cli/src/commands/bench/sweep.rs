//! The measuring loop every architecture shares: per batch size, stage the input (on
//! the GPU: capture a CUDA graph), time repeated runs, compare the first image's outputs
//! with the fp32 reference, and record peak memory; optionally a per-operation profile.

use std::time::Instant;

use aperture_cuda::CudaBackend;
use aperture_engine::{relative_l2, HostTensor, Precision};
use serde_json::Value;

use super::report::{print_profile, Row, Stats};

/// A forward pass ready to run again and again on one staged input.
pub struct Staged<'a> {
    /// The outputs of the first run (whole batch, f32), for the accuracy column.
    pub outputs: Vec<HostTensor>,
    /// One more run: an eager pass on the CPU, a graph replay on the GPU.
    pub run: Box<dyn Fn() -> anyhow::Result<()> + 'a>,
    /// What the graph's memory plan holds (printed beside the peak), when known.
    pub memory: Option<String>,
}

/// How the first image's outputs compare with the reference.
pub struct Accuracy {
    /// The figure of the `rel_l2_vs_fp32` column.
    pub rel_l2: f64,
    /// Further figures, added to the JSON row and the table.
    pub extra: Vec<(&'static str, Value)>,
}

/// A model prepared on one backend in one precision, as the sweep sees it.
pub trait BenchModel {
    /// The GPU backend it runs on; `None` on the CPU (wall-clock timing, no memory
    /// counter, no profile).
    fn gpu(&self) -> Option<&CudaBackend>;
    /// Runs once on `x` and keeps what another run needs: with `graph`, the forward
    /// pass captured in a CUDA graph (GPU only), else the uploaded input.
    fn stage(&self, x: &HostTensor, graph: bool) -> anyhow::Result<Staged<'_>>;
    /// Compares the first image's outputs (`got`) with the reference's (`want`).
    fn compare(&self, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy;
    /// Figures naming what a timed GPU run covers, added to each GPU row (e.g. D-FINE's
    /// pre- and post-processing inside the graph).
    fn graph_extra(&self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }
}

/// The sweep's settings, common to every architecture.
pub struct Settings<'a> {
    pub batches: &'a [usize],
    pub warmup: usize,
    pub iters: usize,
    pub profile: bool,
    pub seed: u64,
    /// Input channels, height and width.
    pub chw: (usize, usize, usize),
}

/// A deterministic input in [0, 1) (never zeros: they can hide bugs and time faster).
/// One stream over the whole batch, so every batch starts with the same first image.
pub fn input(
    batch: usize,
    (c, h, w): (usize, usize, usize),
    seed: u64,
) -> anyhow::Result<HostTensor> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..batch * c * h * w)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    Ok(HostTensor::from_f32(vec![batch, c, h, w], data)?)
}

/// Each output's first image (the leading `numel / batch` values).
pub fn first_images(outputs: &[HostTensor], batch: usize) -> Vec<Vec<f32>> {
    outputs
        .iter()
        .map(|t| {
            let v = t.to_f32_vec();
            let per = v.len() / batch.max(1);
            v.into_iter().take(per).collect()
        })
        .collect()
}

/// Relative L2 of the first output: the figure for single-output models.
pub fn first_output_error(got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
    let rel_l2 = match (got.first(), want.first()) {
        (Some(g), Some(w)) if got.len() == want.len() => relative_l2(g, w),
        _ => f64::INFINITY,
    };
    Accuracy {
        rel_l2,
        extra: Vec::new(),
    }
}

/// The reference for the accuracy column: the first image's outputs of a batch-1 run.
pub fn reference<M: BenchModel>(model: &M, s: &Settings) -> anyhow::Result<Vec<Vec<f32>>> {
    let staged = model.stage(&input(1, s.chw, s.seed)?, false)?;
    Ok(first_images(&staged.outputs, 1))
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Set, each GPU batch size gets one more run inside a CUDA profiler range, so that
/// `ncu --profile-from-start off --graph-profiling node` times every kernel of one
/// graph replay and nothing else.
const PROFILER_RANGE_ENV: &str = "APERTURE_PROFILER_RANGE";

/// Milliseconds per run: CUDA events around each replay on the GPU (device time), the
/// wall clock on the CPU.
fn time(
    staged: &Staged,
    gpu: Option<&CudaBackend>,
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        (staged.run)()?;
    }
    let mut ms = Vec::with_capacity(iters.max(1));
    match gpu {
        Some(be) => {
            be.synchronize()?;
            for _ in 0..iters.max(1) {
                let start = be.record_event()?;
                (staged.run)()?;
                let end = be.record_event()?;
                ms.push(f64::from(end.elapsed_ms(&start)?));
            }
            if std::env::var_os(PROFILER_RANGE_ENV).is_some() {
                be.in_profiler_range(|| (staged.run)())??;
            }
        }
        None => {
            for _ in 0..iters.max(1) {
                let start = Instant::now();
                (staged.run)()?;
                ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(ms)
}

/// One row per batch size for `model` in precision `p`. A batch that fails (e.g. out of
/// GPU memory) gives a failed row and the sweep goes on.
pub fn batches<M: BenchModel>(
    model: &M,
    p: Precision,
    s: &Settings,
    reference: Option<&[Vec<f32>]>,
) -> anyhow::Result<Vec<Row>> {
    let gpu = model.gpu();
    // CPU passes are slow: one untimed pass is enough to warm caches.
    let warmup = if gpu.is_some() {
        s.warmup
    } else {
        s.warmup.min(1)
    };
    let mut rows = Vec::new();
    for &batch in s.batches {
        if let Some(be) = gpu {
            be.memory().reset_peak();
        }
        let x = input(batch, s.chw, s.seed)?;
        let mut memory = None;
        let result = (|| -> anyhow::Result<(Stats, Option<Accuracy>)> {
            let staged = model.stage(&x, gpu.is_some())?;
            memory = staged.memory.clone();
            let accuracy =
                reference.map(|r| model.compare(&first_images(&staged.outputs, batch), r));
            let ms = time(&staged, gpu, warmup, s.iters)?;
            Ok((Stats::of(&ms), accuracy))
        })();
        let peak = gpu.map_or(0.0, |be| gib(be.memory().peak_reserved()));
        if let Some(m) = memory {
            eprintln!("{p} batch {batch}: {m}, peak held {peak:.2} GiB");
        }
        match result {
            Ok((stats, accuracy)) => {
                let mut row = Row::new("aperture", p.as_str(), batch, stats, peak, None);
                if let Some(a) = accuracy {
                    row.rel_l2 = Some(a.rel_l2);
                    row.extra = a.extra;
                }
                if gpu.is_some() {
                    row.extra.extend(model.graph_extra());
                }
                rows.push(row);
            }
            Err(e) => {
                eprintln!("{p} batch {batch}: {e:#}");
                rows.push(Row::failed("aperture", p.as_str(), batch, format!("{e:#}")));
            }
        }
        if let Some(be) = gpu {
            be.trim_memory()?;
            if s.profile {
                if let Err(e) = profile(model, be, &x, p, batch) {
                    eprintln!("{p} batch {batch}: profile failed: {e:#}");
                }
            }
        }
    }
    Ok(rows)
}

/// One eager pass with the backend's per-operation profiler on, printed as a table
/// (`aperture report --profile-log` reads it back).
fn profile<M: BenchModel>(
    model: &M,
    be: &CudaBackend,
    x: &HostTensor,
    p: Precision,
    batch: usize,
) -> anyhow::Result<()> {
    let staged = model.stage(x, false)?; // its first pass warms kernels and constants
    be.synchronize()?;
    be.profiler().set_enabled(true);
    let start = be.record_event()?;
    let ran = (staged.run)();
    let end = be.record_event()?;
    be.profiler().set_enabled(false);
    let stats = be.profiler().take()?;
    ran?;
    let total = end.elapsed_ms(&start)? as f64;
    print_profile(
        &format!("{p} batch {batch}, one eager pass: {total:.2} ms"),
        &stats,
        p,
    );
    drop(staged);
    be.trim_memory()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_batch_starts_with_the_same_image() {
        let chw = (3, 4, 5);
        let one = input(1, chw, 9).unwrap();
        let three = input(3, chw, 9).unwrap();
        let firsts = first_images(&[three], 3);
        assert_eq!(firsts[0], one.to_f32_vec());
        assert!(one.to_f32_vec().iter().all(|v| (0.0..1.0).contains(v)));
    }

    #[test]
    fn single_output_error_is_relative_l2() {
        let want = vec![vec![3.0, 4.0]];
        let got = vec![vec![3.0, 4.5]];
        let a = first_output_error(&got, &want);
        assert!((a.rel_l2 - 0.1).abs() < 1e-12);
        assert!(first_output_error(&[], &want).rel_l2.is_infinite());
    }
}
