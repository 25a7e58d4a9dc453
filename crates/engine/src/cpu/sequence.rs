//! Sequence operations on `[B, 1, L, C]` tensors: multi-head attention and D-FINE's
//! gated residual.

use rayon::prelude::*;

use super::gemm::matmul_serial;
use super::spatial::sigmoid;
use super::CpuTensor;
use crate::error::{EngineError, Result};

/// Per head `softmax(q k^T * scale) v`; heads take consecutive channel blocks.
pub fn attention(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    heads: usize,
    scale: f32,
) -> Result<CpuTensor> {
    let c = q.c;
    if heads == 0 || !c.is_multiple_of(heads) {
        return Err(EngineError::Shape(format!(
            "{c} channels cannot split into {heads} heads"
        )));
    }
    if q.h != 1 || k.h != 1 || v.h != 1 || k.dims() != v.dims() || k.c != c || q.n != k.n {
        return Err(EngineError::Shape(format!(
            "attention needs sequences [B, 1, L, C]: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let (lq, lk, d) = (q.w, k.w, c / heads);
    let mut out = CpuTensor::zeros(q.n, 1, lq, c);
    // One task per (batch item, head): gather the head's columns, two small GEMMs.
    let results: Vec<Vec<f32>> = (0..q.n * heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / heads, task % heads);
            let cols = |t: &CpuTensor, rows: usize| -> Vec<f32> {
                let base = b * rows * c;
                (0..rows)
                    .flat_map(|r| t.data[base + r * c + h * d..][..d].iter().copied())
                    .collect()
            };
            let qh = cols(q, lq);
            let kh = cols(k, lk);
            let vh = cols(v, lk);
            let mut kt = vec![0f32; d * lk];
            for r in 0..lk {
                for j in 0..d {
                    kt[j * lk + r] = kh[r * d + j];
                }
            }
            let mut s = vec![0f32; lq * lk];
            matmul_serial(&qh, &kt, &mut s, lq, d, lk, 0.0);
            for row in s.chunks_mut(lk.max(1)) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x * scale - max).exp();
                    sum += *x;
                }
                row.iter_mut().for_each(|x| *x /= sum);
            }
            let mut o = vec![0f32; lq * d];
            matmul_serial(&s, &vh, &mut o, lq, lk, d, 0.0);
            o
        })
        .collect();
    for (task, o) in results.into_iter().enumerate() {
        let (b, h) = (task / heads, task % heads);
        for r in 0..lq {
            out.data[(b * lq + r) * c + h * d..][..d].copy_from_slice(&o[r * d..(r + 1) * d]);
        }
    }
    Ok(out)
}

/// `sigmoid(g[..C]) * a + sigmoid(g[C..]) * b`.
pub fn gated_sum(a: &CpuTensor, b: &CpuTensor, gates: &CpuTensor) -> Result<CpuTensor> {
    let c = a.c;
    if a.dims() != b.dims() || (gates.n, gates.h, gates.w, gates.c) != (a.n, a.h, a.w, 2 * c) {
        return Err(EngineError::Shape(format!(
            "gate over {:?} and {:?} needs gates of {} channels, got {:?}",
            a.dims(),
            b.dims(),
            2 * c,
            gates.dims()
        )));
    }
    let mut out = a.clone();
    out.data
        .par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(px, dst)| {
            let g = &gates.data[px * 2 * c..(px + 1) * 2 * c];
            let bb = &b.data[px * c..(px + 1) * c];
            for i in 0..c {
                dst[i] = sigmoid(g[i]) * dst[i] + sigmoid(g[c + i]) * bb[i];
            }
        });
    Ok(out)
}

/// Concatenates `[B, 1, L_i, C]` sequences along L.
pub fn concat_rows(parts: &[&CpuTensor]) -> Result<CpuTensor> {
    let first = parts
        .first()
        .ok_or_else(|| EngineError::Invalid("nothing to concatenate".into()))?;
    if let Some(p) = parts
        .iter()
        .find(|p| p.h != 1 || p.n != first.n || p.c != first.c)
    {
        return Err(EngineError::Shape(format!(
            "cannot concatenate sequences {:?} and {:?}",
            first.dims(),
            p.dims()
        )));
    }
    let total: usize = parts.iter().map(|p| p.w).sum();
    let mut out = CpuTensor::zeros(first.n, 1, total, first.c);
    let c = first.c;
    for b in 0..first.n {
        let mut at = b * total * c;
        for p in parts {
            let len = p.w * c;
            out.data[at..at + len].copy_from_slice(&p.data[b * len..(b + 1) * len]);
            at += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(l: usize, c: usize, f: impl Fn(usize) -> f32) -> CpuTensor {
        CpuTensor {
            n: 1,
            h: 1,
            w: l,
            c,
            data: (0..l * c).map(f).collect(),
        }
    }

    /// Straightforward per-element reference.
    fn naive(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, heads: usize, scale: f32) -> Vec<f32> {
        let (c, d) = (q.c, q.c / heads);
        let mut out = vec![0f32; q.w * c];
        for h in 0..heads {
            for i in 0..q.w {
                let s: Vec<f32> = (0..k.w)
                    .map(|j| {
                        (0..d)
                            .map(|t| q.data[i * c + h * d + t] * k.data[j * c + h * d + t])
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for t in 0..d {
                    out[i * c + h * d + t] =
                        (0..k.w).map(|j| e[j] / z * v.data[j * c + h * d + t]).sum();
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_reference() {
        let q = seq(3, 4, |i| ((i * 7) % 5) as f32 * 0.3 - 0.5);
        let k = seq(5, 4, |i| ((i * 3) % 7) as f32 * 0.2 - 0.6);
        let v = seq(5, 4, |i| i as f32 * 0.1);
        let got = attention(&q, &k, &v, 2, 0.7).unwrap();
        let want = naive(&q, &k, &v, 2, 0.7);
        for (a, b) in got.data.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(attention(&q, &k, &v, 3, 1.0).is_err());
    }

    #[test]
    fn rows_concatenate_per_batch_item() {
        let a = CpuTensor {
            n: 2,
            h: 1,
            w: 1,
            c: 2,
            data: vec![1.0, 2.0, 3.0, 4.0],
        };
        let b = CpuTensor {
            n: 2,
            h: 1,
            w: 2,
            c: 2,
            data: vec![5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
        };
        let y = concat_rows(&[&a, &b]).unwrap();
        assert_eq!(y.dims(), [2, 1, 3, 2]);
        assert_eq!(
            y.data,
            vec![1.0, 2.0, 5.0, 6.0, 7.0, 8.0, 3.0, 4.0, 9.0, 10.0, 11.0, 12.0]
        );
        assert!(concat_rows(&[&a, &CpuTensor::zeros(2, 1, 1, 3)]).is_err());
    }

    #[test]
    fn gate_mixes_with_sigmoids() {
        let a = seq(1, 2, |i| i as f32 + 1.0); // [1, 2]
        let b = seq(1, 2, |_| 10.0);
        let g = seq(1, 4, |i| if i < 2 { 0.0 } else { 100.0 }); // sigmoid: 0.5, 1
        let y = gated_sum(&a, &b, &g).unwrap();
        assert_eq!(y.data, vec![10.5, 11.0]);
        assert!(gated_sum(&a, &b, &a).is_err());
    }
}
