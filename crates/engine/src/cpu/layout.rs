//! Layout conversions and channel shuffles. Channel orders follow PyTorch's NCHW
//! semantics exactly, so weights trained there work unchanged.

use super::CpuTensor;
use crate::error::{EngineError, Result};
use crate::tensor::HostTensor;

pub fn nchw_to_nhwc(x: &HostTensor) -> Result<CpuTensor> {
    let s = x.shape();
    if s.len() != 4 {
        return Err(EngineError::Shape(format!(
            "expected an NCHW image tensor (4-D), got shape {s:?}"
        )));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let src = x.to_f32_vec();
    let mut out = CpuTensor::zeros(n, h, w, c);
    for b in 0..n {
        for ch in 0..c {
            let plane = &src[(b * c + ch) * h * w..][..h * w];
            for (p, &v) in plane.iter().enumerate() {
                out.data[(b * h * w + p) * c + ch] = v;
            }
        }
    }
    Ok(out)
}

pub fn nhwc_to_nchw(x: &CpuTensor) -> Result<HostTensor> {
    let (n, h, w, c) = (x.n, x.h, x.w, x.c);
    let mut out = vec![0.0f32; x.data.len()];
    for b in 0..n {
        for p in 0..h * w {
            let px = &x.data[(b * h * w + p) * c..][..c];
            for (ch, &v) in px.iter().enumerate() {
                out[(b * c + ch) * h * w + p] = v;
            }
        }
    }
    HostTensor::from_f32(vec![n, c, h, w], out)
}

/// `PixelShuffle(r)`: out[c, y*r+i, x*r+j] = in[c*r*r + i*r + j, y, x].
pub fn pixel_shuffle(x: &CpuTensor, r: usize) -> Result<CpuTensor> {
    if r == 0 || !x.c.is_multiple_of(r * r) {
        return Err(EngineError::Shape(format!(
            "pixel shuffle by {r} needs channels divisible by {}, got {}",
            r * r,
            x.c
        )));
    }
    let co = x.c / (r * r);
    let mut out = CpuTensor::zeros(x.n, x.h * r, x.w * r, co);
    for b in 0..x.n {
        for y in 0..x.h {
            for xx in 0..x.w {
                let src = &x.data[x.offset(b, y, xx)..][..x.c];
                for c in 0..co {
                    for i in 0..r {
                        for j in 0..r {
                            let o = out.offset(b, y * r + i, xx * r + j) + c;
                            out.data[o] = src[c * r * r + i * r + j];
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `PixelUnshuffle(r)`: out[c*r*r + i*r + j, y, x] = in[c, y*r+i, x*r+j].
pub fn pixel_unshuffle(x: &CpuTensor, r: usize) -> Result<CpuTensor> {
    if r == 0 || !x.h.is_multiple_of(r) || !x.w.is_multiple_of(r) {
        return Err(EngineError::Shape(format!(
            "pixel unshuffle by {r} needs H and W divisible by {r}, got {}x{}",
            x.h, x.w
        )));
    }
    let mut out = CpuTensor::zeros(x.n, x.h / r, x.w / r, x.c * r * r);
    for b in 0..x.n {
        for y in 0..out.h {
            for xx in 0..out.w {
                let o = out.offset(b, y, xx);
                for i in 0..r {
                    for j in 0..r {
                        let src = &x.data[x.offset(b, y * r + i, xx * r + j)..][..x.c];
                        for (c, &v) in src.iter().enumerate() {
                            out.data[o + c * r * r + i * r + j] = v;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

pub fn concat_channels(a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
    if (a.n, a.h, a.w) != (b.n, b.h, b.w) {
        return Err(EngineError::Shape(format!(
            "cannot concatenate {:?} and {:?} along channels",
            a.dims(),
            b.dims()
        )));
    }
    let mut out = CpuTensor::zeros(a.n, a.h, a.w, a.c + b.c);
    for p in 0..a.n * a.h * a.w {
        let d = &mut out.data[p * (a.c + b.c)..][..a.c + b.c];
        d[..a.c].copy_from_slice(&a.data[p * a.c..][..a.c]);
        d[a.c..].copy_from_slice(&b.data[p * b.c..][..b.c]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, h: usize, w: usize, c: usize) -> CpuTensor {
        CpuTensor {
            n,
            h,
            w,
            c,
            data: (0..n * h * w * c).map(|v| v as f32).collect(),
        }
    }

    #[test]
    fn shuffle_inverts_unshuffle() {
        let x = ramp(2, 4, 6, 3);
        let y = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), [2, 2, 3, 12]);
        assert_eq!(pixel_shuffle(&y, 2).unwrap(), x);
    }

    #[test]
    fn unshuffle_matches_torch_channel_order() {
        // One channel, 2x2 image [[0,1],[2,3]] -> 4 channels in (i, j) order.
        let x = ramp(1, 2, 2, 1);
        let y = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(y.data, vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn layout_round_trip() {
        let t =
            HostTensor::from_f32(vec![2, 3, 4, 5], (0..120).map(|v| v as f32).collect()).unwrap();
        let back = nhwc_to_nchw(&nchw_to_nhwc(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
