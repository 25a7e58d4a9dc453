//! Preprocessing inside the D-FINE graph (8-bit pixels in, detection rows out) against
//! preprocessing as a separate step (`GpuPreprocessor` into the post-processing graph's
//! input, today's `detect_images_post`): the same kernels in the same order, so the
//! rows must be bit-identical. Also checks that `detect_images_post` picks the graph
//! for images of one size and falls back for mixed sizes with the same detections.

use anyhow::Context;
use aperture_cuda::preprocess::check::test_image;
use aperture_cuda::preprocess::{GpuPreprocessor, PreprocessSpec};
use aperture_engine::Precision;
use aperture_models::dfine::Detection;
use aperture_vision::RgbImage;
use serde_json::{json, Value};

use crate::gpu_runner::{detections_from_rows, GraphDFine, PreprocessPath};

/// The batches compared: (name, (width, height) of each image).
pub fn cases() -> Vec<(&'static str, Vec<(u32, u32)>)> {
    vec![
        ("2 images 640x480", vec![(640, 480); 2]),
        ("1 image 500x333", vec![(500, 333)]),
    ]
}

/// Where two row sets first differ, and how many values do: `None` when every value
/// has the same bits (and the lengths agree).
pub fn first_difference(got: &[f32], want: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values vs {}", got.len(), want.len()));
    }
    let differ: Vec<usize> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
        .map(|(i, _)| i)
        .collect();
    let &i = differ.first()?;
    Some(format!(
        "{} of {} values differ, first at row {} value {}: {} vs {}",
        differ.len(),
        want.len(),
        i / 6,
        i % 6,
        got[i],
        want[i]
    ))
}

/// Whether two images' detections are the same bit for bit.
pub fn same_detections(a: &[Vec<Detection>], b: &[Vec<Detection>]) -> bool {
    let same = |x: &Detection, y: &Detection| {
        x.label == y.label
            && x.score.to_bits() == y.score.to_bits()
            && x.bbox
                .iter()
                .zip(&y.bbox)
                .all(|(p, q)| p.to_bits() == q.to_bits())
    };
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(d, e)| same(d, e)))
}

fn images(sizes: &[(u32, u32)]) -> Vec<RgbImage> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| test_image(w, h, 11 + i as u32))
        .collect()
}

/// Runs every case through both paths on `graph`'s model in precision `p`.
pub fn check(
    graph: &GraphDFine,
    spec: &PreprocessSpec,
    p: Precision,
    failures: &mut Vec<String>,
) -> anyhow::Result<Vec<Value>> {
    // check-dfine runs every model on GPU 0.
    let pre = GpuPreprocessor::new(0).context("opening the GPU preprocessor")?;
    let mut rows = Vec::new();
    let all = f32::NEG_INFINITY;
    for (name, sizes) in cases() {
        let imgs = images(&sizes);
        let refs: Vec<&RgbImage> = imgs.iter().collect();
        let hw: Vec<(u32, u32)> = sizes.iter().map(|&(w, h)| (h, w)).collect();
        let separate = graph.detection_rows(&pre, &refs, spec, PreprocessPath::SeparateStep)?;
        let in_graph = graph.detection_rows(&pre, &refs, spec, PreprocessPath::InGraph)?;
        let diff = first_difference(&in_graph, &separate);
        // The public entry point must take the graph and give the same detections.
        let served = graph.detect_images_post(&pre, &refs, spec, all)?;
        let same = same_detections(&served, &detections_from_rows(&separate, &hw, all)?);
        let pass = diff.is_none() && same;
        println!(
            "{p:>5} preprocessing in the graph vs separate step, {name}: {} rows {}{}",
            separate.len() / 6,
            match &diff {
                None => "bit-identical",
                Some(_) => "DIFFER",
            },
            if pass { " ok" } else { " FAIL" }
        );
        if let Some(d) = &diff {
            failures.push(format!("{p} preprocessing in the graph, {name}: {d}"));
        }
        if !same {
            failures.push(format!(
                "{p} detect_images_post, {name}: detections differ from the separate step's"
            ));
        }
        rows.push(json!({"precision": p.to_string(), "case": name, "rows": separate.len() / 6, "bit_identical": diff.is_none(), "detect_images_post_same": same, "pass": pass}));
    }
    // Mixed sizes cannot share a pixel graph: detect_images_post falls back to the
    // separate step (same detections as that path asked for directly).
    let mixed = images(&[(640, 480), (500, 333)]);
    let refs: Vec<&RgbImage> = mixed.iter().collect();
    let hw = [(480, 640), (333, 500)];
    let served = graph.detect_images_post(&pre, &refs, spec, all)?;
    let separate = graph.detection_rows(&pre, &refs, spec, PreprocessPath::SeparateStep)?;
    let same = same_detections(&served, &detections_from_rows(&separate, &hw, all)?);
    let refused = graph
        .detection_rows(&pre, &refs, spec, PreprocessPath::InGraph)
        .is_err();
    let pass = same && refused;
    println!(
        "{p:>5} mixed sizes 640x480 + 500x333 fall back to the separate step: {}",
        if pass { "ok" } else { "FAIL" }
    );
    if !pass {
        failures.push(format!(
            "{p} mixed sizes: fallback detections same {same}, in-graph path refused {refused}"
        ));
    }
    rows.push(json!({"precision": p.to_string(), "case": "mixed sizes fall back", "pass": pass}));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_counted_by_bits() {
        let a = vec![0.0f32; 12];
        assert_eq!(first_difference(&a, &a), None);
        let mut b = a.clone();
        b[7] = -0.0; // equal as floats, not as bits
        let d = first_difference(&b, &a).unwrap();
        assert!(
            d.starts_with("1 of 12 values differ, first at row 1 value 1"),
            "{d}"
        );
        assert!(first_difference(&a[..6], &a)
            .unwrap()
            .contains("6 values vs 12"));
    }

    #[test]
    fn detections_compare_bit_for_bit() {
        let d = |score: f32| Detection {
            score,
            label: 3,
            bbox: [1.0, 2.0, 3.0, 4.0],
        };
        let a = vec![vec![d(0.5)], vec![]];
        assert!(same_detections(&a, &a.clone()));
        assert!(!same_detections(&a, &[vec![d(0.5000001)], vec![]]));
        assert!(!same_detections(&a, &a[..1]));
        assert!(!same_detections(&a, &[vec![], vec![]]));
    }

    #[test]
    fn cases_have_one_size_per_batch() {
        for (name, sizes) in cases() {
            assert!(!sizes.is_empty(), "{name}");
            assert!(sizes.iter().all(|&s| s == sizes[0]), "{name}");
        }
    }
}
