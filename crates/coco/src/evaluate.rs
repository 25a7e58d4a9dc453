//! Bounding-box evaluation end to end: grouping, matching, accumulation, summary.

use std::collections::HashMap;

use crate::accumulate::{accumulate, Accumulated};
use crate::dataset::{Detection, GroundTruth};
use crate::error::{CocoError, Result};
use crate::match_image::{evaluate_group, DtBox, GroupEval, GtBox};
use crate::params::Params;
use crate::summary::{mean_present, summarize, summary_lines, STAT_NAMES};

/// AP of one category, as users compute it from pycocotools' `eval['precision']`:
/// the mean of `precision[:, :, k, 0, -1]` (area `all`, largest maxDets) over values > -1.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryAp {
    pub category_id: i64,
    pub name: String,
    /// AP@[.5:.95]; `None` when the category has no ground truth that counts.
    pub ap: Option<f64>,
    /// AP at IoU 0.5 (`precision[0, :, k, 0, -1]`); `None` as above.
    pub ap50: Option<f64>,
}

/// Everything an evaluation produces.
#[derive(Debug, Clone)]
pub struct EvalResult {
    /// The 12 numbers of `COCOeval.summarize()`, in its order (see [`STAT_NAMES`]).
    pub stats: [f64; 12],
    /// One entry per evaluated category, by ascending category id.
    pub per_category: Vec<CategoryAp>,
    /// pycocotools' `precision` and `recall` arrays.
    pub accumulated: Accumulated,
    /// The parameters used, with max_dets sorted.
    pub params: Params,
    pub num_images: usize,
    /// Detections that took part (in an evaluated image and category).
    pub num_detections: usize,
    /// Detections left out: category not evaluated (not in the ground truth) or image not selected.
    pub num_skipped_detections: usize,
}

impl EvalResult {
    /// mAP@[.5:.95] (the first stat).
    pub fn map(&self) -> f64 {
        self.stats[0]
    }

    /// mAP@.5 (the second stat).
    pub fn map50(&self) -> f64 {
        self.stats[1]
    }

    /// The 12 lines pycocotools' `summarize()` prints.
    pub fn summary_lines(&self) -> Vec<String> {
        summary_lines(&self.stats, &self.params)
    }

    /// A JSON report: named stats, the 12 stats in order, per-category AP.
    pub fn to_json(&self) -> serde_json::Value {
        let named: serde_json::Map<String, serde_json::Value> = STAT_NAMES
            .iter()
            .zip(self.stats)
            .map(|(n, v)| (n.to_string(), v.into()))
            .collect();
        let per_category: Vec<serde_json::Value> = self
            .per_category
            .iter()
            .map(|c| {
                serde_json::json!({
                    "category_id": c.category_id,
                    "name": c.name,
                    "ap": c.ap,
                    "ap50": c.ap50,
                })
            })
            .collect();
        serde_json::json!({
            "stats": self.stats.to_vec(),
            "named_stats": named,
            "per_category": per_category,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "num_skipped_detections": self.num_skipped_detections,
        })
    }
}

/// Sorted, de-duplicated ids (`np.unique`).
fn unique_sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn check_detections(gt: &GroundTruth, dets: &[Detection]) -> Result<()> {
    let known: std::collections::HashSet<i64> = gt.images.iter().map(|im| im.id).collect();
    for (index, d) in dets.iter().enumerate() {
        let what = || format!("detection #{index}");
        if d.bbox.iter().any(|v| !v.is_finite()) {
            return Err(CocoError::NotFinite {
                what: what(),
                field: "bbox",
            });
        }
        if !d.score.is_finite() {
            return Err(CocoError::NotFinite {
                what: what(),
                field: "score",
            });
        }
        if !known.contains(&d.image_id) {
            return Err(CocoError::UnknownImage {
                index,
                image_id: d.image_id,
            });
        }
    }
    Ok(())
}

/// Ground-truth and detection indices of one (image, category) pair.
#[derive(Default)]
struct Group {
    gts: Vec<usize>,
    dts: Vec<usize>,
}

/// Evaluate detections against the ground truth exactly as pycocotools'
/// `COCOeval(gt, gt.loadRes(dets), 'bbox')` followed by `evaluate()`, `accumulate()`, `summarize()`.
///
/// Detections get `area = w * h` and are never crowd, as in `loadRes`. A detection for an
/// image the ground truth does not list is an error; an empty list is allowed here (all
/// categories with ground truth then score 0).
pub fn evaluate(gt: &GroundTruth, dets: &[Detection], params: &Params) -> Result<EvalResult> {
    let mut p = params.normalized()?;
    gt.validate()?;
    check_detections(gt, dets)?;

    let image_ids = unique_sorted(
        p.image_ids
            .clone()
            .unwrap_or_else(|| gt.images.iter().map(|im| im.id).collect()),
    );
    let category_ids = unique_sorted(
        p.category_ids
            .clone()
            .unwrap_or_else(|| gt.categories.iter().map(|c| c.id).collect()),
    );
    p.image_ids = Some(image_ids.clone());
    p.category_ids = Some(category_ids.clone());
    let image_index: HashMap<i64, usize> = image_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let category_index: HashMap<i64, usize> = category_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| (id, k))
        .collect();

    let mut groups: HashMap<(usize, usize), Group> = HashMap::new();
    collect_ground_truth(gt, &image_ids, &image_index, &category_index, &mut groups);
    let num_detections = collect_detections(dets, &image_index, &category_index, &mut groups);

    let max_det = p.max_dets.last().copied().unwrap_or(0);
    let mut per_category: Vec<Vec<(usize, GroupEval)>> = vec![Vec::new(); category_ids.len()];
    for ((img, k), group) in groups {
        let gts: Vec<GtBox> = group
            .gts
            .iter()
            .map(|&i| {
                let a = &gt.annotations[i];
                GtBox {
                    id: a.id,
                    bbox: a.bbox,
                    area: a.area,
                    crowd: a.iscrowd,
                }
            })
            .collect();
        let mut order = group.dts;
        // Stable like numpy's mergesort: equal scores keep results-file order.
        order.sort_by(|&x, &y| {
            dets[y]
                .score
                .partial_cmp(&dets[x].score)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        order.truncate(max_det);
        let dt_boxes: Vec<DtBox> = order
            .iter()
            .map(|&i| DtBox {
                bbox: dets[i].bbox,
                area: dets[i].bbox[2] * dets[i].bbox[3],
            })
            .collect();
        let scores = order.iter().map(|&i| dets[i].score).collect();
        let eval = evaluate_group(&gts, &dt_boxes, scores, &p.iou_thresholds, &p.area_ranges);
        if let Some(list) = per_category.get_mut(k) {
            list.push((img, eval));
        }
    }
    let per_category: Vec<Vec<GroupEval>> = per_category
        .into_iter()
        .map(|mut list| {
            list.sort_by_key(|(img, _)| *img);
            list.into_iter().map(|(_, e)| e).collect()
        })
        .collect();

    let accumulated = accumulate(&per_category, &p);
    let stats = summarize(&accumulated, &p);
    let category_aps = category_aps(gt, &category_ids, &accumulated, &p);
    Ok(EvalResult {
        stats,
        per_category: category_aps,
        accumulated,
        num_images: image_ids.len(),
        num_detections,
        num_skipped_detections: dets.len() - num_detections,
        params: p,
    })
}

/// Ground truth per (image, category) in pycocotools' order: images by id, then file order.
/// Like `loadAnns`, an annotation id that occurs twice resolves to its last occurrence.
fn collect_ground_truth(
    gt: &GroundTruth,
    image_ids: &[i64],
    image_index: &HashMap<i64, usize>,
    category_index: &HashMap<i64, usize>,
    groups: &mut HashMap<(usize, usize), Group>,
) {
    let mut by_id: HashMap<i64, usize> = HashMap::with_capacity(gt.annotations.len());
    let mut by_image: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, a) in gt.annotations.iter().enumerate() {
        by_id.insert(a.id, i);
        by_image.entry(a.image_id).or_default().push(i);
    }
    for img in image_ids {
        for &i in by_image.get(img).map(Vec::as_slice).unwrap_or(&[]) {
            let a = &gt.annotations[i];
            if !category_index.contains_key(&a.category_id) {
                continue;
            }
            let resolved = by_id.get(&a.id).copied().unwrap_or(i);
            let r = &gt.annotations[resolved];
            if let (Some(&ii), Some(&k)) = (
                image_index.get(&r.image_id),
                category_index.get(&r.category_id),
            ) {
                groups.entry((ii, k)).or_default().gts.push(resolved);
            }
        }
    }
}

/// Detections per (image, category) in results-file order; returns how many were kept.
fn collect_detections(
    dets: &[Detection],
    image_index: &HashMap<i64, usize>,
    category_index: &HashMap<i64, usize>,
    groups: &mut HashMap<(usize, usize), Group>,
) -> usize {
    let mut kept = 0;
    for (i, d) in dets.iter().enumerate() {
        if let (Some(&ii), Some(&k)) = (
            image_index.get(&d.image_id),
            category_index.get(&d.category_id),
        ) {
            groups.entry((ii, k)).or_default().dts.push(i);
            kept += 1;
        }
    }
    kept
}

fn category_aps(
    gt: &GroundTruth,
    category_ids: &[i64],
    acc: &Accumulated,
    p: &Params,
) -> Vec<CategoryAp> {
    let [t_len, r_len, _, _, m_len] = acc.dims;
    let m = m_len.saturating_sub(1);
    let t50 = p.iou_thresholds.iter().position(|&t| t == 0.5);
    let some = |v: f64| (v > -1.0).then_some(v);
    category_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| {
            let at = |t: usize| {
                (0..r_len).map(move |r| acc.precision[acc.precision_index(t, r, k, 0, m)])
            };
            let all: Vec<f64> = (0..t_len).flat_map(at).collect();
            let ap50 = t50.and_then(|t| some(mean_present(&at(t).collect::<Vec<_>>())));
            CategoryAp {
                category_id: id,
                name: gt.category_name(id).unwrap_or_default().to_string(),
                ap: some(mean_present(&all)),
                ap50,
            }
        })
        .collect()
}
