//! Bad input gives an error that names the problem, never a panic.

use aperture_coco::{
    evaluate, parse_results, results_to_json, CocoError, Detection, GroundTruth, GtAnnotation,
    Params,
};

const GT: &str = r#"{
  "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}],
  "categories": [{"id": 5, "name": "cat"}],
  "annotations": [
    {"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}
  ]
}"#;

fn gt() -> GroundTruth {
    GroundTruth::from_json(GT.as_bytes()).unwrap()
}

fn message(e: CocoError) -> String {
    e.to_string()
}

#[test]
fn ground_truth_parses() {
    let gt = gt();
    assert_eq!(gt.images.len(), 2);
    assert_eq!(gt.image_id_by_file_name("a.jpg"), Some(1));
    assert_eq!(gt.category_name(5), Some("cat"));
    assert_eq!(gt.annotations[0].bbox, [0.0, 0.0, 10.0, 10.0]);
    assert!(!gt.annotations[0].iscrowd);
}

#[test]
fn detector_output_round_trips_through_results_json() {
    let d = Detection::from_label_xyxy(1, 15, [10.0, 20.0, 50.0, 80.0], 0.75).unwrap();
    assert_eq!(d.category_id, 17, "label 15 (cat) is COCO category 17");
    assert_eq!(d.bbox, [10.0, 20.0, 40.0, 60.0]);
    assert!(Detection::from_label_xyxy(1, 80, [0.0; 4], 0.5).is_none());
    let text = results_to_json(&[d]).to_string();
    assert_eq!(parse_results(text.as_bytes()).unwrap(), vec![d]);
    assert_eq!(gt().file_name_index().get("a.jpg"), Some(&1));
}

#[test]
fn malformed_json_is_reported() {
    let e = GroundTruth::from_json(b"{\"images\": [").unwrap_err();
    assert!(message(e).contains("not valid JSON"));
    let e = parse_results(b"[{\"image_id\": 1,").unwrap_err();
    assert!(message(e).contains("not valid JSON"));
}

#[test]
fn missing_fields_are_named() {
    let no_area = GT.replace(", \"area\": 100", "");
    let e = message(GroundTruth::from_json(no_area.as_bytes()).unwrap_err());
    assert!(
        e.contains("annotation #0 (id 1)") && e.contains("`area`"),
        "{e}"
    );

    let e = message(
        parse_results(br#"[{"image_id": 1, "category_id": 5, "bbox": [0,0,1,1]}]"#).unwrap_err(),
    );
    assert!(e.contains("detection #0") && e.contains("`score`"), "{e}");

    let e = message(
        parse_results(br#"[{"image_id": 1, "category_id": 5, "bbox": [0,0,1], "score": 1}]"#)
            .unwrap_err(),
    );
    assert!(e.contains("4 numbers") && e.contains("found 3"), "{e}");

    let e = message(
        GroundTruth::from_json(br#"{"images": [], "categories": [{"id": 1}]}"#).unwrap_err(),
    );
    assert!(e.contains("no images"), "{e}");
    let e = message(GroundTruth::from_json(br#"{"images": [{"id": 1}]}"#).unwrap_err());
    assert!(e.contains("categories"), "{e}");
}

#[test]
fn results_must_be_a_non_empty_list() {
    let e = parse_results(br#"{"annotations": []}"#).unwrap_err();
    assert!(matches!(e, CocoError::ResultsNotAList));
    let e = parse_results(b"  [ ]").unwrap_err();
    assert!(matches!(e, CocoError::EmptyResults));
}

#[test]
fn unknown_image_is_an_error() {
    let dets = [Detection {
        image_id: 77,
        category_id: 5,
        bbox: [0.0, 0.0, 1.0, 1.0],
        score: 0.5,
    }];
    let e = evaluate(&gt(), &dets, &Params::default()).unwrap_err();
    assert!(matches!(
        e,
        CocoError::UnknownImage {
            index: 0,
            image_id: 77
        }
    ));
    assert!(message(e).contains("77"));
}

#[test]
fn non_finite_values_are_refused() {
    let dets = [Detection {
        image_id: 1,
        category_id: 5,
        bbox: [0.0, f64::NAN, 1.0, 1.0],
        score: 0.5,
    }];
    let e = message(evaluate(&gt(), &dets, &Params::default()).unwrap_err());
    assert!(e.contains("bbox") && e.contains("finite"), "{e}");
    let mut bad = gt();
    bad.annotations.push(GtAnnotation {
        area: f64::INFINITY,
        ..bad.annotations[0].clone()
    });
    let e = message(evaluate(&bad, &[], &Params::default()).unwrap_err());
    assert!(e.contains("area"), "{e}");
}

#[test]
fn no_detections_scores_zero_for_categories_with_ground_truth() {
    let r = evaluate(&gt(), &[], &Params::default()).unwrap();
    assert_eq!(r.stats[0], 0.0);
    // No small/medium boxes in the ground truth except one 10x10: large is absent.
    assert_eq!(r.stats[5], -1.0);
    assert_eq!(r.per_category[0].ap, Some(0.0));
    assert_eq!(r.num_detections, 0);
}

#[test]
fn detections_of_unknown_categories_are_skipped() {
    let dets = [
        Detection {
            image_id: 1,
            category_id: 5,
            bbox: [0.0, 0.0, 10.0, 10.0],
            score: 0.9,
        },
        Detection {
            image_id: 2,
            category_id: 999,
            bbox: [0.0, 0.0, 10.0, 10.0],
            score: 0.9,
        },
    ];
    let r = evaluate(&gt(), &dets, &Params::default()).unwrap();
    assert_eq!(r.num_detections, 1);
    assert_eq!(r.num_skipped_detections, 1);
    assert!((r.map50() - 1.0).abs() < 1e-12);
}
