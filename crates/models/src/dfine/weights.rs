//! Matching a state dict against the parameters the model expects, and the load-time
//! rewrites: batch-norm folded into the preceding convolution, RepVGG's 3x3 + 1x1
//! branches merged into one 3x3 convolution.
//!
//! [`Loader`] never stops at the first problem: a missing or mis-shaped tensor is
//! recorded and replaced by zeros so that the walk continues, and [`Loader::finish`]
//! reports every problem (plus the tensors nobody asked for) in one error.

use std::collections::BTreeSet;

use aperture_engine::HostTensor;
use aperture_weights::StateDict;

use crate::error::{ModelError, Result, WeightIssue};

pub struct Loader<'a> {
    sd: &'a StateDict,
    used: BTreeSet<String>,
    issues: Vec<WeightIssue>,
    /// Name prefixes of tensors that may be present but are not needed for inference.
    ignored: Vec<String>,
}

impl<'a> Loader<'a> {
    pub fn new(sd: &'a StateDict) -> Self {
        Self {
            sd,
            used: BTreeSet::new(),
            issues: Vec::new(),
            ignored: Vec::new(),
        }
    }

    /// Accepts, without using, tensors whose names start with `prefix`.
    pub fn ignore_prefix(&mut self, prefix: impl Into<String>) {
        self.ignored.push(prefix.into());
    }

    /// The tensor `name` as f32, which must have `shape`. On a problem the issue is
    /// recorded and zeros of `shape` are returned.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> HostTensor {
        self.first_of(&[name], shape)
    }

    /// Like [`Loader::tensor`], trying each name in turn (tied weights saved under
    /// either of two names).
    pub fn first_of(&mut self, names: &[&str], shape: &[usize]) -> HostTensor {
        for name in names {
            if let Some(t) = self.sd.get(name) {
                self.used.insert(name.to_string());
                if t.shape() != shape {
                    self.issues.push(WeightIssue::WrongShape {
                        name: name.to_string(),
                        expected: shape.to_vec(),
                        found: t.shape().to_vec(),
                    });
                    return HostTensor::zeros(shape.to_vec());
                }
                return t.to_f32();
            }
        }
        self.issues.push(WeightIssue::Missing {
            name: names.first().map(|s| s.to_string()).unwrap_or_default(),
            expected: shape.to_vec(),
        });
        HostTensor::zeros(shape.to_vec())
    }

    /// A one-element tensor as a scalar.
    pub fn scalar(&mut self, name: &str) -> f32 {
        self.tensor(name, &[1])
            .to_f32_vec()
            .first()
            .copied()
            .unwrap_or(0.0)
    }

    /// Whether `name` is present (without marking it used).
    pub fn has(&self, name: &str) -> bool {
        self.sd.get(name).is_some()
    }

    /// Batch-norm statistics at `prefix` (`weight`, `bias`, `running_mean`,
    /// `running_var`) as the per-channel `(scale, shift)` of `y = scale * x + shift`.
    pub fn batch_norm(&mut self, prefix: &str, channels: usize, eps: f32) -> (Vec<f64>, Vec<f64>) {
        let shape = [channels];
        let g = self
            .tensor(&format!("{prefix}.weight"), &shape)
            .to_f32_vec();
        let b = self.tensor(&format!("{prefix}.bias"), &shape).to_f32_vec();
        let m = self
            .tensor(&format!("{prefix}.running_mean"), &shape)
            .to_f32_vec();
        let v = self
            .tensor(&format!("{prefix}.running_var"), &shape)
            .to_f32_vec();
        self.used.insert(format!("{prefix}.num_batches_tracked"));
        let scale: Vec<f64> = g
            .iter()
            .zip(&v)
            .map(|(&g, &v)| g as f64 / (v as f64 + eps as f64).sqrt())
            .collect();
        let shift = b
            .iter()
            .zip(&m)
            .zip(&scale)
            .map(|((&b, &m), &s)| b as f64 - m as f64 * s)
            .collect();
        (scale, shift)
    }

    /// Reports every problem found so far, plus tensors that were never asked for.
    pub fn finish(self, model: &str) -> Result<()> {
        let mut issues = self.issues;
        for (name, t) in self.sd.tensors() {
            if !self.used.contains(name)
                && !self.ignored.iter().any(|p| name.starts_with(p.as_str()))
            {
                issues.push(WeightIssue::Unexpected {
                    name: name.clone(),
                    found: t.shape().to_vec(),
                });
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(ModelError::WeightMismatch {
                model: model.to_string(),
                issues,
            })
        }
    }
}

/// Folds `y = scale * conv(x) + shift` into the convolution's weight (OIHW) and bias.
pub fn fold_batch_norm(
    weight: &HostTensor,
    bias: Option<&[f32]>,
    scale: &[f64],
    shift: &[f64],
) -> Result<(HostTensor, Vec<f32>)> {
    let out = weight.shape().first().copied().unwrap_or(0);
    if out != scale.len() || out != shift.len() || bias.is_some_and(|b| b.len() != out) {
        return Err(ModelError::Config(format!(
            "cannot fold {} batch-norm channels into a convolution of shape {:?}",
            scale.len(),
            weight.shape()
        )));
    }
    let per = weight.numel() / out.max(1);
    let w = weight.to_f32_vec();
    let folded: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, &x)| (x as f64 * scale[i / per.max(1)]) as f32)
        .collect();
    let b = (0..out)
        .map(|o| (bias.map_or(0.0, |b| b[o] as f64) * scale[o] + shift[o]) as f32)
        .collect();
    Ok((HostTensor::from_f32(weight.shape().to_vec(), folded)?, b))
}

/// RepVGG re-parameterisation: `conv3x3(x) + b3 + conv1x1(x) + b1` as one 3x3 convolution
/// (padding 1) by adding the 1x1 kernel to the centre tap.
pub fn merge_repvgg(
    w3: &HostTensor,
    b3: &[f32],
    w1: &HostTensor,
    b1: &[f32],
) -> Result<(HostTensor, Vec<f32>)> {
    let (s3, s1) = (w3.shape(), w1.shape());
    if s3.len() != 4
        || s3[2] != 3
        || s3[3] != 3
        || s1 != [s3[0], s3[1], 1, 1]
        || b3.len() != s3[0]
        || b1.len() != s3[0]
    {
        return Err(ModelError::Config(format!(
            "cannot merge RepVGG branches of shapes {s3:?} and {s1:?}"
        )));
    }
    let mut w = w3.to_f32_vec();
    for (i, &v) in w1.to_f32_vec().iter().enumerate() {
        w[i * 9 + 4] += v;
    }
    let b = b3.iter().zip(b1).map(|(a, b)| a + b).collect();
    Ok((HostTensor::from_f32(s3.to_vec(), w)?, b))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aperture_engine::cpu::CpuBackend;
    use aperture_engine::{relative_l2, Activation, Backend, ConvSpec};

    use super::*;

    fn ramp(shape: &[usize], k: f32) -> HostTensor {
        let n: usize = shape.iter().product();
        HostTensor::from_f32(
            shape.to_vec(),
            (0..n).map(|i| (i as f32 * k).sin() * 0.7).collect(),
        )
        .unwrap()
    }

    #[test]
    fn folding_batch_norm_preserves_the_output() {
        let cpu = CpuBackend::new();
        let (w, x) = (ramp(&[4, 3, 3, 3], 0.37), ramp(&[1, 3, 5, 6], 0.11));
        let (g, b, m, v) = (
            [1.3f32, 0.7, 1.1, 0.9],
            [0.1f32, -0.2, 0.3, 0.0],
            [0.2f32, -0.1, 0.05, 0.4],
            [0.6f32, 1.4, 0.9, 1.1],
        );
        let spec = ConvSpec::same(3);
        // Reference: convolution, then batch norm applied per channel on the host.
        let plain = cpu
            .download_nchw(
                &cpu.conv2d(
                    &cpu.upload_nchw(&x).unwrap(),
                    &cpu.prepare_conv(&w, None, spec).unwrap(),
                    Activation::Identity,
                    None,
                )
                .unwrap(),
            )
            .unwrap();
        let hw = 30;
        let want: Vec<f32> = plain
            .to_f32_vec()
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                let c = i / hw;
                (y - m[c]) / (v[c] + 1e-5).sqrt() * g[c] + b[c]
            })
            .collect();
        let scale: Vec<f64> = (0..4)
            .map(|c| g[c] as f64 / (v[c] as f64 + 1e-5).sqrt())
            .collect();
        let shift: Vec<f64> = (0..4)
            .map(|c| b[c] as f64 - m[c] as f64 * scale[c])
            .collect();
        let (fw, fb) = fold_batch_norm(&w, None, &scale, &shift).unwrap();
        let fb = HostTensor::from_f32(vec![4], fb).unwrap();
        let got = cpu
            .conv2d(
                &cpu.upload_nchw(&x).unwrap(),
                &cpu.prepare_conv(&fw, Some(&fb), spec).unwrap(),
                Activation::Identity,
                None,
            )
            .unwrap();
        let got = cpu.download_nchw(&got).unwrap().to_f32_vec();
        assert!(
            relative_l2(&got, &want) < 1e-6,
            "{}",
            relative_l2(&got, &want)
        );
    }

    #[test]
    fn merged_repvgg_equals_the_two_branches() {
        let cpu = CpuBackend::new();
        let (w3, w1, x) = (
            ramp(&[4, 4, 3, 3], 0.21),
            ramp(&[4, 4, 1, 1], 0.9),
            ramp(&[2, 4, 6, 5], 0.05),
        );
        let (b3, b1) = (vec![0.1, 0.2, -0.3, 0.4], vec![-0.5, 0.0, 0.25, 0.1]);
        let xt = cpu.upload_nchw(&x).unwrap();
        let bias = |b: &[f32]| HostTensor::from_f32(vec![4], b.to_vec()).unwrap();
        let y3 = cpu
            .conv2d(
                &xt,
                &cpu.prepare_conv(&w3, Some(&bias(&b3)), ConvSpec::same(3))
                    .unwrap(),
                Activation::Identity,
                None,
            )
            .unwrap();
        // Reference: the sum of both branches, then silu on the host.
        let y1 = cpu
            .conv2d(
                &xt,
                &cpu.prepare_conv(&w1, Some(&bias(&b1)), ConvSpec::same(1))
                    .unwrap(),
                Activation::Identity,
                Some(&y3),
            )
            .unwrap();
        let want: Vec<f32> = cpu
            .download_nchw(&y1)
            .unwrap()
            .to_f32_vec()
            .iter()
            .map(|&v| v / (1.0 + (-v).exp()))
            .collect();
        let (wm, bm) = merge_repvgg(&w3, &b3, &w1, &b1).unwrap();
        let got = cpu
            .conv2d(
                &xt,
                &cpu.prepare_conv(&wm, Some(&bias(&bm)), ConvSpec::same(3))
                    .unwrap(),
                Activation::Silu,
                None,
            )
            .unwrap();
        let got = cpu.download_nchw(&got).unwrap().to_f32_vec();
        assert!(
            relative_l2(&got, &want) < 1e-6,
            "{}",
            relative_l2(&got, &want)
        );
    }

    #[test]
    fn loader_reports_every_problem_at_once() {
        let mut t = BTreeMap::new();
        t.insert("a.weight".to_string(), HostTensor::zeros(vec![2, 3]));
        t.insert("b.weight".to_string(), HostTensor::zeros(vec![4]));
        t.insert("stray".to_string(), HostTensor::zeros(vec![1]));
        t.insert("skip.me".to_string(), HostTensor::zeros(vec![1]));
        let sd = StateDict::from_tensors(t);
        let mut l = Loader::new(&sd);
        l.ignore_prefix("skip.");
        assert_eq!(l.tensor("a.weight", &[2, 3]).shape(), &[2, 3]);
        assert_eq!(l.tensor("b.weight", &[5]).shape(), &[5]);
        let _ = l.tensor("c.weight", &[7]);
        let msg = l.finish("D-FINE").unwrap_err().to_string();
        for part in [
            "b.weight: expected [5], found [4]",
            "missing      c.weight (expected shape [7])",
            "unexpected   stray",
            "3 problems",
        ] {
            assert!(msg.contains(part), "{part} not in {msg}");
        }
        assert!(!msg.contains("skip.me"));
    }
}
