//! COCO bounding-box evaluation with results identical to pycocotools' `COCOeval`
//! (`iouType='bbox'`): the same matching, accumulation and summary, down to numpy's
//! summation order, so the 12 standard stats agree to the last bit.
//!
//! ```
//! use aperture_coco::{evaluate, Category, Detection, GroundTruth, GtAnnotation, Image, Params};
//!
//! let gt = GroundTruth {
//!     images: vec![Image { id: 1, file_name: None, width: None, height: None }],
//!     categories: vec![Category { id: 18, name: "dog".into() }],
//!     annotations: vec![GtAnnotation {
//!         id: 1, image_id: 1, category_id: 18,
//!         bbox: [10.0, 10.0, 50.0, 40.0], area: 2000.0, iscrowd: false,
//!     }],
//! };
//! let dets = [Detection { image_id: 1, category_id: 18, bbox: [10.0, 10.0, 50.0, 40.0], score: 0.9 }];
//! let result = evaluate(&gt, &dets, &Params::default()).unwrap();
//! // pycocotools divides by tp + fp + eps, so a perfect score is 1 - 2e-16.
//! assert!((result.map() - 1.0).abs() < 1e-12);
//! println!("{}", result.summary_lines().join("\n"));
//! ```

mod accumulate;
mod dataset;
mod error;
mod evaluate;
mod json;
mod labels;
mod match_image;
mod params;
mod summary;

pub use accumulate::Accumulated;
pub use dataset::{
    load_results, parse_results, results_to_json, Category, Detection, GroundTruth, GtAnnotation,
    Image,
};
pub use error::{CocoError, Result};
pub use evaluate::{evaluate, CategoryAp, EvalResult};
pub use labels::{category_id_of_label, label_of_category_id, COCO_CATEGORY_IDS, COCO_CLASS_NAMES};
pub use match_image::bbox_iou;
pub use params::{linspace, AreaRange, Params};
pub use summary::STAT_NAMES;
