//! Box arithmetic of DETR-style detectors on `[B, 1, L, C]` tensors: top-k query
//! selection, row gathering, iterative box refinement and D-FINE's distribution
//! (FDR) decoding and quality statistics.

use std::cmp::Ordering;

use super::spatial::sigmoid;
use super::CpuTensor;
use crate::error::{EngineError, Result};

fn check_seq(x: &CpuTensor, what: &str) -> Result<()> {
    if x.h != 1 {
        return Err(EngineError::Shape(format!(
            "{what} expects a sequence [B, 1, L, C], got {:?}",
            x.dims()
        )));
    }
    Ok(())
}

pub fn top_k_rows(x: &CpuTensor, k: usize) -> Result<Vec<Vec<usize>>> {
    check_seq(x, "top-k")?;
    if k > x.w || x.c == 0 {
        return Err(EngineError::Shape(format!(
            "cannot pick {k} of {} rows with {} channels",
            x.w, x.c
        )));
    }
    Ok((0..x.n)
        .map(|b| {
            let best: Vec<f32> = (0..x.w)
                .map(|r| {
                    x.data[(b * x.w + r) * x.c..][..x.c]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
                })
                .collect();
            let mut idx: Vec<usize> = (0..x.w).collect();
            // Descending by score; NaN counts as largest (as torch.topk); ties keep index order.
            idx.sort_by(|&i, &j| match (best[i].is_nan(), best[j].is_nan()) {
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                _ => best[j]
                    .partial_cmp(&best[i])
                    .unwrap_or(Ordering::Equal)
                    .then(i.cmp(&j)),
            });
            idx.truncate(k);
            idx
        })
        .collect())
}

pub fn gather_rows(x: &CpuTensor, rows: &[Vec<usize>]) -> Result<CpuTensor> {
    check_seq(x, "gather")?;
    let k = rows.first().map_or(0, Vec::len);
    if rows.len() != x.n
        || rows
            .iter()
            .any(|r| r.len() != k || r.iter().any(|&i| i >= x.w))
    {
        return Err(EngineError::Shape(format!(
            "row indices do not fit a {:?} tensor",
            x.dims()
        )));
    }
    let mut out = CpuTensor::zeros(x.n, 1, k, x.c);
    for (b, r) in rows.iter().enumerate() {
        for (j, &i) in r.iter().enumerate() {
            out.data[(b * k + j) * x.c..][..x.c]
                .copy_from_slice(&x.data[(b * x.w + i) * x.c..][..x.c]);
        }
    }
    Ok(out)
}

/// DETR's `inverse_sigmoid` with eps 1e-5.
pub fn inverse_sigmoid(x: f32) -> f32 {
    let x = x.clamp(0.0, 1.0);
    (x.max(1e-5) / (1.0 - x).max(1e-5)).ln()
}

pub fn refine_boxes(delta: &CpuTensor, boxes: &CpuTensor) -> Result<CpuTensor> {
    if delta.dims() != boxes.dims() {
        return Err(EngineError::Shape(format!(
            "box deltas {:?} vs boxes {:?}",
            delta.dims(),
            boxes.dims()
        )));
    }
    let data = delta
        .data
        .iter()
        .zip(&boxes.data)
        .map(|(&d, &b)| sigmoid(d + inverse_sigmoid(b)))
        .collect();
    Ok(CpuTensor { data, ..*boxes })
}

fn softmax_into(x: &[f32], out: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut z = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        z += *o;
    }
    out.iter_mut().for_each(|o| *o /= z);
}

pub fn distribution_boxes(
    corners: &CpuTensor,
    reference: &CpuTensor,
    project: &[f32],
    reg_scale: f32,
) -> Result<CpuTensor> {
    let bins = project.len();
    check_seq(corners, "distribution boxes")?;
    if bins == 0 || corners.c != 4 * bins || reference.dims() != [corners.n, 1, corners.w, 4] {
        return Err(EngineError::Shape(format!(
            "distribution boxes: corners {:?} with {bins} bins, reference {:?}",
            corners.dims(),
            reference.dims()
        )));
    }
    let rs = reg_scale.abs();
    let mut out = reference.clone();
    let mut prob = vec![0f32; bins];
    for (row, dst) in out.data.chunks_mut(4).enumerate() {
        let mut dist = [0f32; 4];
        for (side, d) in dist.iter_mut().enumerate() {
            softmax_into(
                &corners.data[row * 4 * bins + side * bins..][..bins],
                &mut prob,
            );
            *d = prob.iter().zip(project).map(|(p, w)| p * w).sum();
        }
        let r = &reference.data[row * 4..row * 4 + 4];
        let x1 = r[0] - (0.5 * rs + dist[0]) * (r[2] / rs);
        let y1 = r[1] - (0.5 * rs + dist[1]) * (r[3] / rs);
        let x2 = r[0] + (0.5 * rs + dist[2]) * (r[2] / rs);
        let y2 = r[1] + (0.5 * rs + dist[3]) * (r[3] / rs);
        dst.copy_from_slice(&[(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1]);
    }
    Ok(out)
}

pub fn corner_stats(corners: &CpuTensor, bins: usize, top_k: usize) -> Result<CpuTensor> {
    check_seq(corners, "corner statistics")?;
    if bins == 0 || top_k == 0 || top_k > bins || corners.c != 4 * bins {
        return Err(EngineError::Shape(format!(
            "corner statistics: {} channels for 4 x {bins} bins, top {top_k}",
            corners.c
        )));
    }
    let per = top_k + 1;
    let mut out = CpuTensor::zeros(corners.n, 1, corners.w, 4 * per);
    let mut prob = vec![0f32; bins];
    for (row, dst) in out.data.chunks_mut(4 * per).enumerate() {
        for side in 0..4 {
            softmax_into(
                &corners.data[row * 4 * bins + side * bins..][..bins],
                &mut prob,
            );
            prob.sort_by(|a, b| b.partial_cmp(a).unwrap_or(Ordering::Equal));
            let d = &mut dst[side * per..(side + 1) * per];
            d[..top_k].copy_from_slice(&prob[..top_k]);
            d[top_k] = prob[..top_k].iter().sum::<f32>() / top_k as f32;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(w: usize, c: usize, data: Vec<f32>) -> CpuTensor {
        CpuTensor {
            n: 1,
            h: 1,
            w,
            c,
            data,
        }
    }

    #[test]
    fn top_k_ranks_rows_by_their_best_channel() {
        let x = seq(4, 2, vec![0.1, 0.2, 0.9, -1.0, 0.5, 0.9, -3.0, 0.0]);
        assert_eq!(top_k_rows(&x, 3).unwrap(), vec![vec![1, 2, 0]]);
        let g = gather_rows(&x, &[vec![3, 1]]).unwrap();
        assert_eq!(g.data, vec![-3.0, 0.0, 0.9, -1.0]);
        assert!(top_k_rows(&x, 5).is_err());
        assert!(gather_rows(&x, &[vec![4]]).is_err());
    }

    #[test]
    fn refine_inverts_the_sigmoid() {
        let b = seq(1, 4, vec![0.2, 0.5, 0.7, 1.0]);
        let y = refine_boxes(&seq(1, 4, vec![0.0; 4]), &b).unwrap();
        for (a, e) in y.data.iter().zip(&[0.2, 0.5, 0.7, 1.0]) {
            assert!((a - e).abs() < 2e-5, "{a} {e}");
        }
        assert!((inverse_sigmoid(0.5)).abs() < 1e-7);
    }

    #[test]
    fn uniform_distribution_with_symmetric_weights_keeps_the_box() {
        // Symmetric projection -> expected distance 0 -> box of width w * (0.5 rs * 2) / rs = w.
        let project = [-1.0, 0.0, 1.0];
        let corners = seq(1, 12, vec![0.0; 12]);
        let r = seq(1, 4, vec![0.5, 0.4, 0.2, 0.1]);
        let y = distribution_boxes(&corners, &r, &project, 4.0).unwrap();
        for (a, e) in y.data.iter().zip(&r.data) {
            assert!((a - e).abs() < 1e-6);
        }
        // All mass on the last bin of the right side: x2 grows by 1 * w / rs.
        let mut c = vec![0.0; 12];
        c[6..9].copy_from_slice(&[-50.0, -50.0, 50.0]);
        let y = distribution_boxes(&seq(1, 12, c), &r, &project, 4.0).unwrap();
        assert!(
            (y.data[2] - 0.25).abs() < 1e-5 && (y.data[0] - 0.525).abs() < 1e-5,
            "{:?}",
            y.data
        );
    }

    #[test]
    fn corner_stats_sorts_probabilities() {
        let mut c = vec![0.0; 12];
        c[0] = (2.0f32).ln(); // side 0 probabilities: 0.5, 0.25, 0.25
        let s = corner_stats(&seq(1, 12, c), 3, 2).unwrap();
        assert_eq!(s.c, 12);
        assert!((s.data[0] - 0.5).abs() < 1e-6 && (s.data[1] - 0.25).abs() < 1e-6);
        assert!((s.data[2] - 0.375).abs() < 1e-6);
        assert!((s.data[3] - 1.0 / 3.0).abs() < 1e-6);
    }
}
