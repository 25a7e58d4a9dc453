//! Spatial and channel rearrangements used by detection backbones and necks: zero
//! padding, max pooling, nearest upsampling, scalar affine, channel slicing and
//! concatenation, element-wise products, sigmoid and clamp.

use rayon::prelude::*;

use super::CpuTensor;
use crate::error::{EngineError, Result};

pub fn reshape(mut x: CpuTensor, dims: [usize; 4]) -> Result<CpuTensor> {
    if dims.iter().product::<usize>() != x.data.len() {
        return Err(EngineError::Shape(format!(
            "cannot reshape {:?} to {dims:?}",
            x.dims()
        )));
    }
    let [n, h, w, c] = dims;
    Ok(CpuTensor {
        n,
        h,
        w,
        c,
        data: std::mem::take(&mut x.data),
    })
}

pub fn pad_zeros(x: &CpuTensor, top: usize, bottom: usize, left: usize, right: usize) -> CpuTensor {
    let mut out = CpuTensor::zeros(x.n, x.h + top + bottom, x.w + left + right, x.c);
    for b in 0..x.n {
        for y in 0..x.h {
            let src = &x.data[x.offset(b, y, 0)..][..x.w * x.c];
            let dst = out.offset(b, y + top, left);
            out.data[dst..dst + x.w * x.c].copy_from_slice(src);
        }
    }
    out
}

pub fn max_pool2d(x: &CpuTensor, kernel: usize, stride: usize) -> Result<CpuTensor> {
    if kernel == 0 || stride == 0 || x.h < kernel || x.w < kernel {
        return Err(EngineError::Shape(format!(
            "max pool {kernel}x{kernel} stride {stride} does not fit a {}x{} input",
            x.h, x.w
        )));
    }
    let (oh, ow) = ((x.h - kernel) / stride + 1, (x.w - kernel) / stride + 1);
    let mut out = CpuTensor::zeros(x.n, oh, ow, x.c);
    let c = x.c;
    out.data
        .par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, oy) = (row / oh, row % oh);
            for ox in 0..ow {
                let d = &mut dst[ox * c..(ox + 1) * c];
                d.fill(f32::NEG_INFINITY);
                for ky in 0..kernel {
                    for kx in 0..kernel {
                        let src = &x.data[x.offset(b, oy * stride + ky, ox * stride + kx)..][..c];
                        for (o, &v) in d.iter_mut().zip(src) {
                            // NaN propagates, as in PyTorch.
                            if v > *o || v.is_nan() {
                                *o = v;
                            }
                        }
                    }
                }
            }
        });
    Ok(out)
}

pub fn upsample_nearest(x: &CpuTensor, factor: usize) -> Result<CpuTensor> {
    if factor == 0 {
        return Err(EngineError::Invalid(
            "upsampling factor must be at least 1".into(),
        ));
    }
    let mut out = CpuTensor::zeros(x.n, x.h * factor, x.w * factor, x.c);
    let c = x.c;
    let (oh, ow) = (out.h, out.w);
    out.data
        .par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, oy) = (row / oh, row % oh);
            for ox in 0..ow {
                let src = &x.data[x.offset(b, oy / factor, ox / factor)..][..c];
                dst[ox * c..(ox + 1) * c].copy_from_slice(src);
            }
        });
    Ok(out)
}

pub fn map(x: &CpuTensor, f: impl Fn(f32) -> f32 + Sync) -> CpuTensor {
    let data = x.data.par_iter().map(|&v| f(v)).collect();
    CpuTensor { data, ..*x }
}

pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

pub fn slice_channels(x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
    if start + len > x.c {
        return Err(EngineError::Shape(format!(
            "channels {start}..{} of a {}-channel tensor",
            start + len,
            x.c
        )));
    }
    let mut out = CpuTensor::zeros(x.n, x.h, x.w, len);
    for (dst, src) in out
        .data
        .chunks_mut(len.max(1))
        .zip(x.data.chunks(x.c.max(1)))
    {
        dst.copy_from_slice(&src[start..start + len]);
    }
    Ok(out)
}

pub fn concat_channels_n(parts: &[&CpuTensor]) -> Result<CpuTensor> {
    let first = parts
        .first()
        .ok_or_else(|| EngineError::Invalid("nothing to concatenate".into()))?;
    if let Some(p) = parts
        .iter()
        .find(|p| (p.n, p.h, p.w) != (first.n, first.h, first.w))
    {
        return Err(EngineError::Shape(format!(
            "cannot concatenate {:?} and {:?} along channels",
            first.dims(),
            p.dims()
        )));
    }
    let c: usize = parts.iter().map(|p| p.c).sum();
    let mut out = CpuTensor::zeros(first.n, first.h, first.w, c);
    out.data
        .par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(px, dst)| {
            let mut at = 0;
            for p in parts {
                dst[at..at + p.c].copy_from_slice(&p.data[px * p.c..(px + 1) * p.c]);
                at += p.c;
            }
        });
    Ok(out)
}

pub fn mul(a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
    if (a.n, a.h, a.w) != (b.n, b.h, b.w) || (b.c != a.c && b.c != 1) {
        return Err(EngineError::Shape(format!(
            "cannot multiply {:?} by {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let mut out = a.clone();
    let c = a.c.max(1);
    out.data
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(px, dst)| {
            if b.c == 1 {
                let s = b.data[px];
                dst.iter_mut().for_each(|v| *v *= s);
            } else {
                dst.iter_mut()
                    .zip(&b.data[px * c..(px + 1) * c])
                    .for_each(|(v, s)| *v *= s);
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize, h: usize, w: usize, c: usize, data: Vec<f32>) -> CpuTensor {
        CpuTensor { n, h, w, c, data }
    }

    #[test]
    fn pad_then_pool_matches_hand_computation() {
        // [[1, 2], [3, 4]] padded right/bottom with zeros, then 2x2 max pool stride 1.
        let x = t(1, 2, 2, 1, vec![1.0, -2.0, 3.0, -4.0]);
        let p = pad_zeros(&x, 0, 1, 0, 1);
        assert_eq!(p.data, vec![1.0, -2.0, 0.0, 3.0, -4.0, 0.0, 0.0, 0.0, 0.0]);
        let m = max_pool2d(&p, 2, 1).unwrap();
        assert_eq!(m.data, vec![3.0, 0.0, 3.0, 0.0]);
        assert!(max_pool2d(&x, 3, 1).is_err());
    }

    #[test]
    fn nearest_upsampling_repeats_pixels() {
        let x = t(1, 1, 2, 2, vec![1.0, 2.0, 3.0, 4.0]);
        let y = upsample_nearest(&x, 2).unwrap();
        assert_eq!(y.dims(), [1, 2, 4, 2]);
        assert_eq!(&y.data[..8], &[1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
        assert_eq!(&y.data[8..], &y.data[..8]);
    }

    #[test]
    fn slice_and_concat_are_inverse() {
        let x = t(1, 1, 2, 3, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let a = slice_channels(&x, 0, 1).unwrap();
        let b = slice_channels(&x, 1, 2).unwrap();
        assert_eq!(b.data, vec![1.0, 2.0, 4.0, 5.0]);
        assert_eq!(concat_channels_n(&[&a, &b]).unwrap(), x);
        assert!(slice_channels(&x, 2, 2).is_err());
    }

    #[test]
    fn mul_broadcasts_a_single_channel() {
        let a = t(1, 1, 2, 2, vec![1.0, 2.0, 3.0, 4.0]);
        let m = t(1, 1, 2, 1, vec![0.0, 2.0]);
        assert_eq!(mul(&a, &m).unwrap().data, vec![0.0, 0.0, 6.0, 8.0]);
        assert_eq!(mul(&a, &a).unwrap().data, vec![1.0, 4.0, 9.0, 16.0]);
        assert!(mul(&m, &a).is_err());
    }

    #[test]
    fn map_applies_affine_and_clamp() {
        let x = t(1, 1, 1, 3, vec![-2.0, 0.5, 3.0]);
        assert_eq!(map(&x, |v| 2.0 * v + 1.0).data, vec![-3.0, 2.0, 7.0]);
        assert_eq!(map(&x, |v| v.clamp(-1.0, 1.0)).data, vec![-1.0, 0.5, 1.0]);
    }

    #[test]
    fn sigmoid_and_reshape() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(2.0) - 0.880_797_1).abs() < 1e-6);
        let x = t(1, 2, 3, 1, vec![0.0; 6]);
        assert_eq!(
            reshape(x.clone(), [1, 1, 6, 1]).unwrap().dims(),
            [1, 1, 6, 1]
        );
        assert!(reshape(x, [1, 1, 5, 1]).is_err());
    }
}
