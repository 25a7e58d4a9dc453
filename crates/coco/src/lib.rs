//! COCO bounding-box evaluation with results identical to pycocotools.
