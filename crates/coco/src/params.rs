//! Evaluation parameters; the defaults are pycocotools' `Params(iouType='bbox')`.

use crate::error::{CocoError, Result};

/// A range of object areas (in square pixels), both ends included.
#[derive(Debug, Clone, PartialEq)]
pub struct AreaRange {
    pub label: String,
    pub min: f64,
    pub max: f64,
}

/// What to evaluate and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Images to evaluate; `None` means every image of the ground truth.
    pub image_ids: Option<Vec<i64>>,
    /// Categories to evaluate; `None` means every category of the ground truth.
    pub category_ids: Option<Vec<i64>>,
    /// IoU thresholds, `[0.5, 0.55, ..., 0.95]` by default.
    pub iou_thresholds: Vec<f64>,
    /// Recall points of the interpolated precision, `[0, 0.01, ..., 1]` by default.
    pub recall_thresholds: Vec<f64>,
    /// Detections kept per image and category, `[1, 10, 100]` by default.
    pub max_dets: Vec<usize>,
    /// `all`, `small`, `medium`, `large` by default.
    pub area_ranges: Vec<AreaRange>,
}

/// `numpy.linspace(start, stop, num)` with numpy's rounding: `i * step + start`, last = `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

impl Default for Params {
    fn default() -> Self {
        let range = |label: &str, min: f64, max: f64| AreaRange {
            label: label.to_string(),
            min,
            max,
        };
        Params {
            image_ids: None,
            category_ids: None,
            iou_thresholds: linspace(0.5, 0.95, 10),
            recall_thresholds: linspace(0.0, 1.0, 101),
            max_dets: vec![1, 10, 100],
            area_ranges: vec![
                range("all", 0.0, 1e10),
                range("small", 0.0, 1024.0),
                range("medium", 1024.0, 9216.0),
                range("large", 9216.0, 1e10),
            ],
        }
    }
}

impl Params {
    /// Check the parameters and put them in the form evaluation uses (max_dets sorted).
    pub(crate) fn normalized(&self) -> Result<Params> {
        let bad = |m: &str| Err(CocoError::InvalidParams(m.to_string()));
        if self.iou_thresholds.is_empty() || self.iou_thresholds.iter().any(|t| !t.is_finite()) {
            return bad("iou_thresholds must be a non-empty list of finite numbers");
        }
        if self.recall_thresholds.is_empty()
            || self.recall_thresholds.iter().any(|t| !t.is_finite())
            || self.recall_thresholds.windows(2).any(|w| w[0] > w[1])
        {
            return bad("recall_thresholds must be a non-empty, ascending list of finite numbers");
        }
        if self.area_ranges.is_empty() {
            return bad("area_ranges must not be empty");
        }
        let mut p = self.clone();
        p.max_dets.sort_unstable();
        if p.max_dets.len() < 3 || p.max_dets.first() == Some(&0) {
            return bad("max_dets needs at least three positive values (the summary uses three)");
        }
        Ok(p)
    }

    /// Index of the area range with this label.
    pub fn area_index(&self, label: &str) -> Option<usize> {
        self.area_ranges.iter().position(|a| a.label == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_numpy_linspace() {
        let p = Params::default();
        // Values printed by numpy 2.x: np.linspace(.5, .95, 10).tolist().
        let numpy_iou = [
            0.5,
            0.55,
            0.6,
            0.65,
            0.7,
            0.75,
            0.8,
            0.85,
            0.8999999999999999,
            0.95,
        ];
        assert_eq!(p.iou_thresholds, numpy_iou);
        assert_eq!(p.recall_thresholds.len(), 101);
        // np.linspace(0, 1, 101)[35], [57], [94], [95] carry rounding of i * 0.01.
        assert_eq!(p.recall_thresholds[35], 0.35000000000000003);
        assert_eq!(p.recall_thresholds[57], 0.5700000000000001);
        assert_eq!(p.recall_thresholds[95], 0.9500000000000001);
        assert_eq!(p.recall_thresholds[100], 1.0);
    }

    #[test]
    fn rejects_bad_params() {
        let p = Params {
            max_dets: vec![100],
            ..Params::default()
        };
        assert!(p.normalized().is_err());
        let p = Params {
            iou_thresholds: vec![],
            ..Params::default()
        };
        assert!(p.normalized().is_err());
    }
}
