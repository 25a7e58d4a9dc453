//! Operation-level parity of the CUDA backend against the CPU reference backend on
//! fresh random data, with every GPU output poisoned (NaN) before its kernel runs.

use aperture_engine::backend::{Activation, Backend, ConvSpec};
use aperture_engine::{HostTensor, Precision, Result};

/// GPU image preprocessing against the CPU path (resized bytes identical, f32 within
/// 1e-6): see [`crate::preprocess::check`].
pub use crate::preprocess::check::{preprocess_parity, PreprocessRow};

mod cases;
mod parity;

pub use parity::op_parity;

/// The in-place concatenation blocks (HG aggregations, ELAN-shaped node blocks, odd
/// channel counts for the fallbacks) against the CPU backend, GPU allocations poisoned.
pub fn concat_parity(gpu: &crate::CudaBackend, seed: u64) -> Result<Vec<ParityRow>> {
    crate::conv_concat_check::parity(gpu, seed)
}

/// One compared operation.
#[derive(Clone, Debug)]
pub struct ParityRow {
    pub case: String,
    pub rel_l2: f64,
    pub tolerance: f64,
}

impl ParityRow {
    /// NaN (an unwritten or broken output) never passes.
    pub fn passed(&self) -> bool {
        self.rel_l2 <= self.tolerance
    }
}

/// Tolerance for one operation's output at a precision (the inputs are rounded to the
/// storage type too, so this is looser than the model-level bound for fp32 only by
/// accumulation order).
pub fn op_tolerance(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-5,
        Precision::Tf32 => 2e-3,
        Precision::Fp16 => 2e-3,
        Precision::Bf16 => 1.6e-2,
    }
}

/// Model-level tolerance from the issue: relative L2 against an fp32 reference.
pub fn model_tolerance(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-5,
        Precision::Tf32 => 5e-3,
        Precision::Fp16 => 1e-3,
        Precision::Bf16 => 1e-2,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    fn tensor(&mut self, shape: Vec<usize>, scale: f32) -> HostTensor {
        self.tensor_around(shape, scale, 0.0)
    }

    /// Uniform in `offset +- scale`.
    fn tensor_around(&mut self, shape: Vec<usize>, scale: f32, offset: f32) -> HostTensor {
        let n = shape.iter().product();
        let data = (0..n).map(|_| offset + self.next() * scale).collect();
        HostTensor::from_f32(shape, data).unwrap_or_else(|_| HostTensor::zeros(vec![0]))
    }
}

enum Op {
    Conv {
        w: HostTensor,
        b: Option<HostTensor>,
        spec: ConvSpec,
        act: Activation,
        residual: bool,
    },
    Norm {
        w: HostTensor,
        b: Option<HostTensor>,
    },
    GeluGate,
    /// Depthwise 3x3 (stride 1, pad 1) then the GELU gate, as one call.
    DepthwiseGate {
        w: HostTensor,
        b: Option<HostTensor>,
    },
    /// LayerNorm then a 1x1 product, as one call.
    NormProduct {
        norm: (HostTensor, Option<HostTensor>),
        pointwise: (HostTensor, Option<HostTensor>),
    },
    /// LayerNorm, 1x1 product, depthwise 3x3 (and the GELU gate) as one call.
    Front {
        norm: (HostTensor, Option<HostTensor>),
        pointwise: (HostTensor, Option<HostTensor>),
        depthwise: (HostTensor, Option<HostTensor>),
        gate: bool,
    },
    Attention {
        heads: usize,
        temp: HostTensor,
        w: HostTensor,
        b: Option<HostTensor>,
        residual: bool,
    },
    Shuffle(usize),
    Unshuffle(usize),
    Concat,
    Add,
}

/// Runs one operation on any backend; inputs and output are NCHW host tensors.
fn run<B: Backend>(be: &B, op: &Op, xs: &[HostTensor]) -> Result<HostTensor> {
    let t = xs
        .iter()
        .map(|x| be.upload_nchw(x))
        .collect::<Result<Vec<_>>>()?;
    let first = || {
        t.first()
            .ok_or_else(|| aperture_engine::EngineError::Invalid("case without input".into()))
    };
    let second = || {
        t.get(1).ok_or_else(|| {
            aperture_engine::EngineError::Invalid("case without second input".into())
        })
    };
    let y = match op {
        Op::Conv {
            w,
            b,
            spec,
            act,
            residual,
        } => {
            let p = be.prepare_conv(w, b.as_ref(), *spec)?;
            let r = if *residual { Some(second()?) } else { None };
            be.conv2d(first()?, &p, *act, r)?
        }
        Op::Norm { w, b } => {
            let wp = be.prepare_vector(w)?;
            let bp = b.as_ref().map(|b| be.prepare_vector(b)).transpose()?;
            be.layer_norm(first()?, &wp, bp.as_ref(), 1e-5)?
        }
        Op::GeluGate => be.gelu_gate(first()?)?,
        Op::DepthwiseGate { w, b } => {
            let c = w.shape()[0];
            let p = be.prepare_conv(w, b.as_ref(), ConvSpec::depthwise(c, 3))?;
            be.depthwise_gelu_gate(first()?, &p)?
        }
        Op::NormProduct { norm, pointwise } => {
            let nw = be.prepare_vector(&norm.0)?;
            let nb = norm.1.as_ref().map(|b| be.prepare_vector(b)).transpose()?;
            let pw = be.prepare_conv(&pointwise.0, pointwise.1.as_ref(), ConvSpec::same(1))?;
            let f = aperture_engine::NormProduct {
                norm_weight: &nw,
                norm_bias: nb.as_ref(),
                eps: 1e-5,
                pointwise: &pw,
            };
            be.norm_pointwise(first()?, &f)?
        }
        Op::Front {
            norm,
            pointwise,
            depthwise,
            gate,
        } => {
            let nw = be.prepare_vector(&norm.0)?;
            let nb = norm.1.as_ref().map(|b| be.prepare_vector(b)).transpose()?;
            let pw = be.prepare_conv(&pointwise.0, pointwise.1.as_ref(), ConvSpec::same(1))?;
            let c = depthwise.0.shape()[0];
            let dw = be.prepare_conv(
                &depthwise.0,
                depthwise.1.as_ref(),
                ConvSpec::depthwise(c, 3),
            )?;
            let f = aperture_engine::FrontHalf {
                norm_weight: &nw,
                norm_bias: nb.as_ref(),
                eps: 1e-5,
                pointwise: &pw,
                depthwise: &dw,
                gate: *gate,
            };
            be.norm_pointwise_depthwise(first()?, &f)?
        }
        Op::Attention {
            heads,
            temp,
            w,
            b,
            residual,
        } => {
            let tp = be.prepare_vector(temp)?;
            let pp = be.prepare_conv(w, b.as_ref(), ConvSpec::same(1))?;
            let r = if *residual { Some(second()?) } else { None };
            be.channel_attention(first()?, *heads, &tp, &pp, r)?
        }
        Op::Shuffle(r) => be.pixel_shuffle(first()?, *r)?,
        Op::Unshuffle(r) => be.pixel_unshuffle(first()?, *r)?,
        Op::Concat => be.concat_channels(first()?, second()?)?,
        Op::Add => be.add(first()?, second()?)?,
    };
    be.download_nchw(&y)
}

type Case = (String, Op, Vec<HostTensor>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_span_the_interval() {
        let mut r = Rng(7);
        let v: Vec<f32> = (0..10_000).map(|_| r.next()).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!(v.iter().any(|&x| x < -0.9) && v.iter().any(|&x| x > 0.9));
    }

    #[test]
    fn nan_never_passes() {
        let row = ParityRow {
            case: "x".into(),
            rel_l2: f64::NAN,
            tolerance: 1.0,
        };
        assert!(!row.passed());
        assert!(ParityRow {
            case: "y".into(),
            rel_l2: 1e-6,
            tolerance: 1e-5
        }
        .passed());
    }

    #[test]
    fn tolerances_follow_precision() {
        assert!(model_tolerance(Precision::Fp32) < model_tolerance(Precision::Fp16));
        assert!(model_tolerance(Precision::Fp16) < model_tolerance(Precision::Bf16));
        assert_eq!(model_tolerance(Precision::Fp16), 1e-3);
    }
}
