//! Reflection padding of NCHW f32 images to a multiple of a block size, and
//! cropping back.
//!
//! Padding goes on the bottom and right only, as Restormer's reference code does
//! (`F.pad(x, (0, pad_w, 0, pad_h), mode='reflect')`). Reflection excludes the edge
//! pixel: row `h + i` copies row `h - 2 - i`, as PyTorch's `reflect` mode does.
//!
//! PyTorch refuses a pad that is not smaller than the dimension. [`ReflectPolicy::Torch`]
//! does the same; [`ReflectPolicy::Iterate`] instead keeps reflecting back and forth
//! (what padding by `n - 1` repeatedly would give; a 1-pixel dimension repeats its
//! pixel), so tiny images still work. Both agree whenever PyTorch accepts the pad.

use crate::error::VisionError;

/// What to do when a pad is not smaller than the dimension it extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReflectPolicy {
    /// Refuse, as `torch.nn.functional.pad(mode='reflect')` does.
    Torch,
    /// Keep reflecting (triangle-wave indexing).
    #[default]
    Iterate,
}

/// Shape of an NCHW tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nchw {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Nchw {
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Source index for output index `i` of a reflected axis of length `n`.
fn reflect_index(i: usize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let r = i % period;
    if r < n {
        r
    } else {
        period - r
    }
}

fn check_len(data: &[f32], shape: Nchw) -> Result<(), VisionError> {
    if data.len() != shape.len() || shape.h == 0 || shape.w == 0 {
        return Err(VisionError::InvalidArgument(format!(
            "an NCHW tensor of shape {shape:?} needs {} values (and non-zero H, W), got {}",
            shape.len(),
            data.len()
        )));
    }
    Ok(())
}

/// Pad the bottom by `pad_h` rows and the right by `pad_w` columns by reflection.
pub fn reflect_pad(
    data: &[f32],
    shape: Nchw,
    pad_h: usize,
    pad_w: usize,
    policy: ReflectPolicy,
) -> Result<(Vec<f32>, Nchw), VisionError> {
    check_len(data, shape)?;
    if policy == ReflectPolicy::Torch && (pad_h >= shape.h || pad_w >= shape.w) {
        return Err(VisionError::InvalidArgument(format!(
            "reflection padding ({pad_h}, {pad_w}) must be smaller than the image size \
             ({}, {})",
            shape.h, shape.w
        )));
    }
    let out_shape = Nchw {
        h: shape.h + pad_h,
        w: shape.w + pad_w,
        ..shape
    };
    let mut out = Vec::with_capacity(out_shape.len());
    let cols: Vec<usize> = (0..out_shape.w)
        .map(|x| reflect_index(x, shape.w))
        .collect();
    for plane in data.chunks_exact(shape.h * shape.w) {
        for y in 0..out_shape.h {
            let row = &plane[reflect_index(y, shape.h) * shape.w..][..shape.w];
            out.extend(cols.iter().map(|&x| row[x]));
        }
    }
    Ok((out, out_shape))
}

/// Pad H and W up to the next multiple of `m` (no-op when already multiples),
/// iterating the reflection for images smaller than the pad.
pub fn pad_to_multiple(
    data: &[f32],
    shape: Nchw,
    m: usize,
) -> Result<(Vec<f32>, Nchw), VisionError> {
    if m == 0 {
        return Err(VisionError::InvalidArgument(
            "pad multiple must be positive".into(),
        ));
    }
    let pad_h = (m - shape.h % m) % m;
    let pad_w = (m - shape.w % m) % m;
    reflect_pad(data, shape, pad_h, pad_w, ReflectPolicy::Iterate)
}

/// Keep the top-left `h` x `w` of every plane (undoes [`pad_to_multiple`]).
pub fn crop(data: &[f32], shape: Nchw, h: usize, w: usize) -> Result<Vec<f32>, VisionError> {
    check_len(data, shape)?;
    if h == 0 || w == 0 || h > shape.h || w > shape.w {
        return Err(VisionError::InvalidArgument(format!(
            "cannot crop {}x{} to {h}x{w}",
            shape.h, shape.w
        )));
    }
    let mut out = Vec::with_capacity(shape.n * shape.c * h * w);
    for plane in data.chunks_exact(shape.h * shape.w) {
        for row in plane.chunks_exact(shape.w).take(h) {
            out.extend_from_slice(&row[..w]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, c: usize, h: usize, w: usize) -> Nchw {
        Nchw { n, c, h, w }
    }

    #[test]
    fn reflect_matches_torch_semantics() {
        // One 3x4 plane with values 10*y + x: torch reflect of (0, 2, 0, 2) gives
        // rows 0 1 2 1 0 and columns 0 1 2 3 2 1.
        let data: Vec<f32> = (0..3)
            .flat_map(|y| (0..4).map(move |x| (10 * y + x) as f32))
            .collect();
        let (out, s) = reflect_pad(&data, shape(1, 1, 3, 4), 2, 2, ReflectPolicy::Torch).unwrap();
        assert_eq!(s, shape(1, 1, 5, 6));
        let rows = [0, 1, 2, 1, 0];
        let cols = [0, 1, 2, 3, 2, 1];
        for (y, &ry) in rows.iter().enumerate() {
            for (x, &cx) in cols.iter().enumerate() {
                assert_eq!(out[y * 6 + x], (10 * ry + cx) as f32, "at {y},{x}");
            }
        }
    }

    #[test]
    fn torch_policy_refuses_large_pads_iterate_folds() {
        let data = [1.0f32, 2.0];
        let err = reflect_pad(&data, shape(1, 1, 1, 2), 0, 2, ReflectPolicy::Torch);
        assert!(err.is_err());
        let (out, s) = reflect_pad(&data, shape(1, 1, 1, 2), 0, 5, ReflectPolicy::Iterate).unwrap();
        assert_eq!(s.w, 7);
        assert_eq!(out, vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]);
        // 1x1 image: every padded pixel repeats the only one.
        let (out, s) = pad_to_multiple(&[5.0], shape(1, 1, 1, 1), 8).unwrap();
        assert_eq!((s.h, s.w), (8, 8));
        assert!(out.iter().all(|&v| v == 5.0));
    }

    #[test]
    fn pad_to_multiple_then_crop_round_trips() {
        let s = shape(2, 3, 13, 9);
        let data: Vec<f32> = (0..s.len()).map(|i| i as f32 * 0.5).collect();
        let (padded, ps) = pad_to_multiple(&data, s, 8).unwrap();
        assert_eq!((ps.n, ps.c, ps.h, ps.w), (2, 3, 16, 16));
        assert_eq!(padded.len(), ps.len());
        assert_eq!(crop(&padded, ps, 13, 9).unwrap(), data);
        // Already a multiple: unchanged.
        let s8 = shape(1, 1, 8, 16);
        let d8: Vec<f32> = (0..s8.len()).map(|i| i as f32).collect();
        assert_eq!(pad_to_multiple(&d8, s8, 8).unwrap().0, d8);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(reflect_pad(&[1.0; 5], shape(1, 1, 2, 2), 1, 1, ReflectPolicy::Iterate).is_err());
        assert!(pad_to_multiple(&[1.0; 4], shape(1, 1, 2, 2), 0).is_err());
        assert!(crop(&[1.0; 4], shape(1, 1, 2, 2), 3, 1).is_err());
        assert!(crop(&[1.0; 4], shape(1, 1, 2, 2), 0, 1).is_err());
    }
}
