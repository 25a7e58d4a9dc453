//! `aperture eval`: COCO bounding-box evaluation, with numbers identical to pycocotools.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aperture_coco::{
    evaluate, load_results, results_to_json, Detection, EvalResult, GroundTruth, Params,
};
use clap::Args;

#[derive(Args)]
pub struct EvalArgs {
    /// Ground truth in COCO format (`instances.json`: images, annotations, categories).
    #[arg(long)]
    pub gt: PathBuf,
    /// Detections in the COCO results format: `[{image_id, category_id, bbox: [x, y, w, h], score}]`.
    #[arg(long, required_unless_present = "images", conflicts_with = "images")]
    pub dt: Option<PathBuf>,
    /// Instead of --dt: run a detector over this folder of the ground truth's images.
    #[arg(long, requires = "model")]
    pub images: Option<PathBuf>,
    /// D-FINE model folder (80 COCO classes) for --images.
    #[arg(long, requires = "images")]
    pub model: Option<PathBuf>,
    /// Write the detections made with --images here (COCO results format).
    #[arg(long, requires = "images")]
    pub save_dt: Option<PathBuf>,
    /// Also write the stats and per-class AP as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print AP and AP50 of every class after the summary.
    #[arg(long)]
    pub per_class: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let gt = GroundTruth::from_path(&args.gt).context("loading the ground truth")?;
    let dets = match (&args.dt, &args.images, &args.model) {
        (Some(dt), _, _) => load_results(dt).context("loading the detections")?,
        (None, Some(images), Some(model)) => {
            let dets = super::detect::detect_coco_images(&gt, images, model)?;
            if let Some(path) = &args.save_dt {
                let text = serde_json::to_string(&results_to_json(&dets))?;
                std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            dets
        }
        _ => anyhow::bail!("give --dt, or --images with --model"),
    };
    report(&gt, &dets, args.json.as_deref(), args.per_class)?;
    Ok(())
}

/// Evaluate detections held in memory, print the summary and write the JSON report.
/// This is the entry point for modes that produce detections themselves (`--images`).
pub fn report(
    gt: &GroundTruth,
    dets: &[Detection],
    json: Option<&Path>,
    per_class: bool,
) -> anyhow::Result<EvalResult> {
    let result = evaluate(gt, dets, &Params::default()).context("evaluating the detections")?;
    if result.num_skipped_detections > 0 {
        tracing::warn!(
            "{} detections have a category the ground truth does not list; they are not scored",
            result.num_skipped_detections
        );
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&result.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let mut text = result.summary_lines().join("\n") + "\n";
    if per_class {
        text += &per_class_table(&result);
    }
    print_to_stdout(&text)?;
    Ok(result)
}

fn per_class_table(result: &EvalResult) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let mut text = format!("\n{:>4}  {:<20} {:>6} {:>6}\n", "id", "class", "AP", "AP50");
    for c in &result.per_category {
        text += &format!(
            "{:>4}  {:<20} {:>6} {:>6}\n",
            c.category_id,
            c.name,
            fmt(c.ap),
            fmt(c.ap50)
        );
    }
    text
}

/// Print, treating a closed pipe (`aperture eval ... | head`) as a normal end.
fn print_to_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("writing to stdout")?),
    }
}
