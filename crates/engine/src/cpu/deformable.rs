//! Multi-scale deformable attention (D-FINE's v2 variant, no value/output projection):
//! every query samples each head's value maps at a few points around its reference
//! box and sums the samples with softmax weights. Sampling follows
//! `F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`.

use rayon::prelude::*;

use super::CpuTensor;
use crate::backend::DeformableSpec;
use crate::error::{EngineError, Result};

pub fn deformable_attention(
    value: &CpuTensor,
    offsets: &CpuTensor,
    logits: &CpuTensor,
    boxes: &CpuTensor,
    spec: &DeformableSpec,
) -> Result<CpuTensor> {
    let (b, c, heads) = (value.n, value.c, spec.heads);
    let p_total: usize = spec.points.iter().sum();
    let s_total: usize = spec.shapes.iter().map(|(h, w)| h * w).sum();
    let q = offsets.w;
    if heads == 0
        || c % heads != 0
        || spec.points.len() != spec.shapes.len()
        || spec.points.contains(&0)
    {
        return Err(EngineError::Shape(format!(
            "deformable attention: {c} channels, {heads} heads, {} levels, points {:?}",
            spec.shapes.len(),
            spec.points
        )));
    }
    let want = [
        (value, [b, 1, s_total, c]),
        (offsets, [b, 1, q, heads * p_total * 2]),
        (logits, [b, 1, q, heads * p_total]),
        (boxes, [b, 1, q, 4]),
    ];
    for (t, dims) in want {
        if t.dims() != dims {
            return Err(EngineError::Shape(format!(
                "deformable attention: expected {dims:?}, got {:?}",
                t.dims()
            )));
        }
    }
    let d = c / heads;
    // Level of each point and the start row of each level in `value`.
    let mut level_of = Vec::with_capacity(p_total);
    for (l, &n) in spec.points.iter().enumerate() {
        level_of.resize(level_of.len() + n, l);
    }
    let mut starts = Vec::with_capacity(spec.shapes.len());
    let mut acc = 0;
    for (h, w) in &spec.shapes {
        starts.push(acc);
        acc += h * w;
    }
    let mut out = CpuTensor::zeros(b, 1, q, c);
    out.data
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(row, dst)| {
            let bi = row / q;
            let bx = &boxes.data[row * 4..row * 4 + 4];
            let off = &offsets.data[row * heads * p_total * 2..][..heads * p_total * 2];
            let lg = &logits.data[row * heads * p_total..][..heads * p_total];
            let vbase = bi * s_total * c;
            for h in 0..heads {
                let w = softmax(&lg[h * p_total..(h + 1) * p_total]);
                let acc = &mut dst[h * d..(h + 1) * d];
                for (p, &lvl) in level_of.iter().enumerate() {
                    let (lh, lw) = spec.shapes[lvl];
                    let scale = 1.0 / spec.points[lvl] as f32;
                    let o = &off[(h * p_total + p) * 2..][..2];
                    // Same operation order as PyTorch: offset * (1/n) * wh * offset_scale.
                    let lx = bx[0] + o[0] * scale * bx[2] * spec.offset_scale;
                    let ly = bx[1] + o[1] * scale * bx[3] * spec.offset_scale;
                    let level = &value.data[vbase + starts[lvl] * c..][..lh * lw * c];
                    let mut tap = |y: isize, x: isize, wt: f32| {
                        if wt != 0.0 && y >= 0 && x >= 0 && (y as usize) < lh && (x as usize) < lw {
                            let src = &level[(y as usize * lw + x as usize) * c + h * d..][..d];
                            acc.iter_mut().zip(src).for_each(|(a, s)| *a += wt * s);
                        }
                    };
                    if spec.discrete {
                        let x = ((lx * lw as f32 + 0.5) as i64).clamp(0, lw as i64 - 1);
                        let y = ((ly * lh as f32 + 0.5) as i64).clamp(0, lh as i64 - 1);
                        tap(y as isize, x as isize, w[p]);
                    } else {
                        // grid = 2 * loc - 1, then unnormalise with align_corners=False.
                        let gx = 2.0 * lx - 1.0;
                        let gy = 2.0 * ly - 1.0;
                        let ix = ((gx + 1.0) * lw as f32 - 1.0) / 2.0;
                        let iy = ((gy + 1.0) * lh as f32 - 1.0) / 2.0;
                        let (x0, y0) = (ix.floor(), iy.floor());
                        let (fx, fy) = (ix - x0, iy - y0);
                        let (x0, y0) = (x0 as isize, y0 as isize);
                        tap(y0, x0, w[p] * (1.0 - fx) * (1.0 - fy));
                        tap(y0, x0 + 1, w[p] * fx * (1.0 - fy));
                        tap(y0 + 1, x0, w[p] * (1.0 - fx) * fy);
                        tap(y0 + 1, x0 + 1, w[p] * fx * fy);
                    }
                }
            }
        });
    Ok(out)
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(w: usize, c: usize, data: Vec<f32>) -> CpuTensor {
        CpuTensor {
            n: 1,
            h: 1,
            w,
            c,
            data,
        }
    }

    #[test]
    fn samples_bilinearly_with_zero_padding() {
        // One level 2x2, one channel: values 1 2 / 3 4. One head, one point.
        let value = t(4, 1, vec![1.0, 2.0, 3.0, 4.0]);
        let spec = DeformableSpec {
            heads: 1,
            shapes: vec![(2, 2)],
            points: vec![1],
            offset_scale: 0.5,
            discrete: false,
        };
        let logits = t(1, 1, vec![0.3]);
        let zero = t(1, 2, vec![0.0, 0.0]);
        // Centre of the image: the mean of all four pixels.
        let centre = t(1, 4, vec![0.5, 0.5, 1.0, 1.0]);
        let y = deformable_attention(&value, &zero, &logits, &centre, &spec).unwrap();
        assert!((y.data[0] - 2.5).abs() < 1e-6);
        // Pixel centre of (row 0, col 1) exactly.
        let px = t(1, 4, vec![0.75, 0.25, 1.0, 1.0]);
        let y = deformable_attention(&value, &zero, &logits, &px, &spec).unwrap();
        assert!((y.data[0] - 2.0).abs() < 1e-6);
        // Half a pixel left of the image: half of pixel (0, 0), the rest is zero padding.
        let edge = t(1, 4, vec![0.0, 0.25, 1.0, 1.0]);
        let y = deformable_attention(&value, &zero, &logits, &edge, &spec).unwrap();
        assert!((y.data[0] - 0.5).abs() < 1e-6);
        // An offset moves the point by offset / points * w * offset_scale.
        let off = t(1, 2, vec![1.0, 0.0]); // +0.5 in x from 0.25 -> 0.75
        let left = t(1, 4, vec![0.25, 0.25, 1.0, 1.0]);
        let y = deformable_attention(&value, &off, &logits, &left, &spec).unwrap();
        assert!((y.data[0] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn weights_are_a_softmax_over_all_points() {
        let value = t(2, 1, vec![1.0, 3.0]);
        // Two levels of 1x1 each, one point per level, one head.
        let spec = DeformableSpec {
            heads: 1,
            shapes: vec![(1, 1), (1, 1)],
            points: vec![1, 1],
            offset_scale: 0.5,
            discrete: true,
        };
        let logits = t(1, 2, vec![0.0, 0.0]);
        let y = deformable_attention(
            &value,
            &t(1, 4, vec![0.0; 4]),
            &logits,
            &t(1, 4, vec![0.5, 0.5, 1.0, 1.0]),
            &spec,
        )
        .unwrap();
        assert!((y.data[0] - 2.0).abs() < 1e-6);
        assert!(deformable_attention(&value, &logits, &logits, &logits, &spec).is_err());
    }
}
