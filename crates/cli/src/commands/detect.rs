//! `aperture detect`: a D-FINE model over images and folders; JSON results and images
//! with labelled boxes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aperture_cuda::preprocess::{preprocess_cpu, PreprocessSpec, Preprocessor};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{Backend, HostTensor, Precision};
use aperture_models::dfine::{
    coco_category_id, load_dfine, post_process, DFineConfig, DFineRunner, Detection,
    ImageProcessorConfig,
};
use aperture_vision::{
    decode_file, draw_detections, list_images, save_rgb8, DecodeLimits, DrawStyle, EncodeOptions,
    LabeledBox, RgbImage,
};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::device::DeviceArgs;
use crate::gpu_runner::GraphDFine;

#[derive(Args)]
pub struct DetectArgs {
    /// Images (JPEG, PNG, WebP) and/or folders of images.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// D-FINE model folder as HF ships it (config.json, model.safetensors, preprocessor_config.json).
    #[arg(long, env = "APERTURE_DETECT_MODEL")]
    model: PathBuf,
    /// Keep detections scoring above this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Write all detections to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write each image with its boxes drawn into this folder (created if missing).
    #[arg(long)]
    draw: Option<PathBuf>,
    /// Keep only this many queries after query selection (fewer: faster decoder, fewer
    /// candidates); default: the model's num_queries.
    #[arg(long)]
    queries: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: DetectArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.threshold) {
        bail!("--threshold must be between 0 and 1");
    }
    let mut files = Vec::new();
    for input in &args.inputs {
        let found =
            list_images(input).with_context(|| format!("cannot list {}", input.display()))?;
        if found.is_empty() && input.is_dir() {
            eprintln!("warning: no images in {}", input.display());
        }
        files.extend(found);
    }
    if files.is_empty() {
        bail!("no images to process");
    }
    let snap = load_dfine(&args.model)
        .with_context(|| format!("cannot load the D-FINE model at {}", args.model.display()))?;
    // fp16 on the GPU unless asked otherwise (within 1.2e-3 of fp32: docs/dfine-gpu.md).
    match args.device.cuda_backend(Precision::Fp16)? {
        Some(gpu) => {
            let mut runner = DFineRunner::new(gpu, &snap, 1)?;
            if let Some(q) = args.queries {
                runner.set_num_queries(q)?;
            }
            // Resize and rescale on the same GPU; the CPU path if that cannot start.
            let pre = Preprocessor::new(Some(args.device.gpu)).unwrap_or_else(|e| {
                tracing::warn!("preprocessing on the CPU: {e}");
                Preprocessor::Cpu
            });
            let images = Images::new(&snap.processor, &pre);
            run_on(&args, &files, &images, &GraphDFine::new(runner))
        }
        None => {
            let mut runner = DFineRunner::new(CpuBackend::new(), &snap, 1)?;
            if let Some(q) = args.queries {
                runner.set_num_queries(q)?;
            }
            let pre = Preprocessor::Cpu;
            run_on(&args, &files, &Images::new(&snap.processor, &pre), &runner)
        }
    }
}

/// A prepared D-FINE model: eager passes on any backend, or CUDA graphs.
trait Detector {
    /// NCHW pixels -> (`logits [B, Q, C]`, `pred_boxes [B, Q, 4]`).
    fn detect(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)>;
    fn config(&self) -> &DFineConfig;

    /// Preprocesses a decoded image and detects in it.
    fn detect_image(
        &self,
        images: &Images,
        img: &RgbImage,
    ) -> anyhow::Result<(HostTensor, HostTensor)> {
        self.detect(&images.pre.run(&[img], &images.spec)?)
    }

    /// Preprocesses, detects and post-processes: the image's detections above
    /// `threshold` in its own pixels.
    fn detect_image_post(
        &self,
        images: &Images,
        img: &RgbImage,
        threshold: f32,
    ) -> anyhow::Result<Vec<Detection>> {
        let (logits, boxes) = self.detect_image(images, img)?;
        Ok(post_process(
            &logits.to_f32_vec(),
            &boxes.to_f32_vec(),
            self.config().num_labels,
            threshold,
            (img.height(), img.width()),
        )?)
    }
}

impl<B: Backend> Detector for DFineRunner<B> {
    fn detect(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> {
        Ok(DFineRunner::detect(self, pixels)?)
    }
    fn config(&self) -> &DFineConfig {
        DFineRunner::config(self)
    }
}

impl Detector for GraphDFine {
    fn detect(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> {
        GraphDFine::detect(self, pixels)
    }
    fn config(&self) -> &DFineConfig {
        self.runner().config()
    }
    /// On the GPU, preprocessing writes straight into the captured graph's input.
    fn detect_image(
        &self,
        images: &Images,
        img: &RgbImage,
    ) -> anyhow::Result<(HostTensor, HostTensor)> {
        match images.pre {
            Preprocessor::Gpu(gpu) => self.detect_images(gpu, &[img], &images.spec),
            Preprocessor::Cpu => self.detect(&images.pre.run(&[img], &images.spec)?),
        }
    }
    /// Post-processing on the GPU in the same graph: the host receives K detection
    /// rows instead of the logits, and keeps the threshold and the scaling.
    fn detect_image_post(
        &self,
        images: &Images,
        img: &RgbImage,
        threshold: f32,
    ) -> anyhow::Result<Vec<Detection>> {
        let mut per_image = match images.pre {
            Preprocessor::Gpu(gpu) => {
                self.detect_images_post(gpu, &[img], &images.spec, threshold)?
            }
            Preprocessor::Cpu => self.detect_post(
                &images.pre.run(&[img], &images.spec)?,
                &[(img.height(), img.width())],
                threshold,
            )?,
        };
        per_image
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no detections came back for the image"))
    }
}

/// The model's image processor and where it runs.
struct Images<'a> {
    spec: PreprocessSpec,
    pre: &'a Preprocessor,
}

impl<'a> Images<'a> {
    fn new(proc: &ImageProcessorConfig, pre: &'a Preprocessor) -> Self {
        Self {
            spec: preprocess_spec(proc),
            pre,
        }
    }
}

fn run_on(
    args: &DetectArgs,
    files: &[PathBuf],
    images: &Images,
    runner: &dyn Detector,
) -> anyhow::Result<()> {
    if let Some(dir) = &args.draw {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results = Vec::new();
    let mut failures = 0;
    for file in files {
        bar.set_message(
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        match detect_one(runner, images, file, args.threshold) {
            Ok((img, dets)) => {
                let names: Vec<String> = dets
                    .iter()
                    .map(|d| runner.config().label(d.label))
                    .collect();
                if let Some(dir) = &args.draw {
                    let out = drawn_path(dir, file);
                    let mut canvas = img;
                    let boxes: Vec<LabeledBox> = dets
                        .iter()
                        .zip(&names)
                        .map(|(d, n)| LabeledBox {
                            bbox: d.bbox,
                            class_id: d.label,
                            label: n.clone(),
                            score: d.score,
                        })
                        .collect();
                    draw_detections(&mut canvas, &boxes, &DrawStyle::default());
                    if let Err(e) = save_rgb8(&out, &canvas, &EncodeOptions::default()) {
                        bar.suspend(|| eprintln!("error: {}: {e}", out.display()));
                        failures += 1;
                    }
                }
                if args.json.is_none() {
                    let summary: Vec<String> = dets
                        .iter()
                        .zip(&names)
                        .map(|(d, n)| format!("{n} {:.2}", d.score))
                        .collect();
                    bar.suspend(|| {
                        println!(
                            "{}: {} detections [{}]",
                            file.display(),
                            dets.len(),
                            summary.join(", ")
                        )
                    });
                }
                results.push(image_json(file, &dets, &names, runner.config().num_labels));
            }
            Err(e) => {
                bar.suspend(|| eprintln!("error: {}: {e:#}", file.display()));
                failures += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(path) = &args.json {
        let doc = json!({ "model": args.model.display().to_string(), "threshold": args.threshold, "images": results });
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if failures > 0 {
        bail!("{failures} of {} images failed", files.len());
    }
    Ok(())
}

/// Runs the detector over every ground-truth image found in `dir` (by `file_name`) and
/// returns COCO results; labels map to COCO category ids, so the model must have the
/// 80 COCO classes.
pub fn detect_coco_images(
    gt: &aperture_coco::GroundTruth,
    dir: &Path,
    model: &Path,
) -> anyhow::Result<Vec<aperture_coco::Detection>> {
    let snap = load_dfine(model)
        .with_context(|| format!("cannot load the D-FINE model at {}", model.display()))?;
    if snap.config.num_labels != 80 {
        bail!(
            "COCO evaluation needs a model with the 80 COCO classes; {} has {}",
            model.display(),
            snap.config.num_labels
        );
    }
    let runner = DFineRunner::new(CpuBackend::new(), &snap, 1)?;
    let present: Vec<(i64, PathBuf)> = gt
        .images
        .iter()
        .filter_map(|im| Some((im.id, dir.join(im.file_name.as_ref()?))))
        .filter(|(_, path)| path.is_file())
        .collect();
    if present.is_empty() {
        bail!(
            "none of the ground truth's {} images is in {}",
            gt.images.len(),
            dir.display()
        );
    }
    if present.len() < gt.images.len() {
        eprintln!(
            "warning: {} of {} ground-truth images are missing from {}; they count as images without detections",
            gt.images.len() - present.len(),
            gt.images.len(),
            dir.display()
        );
    }
    let bar = ProgressBar::new(present.len() as u64);
    let mut out = Vec::new();
    let images = Images::new(&snap.processor, &Preprocessor::Cpu);
    for (image_id, path) in present {
        // Every detection counts for mAP: no score threshold, top-k as post-processing gives.
        let (_, dets) = detect_one(&runner, &images, &path, 0.0)
            .with_context(|| format!("detecting in {}", path.display()))?;
        out.extend(dets.iter().filter_map(|d| {
            let b = d.bbox.map(f64::from);
            aperture_coco::Detection::from_label_xyxy(image_id, d.label, b, f64::from(d.score))
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Decodes, preprocesses as the HF image processor does, runs the model and
/// post-processes. Returns the decoded image (for drawing) and its detections.
fn detect_one(
    runner: &dyn Detector,
    images: &Images,
    file: &Path,
    threshold: f32,
) -> anyhow::Result<(RgbImage, Vec<Detection>)> {
    let img = decode_file(file, &DecodeLimits::default())?.into_rgb8();
    let dets = runner.detect_image_post(images, &img, threshold)?;
    Ok((img, dets))
}

/// The HF image processor's steps: resize (PIL bilinear) when it has a size, rescale
/// (1 when it has none), optional mean/std; NCHW.
pub fn preprocess_spec(proc: &ImageProcessorConfig) -> PreprocessSpec {
    let spec = PreprocessSpec {
        size: proc.size.map(|(h, w)| (h as usize, w as usize)),
        scale: proc.rescale.unwrap_or(1.0),
        ..PreprocessSpec::keep_size()
    };
    match proc.normalize {
        Some((mean, std)) => spec.normalized(mean, std),
        None => spec,
    }
}

/// Resize (PIL bilinear), rescale and optionally normalise into a `[1, 3, H, W]` tensor
/// on the CPU.
pub fn preprocess(img: &RgbImage, proc: &ImageProcessorConfig) -> anyhow::Result<HostTensor> {
    Ok(preprocess_cpu(&[img], &preprocess_spec(proc))?)
}

fn drawn_path(dir: &Path, file: &Path) -> PathBuf {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dir.join(format!("{stem}.png"))
}

fn image_json(file: &Path, dets: &[Detection], names: &[String], classes: usize) -> Value {
    let list: Vec<Value> = dets
        .iter()
        .zip(names)
        .map(|(d, n)| {
            let mut v = json!({ "label": d.label, "name": n, "score": d.score, "box": d.bbox });
            if classes == 80 {
                v["category_id"] = json!(coco_category_id(d.label));
            }
            v
        })
        .collect();
    json!({ "file": file.display().to_string(), "detections": list })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_cuda::preprocess::check::test_image;
    use aperture_vision::{normalize_chw, pil_bilinear, to_nchw_f32};

    #[test]
    fn cpu_preprocessing_is_the_image_processors_steps() {
        let img = test_image(50, 30, 1);
        let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let proc = ImageProcessorConfig {
            size: Some((16, 20)),
            resample: 2,
            rescale: Some(1.0 / 255.0),
            normalize: Some((mean, std)),
        };
        let got = preprocess(&img, &proc).unwrap();
        let mut want = to_nchw_f32(&pil_bilinear(&img, 20, 16).unwrap(), 1.0 / 255.0);
        normalize_chw(&mut want, mean, std).unwrap();
        assert_eq!(got.shape(), &[1, 3, 16, 20]);
        assert_eq!(got.to_f32_vec(), want);
        // No size, no rescale: the pixels as they are.
        let keep = ImageProcessorConfig {
            size: None,
            resample: 2,
            rescale: None,
            normalize: None,
        };
        let got = preprocess(&img, &keep).unwrap();
        assert_eq!(got.shape(), &[1, 3, 30, 50]);
        assert_eq!(got.to_f32_vec(), to_nchw_f32(&img, 1.0));
        let spec = preprocess_spec(&proc);
        assert_eq!(spec.size, Some((16, 20)));
        assert_eq!(spec.normalize, Some((mean, std)));
    }
}
