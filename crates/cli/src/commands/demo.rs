//! `aperture demo`: the whole enhancement path on built-in data, no downloads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use aperture_engine::cpu::CpuBackend;
use aperture_engine::HostTensor;
use aperture_models::restormer::{
    enhance::enhance_chw, parameter_count, random_state_dict, RestormerConfig, RestormerRunner,
};
use aperture_vision::{save_rgb_f32, EncodeOptions, Layout};
use aperture_weights::StateDict;
use clap::Args;

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for input.png and enhanced.png.
    #[arg(short, long, default_value = "aperture-demo")]
    output: PathBuf,
    /// Side of the generated square image.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the random model (model.safetensors + config.json) into this folder,
    /// e.g. to try `aperture enhance`, `info` or `bench` on the base configuration.
    #[arg(long)]
    export_model: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let config = RestormerConfig::default();
    println!(
        "Aperture demo: Restormer base ({} parameters) with SEEDED RANDOM weights.",
        parameter_count(&config)
    );
    println!("The output shows the pipeline working, not a trained enhancement: pass your own");
    println!("weights with `aperture enhance IMAGE -o OUT --model model.pth` for real results.\n");
    let sd = gentle(random_state_dict(&config, args.seed)?)?;
    if let Some(dir) = &args.export_model {
        export_model(dir, &config, &sd)?;
    }
    let runner = RestormerRunner::new(CpuBackend::new(), config, &sd, 1)?;
    let (h, w) = (args.size, args.size);
    let image = synthetic_image(h, w);
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let opts = EncodeOptions::default();
    let input_path = args.output.join("input.png");
    save_rgb_f32(
        &input_path,
        &image,
        w as u32,
        h as u32,
        Layout::Planar,
        &opts,
    )?;
    let started = Instant::now();
    let out = enhance_chw(&runner, &image, 3, h, w)?;
    let secs = started.elapsed().as_secs_f64();
    let output_path = args.output.join("enhanced.png");
    save_rgb_f32(
        &output_path,
        &out,
        w as u32,
        h as u32,
        Layout::Planar,
        &opts,
    )?;
    let mean_change = out
        .iter()
        .zip(&image)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / out.len() as f32;
    println!(
        "enhanced a {w}x{h} image on {} in {:.2} s",
        aperture_engine::Backend::name(&CpuBackend::new()),
        secs
    );
    println!("mean absolute change {mean_change:.4}");
    println!(
        "wrote {} and {}",
        input_path.display(),
        output_path.display()
    );
    Ok(())
}

fn export_model(
    dir: &std::path::Path,
    config: &RestormerConfig,
    sd: &StateDict,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    sd.save_safetensors(&dir.join("model.safetensors"))?;
    let mut json = serde_json::to_value(config)?;
    json["architecture"] = "Restormer".into();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("wrote the random model to {}", dir.display());
    Ok(())
}

/// Scales the last convolution down so the random network adds a small correction to
/// the image (the global residual) instead of drowning it.
fn gentle(sd: StateDict) -> anyhow::Result<StateDict> {
    let mut tensors = sd.into_tensors();
    if let Some(w) = tensors.get_mut("output.weight") {
        let scaled = w.to_f32_vec().iter().map(|v| v * 0.02).collect();
        *w = HostTensor::from_f32(w.shape().to_vec(), scaled)?;
    }
    Ok(StateDict::from_tensors(tensors))
}

/// A test card: colour gradients, a bright disc and fine stripes, in CHW [0, 1].
fn synthetic_image(h: usize, w: usize) -> Vec<f32> {
    let mut img = vec![0.0; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
            let (dy, dx) = (fy - 0.5, fx - 0.6);
            let disc = if dy * dy + dx * dx < 0.04 { 0.35 } else { 0.0 };
            let stripes = if fy > 0.75 && (x / 3).is_multiple_of(2) {
                0.2
            } else {
                0.0
            };
            let rgb = [
                0.2 + 0.6 * fx + disc,
                0.15 + 0.5 * fy + disc + stripes,
                0.5 - 0.3 * fx + stripes,
            ];
            for (c, v) in rgb.iter().enumerate() {
                img[(c * h + y) * w + x] = v.clamp(0.0, 1.0);
            }
        }
    }
    img
}
