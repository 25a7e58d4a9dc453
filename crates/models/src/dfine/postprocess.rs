//! Turning raw outputs into detections exactly as transformers'
//! `RTDetrImageProcessor.post_process_object_detection` (focal-loss variant) does, and
//! the HF image processor settings (`preprocessor_config.json`).

use serde_json::Value;

use crate::error::{ModelError, Result};

/// One detected object in original-image pixels.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Detection {
    pub score: f32,
    pub label: usize,
    /// `[x0, y0, x1, y1]`.
    pub bbox: [f32; 4],
}

/// `logits` `[Q, C]` and cxcywh `boxes` `[Q, 4]` of one image -> detections above
/// `threshold`: sigmoid, top-Q over all `Q*C` scores (label = index % C), boxes scaled
/// to `(height, width)`. Sorted by decreasing score (ties: lower flat index first).
pub fn post_process(
    logits: &[f32],
    boxes: &[f32],
    classes: usize,
    threshold: f32,
    size: (u32, u32),
) -> Result<Vec<Detection>> {
    if classes == 0
        || !logits.len().is_multiple_of(classes)
        || boxes.len() != logits.len() / classes * 4
    {
        return Err(ModelError::Input(format!(
            "post-processing: {} logits and {} box values do not fit {classes} classes",
            logits.len(),
            boxes.len()
        )));
    }
    let q = logits.len() / classes;
    let (h, w) = (size.0 as f32, size.1 as f32);
    let scores: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(q);
    Ok(idx
        .into_iter()
        .filter(|&i| scores[i] > threshold)
        .map(|i| {
            let bx = &boxes[(i / classes) * 4..(i / classes) * 4 + 4];
            let (cx, cy, bw, bh) = (bx[0], bx[1], bx[2], bx[3]);
            Detection {
                score: scores[i],
                label: i % classes,
                bbox: [
                    (cx - 0.5 * bw) * w,
                    (cy - 0.5 * bh) * h,
                    (cx + 0.5 * bw) * w,
                    (cy + 0.5 * bh) * h,
                ],
            }
        })
        .collect())
}

/// COCO category id of contiguous label `0..80` (the ids skip 12, 26, 29, 30, 45, 66,
/// 68, 69, 71 and 83), as needed for COCO evaluation of 80-class detectors.
pub fn coco_category_id(label: usize) -> Option<u32> {
    const SKIPPED: [u32; 10] = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83];
    if label >= 80 {
        return None;
    }
    let mut id = 0u32;
    let mut left = label + 1;
    while left > 0 {
        id += 1;
        if !SKIPPED.contains(&id) {
            left -= 1;
        }
    }
    Some(id)
}

/// The image processor settings D-FINE checkpoints ship in `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// `(height, width)` to resize to, or `None` when `do_resize` is false.
    pub size: Option<(u32, u32)>,
    /// PIL resample filter id (2 = bilinear, the only one supported).
    pub resample: u32,
    pub rescale: Option<f32>,
    /// `(mean, std)` when `do_normalize` is true.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for ImageProcessorConfig {
    /// RT-DETR/D-FINE defaults: 640x640 bilinear, rescale 1/255, no normalisation.
    fn default() -> Self {
        Self {
            size: Some((640, 640)),
            resample: 2,
            rescale: Some(1.0 / 255.0),
            normalize: None,
        }
    }
}

impl ImageProcessorConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("preprocessor_config.json: {e}")))?;
        let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let triple = |k: &str, d: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(|| {
                            ModelError::Config(format!(
                                "preprocessor_config.json: {k} must hold numbers"
                            ))
                        })? as f32;
                    }
                    Ok(out)
                }
                Some(_) => Err(ModelError::Config(format!(
                    "preprocessor_config.json: {k} must be a list of 3 numbers"
                ))),
            }
        };
        let size = if flag("do_resize", true) {
            let s = v.get("size");
            let get = |k: &str| s.and_then(|s| s.get(k)).and_then(Value::as_u64);
            match (get("height"), get("width")) {
                (Some(h), Some(w)) if h > 0 && w > 0 => Some((h as u32, w as u32)),
                (None, None) if s.is_none() => Some((640, 640)),
                _ => {
                    return Err(ModelError::Config(
                        "preprocessor_config.json: only a fixed size {\"height\": H, \"width\": W} is supported".into(),
                    ))
                }
            }
        } else {
            None
        };
        let resample = v.get("resample").and_then(Value::as_u64).unwrap_or(2) as u32;
        if size.is_some() && resample != 2 {
            return Err(ModelError::Config(format!(
                "preprocessor_config.json: resample {resample} is not supported (2 = bilinear)"
            )));
        }
        let rescale = if flag("do_rescale", true) {
            Some(
                v.get("rescale_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0 / 255.0) as f32,
            )
        } else {
            None
        };
        let normalize = if flag("do_normalize", false) {
            Some((
                triple("image_mean", [0.485, 0.456, 0.406])?,
                triple("image_std", [0.229, 0.224, 0.225])?,
            ))
        } else {
            None
        };
        Ok(Self {
            size,
            resample,
            rescale,
            normalize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_scores_become_pixel_boxes() {
        // Two queries, two classes.
        let logits = [0.0, 2.0, -1.0, 1.0];
        let boxes = [0.5, 0.5, 0.2, 0.4, 0.25, 0.25, 0.5, 0.5];
        let d = post_process(&logits, &boxes, 2, 0.4, (100, 200)).unwrap();
        // Top-2 of 4 scores: index 1 (q0, c1) then 3 (q1, c1); both above 0.4.
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].label, d[1].label), (1, 1));
        let close = |a: [f32; 4], b: [f32; 4]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4);
        assert!(
            close(d[0].bbox, [80.0, 30.0, 120.0, 70.0]),
            "{:?}",
            d[0].bbox
        );
        assert!(close(d[1].bbox, [0.0, 0.0, 100.0, 50.0]), "{:?}", d[1].bbox);
        assert!(post_process(&logits, &boxes[..4], 2, 0.5, (1, 1)).is_err());
    }

    #[test]
    fn coco_ids_skip_the_unused_categories() {
        assert_eq!(coco_category_id(0), Some(1));
        assert_eq!(coco_category_id(11), Some(13));
        assert_eq!(coco_category_id(15), Some(17)); // cat
        assert_eq!(coco_category_id(79), Some(90));
        assert_eq!(coco_category_id(80), None);
    }

    #[test]
    fn reads_the_hf_processor_config() {
        let p = ImageProcessorConfig::from_json(include_str!(
            "../../../../tests/fixtures/dfine/x/preprocessor_config.json"
        ))
        .unwrap();
        assert_eq!(
            p,
            ImageProcessorConfig {
                size: Some((640, 640)),
                resample: 2,
                rescale: Some(1.0 / 255.0),
                normalize: None
            }
        );
        let n = ImageProcessorConfig::from_json(
            r#"{"do_normalize": true, "size": {"height": 8, "width": 4}}"#,
        )
        .unwrap();
        assert_eq!(n.size, Some((8, 4)));
        assert!(n.normalize.is_some());
        assert!(ImageProcessorConfig::from_json(r#"{"size": {"shortest_edge": 800}}"#).is_err());
    }
}
