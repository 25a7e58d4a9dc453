//! PIL-exact bilinear resampling and conversion to normalised float tensors.
//!
//! [`pil_bilinear`] reproduces `PIL.Image.resize((w, h), Image.BILINEAR)` on RGB
//! images bit for bit (Pillow's `ImagingResample`): a separable triangle filter
//! whose support grows with the downscale factor (antialiasing), coefficients
//! normalised in f64 then converted to fixed point with 22 fractional bits
//! (`PRECISION_BITS = 32 - 8 - 2`), accumulation in i32 starting from one half,
//! arithmetic shift and clamping to 0..=255, each pass rounding to 8 bits.

use image::RgbImage;

use crate::error::VisionError;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fractional bits of the fixed-point coefficients in [`AxisTaps`]: a pass accumulates
/// `(1 << (RESIZE_PRECISION_BITS - 1)) + sum(pixel * coeff)` in i32, then shifts right
/// arithmetically by this many bits and clamps to 0..=255.
pub const RESIZE_PRECISION_BITS: u32 = PRECISION_BITS;

/// Hugging Face's default `rescale_factor` (1/255 as Python writes it).
pub const HF_RESCALE_FACTOR: f32 = 0.003_921_568_627_450_98_f64 as f32;

/// Filter taps for every output position along one axis (public so that a device
/// implementation applies exactly the coefficients [`pil_bilinear`] uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AxisTaps {
    /// First input index per output position.
    pub start: Vec<usize>,
    /// Number of taps per output position (at most `ksize`).
    pub count: Vec<usize>,
    /// Fixed-point coefficients, `ksize` per output position (unused ones are 0).
    pub coeffs: Vec<i32>,
    /// Coefficient slots per output position.
    pub ksize: usize,
}

impl AxisTaps {
    /// Number of output positions.
    pub fn len(&self) -> usize {
        self.start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
    }
}

type Taps = AxisTaps;

/// The passes [`pil_bilinear`] runs for one size change, in order. A device
/// implementation that runs the same passes with the same taps gets the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResizePlan {
    /// Taps along x when the width changes.
    pub horizontal: Option<AxisTaps>,
    /// Taps along y when the height changes.
    pub vertical: Option<AxisTaps>,
    /// Horizontal pass first (Pillow 13 runs the vertical pass first only when the
    /// width does not shrink and the height does).
    pub horizontal_first: bool,
    /// Source rows `[first, last)` a horizontal-first pass covers: the rows the vertical
    /// pass reads (all rows without one). The vertical pass then indexes source rows,
    /// so its input starts at row `first`.
    pub rows: (usize, usize),
}

/// Which passes resize `in_w x in_h` to `out_w x out_h`, with their taps.
pub fn resize_plan(
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
) -> Result<ResizePlan, VisionError> {
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return Err(VisionError::InvalidArgument(format!(
            "cannot resize {in_w}x{in_h} to {out_w}x{out_h}: sizes must be positive"
        )));
    }
    let horizontal = (out_w != in_w).then(|| precompute_taps(in_w, out_w));
    let vertical = (out_h != in_h).then(|| precompute_taps(in_h, out_h));
    let horizontal_first = !(out_w >= in_w && out_h < in_h);
    let rows = match (&vertical, horizontal_first) {
        (Some(v), true) => (v.start[0], v.start[out_h - 1] + v.count[out_h - 1]),
        _ => (0, in_h),
    };
    Ok(ResizePlan {
        horizontal,
        vertical,
        horizontal_first,
        rows,
    })
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box
/// `[0, in_size)` mapped onto `out_size` samples (both positive).
pub fn bilinear_taps(in_size: usize, out_size: usize) -> AxisTaps {
    precompute_taps(in_size, out_size)
}

fn precompute_taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 1.0; // bilinear
                              // Pillow computes the box edges in f32, then the scale in f64.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut start = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut coeffs = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; negatives are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bilinear_filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut coeffs[xx * ksize..(xx + 1) * ksize];
        for (c, &w) in row.iter_mut().zip(k.iter()).take(n) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *c = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        start.push(xmin);
        count.push(n);
    }
    Taps {
        start,
        count,
        coeffs,
        ksize,
    }
}

/// Pillow's `clip8`: arithmetic shift, then clamp.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize 8-bit RGB exactly as `PIL.Image.resize((width, height), Image.BILINEAR)`
/// does in Pillow 13: horizontal pass first, except when the width does not
/// shrink and the height does (then vertical first, on the full width). Older
/// Pillow always ran the horizontal pass first; on those few size combinations
/// results then differ by at most 1 on some pixels.
pub fn pil_bilinear(src: &RgbImage, width: u32, height: u32) -> Result<RgbImage, VisionError> {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let plan = resize_plan(in_w, in_h, out_w, out_h)?;
    let src_raw = src.as_raw();
    let data = if plan.horizontal_first {
        // The horizontal pass only covers the rows the vertical pass reads.
        let (first, last) = plan.rows;
        let rows = &src_raw[first * in_w * 3..last * in_w * 3];
        let tmp = match &plan.horizontal {
            Some(h) => horizontal_pass(rows, in_w, out_w, h),
            None => rows.to_vec(),
        };
        match &plan.vertical {
            Some(v) => vertical_pass(&tmp, out_w, first, out_h, v),
            None => tmp,
        }
    } else {
        // Only reached when the height shrinks, so the vertical pass always runs.
        let tmp = match &plan.vertical {
            Some(v) => vertical_pass(src_raw, in_w, 0, out_h, v),
            None => src_raw.to_vec(),
        };
        match &plan.horizontal {
            Some(h) => horizontal_pass(&tmp, in_w, out_w, h),
            None => tmp,
        }
    };
    image_from(out_w, out_h, data)
}

/// Resample every row of `src` (rows of `in_w` RGB pixels) to `out_w` pixels.
fn horizontal_pass(src: &[u8], in_w: usize, out_w: usize, taps: &Taps) -> Vec<u8> {
    let rows = src.len() / (in_w * 3);
    let mut out = vec![0u8; rows * out_w * 3];
    for (in_row, out_row) in src
        .chunks_exact(in_w * 3)
        .zip(out.chunks_exact_mut(out_w * 3))
    {
        for (xx, out_px) in out_row.chunks_exact_mut(3).enumerate() {
            let base = xx * taps.ksize;
            let k = &taps.coeffs[base..base + taps.count[xx]];
            let px = &in_row[taps.start[xx] * 3..];
            let mut acc = [HALF; 3];
            for (p, &kx) in px.chunks_exact(3).zip(k) {
                acc[0] += i32::from(p[0]) * kx;
                acc[1] += i32::from(p[1]) * kx;
                acc[2] += i32::from(p[2]) * kx;
            }
            out_px[0] = clip8(acc[0]);
            out_px[1] = clip8(acc[1]);
            out_px[2] = clip8(acc[2]);
        }
    }
    out
}

/// Resample columns: `src` holds rows of `w` RGB pixels starting at source row
/// `first_row`; the output has `out_h` rows.
fn vertical_pass(src: &[u8], w: usize, first_row: usize, out_h: usize, taps: &Taps) -> Vec<u8> {
    let row_len = w * 3;
    let mut out = vec![0u8; out_h * row_len];
    let mut acc = vec![0i32; row_len];
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let base = yy * taps.ksize;
        let k = &taps.coeffs[base..base + taps.count[yy]];
        let ymin = taps.start[yy] - first_row;
        acc.fill(HALF);
        for (in_row, &ky) in src[ymin * row_len..].chunks_exact(row_len).zip(k) {
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += i32::from(p) * ky;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

fn image_from(w: usize, h: usize, data: Vec<u8>) -> Result<RgbImage, VisionError> {
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| VisionError::InvalidArgument("internal buffer size mismatch".into()))
}

/// NCHW (one image, C = 3) f32 values `v as f32 * scale`, multiplied in f32 as the
/// HF fast (torch) image processors do; pass [`HF_RESCALE_FACTOR`] for 1/255.
/// (The numpy processors multiply in f64 and round once to f32; the two differ by
/// at most one f32 ulp.)
pub fn to_nchw_f32(img: &RgbImage, scale: f32) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0.0f32; plane * 3];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            out[c * plane + i] = f32::from(v) * scale;
        }
    }
    out
}

/// In-place `(x - mean[c]) / std[c]` on one CHW image, computed in f32 like
/// torchvision's `normalize`.
pub fn normalize_chw(data: &mut [f32], mean: [f32; 3], std: [f32; 3]) -> Result<(), VisionError> {
    if !data.len().is_multiple_of(3) {
        return Err(VisionError::InvalidArgument(format!(
            "normalize: {} values is not a 3-channel image",
            data.len()
        )));
    }
    if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
        return Err(VisionError::InvalidArgument(format!(
            "normalize: std {std:?} must be finite and non-zero"
        )));
    }
    let plane = data.len() / 3;
    for (c, chunk) in data.chunks_exact_mut(plane.max(1)).enumerate().take(3) {
        for v in chunk {
            *v = (*v - mean[c]) / std[c];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_taps_are_pillows_triangle_weights() {
        // 4 -> 2: scale 2, support 2; output 0 is centred on input 1 and reads inputs
        // 0..3 with triangle weights 0.75, 0.75, 0.25 (sum 1.75), i.e. 3/7, 3/7, 1/7.
        let t = bilinear_taps(4, 2);
        assert_eq!(t.ksize, 5);
        assert_eq!(t.start, vec![0, 1]);
        assert_eq!(t.count, vec![3, 3]);
        let one = f64::from(1u32 << RESIZE_PRECISION_BITS);
        let q = |w: f64| (w * one + 0.5) as i32;
        assert_eq!(
            &t.coeffs[..5],
            &[q(3.0 / 7.0), q(3.0 / 7.0), q(1.0 / 7.0), 0, 0]
        );
        assert_eq!(&t.coeffs[5..8], &[q(1.0 / 7.0), q(3.0 / 7.0), q(3.0 / 7.0)]);
    }

    #[test]
    fn taps_stay_inside_the_source_and_sum_to_one() {
        let one = 1i64 << RESIZE_PRECISION_BITS;
        for (i, o) in [
            (1280, 640),
            (300, 640),
            (7, 3),
            (3, 7),
            (640, 640),
            (1, 5),
            (997, 13),
        ] {
            let t = bilinear_taps(i, o);
            assert_eq!(t.len(), o);
            assert_eq!(t.coeffs.len(), o * t.ksize);
            for x in 0..o {
                assert!(t.count[x] >= 1 && t.count[x] <= t.ksize, "{i}->{o} at {x}");
                assert!(t.start[x] + t.count[x] <= i, "{i}->{o} at {x}");
                let row = &t.coeffs[x * t.ksize..(x + 1) * t.ksize];
                let sum: i64 = row.iter().map(|&c| i64::from(c)).sum();
                // Each coefficient is rounded on its own: the sum is off by at most
                // half a unit per tap.
                assert!(
                    (sum - one).abs() <= t.count[x] as i64,
                    "{i}->{o} at {x}: {sum}"
                );
                assert!(row[t.count[x]..].iter().all(|&c| c == 0));
            }
        }
    }

    #[test]
    fn plan_picks_the_passes_and_their_order() {
        let p = resize_plan(1280, 960, 640, 640).unwrap();
        assert!(p.horizontal_first && p.horizontal.is_some() && p.vertical.is_some());
        let v = p.vertical.as_ref().unwrap();
        assert_eq!(p.rows, (v.start[0], v.start[639] + v.count[639]));
        // Width grows, height shrinks: vertical first, over every source row.
        let p = resize_plan(300, 900, 640, 640).unwrap();
        assert!(!p.horizontal_first && p.horizontal.is_some() && p.vertical.is_some());
        assert_eq!(p.rows, (0, 900));
        // Same width: only the vertical pass.
        let p = resize_plan(640, 480, 640, 640).unwrap();
        assert!(p.horizontal.is_none() && p.vertical.is_some());
        let p = resize_plan(640, 640, 640, 640).unwrap();
        assert!(p.horizontal.is_none() && p.vertical.is_none());
        assert_eq!(p.rows, (0, 640));
        assert!(resize_plan(0, 4, 2, 2).is_err());
        assert!(resize_plan(4, 4, 2, 0).is_err());
    }
}
