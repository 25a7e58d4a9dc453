//! Loading a COCO ground-truth file (`instances.json`) and a COCO results list.
//!
//! Only what bounding-box evaluation needs is kept; other fields (segmentation,
//! licenses, ...) are skipped while parsing.

use std::path::Path;

use serde::Deserialize;

use crate::error::{CocoError, Result};
use crate::json::{JsonCrowd, JsonId};

/// One image of the ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub id: i64,
    pub file_name: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// One category of the ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    pub id: i64,
    pub name: String,
}

/// One ground-truth box.
#[derive(Debug, Clone, PartialEq)]
pub struct GtAnnotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    /// The annotation's `area` field (the mask area in COCO), used for the area ranges.
    pub area: f64,
    /// Crowd regions are never counted as misses and may match many detections.
    pub iscrowd: bool,
}

/// A ground-truth dataset: images, categories and boxes, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroundTruth {
    pub images: Vec<Image>,
    pub categories: Vec<Category>,
    pub annotations: Vec<GtAnnotation>,
}

/// One detection in the COCO results format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    pub score: f64,
}

impl Detection {
    /// A detection from a detector's output: contiguous COCO label (0..79) and a
    /// `[x0, y0, x1, y1]` box in original pixels. `None` for a label past 79.
    pub fn from_label_xyxy(
        image_id: i64,
        label: usize,
        xyxy: [f64; 4],
        score: f64,
    ) -> Option<Self> {
        let category_id = crate::labels::category_id_of_label(label)?;
        Some(Detection {
            image_id,
            category_id: i64::from(category_id),
            bbox: [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]],
            score,
        })
    }
}

/// Detections as a COCO results JSON array (what `load_results` reads back).
pub fn results_to_json(dets: &[Detection]) -> serde_json::Value {
    dets.iter()
        .map(|d| {
            serde_json::json!({
                "image_id": d.image_id,
                "category_id": d.category_id,
                "bbox": d.bbox,
                "score": d.score,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct RawGroundTruth {
    images: Option<Vec<RawImage>>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    categories: Option<Vec<RawCategory>>,
}

#[derive(Deserialize)]
struct RawImage {
    id: Option<JsonId>,
    file_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Deserialize)]
struct RawCategory {
    id: Option<JsonId>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: Option<JsonId>,
    image_id: Option<JsonId>,
    category_id: Option<JsonId>,
    bbox: Option<Vec<f64>>,
    area: Option<f64>,
    iscrowd: Option<JsonCrowd>,
}

#[derive(Deserialize)]
struct RawDetection {
    image_id: Option<JsonId>,
    category_id: Option<JsonId>,
    bbox: Option<Vec<f64>>,
    score: Option<f64>,
}

fn required<T>(value: Option<T>, what: impl FnOnce() -> String, field: &'static str) -> Result<T> {
    value.ok_or_else(|| CocoError::MissingField {
        what: what(),
        field,
    })
}

fn to_bbox(values: Vec<f64>, what: impl FnOnce() -> String) -> Result<[f64; 4]> {
    <[f64; 4]>::try_from(values.as_slice()).map_err(|_| CocoError::BadBbox {
        what: what(),
        len: values.len(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CocoError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl GroundTruth {
    /// Load a COCO `instances.json` file.
    pub fn from_path(path: &Path) -> Result<Self> {
        Self::from_json(&read(path)?).map_err(|e| e.in_file(path))
    }

    /// Parse the text of a COCO `instances.json` file.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let raw: RawGroundTruth =
            serde_json::from_slice(bytes).map_err(|source| CocoError::Json {
                what: "ground truth",
                source,
            })?;
        let images = raw
            .images
            .ok_or(CocoError::EmptyGroundTruth("images (no `images` field)"))?
            .into_iter()
            .enumerate()
            .map(|(i, im)| {
                Ok(Image {
                    id: required(im.id, || format!("image #{i}"), "id")?.0,
                    file_name: im.file_name,
                    width: im.width,
                    height: im.height,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let categories = raw
            .categories
            .ok_or(CocoError::EmptyGroundTruth(
                "categories (no `categories` field)",
            ))?
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let id = required(c.id, || format!("category #{i}"), "id")?.0;
                Ok(Category {
                    id,
                    name: c.name.unwrap_or_else(|| id.to_string()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let annotations = raw
            .annotations
            .into_iter()
            .enumerate()
            .map(|(i, a)| convert_annotation(i, a))
            .collect::<Result<Vec<_>>>()?;
        let gt = GroundTruth {
            images,
            categories,
            annotations,
        };
        gt.validate()?;
        Ok(gt)
    }

    /// Check what evaluation relies on; in-memory datasets go through this too.
    pub fn validate(&self) -> Result<()> {
        if self.images.is_empty() {
            return Err(CocoError::EmptyGroundTruth("images"));
        }
        if self.categories.is_empty() {
            return Err(CocoError::EmptyGroundTruth("categories"));
        }
        for (i, a) in self.annotations.iter().enumerate() {
            let what = || format!("annotation #{i} (id {})", a.id);
            if a.bbox.iter().any(|v| !v.is_finite()) {
                return Err(CocoError::NotFinite {
                    what: what(),
                    field: "bbox",
                });
            }
            if !a.area.is_finite() {
                return Err(CocoError::NotFinite {
                    what: what(),
                    field: "area",
                });
            }
        }
        Ok(())
    }

    /// The id of the image with this `file_name`, for matching image files to the ground truth.
    pub fn image_id_by_file_name(&self, file_name: &str) -> Option<i64> {
        self.images
            .iter()
            .find(|im| im.file_name.as_deref() == Some(file_name))
            .map(|im| im.id)
    }

    /// `file_name -> image id` for every image that has a file name (matching image files
    /// of a folder to the ground truth in one pass).
    pub fn file_name_index(&self) -> std::collections::HashMap<&str, i64> {
        self.images
            .iter()
            .filter_map(|im| im.file_name.as_deref().map(|f| (f, im.id)))
            .collect()
    }

    /// The name of a category id, if the ground truth lists it.
    pub fn category_name(&self, category_id: i64) -> Option<&str> {
        self.categories
            .iter()
            .find(|c| c.id == category_id)
            .map(|c| c.name.as_str())
    }
}

fn convert_annotation(i: usize, a: RawAnnotation) -> Result<GtAnnotation> {
    let id = required(a.id, || format!("annotation #{i}"), "id")?.0;
    let what = || format!("annotation #{i} (id {id})");
    Ok(GtAnnotation {
        id,
        image_id: required(a.image_id, what, "image_id")?.0,
        category_id: required(a.category_id, what, "category_id")?.0,
        bbox: to_bbox(required(a.bbox, what, "bbox")?, what)?,
        area: required(a.area, what, "area")?,
        // pycocotools needs the field; a missing one is read as "not a crowd".
        iscrowd: a.iscrowd.is_some_and(|c| c.0),
    })
}

/// Load a COCO results file: a JSON array of `{image_id, category_id, bbox, score}`.
///
/// An empty list is an error, as in pycocotools' `loadRes`.
pub fn load_results(path: &Path) -> Result<Vec<Detection>> {
    parse_results(&read(path)?).map_err(|e| e.in_file(path))
}

/// Parse the text of a COCO results file (see [`load_results`]).
pub fn parse_results(bytes: &[u8]) -> Result<Vec<Detection>> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'[') {
        return Err(CocoError::ResultsNotAList);
    }
    let raw: Vec<RawDetection> =
        serde_json::from_slice(bytes).map_err(|source| CocoError::Json {
            what: "results",
            source,
        })?;
    if raw.is_empty() {
        return Err(CocoError::EmptyResults);
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, d)| {
            let what = || format!("detection #{i}");
            Ok(Detection {
                image_id: required(d.image_id, what, "image_id")?.0,
                category_id: required(d.category_id, what, "category_id")?.0,
                bbox: to_bbox(required(d.bbox, what, "bbox")?, what)?,
                score: required(d.score, what, "score")?,
            })
        })
        .collect()
}
