//! GPU preprocessing against the CPU path: the resized bytes must be identical and the
//! f32 values within 1e-6 (they are computed with the same roundings, so in practice
//! identical too).

use aperture_engine::{EngineError, Result};
use aperture_vision::{pil_bilinear, RgbImage, HF_RESCALE_FACTOR};

use super::{preprocess_cpu, GpuPreprocessor, PreprocessSpec, TensorLayout};

/// Largest difference allowed between GPU and CPU f32 values.
pub const F32_TOLERANCE: f32 = 1e-6;

/// ImageNet statistics, to exercise the normalisation.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One compared case.
#[derive(Clone, Debug)]
pub struct PreprocessRow {
    pub case: String,
    /// Resized bytes that differ from `pil_bilinear`'s (`None`: not compared, batches).
    pub u8_mismatches: Option<usize>,
    /// Largest |GPU - CPU| over the f32 output (NaN never passes).
    pub f32_max_abs: f32,
}

impl PreprocessRow {
    pub fn passed(&self) -> bool {
        self.u8_mismatches.unwrap_or(0) == 0 && self.f32_max_abs <= F32_TOLERANCE
    }
}

/// A test image: smooth gradients (rounding shows there) plus noise (index errors show
/// there), different in every channel.
pub fn test_image(width: u32, height: u32, seed: u32) -> RgbImage {
    let mut data = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            for c in 0..3u32 {
                let h = (x.wrapping_mul(73_856_093)
                    ^ y.wrapping_mul(19_349_663)
                    ^ (c + seed).wrapping_mul(83_492_791))
                .wrapping_mul(2_654_435_761);
                let noise = h >> 26; // 0..63
                let ramp = match c {
                    0 => x * 191 / width.max(1),
                    1 => y * 191 / height.max(1),
                    _ => (x + y) * 191 / (width + height).max(1),
                };
                data.push((ramp + noise).min(255) as u8);
            }
        }
    }
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

fn compare_f32(gpu: &GpuPreprocessor, images: &[&RgbImage], spec: &PreprocessSpec) -> Result<f32> {
    let want = preprocess_cpu(images, spec)?;
    let got = gpu.run(images, spec)?;
    if got.shape() != want.shape() {
        return Ok(f32::INFINITY);
    }
    Ok(max_abs(&got.to_f32_vec(), &want.to_f32_vec()))
}

/// Runs every case (plus `extra` images, e.g. real photos, resized to 640x640) and
/// returns one row each.
pub fn preprocess_parity(
    gpu: &GpuPreprocessor,
    extra: &[(String, RgbImage)],
) -> Result<Vec<PreprocessRow>> {
    let sizes = [
        ("downscale", (1280, 960), (640, 640)),
        ("upscale", (300, 200), (640, 640)),
        ("odd sizes", (333, 251), (97, 131)),
        ("identity", (640, 640), (640, 640)),
        ("vertical pass first", (300, 900), (640, 640)),
        ("width only", (500, 640), (640, 640)),
        ("height only", (640, 427), (640, 640)),
        ("phone photo", (4032, 3024), (640, 640)),
        ("single pixel up", (1, 1), (7, 5)),
        ("to a single pixel", (7, 5), (1, 1)),
    ];
    let mut cases: Vec<(String, RgbImage, (u32, u32))> = sizes
        .iter()
        .enumerate()
        .map(|(i, (name, (w, h), out))| {
            (
                format!("{name} {w}x{h}->{}x{}", out.0, out.1),
                test_image(*w, *h, i as u32),
                *out,
            )
        })
        .collect();
    for (name, img) in extra {
        cases.push((format!("{name} ->640x640"), img.clone(), (640, 640)));
    }
    let mut rows = Vec::new();
    for (case, img, (w, h)) in &cases {
        let want = pil_bilinear(img, *w, *h).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let got = gpu.resize_u8(img, *w, *h)?;
        let u8_mismatches = if got.dimensions() == want.dimensions() {
            got.as_raw()
                .iter()
                .zip(want.as_raw())
                .filter(|(a, b)| a != b)
                .count()
        } else {
            want.as_raw().len().max(1)
        };
        let spec = PreprocessSpec::resize(*h as usize, *w as usize).rescale(HF_RESCALE_FACTOR);
        let f32_max_abs = compare_f32(gpu, &[img], &spec)?;
        rows.push(PreprocessRow {
            case: case.clone(),
            u8_mismatches: Some(u8_mismatches),
            f32_max_abs,
        });
    }
    // Mixed sizes in one batch, each written into its own slot, both layouts, with
    // normalisation; then a batch without resizing.
    let (a, b, c) = (
        test_image(1280, 960, 11),
        test_image(300, 200, 12),
        test_image(640, 640, 13),
    );
    for layout in [TensorLayout::Nchw, TensorLayout::Nhwc] {
        let spec = PreprocessSpec::resize(640, 640)
            .rescale(HF_RESCALE_FACTOR)
            .normalized(MEAN, STD)
            .with_layout(layout);
        rows.push(PreprocessRow {
            case: format!("batch of 4 (3 sizes), normalised, {layout:?}"),
            u8_mismatches: None,
            f32_max_abs: compare_f32(gpu, &[&a, &b, &c, &a], &spec)?,
        });
    }
    let spec = PreprocessSpec::keep_size().rescale(1.0 / 255.0);
    rows.push(PreprocessRow {
        case: "batch of 2 without resize 640x640".into(),
        u8_mismatches: None,
        f32_max_abs: compare_f32(gpu, &[&c, &c], &spec)?,
    });
    // Into a device buffer (what a captured graph's input gets), read back.
    let spec = PreprocessSpec::resize(640, 640).rescale(HF_RESCALE_FACTOR);
    let want = preprocess_cpu(&[&a, &b], &spec)?;
    let got = gpu.run_through_device(&[&a, &b], &spec)?;
    rows.push(PreprocessRow {
        case: "batch of 2 into a device buffer (run_into)".into(),
        u8_mismatches: None,
        f32_max_abs: if got.shape() == want.shape() {
            max_abs(&got.to_f32_vec(), &want.to_f32_vec())
        } else {
            f32::INFINITY
        },
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_images_have_gradients_and_noise_per_channel() {
        let img = test_image(64, 48, 0);
        let raw = img.as_raw();
        assert_eq!(raw.len(), 64 * 48 * 3);
        let distinct: std::collections::BTreeSet<u8> = raw.iter().copied().collect();
        assert!(distinct.len() > 100, "{}", distinct.len());
        assert_ne!(test_image(8, 8, 1).as_raw(), test_image(8, 8, 2).as_raw());
    }

    #[test]
    fn rows_fail_on_any_byte_or_nan() {
        let row = |m: Option<usize>, d: f32| PreprocessRow {
            case: "x".into(),
            u8_mismatches: m,
            f32_max_abs: d,
        };
        assert!(row(Some(0), 0.0).passed());
        assert!(row(None, 1e-7).passed());
        assert!(!row(Some(1), 0.0).passed());
        assert!(!row(Some(0), f32::NAN).passed());
        assert!(!row(Some(0), 2e-6).passed());
        assert!(max_abs(&[1.0, f32::NAN], &[1.0, 0.0]).is_nan());
        assert_eq!(max_abs(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    }
}
