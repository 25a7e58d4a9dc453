//! `aperture enhance`: a Restormer over one image or a folder of images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aperture_engine::Runner;
use aperture_models::restormer::enhance::enhance_chw;
use aperture_vision::{
    decode_file, save_rgb_f32, BitDepth, DecodeLimits, EncodeOptions, Layout, PngDepth,
};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::DeviceArgs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Depth {
    /// 16-bit PNG for 16-bit sources, else 8-bit.
    Auto,
    #[value(name = "8")]
    Eight,
    #[value(name = "16")]
    Sixteen,
}

#[derive(Args)]
pub struct EnhanceArgs {
    /// An image (JPEG, PNG, WebP) or a folder of images.
    input: PathBuf,
    /// Output file (for one image) or folder (for a folder; created if missing).
    #[arg(short, long)]
    output: PathBuf,
    /// Weights file or model folder of a Restormer.
    #[arg(long)]
    model: PathBuf,
    /// Output format for folder runs: png or jpg.
    #[arg(long, default_value = "png")]
    format: String,
    /// PNG bit depth.
    #[arg(long, value_enum, default_value_t = Depth::Auto)]
    png_depth: Depth,
    /// JPEG quality (1-100).
    #[arg(long, default_value_t = 95)]
    jpeg_quality: u8,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: EnhanceArgs) -> anyhow::Result<()> {
    if !(1..=100).contains(&args.jpeg_quality) {
        bail!("--jpeg-quality must be between 1 and 100");
    }
    let jobs = plan_jobs(&args.input, &args.output, &args.format)?;
    let runner = args.device.load_runner(&args.model, 1, None)?;
    if runner.architecture() != "restormer" {
        bail!(
            "'aperture enhance' needs a Restormer model; {} holds a {} model",
            args.model.display(),
            runner.architecture()
        );
    }
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut failures = 0;
    for (src, dst) in &jobs {
        bar.set_message(
            src.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        if let Err(e) = enhance_file(runner.as_ref(), src, dst, &args) {
            failures += 1;
            // println on a hidden bar (no terminal) prints nothing: suspend and use stderr.
            bar.suspend(|| eprintln!("error: {e:#}"));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "enhanced {} of {} images on {}",
        jobs.len() - failures,
        jobs.len(),
        runner.device()
    );
    if failures > 0 {
        bail!("{failures} image(s) failed");
    }
    Ok(())
}

/// Pairs each input image with its output path.
fn plan_jobs(input: &Path, output: &Path, format: &str) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    if input.is_dir() {
        let ext = match format.to_ascii_lowercase().as_str() {
            "png" => "png",
            "jpg" | "jpeg" => "jpg",
            other => bail!("unknown --format '{other}' (png or jpg)"),
        };
        let images = aperture_vision::list_images(input)?;
        if images.is_empty() {
            bail!("no images (jpg, jpeg, png, webp) in {}", input.display());
        }
        std::fs::create_dir_all(output)
            .with_context(|| format!("creating {}", output.display()))?;
        Ok(images
            .into_iter()
            .map(|p| {
                let stem = p.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
                let dst = output.join(stem).with_extension(ext);
                (p, dst)
            })
            .collect())
    } else if input.is_file() {
        aperture_vision::output_format(output)?;
        Ok(vec![(input.to_path_buf(), output.to_path_buf())])
    } else {
        bail!("{} does not exist", input.display())
    }
}

fn enhance_file(
    runner: &dyn Runner,
    src: &Path,
    dst: &Path,
    args: &EnhanceArgs,
) -> anyhow::Result<()> {
    let img = decode_file(src, &DecodeLimits::default())?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let out = enhance_chw(runner, &img.to_f32_planar(), 3, h, w)
        .with_context(|| src.display().to_string())?;
    let depth = match (args.png_depth, img.source_bit_depth()) {
        (Depth::Sixteen, _) | (Depth::Auto, BitDepth::Sixteen) => PngDepth::Sixteen,
        _ => PngDepth::Eight,
    };
    let opts = EncodeOptions {
        png_depth: depth,
        jpeg_quality: args.jpeg_quality,
    };
    save_rgb_f32(dst, &out, w as u32, h as u32, Layout::Planar, &opts)?;
    Ok(())
}
