//! Decoding: error paths (each must be a clear error naming the file, never a
//! panic) and pixel formats.

use std::path::{Path, PathBuf};

use aperture_vision::{
    decode_bytes, decode_file, encode_rgb8, BitDepth, DecodeLimits, EncodeOptions, OutputFormat,
    VisionError,
};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aperture-vision-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn png(width: u32, height: u32, data: &[u8], color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(data, width, height, color)
        .unwrap();
    out
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    c.extend_from_slice(&body);
    c.extend_from_slice(&crc32(&body).to_be_bytes());
    c
}

/// A structurally valid PNG declaring `w` x `h` RGB8 pixels with no image data.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut f = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    f.extend(chunk(b"IHDR", &ihdr));
    f.extend(chunk(b"IEND", &[]));
    f
}

#[test]
fn huge_png_header_is_refused_before_decoding() {
    let dir = temp_dir("huge");
    let p = write(&dir, "huge.png", &png_header_only(20000, 20000));
    match decode_file(&p, &DecodeLimits::default()) {
        Err(VisionError::TooManyPixels {
            width,
            height,
            path,
            ..
        }) => {
            assert_eq!((width, height), (20000, 20000));
            assert_eq!(path, p);
        }
        other => panic!("expected TooManyPixels, got {other:?}"),
    }
    // The limit is configurable: a 100x100 header passes a 10_000 limit (and then
    // fails for lack of data), but not a 9_999 one.
    let small = png_header_only(100, 100);
    let limits = |max_pixels| DecodeLimits {
        max_pixels,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        decode_bytes(&small, &limits(9_999)),
        Err(VisionError::TooManyPixels { .. })
    ));
    assert!(matches!(
        decode_bytes(&small, &limits(10_000)),
        Err(VisionError::Corrupt { .. })
    ));
}

#[test]
fn huge_jpeg_header_is_refused() {
    let jpeg = encode_rgb8(
        &gradient(16, 16),
        OutputFormat::Jpeg,
        &EncodeOptions::default(),
    )
    .unwrap();
    // Patch the frame header (SOF0: FF C0, len, precision, height, width) to 60000x60000.
    let mut patched = jpeg.clone();
    let sof = patched
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG has SOF0");
    patched[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let err = decode_bytes(&patched, &DecodeLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            VisionError::TooManyPixels {
                width: 60000,
                height: 60000,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn truncated_files_are_errors_naming_the_file() {
    let dir = temp_dir("trunc");
    let img = gradient(64, 48);
    for (name, format) in [("t.png", OutputFormat::Png), ("t.jpg", OutputFormat::Jpeg)] {
        let full = encode_rgb8(&img, format, &EncodeOptions::default()).unwrap();
        // (A PNG missing only part of its IEND chunk has all its pixels and is
        // accepted; cutting 20 bytes reaches into the image data.)
        for cut in [full.len() / 2, full.len() - 20, 40] {
            let p = write(&dir, name, &full[..cut]);
            let Err(err) = decode_file(&p, &DecodeLimits::default()) else {
                panic!("{name} cut at {cut} of {} decoded", full.len());
            };
            assert!(
                matches!(err, VisionError::Corrupt { .. }),
                "{name} cut {cut}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(name), "{msg}");
        }
        // The untruncated file decodes.
        let p = write(&dir, name, &full);
        assert_eq!(
            decode_file(&p, &DecodeLimits::default()).unwrap().width(),
            64
        );
    }
}

#[test]
fn jpeg_missing_only_its_end_marker_is_truncated() {
    let full = encode_rgb8(
        &gradient(32, 32),
        OutputFormat::Jpeg,
        &EncodeOptions::default(),
    )
    .unwrap();
    let err = decode_bytes(&full[..full.len() - 1], &DecodeLimits::default()).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn non_images_empty_and_missing_files_are_errors() {
    let dir = temp_dir("bad");
    let text = write(&dir, "notes.png", b"this is not an image\n");
    let err = decode_file(&text, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, VisionError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("notes.png"));

    let empty = write(&dir, "empty.jpg", b"");
    let err = decode_file(&empty, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, VisionError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("empty.jpg"));

    let gif = write(&dir, "anim.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
    let err = decode_file(&gif, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, VisionError::Unsupported { .. }), "{err}");

    let missing = dir.join("missing.png");
    let err = decode_file(&missing, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, VisionError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.png"));

    let err = decode_file(&dir, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, VisionError::Io { .. }), "{err}");

    // Garbage after a valid signature.
    let mut bad = png(4, 4, &[7u8; 48], ExtendedColorType::Rgb8);
    for b in bad.iter_mut().skip(33) {
        *b ^= 0x5A;
    }
    let err = decode_bytes(&bad, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, VisionError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("<memory>"));
}

#[test]
fn file_size_limit_is_enforced() {
    let dir = temp_dir("size");
    let bytes = png(8, 8, &[1u8; 192], ExtendedColorType::Rgb8);
    let p = write(&dir, "img.png", &bytes);
    let limits = DecodeLimits {
        max_file_bytes: bytes.len() as u64 - 1,
        ..DecodeLimits::default()
    };
    let err = decode_file(&p, &limits).unwrap_err();
    assert!(matches!(err, VisionError::FileTooLarge { .. }), "{err}");
}

#[test]
fn one_pixel_images_decode() {
    let one = png(1, 1, &[10, 20, 30], ExtendedColorType::Rgb8);
    let img = decode_bytes(&one, &DecodeLimits::default()).unwrap();
    assert_eq!((img.width(), img.height()), (1, 1));
    assert_eq!(img.to_rgb8().as_raw(), &[10, 20, 30]);
    let jpeg = encode_rgb8(
        &gradient(1, 1),
        OutputFormat::Jpeg,
        &EncodeOptions::default(),
    )
    .unwrap();
    let img = decode_bytes(&jpeg, &DecodeLimits::default()).unwrap();
    assert_eq!((img.width(), img.height()), (1, 1));
}

#[test]
fn gray_and_alpha_become_rgb_dropping_alpha() {
    let limits = DecodeLimits::default();
    // Gray: replicated.
    let gray = decode_bytes(&png(2, 1, &[0, 200], ExtendedColorType::L8), &limits).unwrap();
    assert_eq!(gray.to_rgb8().as_raw(), &[0, 0, 0, 200, 200, 200]);
    assert!(!gray.had_alpha());
    // Gray + alpha: alpha dropped (not composited), as PIL convert('RGB').
    let la = decode_bytes(
        &png(2, 1, &[90, 0, 180, 255], ExtendedColorType::La8),
        &limits,
    )
    .unwrap();
    assert_eq!(la.to_rgb8().as_raw(), &[90, 90, 90, 180, 180, 180]);
    assert!(la.had_alpha());
    // RGBA: a fully transparent pixel keeps its colour.
    let rgba = png(
        2,
        1,
        &[1, 2, 3, 0, 250, 251, 252, 128],
        ExtendedColorType::Rgba8,
    );
    let rgba = decode_bytes(&rgba, &limits).unwrap();
    assert_eq!(rgba.to_rgb8().as_raw(), &[1, 2, 3, 250, 251, 252]);
    assert_eq!(rgba.source_bit_depth(), BitDepth::Eight);
}

#[test]
fn sixteen_bit_png_keeps_full_precision() {
    let limits = DecodeLimits::default();
    let values: [u16; 6] = [0, 1, 257, 40000, 65534, 65535];
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let img = decode_bytes(&png(2, 1, &bytes, ExtendedColorType::Rgb16), &limits).unwrap();
    assert_eq!(img.source_bit_depth(), BitDepth::Sixteen);
    let f = img.to_f32_interleaved();
    for (&v, &got) in values.iter().zip(&f) {
        assert_eq!(got, f32::from(v) / 65535.0);
    }
    // Planar order: all R, then G, then B.
    let planar = img.to_f32_planar();
    assert_eq!(planar, vec![f[0], f[3], f[1], f[4], f[2], f[5]]);
    // 8-bit view keeps the high byte, as PIL does for 16-bit RGB PNGs.
    let high: Vec<u8> = values.iter().map(|v| (v >> 8) as u8).collect();
    assert_eq!(img.to_rgb8().as_raw(), &high);
    assert_eq!(img.as_rgb16().unwrap().as_raw(), &values);

    // 16-bit gray with alpha: replicated, alpha dropped, still 16 bits.
    let la16: Vec<u8> = [1000u16, 5].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let img = decode_bytes(&png(1, 1, &la16, ExtendedColorType::La16), &limits).unwrap();
    assert_eq!(img.as_rgb16().unwrap().as_raw(), &[1000, 1000, 1000]);
    assert!(img.had_alpha());
}
