//! The dfine_x_coco shapes against transformers. The weights (~250 MB) are not in git:
//! `tests/fixtures/dfine/x/manifest.json` says how `tools/dfine_golden.py` filled every
//! tensor (SplitMix64 over the tensor's name), and this test rebuilds them bit-exactly.
//! About 10 s in a debug build (~200 GFLOP):
//! `cargo test -p aperture-models dfine_x -- --nocapture`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, HostTensor};
use serde_json::Value;

use super::*;

#[test]
fn dfine_x_matches_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dfine/x");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let config =
        DFineConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let t = Instant::now();
    let snap = DFineSnapshot {
        config,
        processor: ImageProcessorConfig::default(),
        weights: golden::materialize(&manifest).unwrap(),
    };
    let runner = DFineRunner::new(CpuBackend::new(), &snap, 0).unwrap();
    eprintln!("weights rebuilt and prepared in {:.2?}", t.elapsed());
    let pixels = HostTensor::from_f32(
        vec![1, 3, 640, 640],
        golden::fill("pixel_values", 3 * 640 * 640, 0.0, 1.0),
    )
    .unwrap();
    let g = aperture_weights::load(&dir.join("golden.safetensors")).unwrap();
    let mut timings = Vec::new();
    let mut out = None;
    for _ in 0..2 {
        let t = Instant::now();
        out = Some(runner.detect(&pixels).unwrap());
        timings.push(t.elapsed());
    }
    let (logits, boxes) = out.unwrap();
    if let Ok(path) = std::env::var("DFINE_X_DUMP") {
        let mut t = BTreeMap::new();
        t.insert("logits".to_string(), logits.clone());
        t.insert("pred_boxes".to_string(), boxes.clone());
        aperture_weights::save_safetensors(std::path::Path::new(&path), &t).unwrap();
    }
    let (gl, gb) = (
        g.get("logits").unwrap().to_f32_vec(),
        g.get("pred_boxes").unwrap().to_f32_vec(),
    );
    let raw = relative_l2(&logits.to_f32_vec(), &gl);
    // Query selection is a top-k over encoder scores; two scores 1 ulp apart can swap
    // places between PyTorch and us. Such queries are the same objects in another row
    // order, so rows are aligned first; only swaps of near-tied scores are accepted.
    let enc = g.get("out.enc_topk_logits").unwrap().to_f32_vec();
    let best: Vec<f32> = enc
        .chunks(80)
        .map(|r| r.iter().cloned().fold(f32::MIN, f32::max))
        .collect();
    let (ol, ob) = (logits.to_f32_vec(), boxes.to_f32_vec());
    let mut al = Vec::with_capacity(ol.len());
    let mut ab = Vec::with_capacity(ob.len());
    let mut moved = 0;
    for i in 0..300 {
        let dist = |j: usize| {
            (0..4)
                .map(|k| (ob[j * 4 + k] - gb[i * 4 + k]).abs())
                .fold(0f32, f32::max)
        };
        let j = (i.saturating_sub(3)..(i + 4).min(300))
            .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
            .unwrap();
        if j != i {
            moved += 1;
            assert!(
                (best[i] - best[j]).abs() <= 1e-5 * best[i].abs().max(1.0),
                "query {i} moved to {j} without a near-tie"
            );
        }
        al.extend_from_slice(&ol[j * 80..(j + 1) * 80]);
        ab.extend_from_slice(&ob[j * 4..(j + 1) * 4]);
    }
    let el = relative_l2(&al, &gl);
    let eb = relative_l2(&ab, &gb);
    eprintln!(
        "dfine_x 640x640 on {}: forward {timings:.2?}; relative L2 logits {el:.3e}, pred_boxes {eb:.3e} \
         ({moved} of 300 queries in another order, near-tied scores; before alignment logits {raw:.3e})",
        rayon_threads()
    );
    assert!(moved <= 6, "{moved} queries reordered");
    assert!(
        el <= 1e-4 && eb <= 1e-4,
        "relative L2: logits {el:e}, boxes {eb:e}"
    );
    let dets: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("detections.json")).unwrap())
            .unwrap();
    let img = &dets["images"][0];
    let ours = post_process(
        &logits.to_f32_vec(),
        &boxes.to_f32_vec(),
        80,
        dets["threshold"].as_f64().unwrap() as f32,
        (480, 640),
    )
    .unwrap();
    let labels: Vec<u64> = img["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mismatched = ours
        .iter()
        .zip(&labels)
        .filter(|(d, &l)| d.label as u64 != l)
        .count();
    assert_eq!(ours.len(), labels.len());
    assert_eq!(
        mismatched,
        0,
        "top-k labels differ at {mismatched} of {} places",
        labels.len()
    );
}

fn rayon_threads() -> String {
    format!(
        "{} threads",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}
