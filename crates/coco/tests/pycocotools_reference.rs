//! The classic cocoapi test pair: 100 val2014 images and the fake bbox results.
//! Expected numbers are what pycocotools prints for them (see DESIGN.md).

use std::path::PathBuf;

use aperture_coco::{evaluate, load_results, GroundTruth, Params};

fn data_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/coco");
    assert!(
        dir.is_dir(),
        "test data folder {} is missing: this test needs the shared COCO data",
        dir.display()
    );
    dir
}

#[test]
fn val2014_100_matches_pycocotools() {
    let dir = data_dir();
    let gt = GroundTruth::from_path(&dir.join("instances_val2014_100.json")).unwrap();
    let dets = load_results(&dir.join("instances_val2014_fakebbox100_results.json")).unwrap();
    let result = evaluate(&gt, &dets, &Params::default()).unwrap();
    let expected = [
        0.504581, 0.696973, 0.572982, 0.585626, 0.519400, 0.501398, 0.386813, 0.593680, 0.595353,
        0.639811, 0.566421, 0.564291,
    ];
    for (i, (a, b)) in result.stats.iter().zip(expected).enumerate() {
        // The reference values are printed with 6 decimals.
        assert!(
            (a - b).abs() <= 5e-7 + 1e-6,
            "stat {i}: got {a}, pycocotools {b}"
        );
    }
    assert_eq!(result.num_images, 100);
    assert_eq!(result.per_category.len(), gt.categories.len());
    for line in result.summary_lines() {
        println!("{line}");
    }
}

#[test]
fn val2014_categories_follow_the_label_mapping() {
    let gt = GroundTruth::from_path(&data_dir().join("instances_val2014_100.json")).unwrap();
    assert_eq!(gt.categories.len(), 80);
    for (label, c) in gt.categories.iter().enumerate() {
        assert_eq!(c.id, i64::from(aperture_coco::COCO_CATEGORY_IDS[label]));
        assert_eq!(c.name, aperture_coco::COCO_CLASS_NAMES[label]);
    }
}
