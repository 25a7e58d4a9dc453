//! NHWC convolutions: 1x1 as one matrix product, dense k x k through per-row im2col,
//! depthwise and other grouped convolutions by direct loops.

use rayon::prelude::*;

use super::gemm::{matmul, matmul_serial};
use super::{apply_activation, CpuTensor};
use crate::backend::{Activation, ConvShape, ConvSpec};
use crate::error::{EngineError, Result};
use crate::tensor::HostTensor;

/// Convolution weights laid out for the CPU kernels.
#[derive(Clone, Debug)]
pub struct CpuConv {
    pub spec: ConvSpec,
    pub c_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    /// Dense/1x1: `[kh, kw, c_in, c_out]`. Grouped: `[c_out, kh, kw, c_in/groups]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl CpuConv {
    pub fn from_oihw(
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        spec: ConvSpec,
    ) -> Result<Self> {
        let ConvShape {
            c_out,
            c_in,
            kh,
            kw,
        } = ConvShape::of(weight, bias, spec)?;
        let cig = c_in / spec.groups;
        let w = weight.to_f32_vec();
        let weight = if spec.groups == 1 {
            let mut out = vec![0.0; w.len()];
            for o in 0..c_out {
                for i in 0..c_in {
                    for y in 0..kh {
                        for x in 0..kw {
                            out[((y * kw + x) * c_in + i) * c_out + o] =
                                w[((o * c_in + i) * kh + y) * kw + x];
                        }
                    }
                }
            }
            out
        } else {
            let mut out = vec![0.0; w.len()];
            for o in 0..c_out {
                for i in 0..cig {
                    for y in 0..kh {
                        for x in 0..kw {
                            out[((o * kh + y) * kw + x) * cig + i] =
                                w[((o * cig + i) * kh + y) * kw + x];
                        }
                    }
                }
            }
            out
        };
        let bias = bias.map(HostTensor::to_f32_vec);
        Ok(Self {
            spec,
            c_in,
            c_out,
            kh,
            kw,
            weight,
            bias,
        })
    }

    /// One filter per channel (groups == channels), the layout `[c_out, kh, kw, 1]`.
    fn is_depthwise(&self) -> bool {
        self.spec.groups == self.c_in && self.c_in == self.c_out
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let p = self.spec.padding;
        if h + 2 * p < self.kh || w + 2 * p < self.kw {
            return Err(EngineError::Shape(format!(
                "input {h}x{w} is smaller than the {}x{} kernel",
                self.kh, self.kw
            )));
        }
        Ok((
            (h + 2 * p - self.kh) / self.spec.stride + 1,
            (w + 2 * p - self.kw) / self.spec.stride + 1,
        ))
    }
}

/// `act(conv(x) + bias) + residual`.
pub fn conv2d(
    x: &CpuTensor,
    conv: &CpuConv,
    act: Activation,
    residual: Option<&CpuTensor>,
) -> Result<CpuTensor> {
    if x.c != conv.c_in {
        return Err(EngineError::Shape(format!(
            "convolution expects {} input channels, got {}",
            conv.c_in, x.c
        )));
    }
    let (oh, ow) = conv.out_size(x.h, x.w)?;
    let mut out = CpuTensor::zeros(x.n, oh, ow, conv.c_out);
    if let Some(r) = residual {
        if r.dims() != out.dims() {
            return Err(EngineError::Shape(format!(
                "residual {:?} does not match convolution output {:?}",
                r.dims(),
                out.dims()
            )));
        }
    }
    let pointwise = conv.kh == 1 && conv.kw == 1 && conv.spec.stride == 1 && conv.spec.padding == 0;
    if conv.spec.groups == 1 && pointwise {
        matmul(
            &x.data,
            &conv.weight,
            &mut out.data,
            x.n * x.h * x.w,
            conv.c_in,
            conv.c_out,
            false,
        );
    } else if conv.spec.groups == 1 {
        dense_im2col(x, conv, &mut out);
    } else if conv.is_depthwise() {
        depthwise(x, conv, &mut out);
    } else {
        grouped_direct(x, conv, &mut out);
    }
    epilogue(&mut out, conv.bias.as_deref(), act, residual);
    Ok(out)
}

fn epilogue(
    out: &mut CpuTensor,
    bias: Option<&[f32]>,
    act: Activation,
    residual: Option<&CpuTensor>,
) {
    let c = out.c;
    out.data
        .par_chunks_mut(c * 64)
        .enumerate()
        .for_each(|(blk, chunk)| {
            let base = blk * c * 64;
            for (i, v) in chunk.iter_mut().enumerate() {
                let mut y = *v;
                if let Some(b) = bias {
                    y += b[i % c];
                }
                y = apply_activation(y, act);
                if let Some(r) = residual {
                    y += r.data[base + i];
                }
                *v = y;
            }
        });
}

/// Dense convolution: for each output row, gather its patches into `[ow, kh*kw*c_in]`
/// and multiply by the `[kh*kw*c_in, c_out]` weight matrix.
fn dense_im2col(x: &CpuTensor, conv: &CpuConv, out: &mut CpuTensor) {
    let (oh, ow, c_out) = (out.h, out.w, out.c);
    let k = conv.kh * conv.kw * conv.c_in;
    out.data
        .par_chunks_mut(ow * c_out)
        .enumerate()
        .for_each(|(row, dst)| {
            let (n, oy) = (row / oh, row % oh);
            let mut patches = vec![0.0f32; ow * k];
            for ox in 0..ow {
                let p = &mut patches[ox * k..(ox + 1) * k];
                for ky in 0..conv.kh {
                    let iy = (oy * conv.spec.stride + ky) as isize - conv.spec.padding as isize;
                    for kx in 0..conv.kw {
                        let ix = (ox * conv.spec.stride + kx) as isize - conv.spec.padding as isize;
                        let seg = &mut p
                            [(ky * conv.kw + kx) * conv.c_in..(ky * conv.kw + kx + 1) * conv.c_in];
                        if iy >= 0 && (iy as usize) < x.h && ix >= 0 && (ix as usize) < x.w {
                            let src = x.offset(n, iy as usize, ix as usize);
                            seg.copy_from_slice(&x.data[src..src + conv.c_in]);
                        }
                    }
                }
            }
            matmul_serial(&patches, &conv.weight, dst, ow, k, c_out, 0.0);
        });
}

/// Depthwise convolution: per output row, each tap is a multiply-add over contiguous
/// channel vectors, which the compiler vectorises.
fn depthwise(x: &CpuTensor, conv: &CpuConv, out: &mut CpuTensor) {
    let (oh, ow, c) = (out.h, out.w, out.c);
    let taps = conv.kh * conv.kw;
    // [tap, channel] so that a tap's weights are contiguous like the pixels.
    let mut wt = vec![0.0f32; taps * c];
    for ch in 0..c {
        for t in 0..taps {
            wt[t * c + ch] = conv.weight[ch * taps + t];
        }
    }
    out.data
        .par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (n, oy) = (row / oh, row % oh);
            for ky in 0..conv.kh {
                let iy = (oy * conv.spec.stride + ky) as isize - conv.spec.padding as isize;
                if iy < 0 || iy as usize >= x.h {
                    continue;
                }
                for kx in 0..conv.kw {
                    let w = &wt[(ky * conv.kw + kx) * c..][..c];
                    for ox in 0..ow {
                        let ix = (ox * conv.spec.stride + kx) as isize - conv.spec.padding as isize;
                        if ix < 0 || ix as usize >= x.w {
                            continue;
                        }
                        let src = &x.data[x.offset(n, iy as usize, ix as usize)..][..c];
                        let d = &mut dst[ox * c..(ox + 1) * c];
                        for ((o, &a), &b) in d.iter_mut().zip(src).zip(w) {
                            *o += a * b;
                        }
                    }
                }
            }
        });
}

/// Grouped convolution by direct summation.
fn grouped_direct(x: &CpuTensor, conv: &CpuConv, out: &mut CpuTensor) {
    let (oh, ow, c_out) = (out.h, out.w, out.c);
    let groups = conv.spec.groups;
    let cig = conv.c_in / groups;
    let cog = c_out / groups;
    out.data
        .par_chunks_mut(ow * c_out)
        .enumerate()
        .for_each(|(row, dst)| {
            let (n, oy) = (row / oh, row % oh);
            for ox in 0..ow {
                let d = &mut dst[ox * c_out..(ox + 1) * c_out];
                for ky in 0..conv.kh {
                    let iy = (oy * conv.spec.stride + ky) as isize - conv.spec.padding as isize;
                    if iy < 0 || iy as usize >= x.h {
                        continue;
                    }
                    for kx in 0..conv.kw {
                        let ix = (ox * conv.spec.stride + kx) as isize - conv.spec.padding as isize;
                        if ix < 0 || ix as usize >= x.w {
                            continue;
                        }
                        let src = &x.data[x.offset(n, iy as usize, ix as usize)..][..conv.c_in];
                        for (o, acc) in d.iter_mut().enumerate() {
                            let g = o / cog;
                            let w =
                                &conv.weight[((o * conv.kh + ky) * conv.kw + kx) * cig..][..cig];
                            let s = &src[g * cig..(g + 1) * cig];
                            *acc += w.iter().zip(s).map(|(a, b)| a * b).sum::<f32>();
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct NCHW-semantics convolution for checking the optimised paths.
    fn naive(x: &CpuTensor, w: &[f32], c_out: usize, k: usize, spec: ConvSpec) -> Vec<f32> {
        let cig = x.c / spec.groups;
        let cog = c_out / spec.groups;
        let oh = (x.h + 2 * spec.padding - k) / spec.stride + 1;
        let ow = (x.w + 2 * spec.padding - k) / spec.stride + 1;
        let mut out = vec![0.0; x.n * oh * ow * c_out];
        for n in 0..x.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..c_out {
                        let g = o / cog;
                        let mut acc = 0.0;
                        for i in 0..cig {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy =
                                        (oy * spec.stride + ky) as isize - spec.padding as isize;
                                    let ix =
                                        (ox * spec.stride + kx) as isize - spec.padding as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= x.h || ix as usize >= x.w
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x.data[x.offset(n, iy as usize, ix as usize) + g * cig + i];
                                    acc += xv * w[((o * cig + i) * k + ky) * k + kx];
                                }
                            }
                        }
                        out[((n * oh + oy) * ow + ox) * c_out + o] = acc;
                    }
                }
            }
        }
        out
    }

    fn check(c_in: usize, c_out: usize, k: usize, spec: ConvSpec) {
        let x = CpuTensor {
            n: 2,
            h: 7,
            w: 9,
            c: c_in,
            data: (0..2 * 7 * 9 * c_in)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect(),
        };
        let cig = c_in / spec.groups;
        let wv: Vec<f32> = (0..c_out * cig * k * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 97.0)
            .collect();
        let wt = HostTensor::from_f32(vec![c_out, cig, k, k], wv.clone()).unwrap();
        let conv = CpuConv::from_oihw(&wt, None, spec).unwrap();
        let got = conv2d(&x, &conv, Activation::Identity, None).unwrap();
        let want = naive(&x, &wv, c_out, k, spec);
        let err = crate::tensor::relative_l2(&got.data, &want);
        assert!(
            err < 1e-6,
            "{spec:?} c_in={c_in} c_out={c_out} k={k}: {err}"
        );
    }

    #[test]
    fn every_convolution_path_matches_direct_summation() {
        check(
            5,
            6,
            1,
            ConvSpec {
                stride: 1,
                padding: 0,
                groups: 1,
            },
        ); // 1x1 GEMM
        check(
            5,
            6,
            3,
            ConvSpec {
                stride: 1,
                padding: 1,
                groups: 1,
            },
        ); // dense im2col
        check(
            5,
            6,
            3,
            ConvSpec {
                stride: 2,
                padding: 1,
                groups: 1,
            },
        ); // strided dense
        check(
            6,
            6,
            3,
            ConvSpec {
                stride: 1,
                padding: 1,
                groups: 6,
            },
        ); // depthwise
        check(
            6,
            6,
            3,
            ConvSpec {
                stride: 2,
                padding: 1,
                groups: 6,
            },
        ); // strided depthwise
        check(
            6,
            4,
            3,
            ConvSpec {
                stride: 1,
                padding: 1,
                groups: 2,
            },
        ); // grouped
    }

    #[test]
    fn rejects_wrong_channel_count() {
        let x = CpuTensor::zeros(1, 4, 4, 3);
        let conv = CpuConv::from_oihw(
            &HostTensor::zeros(vec![2, 4, 1, 1]),
            None,
            ConvSpec::same(1),
        )
        .unwrap();
        assert!(conv2d(&x, &conv, Activation::Identity, None).is_err());
    }
}
