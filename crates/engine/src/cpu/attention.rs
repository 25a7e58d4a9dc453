//! Restormer's multi-Dconv-head transposed attention (MDTA) as two passes over the image:
//! a Gram-matrix reduction over H*W, then one matrix product with the projection
//! folded into the (C/heads x C/heads) attention maps.

use rayon::prelude::*;

use super::gemm::matmul;
use super::{CpuConv, CpuTensor};
use crate::error::{EngineError, Result};

/// `F.normalize`'s default epsilon.
const NORM_EPS: f64 = 1e-12;
/// Pixels per partial Gram reduction.
const PIXEL_BLOCK: usize = 1024;

pub fn channel_attention(
    qkv: &CpuTensor,
    heads: usize,
    temperature: &[f32],
    project_out: &CpuConv,
    residual: Option<&CpuTensor>,
) -> Result<CpuTensor> {
    let c3 = qkv.c;
    if !c3.is_multiple_of(3) || heads == 0 || !(c3 / 3).is_multiple_of(heads) {
        return Err(EngineError::Shape(format!(
            "attention over {c3} qkv channels cannot split into {heads} heads"
        )));
    }
    let c = c3 / 3;
    let d = c / heads;
    if temperature.len() != heads {
        return Err(EngineError::Shape(format!(
            "temperature has {} entries for {heads} heads",
            temperature.len()
        )));
    }
    if project_out.c_in != c
        || project_out.kh != 1
        || project_out.kw != 1
        || project_out.spec.groups != 1
    {
        return Err(EngineError::Shape(format!(
            "project_out must be a 1x1 convolution from {c} channels"
        )));
    }
    let hw = qkv.h * qkv.w;
    let c_out = project_out.c_out;
    let mut out = CpuTensor::zeros(qkv.n, qkv.h, qkv.w, c_out);
    if let Some(r) = residual {
        if r.dims() != out.dims() {
            return Err(EngineError::Shape(format!(
                "residual {:?} does not match attention output {:?}",
                r.dims(),
                out.dims()
            )));
        }
    }
    for b in 0..qkv.n {
        let img = &qkv.data[b * hw * c3..(b + 1) * hw * c3];
        let folded = folded_projection(img, c, heads, d, temperature, project_out);
        // y[p, :] = v[p, :] * folded  ([hw, c] x [c, c_out]); v is strided inside qkv.
        let mut v = super::pool::zeroed(hw * c);
        for (dst, px) in v.chunks_mut(c).zip(img.chunks(c3)) {
            dst.copy_from_slice(&px[2 * c..]);
        }
        let dst = &mut out.data[b * hw * c_out..(b + 1) * hw * c_out];
        matmul(&v, &folded, dst, hw, c, c_out, false);
        super::pool::recycle(v);
    }
    let bias = project_out.bias.as_deref();
    out.data
        .par_chunks_mut(c_out)
        .enumerate()
        .for_each(|(p, px)| {
            for (o, y) in px.iter_mut().enumerate() {
                if let Some(bb) = bias {
                    *y += bb[o];
                }
                if let Some(r) = residual {
                    *y += r.data[p * c_out + o];
                }
            }
        });
    Ok(out)
}

/// Returns `M[j, o] = sum_i A_h[i, j] * W[o, h*d + i]` for every head, i.e. the
/// `[c, c_out]` matrix that maps v directly to the projected output.
fn folded_projection(
    img: &[f32],
    c: usize,
    heads: usize,
    d: usize,
    temperature: &[f32],
    proj: &CpuConv,
) -> Vec<f32> {
    let c3 = 3 * c;
    // Partial sums per pixel block: Gram q.k^T per head plus squared norms of q and k.
    let stats = img
        .par_chunks(PIXEL_BLOCK * c3)
        .map(|blk| {
            let mut gram = vec![0f64; heads * d * d];
            let mut nq = vec![0f64; c];
            let mut nk = vec![0f64; c];
            for px in blk.chunks(c3) {
                let (q, k) = (&px[..c], &px[c..2 * c]);
                for ch in 0..c {
                    nq[ch] += (q[ch] as f64).powi(2);
                    nk[ch] += (k[ch] as f64).powi(2);
                }
                for h in 0..heads {
                    let g = &mut gram[h * d * d..(h + 1) * d * d];
                    for i in 0..d {
                        let qi = q[h * d + i] as f64;
                        let row = &mut g[i * d..(i + 1) * d];
                        for (j, acc) in row.iter_mut().enumerate() {
                            *acc += qi * k[h * d + j] as f64;
                        }
                    }
                }
            }
            (gram, nq, nk)
        })
        .reduce(
            || (vec![0f64; heads * d * d], vec![0f64; c], vec![0f64; c]),
            |mut a, b| {
                a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
                a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
                a.2.iter_mut().zip(&b.2).for_each(|(x, y)| *x += y);
                a
            },
        );
    let (gram, nq, nk) = stats;
    // proj.weight is [c_in, c_out] (1x1 dense layout).
    let c_out = proj.c_out;
    let mut folded = vec![0f32; c * c_out];
    for h in 0..heads {
        let t = temperature[h] as f64;
        for i in 0..d {
            let qn = nq[h * d + i].sqrt().max(NORM_EPS);
            let mut row: Vec<f64> = (0..d)
                .map(|j| gram[(h * d + i) * d + j] / (qn * nk[h * d + j].sqrt().max(NORM_EPS)) * t)
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for j in 0..d {
                let a = (row[j] / sum) as f32;
                let w_row = &proj.weight[(h * d + i) * c_out..(h * d + i + 1) * c_out];
                let dst = &mut folded[(h * d + j) * c_out..(h * d + j + 1) * c_out];
                for (o, w) in dst.iter_mut().zip(w_row) {
                    *o += a * w;
                }
            }
        }
    }
    folded
}
