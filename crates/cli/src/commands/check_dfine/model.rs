//! The whole D-FINE model on the GPU: against transformers' golden outputs (batch 1),
//! against the CPU backend (random batches), eager timings and a per-operation profile.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use aperture_cuda::detection::MultiGraphCache;
use aperture_cuda::preprocess::PreprocessSpec;
use aperture_cuda::{CudaBackend, CudaTensor};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, Backend, EngineError, HostTensor, Precision};
use aperture_models::dfine::{golden, load_dfine, DFineRunner, DFineSnapshot};
use serde_json::{json, Value};

use super::{ops::random, CheckDfineArgs};
use crate::commands::detect::preprocess_spec;
use crate::gpu_runner::GraphDFine;

/// Query selection is a top-k over scores: near-tied scores swap rows between two
/// implementations (in fp16/bf16 many do). Each of `want`'s rows is matched, greedily
/// in order, to the unused row of `got` in the same image with the nearest box (L-inf);
/// returns, per row of `want`, its partner's row index and their box distance. Rows
/// whose anchor left the top-k altogether match a poor (distant) partner.
fn partners(got_boxes: &[f32], want_boxes: &[f32], queries: usize) -> Vec<(usize, f32)> {
    let images = got_boxes.len() / (4 * queries.max(1));
    let mut out = Vec::with_capacity(images * queries);
    for img in 0..images {
        let base = img * queries;
        let mut used = vec![false; queries];
        for i in 0..queries {
            let dist = |j: usize| {
                (0..4)
                    .map(|k| (got_boxes[(base + j) * 4 + k] - want_boxes[(base + i) * 4 + k]).abs())
                    .fold(0f32, f32::max)
            };
            let (j, d) = (0..queries)
                .filter(|&j| !used[j])
                .map(|j| (j, dist(j)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or((i, f32::INFINITY));
            used[j] = true;
            out.push((base + j, d));
        }
    }
    out
}

/// `got`'s logits and boxes reordered to `want`'s rows (see [`partners`]) and how many
/// rows moved. Rows whose anchor left the top-k still count in the error.
pub(crate) fn align(
    got: (&[f32], &[f32]),
    want_boxes: &[f32],
    queries: usize,
    classes: usize,
) -> (Vec<f32>, Vec<f32>, usize) {
    reorder(got, &partners(got.1, want_boxes, queries), classes)
}

/// `got`'s rows in the order of `pairs` (from [`partners`]) and how many moved.
fn reorder(
    (gl, gb): (&[f32], &[f32]),
    pairs: &[(usize, f32)],
    classes: usize,
) -> (Vec<f32>, Vec<f32>, usize) {
    let (mut al, mut ab, mut moved) = (
        Vec::with_capacity(gl.len()),
        Vec::with_capacity(gb.len()),
        0,
    );
    for (i, &(j, _)) in pairs.iter().enumerate() {
        moved += usize::from(j != i);
        al.extend_from_slice(&gl[j * classes..(j + 1) * classes]);
        ab.extend_from_slice(&gb[j * 4..(j + 1) * 4]);
    }
    (al, ab, moved)
}

struct Outputs {
    logits: Vec<f32>,
    boxes: Vec<f32>,
}

fn detect<B: Backend>(r: &DFineRunner<B>, x: &HostTensor) -> anyhow::Result<Outputs> {
    let (l, b) = r.detect(x)?;
    Ok(Outputs {
        logits: l.to_f32_vec(),
        boxes: b.to_f32_vec(),
    })
}

fn compare(got: &Outputs, want: &Outputs, q: usize, c: usize) -> (f64, f64, usize) {
    let (al, ab, moved) = align((&got.logits, &got.boxes), &want.boxes, q, c);
    (
        relative_l2(&al, &want.logits),
        relative_l2(&ab, &want.boxes),
        moved,
    )
}

/// A box farther than this (L-inf, normalised coordinates) from every unused row of the
/// other output has no partner: its query was selected by one side only.
const NO_PARTNER: f32 = 0.05;

/// Per image: logits and boxes errors, and how many of `want`'s rows have no partner in
/// `got` (to tell a query swapped at the top-k boundary from a wrong image).
fn per_image(got: &Outputs, want: &Outputs, q: usize, c: usize) -> Vec<(f64, f64, usize)> {
    let pairs = partners(&got.boxes, &want.boxes, q);
    let (al, ab, _) = reorder((&got.logits, &got.boxes), &pairs, c);
    al.chunks(q * c)
        .zip(want.logits.chunks(q * c))
        .zip(ab.chunks(q * 4).zip(want.boxes.chunks(q * 4)))
        .zip(pairs.chunks(q))
        .map(|(((gl, wl), (gb, wb)), p)| {
            let unpartnered = p.iter().filter(|(_, d)| *d > NO_PARTNER).count();
            (relative_l2(gl, wl), relative_l2(gb, wb), unpartnered)
        })
        .collect()
}

/// The bound on the model's relative L2 error against transformers fp32.
fn model_tolerance(args: &CheckDfineArgs, p: Precision) -> f64 {
    if p == Precision::Fp32 {
        args.fp32_tolerance
    } else {
        1e-2
    }
}

fn pixels(n: usize, size: usize, seed: u64) -> anyhow::Result<HostTensor> {
    Ok(HostTensor::from_f32(
        vec![n, 3, size, size],
        random(seed, n * 3 * size * size, 0.0, 1.0),
    )?)
}

pub fn check_model(
    args: &CheckDfineArgs,
    dir: &Path,
    failures: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let snap: DFineSnapshot =
        load_dfine(dir).with_context(|| format!("cannot load {}", dir.display()))?;
    let (q, c) = (snap.config.num_queries, snap.config.num_labels);
    let t = Instant::now();
    let cpu = DFineRunner::new(CpuBackend::new(), &snap, 0)?;
    println!(
        "== model {} ({} queries, {} classes), CPU prepared in {:.2?} ==",
        dir.display(),
        q,
        c,
        t.elapsed()
    );
    let golden = match &args.golden {
        Some(path) => {
            let g = aperture_weights::load(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let get = |k: &str| {
                g.get(k)
                    .map(|t| t.to_f32_vec())
                    .with_context(|| format!("{} has no {k}", path.display()))
            };
            let x = HostTensor::from_f32(
                vec![1, 3, 640, 640],
                golden::fill("pixel_values", 3 * 640 * 640, 0.0, 1.0),
            )?;
            Some((
                x,
                Outputs {
                    logits: get("logits")?,
                    boxes: get("pred_boxes")?,
                },
            ))
        }
        None => None,
    };
    let mut rows = Vec::new();
    let mut cpu_refs = Vec::new();
    if let Some((x, want)) = &golden {
        let t = Instant::now();
        let got = detect(&cpu, x)?;
        let (el, eb, moved) = compare(&got, want, q, c);
        println!(
            "cpu   vs transformers, batch 1: logits {el:.3e} boxes {eb:.3e} ({moved} rows moved) in {:.2?}",
            t.elapsed()
        );
        rows.push(json!({"engine": "cpu", "against": "transformers-fp32", "precision": "fp32", "batch": 1, "rel_l2_logits": el, "rel_l2_boxes": eb, "moved": moved}));
    }
    for &n in &args.batches {
        let x = pixels(n, args.size, 1000 + n as u64)?;
        let t = Instant::now();
        let out = detect(&cpu, &x)?;
        println!("cpu   batch {n}: {:.2?}", t.elapsed());
        cpu_refs.push((n, x, out));
    }
    let mut timings = Vec::new();
    // The post-processing checks on the model's outputs (their own rows, not timings).
    let mut post_rows = Vec::new();
    let mut pixel_rows = Vec::new();
    let mut profile = Value::Null;
    // The model's preprocessing at the checked input size, for the in-graph check.
    let spec = PreprocessSpec {
        size: Some(
            snap.processor
                .size
                .map_or((args.size, args.size), |(h, w)| (h as usize, w as usize)),
        ),
        ..preprocess_spec(&snap.processor)
    };
    for &p in &args.precisions {
        // A failure in one precision is reported and the others still run.
        let result = (|| -> anyhow::Result<()> {
            let gpu = CudaBackend::new(0, p).context("cannot open the GPU")?;
            let t = Instant::now();
            let runner = DFineRunner::new(gpu, &snap, 0)?;
            println!(
                "-- {p}: {} prepared in {:.2?}",
                runner.backend().name(),
                t.elapsed()
            );
            if let Some((x, want)) = &golden {
                let got = detect(&runner, x)?;
                let (el, eb, moved) = compare(&got, want, q, c);
                let tol = model_tolerance(args, p);
                let pass = el <= tol && eb <= tol;
                if !pass {
                    failures.push(format!(
                    "model {p} vs transformers: logits {el:.3e}, boxes {eb:.3e} (limit {tol:e})"
                ));
                }
                println!(
                "{p:>5} vs transformers, batch 1: logits {el:.3e} boxes {eb:.3e} ({moved} rows moved) {}",
                if pass { "ok" } else { "FAIL" }
            );
                rows.push(json!({"engine": "aperture-cuda", "against": "transformers-fp32", "precision": p.to_string(), "batch": 1, "rel_l2_logits": el, "rel_l2_boxes": eb, "moved": moved, "pass": pass}));
            }
            for (n, x, want) in &cpu_refs {
                let got = detect(&runner, x)?;
                let (el, eb, moved) = compare(&got, want, q, c);
                let tol = model_tolerance(args, p);
                let pass = el <= tol && eb <= tol;
                if !pass {
                    failures.push(format!(
                    "model {p} batch {n} vs CPU: logits {el:.3e}, boxes {eb:.3e} (limit {tol:e})"
                ));
                    for (i, (l, b, u)) in per_image(&got, want, q, c).iter().enumerate() {
                        println!(
                            "{p:>5}   image {i}: logits {l:.3e} boxes {b:.3e}, {u} rows without a partner"
                        );
                    }
                }
                println!(
                "{p:>5} vs cpu, batch {n}: logits {el:.3e} boxes {eb:.3e} ({moved} rows moved) {}",
                if pass { "ok" } else { "FAIL" }
            );
                rows.push(json!({"engine": "aperture-cuda", "against": "cpu-fp32", "precision": p.to_string(), "batch": n, "rel_l2_logits": el, "rel_l2_boxes": eb, "moved": moved, "pass": pass}));
            }
            for &n in &args.time_batches {
                let x = pixels(n, args.size, 7)?;
                let mut ms = Vec::new();
                for i in 0..args.iters + 2 {
                    let t = Instant::now();
                    runner.detect(&x)?;
                    if i >= 2 {
                        ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                ms.sort_by(f64::total_cmp);
                let p50 = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
                let gib = runner.backend().memory().peak_reserved() as f64 / (1u64 << 30) as f64;
                println!(
                "{p:>5} eager batch {n:>3}: p50 {p50:8.2} ms, {:8.1} images/s, peak {gib:.2} GiB",
                n as f64 * 1e3 / p50
            );
                timings.push(json!({"precision": p.to_string(), "batch": n, "mode": "eager", "p50_ms": p50, "images_per_s": n as f64 * 1e3 / p50, "peak_gib": gib}));
            }
            // The whole forward pass as one CUDA graph per batch size.
            let graphs = MultiGraphCache::new();
            let be = runner.backend();
            let fwd =
                |b: &CudaBackend, x: &CudaTensor| -> aperture_engine::Result<Vec<CudaTensor>> {
                    let o = runner
                        .model()
                        .forward(b, x)
                        .map_err(|e| EngineError::Invalid(e.to_string()))?;
                    Ok(vec![o.logits, o.boxes])
                };
            if let Some((x, want)) = &golden {
                let eager = detect(&runner, x)?;
                let g = graphs.infer(be, x, fwd)?;
                let replayed = Outputs {
                    logits: g[0].to_f32_vec(),
                    boxes: g[1].to_f32_vec(),
                };
                let (gl, gb) = (&replayed.logits, &replayed.boxes);
                let (tl, tb, moved) = compare(&replayed, want, q, c);
                let tol = model_tolerance(args, p);
                let pass = tl <= tol && tb <= tol;
                if !pass {
                    failures.push(format!("model {p} graph replay vs transformers: logits {tl:.3e}, boxes {tb:.3e} (limit {tol:e})"));
                }
                println!(
                    "{p:>5} graph vs transformers, batch 1: logits {tl:.3e} boxes {tb:.3e} ({moved} rows moved) {}",
                    if pass { "ok" } else { "FAIL" }
                );
                let again = graphs.infer(be, x, fwd)?;
                let repeatable = again[0].to_f32_vec() == *gl && again[1].to_f32_vec() == *gb;
                if !repeatable {
                    failures.push(format!("{p}: two replays of one graph differ"));
                }
                println!(
                    "{p:>5} graph replayed twice, batch 1: {}",
                    if repeatable {
                        "bit-identical ok"
                    } else {
                        "DIFFER FAIL"
                    }
                );
                let (el, eb) = (
                    relative_l2(gl, &eager.logits),
                    relative_l2(gb, &eager.boxes),
                );
                let pass = el <= 1e-6 && eb <= 1e-6;
                if !pass {
                    failures.push(format!("{p}: graph replay differs from the eager pass: logits {el:.3e}, boxes {eb:.3e}"));
                }
                println!(
                    "{p:>5} graph vs eager, batch 1: logits {el:.3e} boxes {eb:.3e} {}",
                    if pass { "ok" } else { "FAIL" }
                );
            }
            for &n in &args.time_batches {
                let x = pixels(n, args.size, 7)?;
                let t = Instant::now();
                graphs.prepare(be, x.shape(), fwd)?;
                let capture_s = t.elapsed().as_secs_f64();
                for _ in 0..3 {
                    graphs.replay(be, x.shape())?;
                }
                let mut ms = Vec::new();
                for _ in 0..args.iters.max(1) {
                    let s = be.record_event()?;
                    graphs.replay(be, x.shape())?;
                    let e = be.record_event()?;
                    ms.push(e.elapsed_ms(&s)? as f64);
                }
                ms.sort_by(f64::total_cmp);
                let p50 = ms[ms.len() / 2];
                let p99 = ms[(ms.len() * 99 / 100).min(ms.len() - 1)];
                let gib = be.memory().peak_reserved() as f64 / (1u64 << 30) as f64;
                println!("{p:>5} graph batch {n:>3}: p50 {p50:8.3} ms, p99 {p99:8.3} ms, {:8.1} images/s (device time, capture {capture_s:.1} s), peak {gib:.2} GiB", n as f64 * 1e3 / p50);
                timings.push(json!({"precision": p.to_string(), "batch": n, "mode": "graph", "p50_ms": p50, "p99_ms": p99, "images_per_s": n as f64 * 1e3 / p50, "peak_gib": gib}));
            }
            drop(graphs);
            // Post-processing on the GPU: the model's outputs, in and out of a graph.
            let post = super::postprocess::check_model(
                &runner,
                golden.as_ref().map(|(x, _)| x),
                args,
                p,
                failures,
            )?;
            post_rows.extend(post);
            if let Some(&n) = args.time_batches.iter().max() {
                let be = runner.backend();
                be.profiler().set_enabled(true);
                let x = pixels(n, args.size, 7)?;
                runner.detect(&x)?;
                be.profiler().set_enabled(false);
                let stats = be.profiler().take()?;
                let total: f64 = stats.iter().map(|s| s.ms).sum();
                println!("   profile {p} batch {n}: {total:.2} ms in operations");
                println!(
                    "   {:<26} {:>6} {:>9} {:>6} {:>8} {:>8}",
                    "op", "calls", "ms", "share", "TFLOP/s", "GB/s"
                );
                let mut prof = Vec::new();
                for s in &stats {
                    let (tf, gb) = (s.flops / s.ms / 1e9, s.bytes / s.ms / 1e6);
                    println!(
                        "   {:<26} {:>6} {:>9.3} {:>5.1}% {:>8.2} {:>8.1}",
                        s.name,
                        s.calls,
                        s.ms,
                        100.0 * s.ms / total,
                        tf,
                        gb
                    );
                    prof.push(
                    json!({"op": s.name, "calls": s.calls, "ms": s.ms, "tflops": tf, "gbps": gb}),
                );
                }
                if p == Precision::Fp16 || profile.is_null() {
                    profile = json!({"precision": p.to_string(), "batch": n, "ops": prof});
                }
            }
            // Preprocessing inside the graph, through the served runner.
            let graph = GraphDFine::new(runner);
            pixel_rows.extend(super::pixels::check(&graph, &spec, p, failures)?);
            Ok(())
        })();
        if let Err(e) = result {
            println!("{p:>5} FAILED: {e:#}");
            failures.push(format!("model in {p}: {e:#}"));
        }
    }
    Ok(
        json!({"accuracy": rows, "timings": timings, "postprocess_model_outputs": post_rows, "preprocess_in_graph": pixel_rows, "profile": profile}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_undoes_a_row_permutation_within_each_image() {
        // Two images of three queries, two classes; image 1's rows come back rotated.
        let want_boxes: Vec<f32> = (0..6)
            .flat_map(|i| [0.1 * i as f32, 0.2, 0.3, 0.4])
            .collect();
        let want_logits: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let order = [0usize, 1, 2, 4, 5, 3];
        let got_boxes: Vec<f32> = order
            .iter()
            .flat_map(|&i| want_boxes[i * 4..i * 4 + 4].to_vec())
            .collect();
        let got_logits: Vec<f32> = order
            .iter()
            .flat_map(|&i| want_logits[i * 2..i * 2 + 2].to_vec())
            .collect();
        let (l, b, moved) = align((&got_logits, &got_boxes), &want_boxes, 3, 2);
        assert_eq!(l, want_logits);
        assert_eq!(b, want_boxes);
        assert_eq!(moved, 3);
    }

    #[test]
    fn per_image_counts_a_query_that_only_one_side_selected() {
        // Two images of three queries, one class. Image 1's last query was swapped for a
        // box far from every other; image 0 matches exactly.
        let boxes = |far: f32| -> Vec<f32> {
            [0.1, 0.4, 0.7, 0.1, 0.4, far]
                .iter()
                .flat_map(|&c| [c, c, 0.2, 0.2])
                .collect()
        };
        let want = Outputs {
            logits: vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
            boxes: boxes(0.7),
        };
        let got = Outputs {
            logits: vec![1.0, 2.0, 3.0, 1.0, 2.0, -3.0],
            boxes: boxes(0.95),
        };
        let rows = per_image(&got, &want, 3, 1);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].0, rows[0].1, rows[0].2), (0.0, 0.0, 0));
        assert_eq!(rows[1].2, 1, "one row without a partner in image 1");
        assert!(rows[1].0 > 0.5 && rows[1].1 > 0.1);
    }
}
