//! Precision/recall over all images of a category: pycocotools' `accumulate`.

use crate::match_image::GroupEval;
use crate::params::Params;

/// pycocotools adds `np.spacing(1)` to the precision denominator.
const EPS: f64 = f64::EPSILON;

/// The `precision[T, R, K, A, M]` and `recall[T, K, A, M]` arrays of pycocotools' `eval`,
/// flattened in C order. `-1` marks an absent category (no ground truth that counts).
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulated {
    /// Sizes `[T, R, K, A, M]`: IoU thresholds, recall points, categories, area ranges, maxDets.
    pub dims: [usize; 5],
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
}

impl Accumulated {
    fn new(dims: [usize; 5]) -> Self {
        let [t, r, k, a, m] = dims;
        Accumulated {
            dims,
            precision: vec![-1.0; t * r * k * a * m],
            recall: vec![-1.0; t * k * a * m],
        }
    }

    /// Flat index of `precision[t, r, k, a, m]`.
    pub fn precision_index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        let [_, rn, kn, an, mn] = self.dims;
        (((t * rn + r) * kn + k) * an + a) * mn + m
    }

    /// Flat index of `recall[t, k, a, m]`.
    pub fn recall_index(&self, t: usize, k: usize, a: usize, m: usize) -> usize {
        let [_, _, kn, an, mn] = self.dims;
        ((t * kn + k) * an + a) * mn + m
    }
}

/// `per_category[k]` holds the evaluated (image, category) pairs of category `k`, in image order.
pub(crate) fn accumulate(per_category: &[Vec<GroupEval>], p: &Params) -> Accumulated {
    let dims = [
        p.iou_thresholds.len(),
        p.recall_thresholds.len(),
        per_category.len(),
        p.area_ranges.len(),
        p.max_dets.len(),
    ];
    let mut acc = Accumulated::new(dims);
    let mut rc = Vec::new();
    let mut pr = Vec::new();
    for (k, groups) in per_category.iter().enumerate() {
        for a in 0..dims[3] {
            let num_gt: usize = groups
                .iter()
                .filter_map(|g| g.per_area.get(a))
                .map(|e| e.num_gt)
                .sum();
            if groups.is_empty() || num_gt == 0 {
                continue;
            }
            for (m, &max_det) in p.max_dets.iter().enumerate() {
                // (score, group, detection) for the top `max_det` of every image.
                let mut entries: Vec<(f64, usize, usize)> = groups
                    .iter()
                    .enumerate()
                    .flat_map(|(gi, g)| {
                        g.scores
                            .iter()
                            .take(max_det)
                            .enumerate()
                            .map(move |(d, &s)| (s, gi, d))
                    })
                    .collect();
                // Stable, like numpy's mergesort: ties keep image order, then rank order.
                entries.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal));
                for t in 0..dims[0] {
                    curve(&entries, groups, a, t, num_gt, &mut rc, &mut pr);
                    let recall_i = acc.recall_index(t, k, a, m);
                    acc.recall[recall_i] = rc.last().copied().unwrap_or(0.0);
                    // Monotone envelope from the right.
                    for i in (1..pr.len()).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &thr) in p.recall_thresholds.iter().enumerate() {
                        // np.searchsorted(rc, thr, side='left'); past the end the rest stays 0.
                        let pi = rc.partition_point(|&x| x < thr);
                        let value = pr.get(pi).copied().unwrap_or(0.0);
                        let idx = acc.precision_index(t, r, k, a, m);
                        acc.precision[idx] = value;
                    }
                }
            }
        }
    }
    acc
}

/// Recall and precision after each detection, for IoU threshold `t` and area range `a`.
fn curve(
    entries: &[(f64, usize, usize)],
    groups: &[GroupEval],
    a: usize,
    t: usize,
    num_gt: usize,
    rc: &mut Vec<f64>,
    pr: &mut Vec<f64>,
) {
    rc.clear();
    pr.clear();
    let (mut tp, mut fp) = (0u64, 0u64);
    for &(_, gi, d) in entries {
        let g = &groups[gi];
        let e = &g.per_area[a];
        let i = t * g.scores.len() + d;
        if !e.ignored[i] {
            if e.matched[i] {
                tp += 1;
            } else {
                fp += 1;
            }
        }
        let (tpf, fpf) = (tp as f64, fp as f64);
        rc.push(tpf / num_gt as f64);
        pr.push(tpf / (fpf + tpf + EPS));
    }
}
