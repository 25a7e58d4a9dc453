//! D-FINE's post-processing on the GPU (`CudaBackend::top_k_detections`, the rows the
//! detect graph returns) against the CPU's `post_process` on the same logits and boxes:
//! random scores with deliberate ties, the wide kernel, the model's own outputs (eager
//! and in a captured graph), and the graph's time with post-processing included.

use std::time::Instant;

use anyhow::Context;
use aperture_cuda::detection::MultiGraphCache;
use aperture_cuda::{CudaBackend, CudaTensor};
use aperture_engine::{Backend, HostTensor, Precision};
use aperture_models::dfine::{post_process, DFineRunner, Detection};
use serde_json::{json, Value};

use super::ops::random;
use super::CheckDfineArgs;
use crate::gpu_runner::detections_from_rows;

/// Largest relative score difference accepted.
const SCORE_TOLERANCE: f32 = 1e-6;
/// Largest corner difference accepted, as a fraction of the image side.
const BOX_TOLERANCE: f32 = 1e-5;

/// How the GPU's detections of one batch differ from the CPU's.
#[derive(Debug, Default, PartialEq)]
pub struct Mismatch {
    pub detections: usize,
    /// Images whose count, label order or index differ, with the first difference.
    pub order: Option<String>,
    pub max_score_rel: f32,
    /// In fractions of the image side.
    pub max_box: f32,
}

impl Mismatch {
    pub fn pass(&self) -> bool {
        self.order.is_none()
            && self.max_score_rel <= SCORE_TOLERANCE
            && self.max_box <= BOX_TOLERANCE
    }
}

/// Compares per image: the same number of detections with the same labels in the same
/// order, scores within a relative 1e-6, corners within 1e-5 of the image side.
pub fn compare(got: &[Vec<Detection>], want: &[Vec<Detection>], sizes: &[(u32, u32)]) -> Mismatch {
    let mut m = Mismatch::default();
    if got.len() != want.len() {
        m.order = Some(format!("{} images vs {}", got.len(), want.len()));
        return m;
    }
    for (img, ((g, w), &(h, wd))) in got.iter().zip(want).zip(sizes).enumerate() {
        m.detections += w.len();
        if g.len() != w.len() && m.order.is_none() {
            m.order = Some(format!(
                "image {img}: {} detections vs {}",
                g.len(),
                w.len()
            ));
        }
        let side = h.max(wd).max(1) as f32;
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            if a.label != b.label && m.order.is_none() {
                m.order = Some(format!(
                    "image {img} detection {j}: label {} (score {}) vs {} (score {})",
                    a.label, a.score, b.label, b.score
                ));
            }
            let rel = (a.score - b.score).abs() / b.score.abs().max(f32::MIN_POSITIVE);
            m.max_score_rel = m
                .max_score_rel
                .max(if a.score == b.score { 0.0 } else { rel });
            for (x, y) in a.bbox.iter().zip(&b.bbox) {
                m.max_box = m.max_box.max((x - y).abs() / side);
            }
        }
    }
    m
}

/// The CPU's detections of each image of `[B, Q, C]` logits and `[B, Q, 4]` boxes.
fn cpu_detections(
    logits: &[f32],
    boxes: &[f32],
    classes: usize,
    sizes: &[(u32, u32)],
    threshold: f32,
) -> anyhow::Result<Vec<Vec<Detection>>> {
    let n = sizes.len().max(1);
    let (lp, bp) = (logits.len() / n, boxes.len() / n);
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let l = logits
                .get(i * lp..(i + 1) * lp)
                .context("logits too short")?;
            let b = boxes.get(i * bp..(i + 1) * bp).context("boxes too short")?;
            Ok(post_process(l, b, classes, threshold, size)?)
        })
        .collect()
}

/// Image sizes that differ per image (so the host scaling is exercised).
fn sizes(n: usize) -> Vec<(u32, u32)> {
    (0..n as u32)
        .map(|i| (480 + 37 * i, 640 - 23 * i))
        .collect()
}

/// GPU post-processing of device logits and boxes -> detections, as `aperture detect`
/// turns the graph's rows into detections.
fn gpu_detections(
    gpu: &CudaBackend,
    logits: &CudaTensor,
    boxes: &CudaTensor,
    k: usize,
    sizes: &[(u32, u32)],
    threshold: f32,
) -> anyhow::Result<Vec<Vec<Detection>>> {
    let rows = gpu.top_k_detections(logits, boxes, k)?.download(gpu)?;
    detections_from_rows(&rows.to_f32_vec(), sizes, threshold)
}

/// One random case: `b` images of `q` queries and `c` classes, logits from `gen`.
struct Case {
    name: &'static str,
    b: usize,
    q: usize,
    c: usize,
    logits: Vec<f32>,
    threshold: f32,
}

fn cases() -> Vec<Case> {
    let quantised: Vec<f32> = random(201, 2 * 300 * 80, -3.0, 3.0)
        .into_iter()
        .map(|v| (v * 2.0).round() / 2.0)
        .collect();
    vec![
        Case {
            name: "300x80 distinct",
            b: 2,
            q: 300,
            c: 80,
            logits: random(200, 2 * 300 * 80, -8.0, 8.0),
            threshold: f32::NEG_INFINITY,
        },
        Case {
            name: "300x80 ties (13 values)",
            b: 2,
            q: 300,
            c: 80,
            logits: quantised,
            threshold: f32::NEG_INFINITY,
        },
        Case {
            name: "300x80 all equal",
            b: 1,
            q: 300,
            c: 80,
            logits: vec![0.25; 300 * 80],
            threshold: f32::NEG_INFINITY,
        },
        Case {
            name: "100x80 saturated (score 1.0)",
            b: 2,
            q: 100,
            c: 80,
            logits: random(202, 2 * 100 * 80, 14.0, 40.0),
            threshold: f32::NEG_INFINITY,
        },
        Case {
            name: "7x3 (fewer than the block)",
            b: 3,
            q: 7,
            c: 3,
            logits: random(203, 3 * 7 * 3, -2.0, 2.0),
            threshold: f32::NEG_INFINITY,
        },
        Case {
            name: "300x365 (wide kernel)",
            b: 2,
            q: 300,
            c: 365,
            logits: random(204, 2 * 300 * 365, -9.0, 3.0),
            threshold: f32::NEG_INFINITY,
        },
        // About half of the top 300 score above 0.5: the threshold cuts the list.
        Case {
            name: "300x80 threshold 0.5",
            b: 2,
            q: 300,
            c: 80,
            logits: random(205, 2 * 300 * 80, -6.0, 0.04),
            threshold: 0.5,
        },
    ]
}

/// Uploads `values` as `[b, 1, rows, cols]` and returns the tensor and the values the
/// GPU holds (rounded to its storage type).
fn upload(
    gpu: &CudaBackend,
    dims: [usize; 4],
    values: Vec<f32>,
) -> anyhow::Result<(CudaTensor, Vec<f32>)> {
    let t = gpu.upload_nhwc(&HostTensor::from_f32(dims.to_vec(), values)?)?;
    let held = gpu.download_nhwc(&t)?.to_f32_vec();
    Ok((t, held))
}

fn report(
    p: Precision,
    name: &str,
    m: &Mismatch,
    failures: &mut Vec<String>,
    rows: &mut Vec<Value>,
) {
    let pass = m.pass();
    println!(
        "{p:>5} post-process {name:<30} {:>6} detections, score rel {:.1e}, box {:.1e} {}",
        m.detections,
        m.max_score_rel,
        m.max_box,
        match (&m.order, pass) {
            (Some(o), _) => format!("FAIL ({o})"),
            (None, true) => "ok".into(),
            (None, false) => "FAIL".into(),
        }
    );
    if !pass {
        failures.push(format!("post-processing {name} in {p}: {m:?}"));
    }
    rows.push(
        json!({"precision": p.to_string(), "case": name, "detections": m.detections,
        "order": m.order, "max_score_rel": m.max_score_rel, "max_box": m.max_box, "pass": pass}),
    );
}

/// The random cases on `gpu`, then the post-processing alone timed at batch 1 and 32.
pub fn check_random(
    gpu: &CudaBackend,
    p: Precision,
    failures: &mut Vec<String>,
) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    for case in cases() {
        let boxes = random(300 + case.q as u64, case.b * case.q * 4, 0.05, 0.95);
        let (lt, lh) = upload(gpu, [case.b, 1, case.q, case.c], case.logits)?;
        let (bt, bh) = upload(gpu, [case.b, 1, case.q, 4], boxes)?;
        let sz = sizes(case.b);
        let want = cpu_detections(&lh, &bh, case.c, &sz, case.threshold)?;
        let got = gpu_detections(gpu, &lt, &bt, case.q, &sz, case.threshold)?;
        report(
            p,
            case.name,
            &compare(&got, &want, &sz),
            failures,
            &mut rows,
        );
    }
    for b in [1usize, 32] {
        let (lt, _) = upload(gpu, [b, 1, 300, 80], random(400, b * 300 * 80, -8.0, 4.0))?;
        let (bt, _) = upload(gpu, [b, 1, 300, 4], random(401, b * 300 * 4, 0.1, 0.9))?;
        gpu.top_k_detections(&lt, &bt, 300)?;
        gpu.synchronize()?;
        let iters = 50;
        let start = gpu.record_event()?;
        for _ in 0..iters {
            gpu.top_k_detections(&lt, &bt, 300)?;
        }
        let end = gpu.record_event()?;
        let us = f64::from(end.elapsed_ms(&start)?) * 1e3 / iters as f64;
        println!(
            "{p:>5} post-process 300x80 batch {b:>2}: {us:.1} us per call (eager, two kernels)"
        );
        rows.push(
            json!({"precision": p.to_string(), "case": "timing 300x80", "batch": b, "us": us}),
        );
    }
    Ok(rows)
}

/// The model's own outputs: GPU post-processing of an eager pass against the CPU's on
/// the same logits and boxes, the graph with post-processing against the eager rows,
/// and that graph's replay time per batch size (fp16).
pub fn check_model(
    runner: &DFineRunner<CudaBackend>,
    golden_input: Option<&HostTensor>,
    args: &CheckDfineArgs,
    p: Precision,
    failures: &mut Vec<String>,
) -> anyhow::Result<Vec<Value>> {
    let (be, model) = (runner.backend(), runner.model());
    let (k, c) = (model.num_queries(), runner.config().num_labels);
    let mut rows = Vec::new();
    let x = match golden_input {
        Some(x) => x.clone(),
        None => HostTensor::from_f32(
            vec![2, 3, args.size, args.size],
            random(77, 2 * 3 * args.size * args.size, 0.0, 1.0),
        )?,
    };
    let n = x.shape()[0];
    let sz = sizes(n);
    let out = model.forward(be, &be.upload_nchw(&x)?)?;
    let (lh, bh) = (
        be.download_nhwc(&out.logits)?.to_f32_vec(),
        be.download_nhwc(&out.boxes)?.to_f32_vec(),
    );
    let all = f32::NEG_INFINITY;
    let want = cpu_detections(&lh, &bh, c, &sz, all)?;
    let eager_rows = be
        .top_k_detections(&out.logits, &out.boxes, k)?
        .download(be)?;
    let eager = detections_from_rows(&eager_rows.to_f32_vec(), &sz, all)?;
    report(
        p,
        "model outputs (eager)",
        &compare(&eager, &want, &sz),
        failures,
        &mut rows,
    );

    let graphs = MultiGraphCache::new();
    let fwd = |b: &CudaBackend, t: &CudaTensor| -> aperture_engine::Result<Vec<_>> {
        let o = model.forward(b, t)?;
        Ok(vec![b.top_k_detections(&o.logits, &o.boxes, k)?])
    };
    let g = graphs.infer(be, &x, fwd)?;
    let graph_rows = g.first().context("the graph gave no output")?.to_f32_vec();
    let same = graph_rows
        .iter()
        .zip(eager_rows.to_f32_vec())
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let graph = detections_from_rows(&graph_rows, &sz, all)?;
    report(
        p,
        "model outputs (graph)",
        &compare(&graph, &want, &sz),
        failures,
        &mut rows,
    );
    println!(
        "{p:>5} post-process graph rows vs eager rows: {}",
        if same { "bit-identical ok" } else { "FAIL" }
    );
    if !same {
        failures.push(format!(
            "{p}: the graph's detection rows differ from the eager pass's"
        ));
    }

    // Timed in fp16 (the target) only, unless it is the one precision asked for: each
    // batch size is one more capture.
    let timed: &[usize] = if p == Precision::Fp16 || args.precisions.len() == 1 {
        &args.time_batches
    } else {
        &[]
    };
    for &n in timed {
        let xb = HostTensor::from_f32(
            vec![n, 3, args.size, args.size],
            random(7, n * 3 * args.size * args.size, 0.0, 1.0),
        )?;
        let t = Instant::now();
        graphs.prepare(be, xb.shape(), fwd)?;
        let capture_s = t.elapsed().as_secs_f64();
        for _ in 0..3 {
            graphs.replay(be, xb.shape())?;
        }
        let mut ms = Vec::new();
        for _ in 0..args.iters.max(1) {
            let s = be.record_event()?;
            graphs.replay(be, xb.shape())?;
            let e = be.record_event()?;
            ms.push(f64::from(e.elapsed_ms(&s)?));
        }
        ms.sort_by(f64::total_cmp);
        let p50 = ms[ms.len() / 2];
        println!(
            "{p:>5} graph+post batch {n:>3}: p50 {p50:8.3} ms, {:8.1} images/s (device time, capture {capture_s:.1} s)",
            n as f64 * 1e3 / p50
        );
        rows.push(json!({"precision": p.to_string(), "batch": n, "mode": "graph+post", "p50_ms": p50, "images_per_s": n as f64 * 1e3 / p50}));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(score: f32, label: usize, x: f32) -> Detection {
        Detection {
            score,
            label,
            bbox: [x, x + 1.0, x + 2.0, x + 3.0],
        }
    }

    #[test]
    fn comparison_needs_the_same_order_and_close_values() {
        let sz = [(100, 200)];
        let want = vec![vec![det(0.9, 1, 10.0), det(0.8, 2, 20.0)]];
        let same = compare(&want, &want, &sz);
        assert!(same.pass());
        assert_eq!(same.detections, 2);
        let swapped = vec![vec![det(0.8, 2, 20.0), det(0.9, 1, 10.0)]];
        assert!(compare(&swapped, &want, &sz).order.is_some());
        let short = vec![vec![det(0.9, 1, 10.0)]];
        assert!(!compare(&short, &want, &sz).pass());
        let off = vec![vec![det(0.9 * (1.0 + 1e-5), 1, 10.0), det(0.8, 2, 20.0)]];
        let m = compare(&off, &want, &sz);
        assert!(m.order.is_none() && !m.pass(), "{m:?}");
        // 0.01 px on a 200 px side is 5e-5 of it (too far); 0.001 px is 5e-6.
        let moved = vec![vec![det(0.9, 1, 10.01), det(0.8, 2, 20.0)]];
        assert!(!compare(&moved, &want, &sz).pass());
        let tiny = vec![vec![det(0.9, 1, 10.001), det(0.8, 2, 20.0)]];
        assert!(compare(&tiny, &want, &sz).pass());
    }

    #[test]
    fn cpu_detections_split_images_and_scale_each_to_its_size() {
        // Two images of two queries and two classes.
        let logits = [0.0, 2.0, -1.0, 1.0, 3.0, 0.0, 0.0, 0.0];
        let boxes = [
            0.5, 0.5, 0.2, 0.4, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1,
        ];
        let sz = sizes(2);
        let d = cpu_detections(&logits, &boxes, 2, &sz, f32::NEG_INFINITY).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].len(), 2);
        assert_eq!(d[1][0].label, 0);
        // Image 1's best is query 0 (a full-image box) scaled to its own size.
        let (h, w) = (sz[1].0 as f32, sz[1].1 as f32);
        assert_eq!(d[1][0].bbox, [0.0, 0.0, w, h]);
        assert_ne!(sz[0], sz[1]);
    }

    #[test]
    fn every_case_has_consistent_shapes() {
        for c in cases() {
            assert_eq!(c.logits.len(), c.b * c.q * c.c, "{}", c.name);
            assert!(c.q <= c.q * c.c);
        }
        let ties = &cases()[1].logits;
        let mut distinct = ties.clone();
        distinct.sort_by(f32::total_cmp);
        distinct.dedup(); // -0.0 == 0.0: one value
        assert!(distinct.len() <= 13, "{} distinct values", distinct.len());
    }
}
