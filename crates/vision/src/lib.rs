//! Image decoding and encoding, PIL-exact resizing, drawing, COCO evaluation.
