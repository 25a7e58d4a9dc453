//! `aperture selftest preprocess`: GPU image preprocessing against the CPU path
//! (resized bytes identical, f32 within 1e-6), with a timing of both.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use aperture_cuda::preprocess::check::{preprocess_parity, test_image};
use aperture_cuda::preprocess::{preprocess_cpu, GpuPreprocessor, PreprocessSpec};
use aperture_vision::{decode_file, DecodeLimits, HF_RESCALE_FACTOR};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Check {
    /// Resize + rescale + normalise on the GPU against the CPU path.
    Preprocess,
}

#[derive(Args)]
pub struct SelftestArgs {
    /// What to check.
    #[arg(value_enum)]
    check: Check,
    /// Which GPU (CUDA device ordinal).
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Real images to add to the cases (each resized to 640x640).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Timed repetitions of a 1280x960 -> 640x640 batch of 8 (0: no timing).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    match args.check {
        Check::Preprocess => preprocess(&args),
    }
}

fn preprocess(args: &SelftestArgs) -> anyhow::Result<()> {
    let gpu = GpuPreprocessor::new(args.gpu).context("opening the GPU for preprocessing")?;
    let mut extra = Vec::new();
    for path in &args.image {
        let img = decode_file(path, &DecodeLimits::default())
            .with_context(|| format!("cannot read {}", path.display()))?
            .into_rgb8();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        extra.push((format!("{name} {}x{}", img.width(), img.height()), img));
    }
    println!("GPU preprocessing vs CPU on {}", gpu.device_name());
    println!(
        "{:<52} {:>13} {:>12}  result",
        "case", "u8 mismatch", "max |diff|"
    );
    let rows = preprocess_parity(&gpu, &extra)?;
    let mut failed = 0;
    for r in &rows {
        let bytes = r
            .u8_mismatches
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into());
        let ok = r.passed();
        failed += usize::from(!ok);
        println!(
            "{:<52} {:>13} {:>12.3e}  {}",
            r.case,
            bytes,
            r.f32_max_abs,
            if ok { "PASS" } else { "FAIL" }
        );
    }
    if args.iters > 0 {
        time_both(&gpu, args.iters)?;
    }
    println!(
        "preprocess selftest: {}/{} passed",
        rows.len() - failed,
        rows.len()
    );
    if failed > 0 {
        bail!("{failed} preprocessing case(s) differ between GPU and CPU");
    }
    Ok(())
}

/// Milliseconds per image of both paths on a batch of eight 1280x960 images (the GPU
/// figure includes the copies both ways).
fn time_both(gpu: &GpuPreprocessor, iters: usize) -> anyhow::Result<()> {
    let images: Vec<_> = (0..8).map(|i| test_image(1280, 960, i)).collect();
    let refs: Vec<_> = images.iter().collect();
    let spec = PreprocessSpec::resize(640, 640).rescale(HF_RESCALE_FACTOR);
    gpu.run(&refs, &spec)?;
    let t = Instant::now();
    for _ in 0..iters {
        gpu.run(&refs, &spec)?;
    }
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3 / (iters * refs.len()) as f64;
    let t = Instant::now();
    preprocess_cpu(&refs[..1], &spec)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "timing 1280x960 -> 640x640 f32: GPU {gpu_ms:.3} ms/image (batch 8, with copies), CPU {cpu_ms:.3} ms/image (one thread)"
    );
    Ok(())
}
