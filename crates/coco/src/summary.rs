//! The 12 standard COCO numbers: pycocotools' `summarize()`, averaged the way numpy does.

use crate::accumulate::Accumulated;
use crate::params::Params;

/// What each of the 12 stats measures: (AP?, IoU threshold, area label, which maxDets).
#[derive(Debug, Clone, Copy)]
struct StatSpec {
    ap: bool,
    iou: Option<f64>,
    area: &'static str,
    max_det: MaxDet,
}

#[derive(Debug, Clone, Copy)]
enum MaxDet {
    /// A fixed number (pycocotools' default argument 100 for the first stat).
    Fixed(usize),
    /// `params.maxDets[i]`.
    Nth(usize),
}

const SPECS: [StatSpec; 12] = {
    const fn s(ap: bool, iou: Option<f64>, area: &'static str, max_det: MaxDet) -> StatSpec {
        StatSpec {
            ap,
            iou,
            area,
            max_det,
        }
    }
    use MaxDet::{Fixed, Nth};
    [
        s(true, None, "all", Fixed(100)),
        s(true, Some(0.5), "all", Nth(2)),
        s(true, Some(0.75), "all", Nth(2)),
        s(true, None, "small", Nth(2)),
        s(true, None, "medium", Nth(2)),
        s(true, None, "large", Nth(2)),
        s(false, None, "all", Nth(0)),
        s(false, None, "all", Nth(1)),
        s(false, None, "all", Nth(2)),
        s(false, None, "small", Nth(2)),
        s(false, None, "medium", Nth(2)),
        s(false, None, "large", Nth(2)),
    ]
};

/// Short names of the 12 stats, in order.
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

/// numpy's pairwise summation (`pairwise_sum_DOUBLE`), so means agree bit for bit.
fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let end = n - n % 8;
        let mut i = 8;
        while i < end {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[end..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// `np.mean` of the values that are not -1, or -1 when there are none.
pub(crate) fn mean_present(values: &[f64]) -> f64 {
    let present: Vec<f64> = values.iter().copied().filter(|&v| v > -1.0).collect();
    if present.is_empty() {
        -1.0
    } else {
        (0.0 + pairwise_sum(&present)) / present.len() as f64
    }
}

fn max_det_value(p: &Params, m: MaxDet) -> Option<usize> {
    match m {
        MaxDet::Fixed(v) => Some(v),
        MaxDet::Nth(i) => p.max_dets.get(i).copied(),
    }
}

fn summarize_one(acc: &Accumulated, p: &Params, spec: &StatSpec) -> f64 {
    let [t_len, r_len, k_len, _, _] = acc.dims;
    let thresholds: Vec<usize> = (0..t_len)
        .filter(|&t| match spec.iou {
            None => true,
            Some(v) => p.iou_thresholds[t] == v,
        })
        .collect();
    let areas: Vec<usize> = (0..p.area_ranges.len())
        .filter(|&a| p.area_ranges[a].label == spec.area)
        .collect();
    let want = max_det_value(p, spec.max_det);
    let dets: Vec<usize> = (0..p.max_dets.len())
        .filter(|&m| Some(p.max_dets[m]) == want)
        .collect();
    let mut values = Vec::new();
    for &t in &thresholds {
        for &a in &areas {
            for &m in &dets {
                if spec.ap {
                    for r in 0..r_len {
                        for k in 0..k_len {
                            values.push(acc.precision[acc.precision_index(t, r, k, a, m)]);
                        }
                    }
                } else {
                    for k in 0..k_len {
                        values.push(acc.recall[acc.recall_index(t, k, a, m)]);
                    }
                }
            }
        }
    }
    mean_present(&values)
}

/// The 12 stats of `COCOeval.summarize()` for bounding boxes.
pub(crate) fn summarize(acc: &Accumulated, p: &Params) -> [f64; 12] {
    let mut stats = [0.0; 12];
    for (s, spec) in stats.iter_mut().zip(SPECS.iter()) {
        *s = summarize_one(acc, p, spec);
    }
    stats
}

/// The lines `summarize()` prints, e.g.
/// ` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.505`.
pub(crate) fn summary_lines(stats: &[f64; 12], p: &Params) -> Vec<String> {
    let first = p.iou_thresholds.first().copied().unwrap_or(f64::NAN);
    let last = p.iou_thresholds.last().copied().unwrap_or(f64::NAN);
    SPECS
        .iter()
        .zip(stats)
        .map(|(spec, value)| {
            let (title, kind) = if spec.ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            let iou = match spec.iou {
                Some(v) => format!("{v:.2}"),
                None => format!("{first:.2}:{last:.2}"),
            };
            let max_det = max_det_value(p, spec.max_det).unwrap_or(0);
            format!(
                " {title:<18} {kind} @[ IoU={iou:<9} | area={:>6} | maxDets={max_det:>3} ] = {value:.3}",
                spec.area
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_matches_plain_sum_on_exact_values() {
        // Small integers sum exactly in any order: checks the block logic covers every element.
        for n in [0usize, 1, 7, 8, 9, 127, 128, 129, 300, 1000, 8193] {
            let v: Vec<f64> = (0..n).map(|i| (i % 17) as f64).collect();
            let expected: f64 = (0..n).map(|i| (i % 17) as f64).sum();
            assert_eq!(pairwise_sum(&v), expected, "n = {n}");
        }
    }

    #[test]
    fn mean_skips_absent() {
        assert_eq!(mean_present(&[-1.0, 0.5, 1.0, -1.0]), 0.75);
        assert_eq!(mean_present(&[-1.0, -1.0]), -1.0);
        assert_eq!(mean_present(&[]), -1.0);
    }

    #[test]
    fn line_format() {
        let p = Params::default();
        let mut stats = [0.0; 12];
        stats[0] = 0.5046;
        stats[11] = -1.0;
        let lines = summary_lines(&stats, &p);
        assert_eq!(
            lines[0],
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.505"
        );
        assert_eq!(
            lines[1],
            " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 0.000"
        );
        assert_eq!(
            lines[11],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000"
        );
    }
}
