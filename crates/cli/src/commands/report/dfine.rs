//! The D-FINE sweep: precision x query count x batch (x CUDA graphs on/off on the GPU),
//! with self-consistency mAP against the fp32 detections and true mAP with --gt.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aperture_coco::GroundTruth;
use aperture_cuda::CudaBackend;
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{HostTensor, Precision};
use aperture_models::dfine::{load_dfine, post_process, DFineRunner, DFineSnapshot, Detection};
use aperture_vision::{decode_file, DecodeLimits};

use super::accuracy::{self_consistency, true_map};
use super::doc::{Report, Row};
use super::sweep::{images, row_from_times, wall_times, Plan};
use super::ReportArgs;
use crate::commands::detect::preprocess;
use crate::gpu_runner::GraphDFine;

/// Images the accuracy columns are computed on: pixels at the model's input size,
/// the original size (for boxes in pixels) and the COCO image id.
struct AccuracySet {
    pixels: Vec<HostTensor>,
    sizes: Vec<(u32, u32)>,
    ids: Vec<i64>,
    gt: Option<GroundTruth>,
}

fn accuracy_set(
    args: &ReportArgs,
    snap: &DFineSnapshot,
    (h, w): (usize, usize),
) -> anyhow::Result<AccuracySet> {
    let (Some(gt_path), Some(dir)) = (&args.gt, &args.images) else {
        let x = images(4, 3, h, w, 7)?;
        return Ok(AccuracySet {
            pixels: x.split_batch(),
            sizes: vec![(h as u32, w as u32); 4],
            ids: (0..4).collect(),
            gt: None,
        });
    };
    if snap.config.num_labels != 80 {
        bail!(
            "--gt needs a model with the 80 COCO classes; this one has {}",
            snap.config.num_labels
        );
    }
    let gt = GroundTruth::from_path(gt_path).context("loading --gt")?;
    let present: Vec<(i64, PathBuf)> = gt
        .images
        .iter()
        .filter_map(|im| Some((im.id, dir.join(im.file_name.as_ref()?))))
        .filter(|(_, p)| p.is_file())
        .collect();
    if present.is_empty() {
        bail!("none of the ground truth's images is in {}", dir.display());
    }
    let mut set = AccuracySet {
        pixels: Vec::new(),
        sizes: Vec::new(),
        ids: Vec::new(),
        gt: None,
    };
    for (id, path) in present {
        let img = decode_file(&path, &DecodeLimits::default())
            .with_context(|| format!("decoding {}", path.display()))?
            .into_rgb8();
        set.sizes.push((img.height(), img.width()));
        set.pixels.push(preprocess(&img, &snap.processor)?);
        set.ids.push(id);
    }
    set.gt = Some(gt);
    Ok(set)
}

/// Something that turns pixels into (logits, boxes): eager or through CUDA graphs.
type DetectFn<'a> = dyn Fn(&HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> + 'a;

fn detections(
    detect: &DetectFn,
    set: &AccuracySet,
    classes: usize,
) -> anyhow::Result<Vec<Vec<Detection>>> {
    set.pixels
        .iter()
        .zip(&set.sizes)
        .map(|(x, size)| {
            let (l, b) = detect(x)?;
            Ok(post_process(
                &l.to_f32_vec(),
                &b.to_f32_vec(),
                classes,
                0.0,
                *size,
            )?)
        })
        .collect()
}

pub fn sweep(
    args: &ReportArgs,
    model: &Path,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let snap = load_dfine(model).with_context(|| format!("loading {}", model.display()))?;
    let (h, w) = args
        .size
        .map(|s| (s, s))
        .or(snap.processor.size.map(|(h, w)| (h as usize, w as usize)))
        .unwrap_or((640, 640));
    let max_q = snap.config.num_queries;
    // The model's own query count always runs: fp32 with it is the accuracy reference.
    let mut queries: Vec<usize> = vec![max_q];
    for part in args
        .queries
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let q: usize = part
            .parse()
            .ok()
            .filter(|q| *q > 0)
            .with_context(|| format!("--queries: '{part}' is not a positive number"))?;
        if q > max_q {
            report.notes.push(format!(
                "{q} queries skipped: the model has num_queries {max_q}."
            ));
        } else if !queries.contains(&q) {
            queries.push(q);
        }
    }
    queries.sort_unstable_by(|a, b| b.cmp(a));
    let label = model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    report.model = format!("dfine ({label}) {h}x{w}");
    let set = accuracy_set(args, &snap, (h, w))?;
    let classes = snap.config.num_labels;
    let graph_modes: &[bool] = if plan.gpu.is_some() {
        &[true, false]
    } else {
        &[false]
    };
    let precisions: Vec<Precision> = if plan.gpu.is_some() {
        plan.precisions.clone()
    } else {
        vec![Precision::Fp32]
    };
    plan.bar.set_length(
        (precisions.len() * queries.len() * graph_modes.len() * (plan.batches.len() + 1)) as u64,
    );
    let mut reference: Option<Vec<Vec<Detection>>> = None;
    for &p in &precisions {
        for &q in &queries {
            let step = |detect: &DetectFn,
                        variant: &str,
                        report: &mut Report,
                        reference: &mut Option<Vec<Vec<Detection>>>,
                        peak: &dyn Fn() -> Option<f64>|
             -> anyhow::Result<()> {
                plan.bar
                    .set_message(format!("{p} {q} queries {variant}: accuracy"));
                let dets = detections(detect, &set, classes)?;
                let r = reference.get_or_insert_with(|| dets.clone());
                let consistency = self_consistency(r, &dets)?;
                let truth = match &set.gt {
                    Some(gt) => Some(true_map(gt, &set.ids, &dets)?),
                    None => None,
                };
                plan.bar.inc(1);
                for &b in &plan.batches {
                    plan.bar
                        .set_message(format!("{p} {q} queries {variant}: batch {b}"));
                    let x = images(b, 3, h, w, 0)?;
                    match wall_times(plan.warmup, plan.iters, || detect(&x).map(|_| ())) {
                        Ok(ms) => {
                            let mut row: Row = row_from_times(
                                "aperture",
                                p.as_str(),
                                &format!("{q} queries, {variant}"),
                                b,
                                &ms,
                            );
                            row.peak_gib = peak();
                            (row.map50_vs_fp32, row.map_vs_fp32) =
                                consistency.map_or((None, None), |(a, b)| (Some(a), Some(b)));
                            (row.true_map50, row.true_map) =
                                truth.map_or((None, None), |(a, b)| (Some(a), Some(b)));
                            report.rows.push(row);
                        }
                        Err(e) => report
                            .notes
                            .push(format!("{p} {q} queries {variant} batch {b} failed: {e:#}")),
                    }
                    plan.bar.inc(1);
                }
                Ok(())
            };
            match plan.gpu {
                None => {
                    let mut runner = DFineRunner::new(CpuBackend::new(), &snap, 0)?;
                    runner.set_num_queries(q)?;
                    let detect = |x: &HostTensor| Ok(runner.detect(x)?);
                    step(&detect, "eager", report, &mut reference, &|| None)?;
                }
                Some(ordinal) => {
                    let be = CudaBackend::new(ordinal, p).context("opening the GPU")?;
                    let mut runner = DFineRunner::new(be, &snap, 0)?;
                    runner.set_num_queries(q)?;
                    let graph = GraphDFine::new(runner);
                    let peak = || {
                        let m = graph.runner().backend().memory();
                        let v = m.peak_reserved() as f64 / (1u64 << 30) as f64;
                        m.reset_peak();
                        Some(v)
                    };
                    for &graphs in graph_modes {
                        graph.runner().backend().memory().reset_peak();
                        if graphs {
                            let detect = |x: &HostTensor| graph.detect(x);
                            step(&detect, "graph", report, &mut reference, &peak)?;
                        } else {
                            let detect = |x: &HostTensor| Ok(graph.runner().detect(x)?);
                            step(&detect, "eager", report, &mut reference, &peak)?;
                        }
                    }
                    graph.runner().backend().trim_memory()?;
                    // The roofline chart: one profiled eager pass per precision, at the
                    // full query count and the largest swept batch up to 8.
                    if Some(&q) == queries.first() {
                        let b = plan.batches.iter().copied().filter(|b| *b <= 8).max();
                        if let Some(b) = b {
                            let x = images(b, 3, h, w, 0)?;
                            let be = graph.runner().backend();
                            let run = || Ok(graph.runner().detect(&x).map(|_| ())?);
                            match super::sweep::profile_pass(be, run) {
                                Ok(ops) => report.profiles.push(super::doc::Profile {
                                    title: format!("{p} batch {b}, one eager pass"),
                                    ops,
                                }),
                                Err(e) => report.notes.push(format!("{p} profile failed: {e:#}")),
                            }
                        }
                    }
                }
            }
            plan.save_partial(report, &format!("{p} with {q} queries"));
        }
    }
    let source = if set.gt.is_some() {
        format!("the {} --images", set.pixels.len())
    } else {
        format!("{} seeded random images", set.pixels.len())
    };
    let shape = vec![3, h as i64, w as i64];
    super::served::measure(
        model,
        "dfine",
        plan,
        plan.served_precision(),
        shape,
        (args.serve_ms, args.serve_clients.max(1)),
        report,
    );
    report.notes.push(format!(
        "D-FINE accuracy: each variant's detections on {source} scored with aperture_coco against the detections of fp32 with {} queries (score >= {}, at most the 100 best per image as COCO scores at most 100; the 10 best per image when none reaches it; boxes of non-positive width or height, which untrained weights produce, left out on both sides).",
        queries.first().copied().unwrap_or(max_q),
        super::accuracy::CONSISTENCY_SCORE
    ));
    report.notes.push(
        "D-FINE latencies are wall-clock per detect call (host copies in and out included); the query count is changed at run time (DFineRunner::set_num_queries).".into(),
    );
    if plan.gpu.is_none() {
        report.notes.push("CPU run: fp32 only, eager passes only, no peak-memory counter, no roofline chart (no CPU profiler).".into());
    }
    if plan.gpu.is_some() && !args.no_peers {
        super::peers::dfine(model, plan, report);
    }
    Ok(())
}
