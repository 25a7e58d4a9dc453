//! Per-pixel normalisation and gating.

use rayon::prelude::*;

use super::{gelu, CpuTensor};
use crate::error::{EngineError, Result};

/// LayerNorm over channels at each pixel, biased variance, accumulated in f64.
/// Without `bias` (Restormer's BiasFree) the mean is not subtracted.
pub fn layer_norm(
    x: &CpuTensor,
    weight: &[f32],
    bias: Option<&[f32]>,
    eps: f32,
) -> Result<CpuTensor> {
    let c = x.c;
    if weight.len() != c || bias.is_some_and(|b| b.len() != c) {
        return Err(EngineError::Shape(format!(
            "layer norm over {c} channels got parameters of another size"
        )));
    }
    let mut out = CpuTensor::zeros(x.n, x.h, x.w, x.c);
    out.data.copy_from_slice(&x.data);
    out.data.par_chunks_mut(c).for_each(|px| {
        let mean = px.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = px.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        match bias {
            Some(b) => {
                for ((v, &g), &bb) in px.iter_mut().zip(weight).zip(b) {
                    *v = ((*v as f64 - mean) * inv) as f32 * g + bb;
                }
            }
            None => {
                for (v, &g) in px.iter_mut().zip(weight) {
                    *v = (*v as f64 * inv) as f32 * g;
                }
            }
        }
    });
    Ok(out)
}

/// `gelu(a) * b` where `a | b` are the two channel halves.
pub fn gelu_gate(x: &CpuTensor) -> Result<CpuTensor> {
    if !x.c.is_multiple_of(2) {
        return Err(EngineError::Shape(format!(
            "gated GELU needs an even channel count, got {}",
            x.c
        )));
    }
    let half = x.c / 2;
    let mut out = CpuTensor::zeros(x.n, x.h, x.w, half);
    out.data
        .par_chunks_mut(half)
        .zip(x.data.par_chunks(x.c))
        .for_each(|(dst, src)| {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = gelu(src[i]) * src[half + i];
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_normalises_each_pixel() {
        let x = CpuTensor {
            n: 1,
            h: 1,
            w: 2,
            c: 3,
            data: vec![1.0, 2.0, 3.0, -4.0, 0.0, 4.0],
        };
        let y = layer_norm(&x, &[1.0; 3], Some(&[0.0; 3]), 1e-5).unwrap();
        for px in y.data.chunks(3) {
            let mean: f32 = px.iter().sum::<f32>() / 3.0;
            let var: f32 = px.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 3.0;
            assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{px:?}");
        }
    }

    #[test]
    fn gelu_matches_known_values() {
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_26).abs() < 1e-6);
    }
}
