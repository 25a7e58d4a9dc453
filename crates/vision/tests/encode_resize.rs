//! Encoding round trips and rounding; resize properties and small cases whose
//! expected values were produced by Pillow 13 (`Image.resize(size, Image.BILINEAR)`).

use aperture_vision::encode::{f32_to_u16, f32_to_u8, rgb8_from_f32};
use aperture_vision::{
    decode_bytes, encode_rgb8, encode_rgb_f32, normalize_chw, output_format, pil_bilinear,
    save_rgb_f32, to_nchw_f32, BitDepth, DecodeLimits, EncodeOptions, Layout, OutputFormat,
    PngDepth, RgbImage, VisionError, HF_RESCALE_FACTOR,
};
use std::path::Path;

fn img(w: u32, h: u32, data: &[u8]) -> RgbImage {
    RgbImage::from_raw(w, h, data.to_vec()).unwrap()
}

#[test]
fn float_to_int_rounds_half_up_and_clamps() {
    // Exactly representable midpoints: k + 0.5 rounds up.
    assert_eq!(f32_to_u8(0.5 / 255.0), 1);
    assert_eq!(f32_to_u8(127.5 / 255.0), 128);
    assert_eq!(f32_to_u8(0.49 / 255.0), 0);
    assert_eq!(f32_to_u8(1.0), 255);
    assert_eq!(f32_to_u8(0.0), 0);
    assert_eq!(f32_to_u8(-0.3), 0);
    assert_eq!(f32_to_u8(1.7), 255);
    assert_eq!(f32_to_u8(f32::NAN), 0);
    assert_eq!(f32_to_u8(f32::INFINITY), 255);
    for v in 0..=255u8 {
        assert_eq!(f32_to_u8(f32::from(v) / 255.0), v);
    }
    assert_eq!(f32_to_u16(1.0), 65535);
    assert_eq!(f32_to_u16(0.5 / 65535.0), 1);
    assert_eq!(f32_to_u16(-1.0), 0);
    for v in (0..=65535u16).step_by(97) {
        assert_eq!(f32_to_u16(f32::from(v) / 65535.0), v);
    }
}

#[test]
fn planar_and_interleaved_layouts_agree() {
    // 2x1 image: pixel 0 = (0.0, 0.5, 1.0), pixel 1 = (0.2, 0.4, 0.6).
    let inter = [0.0, 0.5, 1.0, 0.2, 0.4, 0.6];
    let planar = [0.0, 0.2, 0.5, 0.4, 1.0, 0.6];
    let a = rgb8_from_f32(&inter, 2, 1, Layout::Interleaved).unwrap();
    let b = rgb8_from_f32(&planar, 2, 1, Layout::Planar).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.as_raw(), &[0, 128, 255, 51, 102, 153]);
    assert!(rgb8_from_f32(&inter[..5], 2, 1, Layout::Planar).is_err());
}

#[test]
fn png_round_trips_at_8_and_16_bits() {
    let (w, h) = (5u32, 3u32);
    let data: Vec<f32> = (0..w * h * 3).map(|i| i as f32 / 44.0).collect();
    let limits = DecodeLimits::default();
    for depth in [PngDepth::Eight, PngDepth::Sixteen] {
        let opts = EncodeOptions {
            png_depth: depth,
            ..EncodeOptions::default()
        };
        let bytes = encode_rgb_f32(&data, w, h, Layout::Planar, OutputFormat::Png, &opts).unwrap();
        let back = decode_bytes(&bytes, &limits).unwrap();
        let (max, expect_depth) = match depth {
            PngDepth::Eight => (255.0, BitDepth::Eight),
            PngDepth::Sixteen => (65535.0, BitDepth::Sixteen),
        };
        assert_eq!(back.source_bit_depth(), expect_depth);
        for (&a, &b) in data.iter().zip(&back.to_f32_planar()) {
            assert!((a - b).abs() <= 0.5 / max + 1e-7, "{a} vs {b} at {depth:?}");
        }
    }
}

#[test]
fn jpeg_encodes_with_quality_and_checks_it() {
    let src = RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    let opts = |q| EncodeOptions {
        jpeg_quality: q,
        ..EncodeOptions::default()
    };
    let hi = encode_rgb8(&src, OutputFormat::Jpeg, &opts(95)).unwrap();
    let lo = encode_rgb8(&src, OutputFormat::Jpeg, &opts(20)).unwrap();
    assert!(lo.len() < hi.len());
    let back = decode_bytes(&hi, &DecodeLimits::default())
        .unwrap()
        .into_rgb8();
    let max_err = src
        .as_raw()
        .iter()
        .zip(back.as_raw())
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .max()
        .unwrap();
    assert!(max_err <= 8, "quality 95 JPEG differs by {max_err}");
    assert!(matches!(
        encode_rgb8(&src, OutputFormat::Jpeg, &opts(0)),
        Err(VisionError::InvalidArgument(_))
    ));
}

#[test]
fn output_format_comes_from_extension() {
    assert_eq!(
        output_format(Path::new("a/b.PNG")).unwrap(),
        OutputFormat::Png
    );
    assert_eq!(
        output_format(Path::new("x.jpeg")).unwrap(),
        OutputFormat::Jpeg
    );
    assert_eq!(
        output_format(Path::new("x.JPG")).unwrap(),
        OutputFormat::Jpeg
    );
    let err = output_format(Path::new("out.bmp")).unwrap_err().to_string();
    assert!(err.contains("out.bmp") && err.contains("bmp"), "{err}");
    assert!(output_format(Path::new("noext")).is_err());
    let err = save_rgb_f32(
        Path::new("/nonexistent-dir/x.tiff"),
        &[0.0; 3],
        1,
        1,
        Layout::Planar,
        &EncodeOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, VisionError::UnknownOutputFormat { .. }));
    // Unwritable location: an I/O error naming the path.
    let err = save_rgb_f32(
        Path::new("/nonexistent-dir/x.png"),
        &[0.0; 3],
        1,
        1,
        Layout::Planar,
        &EncodeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent-dir/x.png"), "{err}");
}

#[test]
fn resize_matches_pillow_on_small_cases() {
    // Values produced by Pillow 13.0.0.
    let row = img(
        5,
        1,
        &[
            0, 10, 255, 50, 20, 0, 100, 30, 255, 200, 40, 0, 255, 50, 128,
        ],
    );
    let down = pil_bilinear(&row, 3, 1).unwrap();
    assert_eq!(down.as_raw(), &[21, 14, 146, 111, 30, 142, 231, 46, 73]);
    let up = pil_bilinear(&row, 8, 1).unwrap();
    assert_eq!(
        up.as_raw(),
        &[
            0, 10, 255, 22, 14, 143, 53, 21, 16, 84, 27, 175, 131, 33, 175, 194, 39, 16, 231, 46,
            72, 255, 50, 128
        ]
    );
    // 3x4 with values 7 * index, to 2x5 (width shrinks, height grows).
    let data: Vec<u8> = (0..36u8).map(|v| v * 7).collect();
    let out = pil_bilinear(&img(3, 4, &data), 2, 5).unwrap();
    assert_eq!(
        out.as_raw(),
        &[
            8, 15, 22, 34, 41, 48, 52, 59, 66, 78, 85, 92, 103, 110, 117, 129, 136, 143, 153, 160,
            167, 179, 186, 193, 197, 204, 211, 223, 230, 237
        ]
    );
}

#[test]
fn resize_properties() {
    // A constant image stays constant at any size.
    let flat = RgbImage::from_pixel(37, 53, image::Rgb([9, 200, 255]));
    for (w, h) in [(640, 640), (5, 3), (1, 1), (37, 100)] {
        let out = pil_bilinear(&flat, w, h).unwrap();
        assert_eq!((out.width(), out.height()), (w, h));
        assert!(out.pixels().all(|p| p.0 == [9, 200, 255]));
    }
    // 1x1 input upscales to a constant.
    let one = img(1, 1, &[1, 2, 3]);
    assert!(pil_bilinear(&one, 4, 7)
        .unwrap()
        .pixels()
        .all(|p| p.0 == [1, 2, 3]));
    // Same size is a copy.
    let g = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8, y as u8, 3]));
    assert_eq!(pil_bilinear(&g, 7, 5).unwrap(), g);
    assert!(pil_bilinear(&g, 0, 5).is_err());
    assert!(pil_bilinear(&RgbImage::new(0, 0), 5, 5).is_err());
}

#[test]
fn rescale_and_normalize() {
    let im = img(2, 1, &[0, 255, 128, 1, 2, 3]);
    let t = to_nchw_f32(&im, HF_RESCALE_FACTOR);
    // CHW: R plane, G plane, B plane; each value v as f32 * f32(1/255).
    let expect: Vec<f32> = [0u8, 1, 255, 2, 128, 3]
        .iter()
        .map(|&v| f32::from(v) * (1.0f64 / 255.0) as f32)
        .collect();
    assert_eq!(t, expect);
    assert_eq!(t[2], 1.0);
    let mut n = t.clone();
    normalize_chw(&mut n, [0.5, 0.5, 0.5], [0.5, 0.25, 2.0]).unwrap();
    assert_eq!(n[0], -1.0);
    assert_eq!(n[2], (1.0 - 0.5) / 0.25);
    assert!(normalize_chw(&mut n, [0.0; 3], [1.0, 0.0, 1.0]).is_err());
    assert!(normalize_chw(&mut [0.0; 4], [0.0; 3], [1.0; 3]).is_err());
}
