//! Accuracy against fp32: image error (relative L1/L2, PSNR) for Restormer; for
//! D-FINE, mAP of a variant's detections scored with aperture_coco against the fp32
//! detections (self-consistency) or against a COCO ground truth.

use aperture_coco::{evaluate, Category, Detection, GroundTruth, GtAnnotation, Image, Params};
use aperture_models::dfine::Detection as Found;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageError {
    pub rel_l1: f64,
    pub rel_l2: f64,
    /// Peak signal 1.0 (images in [0, 1]); infinite when identical.
    pub psnr_db: f64,
}

pub fn image_error(out: &[f32], reference: &[f32]) -> ImageError {
    let (mut d1, mut r1, mut d2, mut r2) = (0f64, 0f64, 0f64, 0f64);
    for (a, b) in out.iter().zip(reference) {
        let (a, b) = (f64::from(*a), f64::from(*b));
        d1 += (a - b).abs();
        r1 += b.abs();
        d2 += (a - b) * (a - b);
        r2 += b * b;
    }
    let n = out.len().min(reference.len()).max(1) as f64;
    let ratio = |d: f64, r: f64| if r > 0.0 { d / r } else { d };
    let mse = d2 / n;
    ImageError {
        rel_l1: ratio(d1, r1),
        rel_l2: ratio(d2.sqrt(), r2.sqrt()),
        psnr_db: if mse > 0.0 {
            10.0 * (1.0 / mse).log10()
        } else {
            f64::INFINITY
        },
    }
}

/// Score above which an fp32 detection counts as ground truth for self-consistency.
pub const CONSISTENCY_SCORE: f32 = 0.5;

fn xywh(b: [f32; 4]) -> [f64; 4] {
    let b = b.map(f64::from);
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// A box with positive width and height. Untrained weights also predict inverted boxes
/// (x1 < x0), whose COCO IoU with themselves is 0: scored, they would count as misses
/// of identical outputs, so self-consistency leaves them out on both sides.
fn proper(d: &&Found) -> bool {
    d.bbox[2] > d.bbox[0] && d.bbox[3] > d.bbox[1]
}

/// The fp32 detections (score >= [`CONSISTENCY_SCORE`], at most the 100 best per image,
/// or the 10 best when none reaches it, as with random weights) as a ground truth,
/// labels as categories.
fn reference_truth(reference: &[Vec<Found>]) -> GroundTruth {
    let confident = reference
        .iter()
        .flatten()
        .filter(proper)
        .any(|d| d.score >= CONSISTENCY_SCORE);
    let mut gt = GroundTruth::default();
    let mut labels = Vec::new();
    for (i, dets) in reference.iter().enumerate() {
        gt.images.push(Image {
            id: i as i64,
            file_name: None,
            width: None,
            height: None,
        });
        let mut kept: Vec<&Found> = dets
            .iter()
            .filter(proper)
            .filter(|d| !confident || d.score >= CONSISTENCY_SCORE)
            .collect();
        // COCO scores at most 100 detections per image: a reference with more could
        // never be matched in full, even by itself.
        kept.sort_by(|a, b| b.score.total_cmp(&a.score));
        kept.truncate(if confident { 100 } else { 10 });
        for d in kept {
            let bbox = xywh(d.bbox);
            gt.annotations.push(GtAnnotation {
                id: gt.annotations.len() as i64 + 1,
                image_id: i as i64,
                category_id: d.label as i64,
                bbox,
                area: bbox[2] * bbox[3],
                iscrowd: false,
            });
            if !labels.contains(&d.label) {
                labels.push(d.label);
            }
        }
    }
    labels.sort_unstable();
    gt.categories = labels
        .into_iter()
        .map(|l| Category {
            id: l as i64,
            name: l.to_string(),
        })
        .collect();
    gt
}

/// (mAP@50, mAP@50:95) of `variant` against the fp32 `reference`, image by image;
/// `None` when the reference has no detection to score against.
pub fn self_consistency(
    reference: &[Vec<Found>],
    variant: &[Vec<Found>],
) -> anyhow::Result<Option<(f64, f64)>> {
    let gt = reference_truth(reference);
    if gt.annotations.is_empty() {
        return Ok(None);
    }
    let dets: Vec<Detection> = variant
        .iter()
        .enumerate()
        .flat_map(|(i, ds)| {
            ds.iter().filter(proper).map(move |d| Detection {
                image_id: i as i64,
                category_id: d.label as i64,
                bbox: xywh(d.bbox),
                score: f64::from(d.score),
            })
        })
        .collect();
    let r = evaluate(&gt, &dets, &Params::default())?;
    Ok(Some((r.map50(), r.map())))
}

/// (mAP@50, mAP@50:95) against a COCO ground truth; `image_ids[i]` is the id of the
/// i-th image in `variant`; labels map to COCO category ids.
pub fn true_map(
    gt: &GroundTruth,
    image_ids: &[i64],
    variant: &[Vec<Found>],
) -> anyhow::Result<(f64, f64)> {
    let dets: Vec<Detection> = image_ids
        .iter()
        .zip(variant)
        .flat_map(|(id, ds)| {
            ds.iter().filter_map(move |d| {
                Detection::from_label_xyxy(*id, d.label, d.bbox.map(f64::from), f64::from(d.score))
            })
        })
        .collect();
    let r = evaluate(gt, &dets, &Params::default())?;
    Ok((r.map50(), r.map()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_have_no_error() {
        let e = image_error(&[0.5, 0.25], &[0.5, 0.25]);
        assert_eq!((e.rel_l1, e.rel_l2), (0.0, 0.0));
        assert!(e.psnr_db.is_infinite());
        let e = image_error(&[0.6, 0.25], &[0.5, 0.25]);
        assert!((e.rel_l1 - 0.1 / 0.75).abs() < 1e-6);
        // MSE 0.005 -> 23.01 dB.
        assert!((e.psnr_db - 23.0103).abs() < 1e-3, "{}", e.psnr_db);
    }

    #[test]
    fn detections_agree_with_themselves() {
        let d = |score, label, x: f32| Found {
            score,
            label,
            bbox: [x, x, x + 20.0, x + 30.0],
        };
        let reference = vec![vec![d(0.9, 1, 10.0), d(0.8, 2, 50.0), d(0.1, 3, 80.0)]];
        let (m50, m) = self_consistency(&reference, &reference).unwrap().unwrap();
        assert!(m50 > 0.99 && m > 0.99, "{m50} {m}");
        let shifted = vec![vec![d(0.9, 1, 10.0), d(0.8, 2, 60.0)]];
        let (m50, _) = self_consistency(&reference, &shifted).unwrap().unwrap();
        assert!(m50 < 0.6, "{m50}");
    }

    #[test]
    fn many_confident_or_inverted_detections_still_agree_with_themselves() {
        // 300 confident detections of one class (as untrained weights give), one of them
        // inverted: COCO scores 100 per image and an inverted box never matches itself.
        let mut dets: Vec<Found> = (0..300)
            .map(|i| Found {
                score: 0.9 - i as f32 * 1e-4,
                label: 7,
                bbox: [i as f32, 0.0, i as f32 + 5.0, 8.0],
            })
            .collect();
        dets[3].bbox = [50.0, 50.0, 40.0, 40.0];
        let reference = vec![dets];
        let (m50, m) = self_consistency(&reference, &reference).unwrap().unwrap();
        assert!(m50 > 0.999 && m > 0.999, "{m50} {m}");
    }
}
