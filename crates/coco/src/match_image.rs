//! Matching detections to ground truth within one (image, category) pair:
//! pycocotools' `computeIoU` + `evaluateImg` for bounding boxes.

use crate::params::AreaRange;

/// A ground-truth box as matching sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GtBox {
    pub id: i64,
    pub bbox: [f64; 4],
    pub area: f64,
    pub crowd: bool,
}

/// A detection as matching sees it (`area = w * h`, as pycocotools' `loadRes` sets it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DtBox {
    pub bbox: [f64; 4],
    pub area: f64,
}

/// Matching outcome of one area range; `T x D` flags stored row-major by IoU threshold.
#[derive(Debug, Clone, Default)]
pub(crate) struct AreaEval {
    /// The detection counts as matched (pycocotools: `dtMatches != 0`).
    pub matched: Vec<bool>,
    /// The detection is ignored (matched to an ignored box, or unmatched and outside the area range).
    pub ignored: Vec<bool>,
    /// Ground-truth boxes that are not ignored in this area range.
    pub num_gt: usize,
}

/// All area ranges of one (image, category) pair.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupEval {
    /// Scores of the kept detections, highest first.
    pub scores: Vec<f64>,
    pub per_area: Vec<AreaEval>,
}

/// IoU of a detection and a ground-truth box, in the operation order of cocoapi's `bbIou`.
/// For a crowd box the union is the detection's own area.
pub fn bbox_iou(dt: &[f64; 4], gt: &[f64; 4], gt_is_crowd: bool) -> f64 {
    let gt_area = gt[2] * gt[3];
    let dt_area = dt[2] * dt[3];
    let w = (dt[2] + dt[0]).min(gt[2] + gt[0]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[3] + dt[1]).min(gt[3] + gt[1]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let union = if gt_is_crowd {
        dt_area
    } else {
        dt_area + gt_area - inter
    };
    inter / union
}

/// Evaluate one (image, category) pair.
///
/// `dts` must already be sorted by descending score (stable) and cut to the largest maxDets.
pub(crate) fn evaluate_group(
    gts: &[GtBox],
    dts: &[DtBox],
    scores: Vec<f64>,
    iou_thresholds: &[f64],
    area_ranges: &[AreaRange],
) -> GroupEval {
    let (g_len, d_len) = (gts.len(), dts.len());
    // pycocotools returns an empty IoU matrix when either side is empty: nothing matches.
    let ious: Vec<f64> = if g_len == 0 || d_len == 0 {
        Vec::new()
    } else {
        dts.iter()
            .flat_map(|d| gts.iter().map(move |g| bbox_iou(&d.bbox, &g.bbox, g.crowd)))
            .collect()
    };
    let per_area = area_ranges
        .iter()
        .map(|range| evaluate_area(gts, dts, &ious, iou_thresholds, range))
        .collect();
    GroupEval { scores, per_area }
}

fn evaluate_area(
    gts: &[GtBox],
    dts: &[DtBox],
    ious: &[f64],
    iou_thresholds: &[f64],
    range: &AreaRange,
) -> AreaEval {
    let (g_len, d_len, t_len) = (gts.len(), dts.len(), iou_thresholds.len());
    let outside = |area: f64| area < range.min || area > range.max;
    let gt_ignored: Vec<bool> = gts.iter().map(|g| g.crowd || outside(g.area)).collect();
    // Boxes that count come first; the stable sort keeps file order within each half.
    let mut order: Vec<usize> = (0..g_len).collect();
    order.sort_by_key(|&i| gt_ignored[i]);

    let mut gt_taken = vec![false; t_len * g_len];
    let mut matched = vec![false; t_len * d_len];
    let mut ignored = vec![false; t_len * d_len];
    if !ious.is_empty() {
        for (ti, &thr) in iou_thresholds.iter().enumerate() {
            let taken = &mut gt_taken[ti * g_len..(ti + 1) * g_len];
            for d in 0..d_len {
                let mut best = thr.min(1.0 - 1e-10);
                let mut found: Option<usize> = None;
                for (pos, &g) in order.iter().enumerate() {
                    if taken[pos] && !gts[g].crowd {
                        continue;
                    }
                    // Once matched to a counted box, ignored boxes cannot take over.
                    if let Some(m) = found {
                        if !gt_ignored[order[m]] && gt_ignored[g] {
                            break;
                        }
                    }
                    let iou = ious[d * g_len + g];
                    if iou < best {
                        continue;
                    }
                    best = iou;
                    found = Some(pos);
                }
                if let Some(m) = found {
                    let g = order[m];
                    ignored[ti * d_len + d] = gt_ignored[g];
                    // pycocotools stores the matched box's id; an id of 0 reads as "unmatched".
                    matched[ti * d_len + d] = gts[g].id != 0;
                    taken[m] = true;
                }
            }
        }
    }
    for (d, dt) in dts.iter().enumerate() {
        if outside(dt.area) {
            for ti in 0..t_len {
                let i = ti * d_len + d;
                ignored[i] = ignored[i] || !matched[i];
            }
        }
    }
    AreaEval {
        matched,
        ignored,
        num_gt: gt_ignored.iter().filter(|&&ig| !ig).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_known_boxes() {
        // 10x10 boxes overlapping in a 5x10 strip: 50 / (100 + 100 - 50).
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [5.0, 0.0, 10.0, 10.0];
        assert_eq!(bbox_iou(&a, &b, false), 50.0 / 150.0);
        // Crowd: intersection over the detection's area.
        assert_eq!(bbox_iou(&a, &b, true), 0.5);
        // Touching edges do not overlap.
        assert_eq!(bbox_iou(&a, &[10.0, 0.0, 5.0, 5.0], false), 0.0);
    }

    #[test]
    fn crowd_box_absorbs_many_detections_and_is_ignored() {
        let all = AreaRange {
            label: "all".into(),
            min: 0.0,
            max: 1e10,
        };
        let gts = [
            GtBox {
                id: 1,
                bbox: [0.0, 0.0, 10.0, 10.0],
                area: 100.0,
                crowd: false,
            },
            GtBox {
                id: 2,
                bbox: [100.0, 100.0, 50.0, 50.0],
                area: 2500.0,
                crowd: true,
            },
        ];
        let dts = [
            DtBox {
                bbox: [0.0, 0.0, 10.0, 10.0],
                area: 100.0,
            },
            DtBox {
                bbox: [0.0, 0.0, 10.0, 10.0],
                area: 100.0,
            },
            DtBox {
                bbox: [110.0, 110.0, 10.0, 10.0],
                area: 100.0,
            },
            DtBox {
                bbox: [120.0, 120.0, 10.0, 10.0],
                area: 100.0,
            },
        ];
        let e = evaluate_group(&gts, &dts, vec![0.9, 0.8, 0.7, 0.6], &[0.5], &[all]);
        let a = &e.per_area[0];
        assert_eq!(a.num_gt, 1);
        // First detection takes the box; the duplicate is a false positive.
        assert_eq!(a.matched, vec![true, false, true, true]);
        assert_eq!(a.ignored, vec![false, false, true, true]);
    }
}
