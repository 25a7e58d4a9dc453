//! The 80 contiguous COCO detection labels (0..79, as D-FINE and most detectors emit them)
//! and the original COCO category ids (1..90 with gaps) that ground-truth files use.

/// `COCO_CATEGORY_IDS[label]` is the COCO category id of contiguous label `label`.
pub const COCO_CATEGORY_IDS: [u32; 80] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
];

/// `COCO_CLASS_NAMES[label]`, as in the `id2label` of transformers' COCO D-FINE configs.
pub const COCO_CLASS_NAMES: [&str; 80] = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// The COCO category id of a contiguous label, or `None` past 79.
pub fn category_id_of_label(label: usize) -> Option<u32> {
    COCO_CATEGORY_IDS.get(label).copied()
}

/// The contiguous label of a COCO category id, or `None` for ids COCO leaves unused.
pub fn label_of_category_id(category_id: u32) -> Option<usize> {
    COCO_CATEGORY_IDS.binary_search(&category_id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_round_trips_and_is_increasing() {
        assert!(COCO_CATEGORY_IDS.windows(2).all(|w| w[0] < w[1]));
        for label in 0..80 {
            let id = category_id_of_label(label).unwrap();
            assert_eq!(label_of_category_id(id), Some(label));
        }
        assert_eq!(category_id_of_label(80), None);
        for unused in [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91] {
            assert_eq!(label_of_category_id(unused), None);
        }
    }
}
