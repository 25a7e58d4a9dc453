//! Operation-level parity of the CUDA backend against the CPU reference backend on
//! fresh random data, with every GPU output poisoned (NaN) before its kernel runs.

use aperture_engine::backend::{Activation, Backend, ConvSpec};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, HostTensor, Precision, Result};

use crate::backend::CudaBackend;

/// GPU image preprocessing against the CPU path (resized bytes identical, f32 within
/// 1e-6): see [`crate::preprocess::check`].
pub use crate::preprocess::check::{preprocess_parity, PreprocessRow};

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
        let n = shape.iter().product();
        let data = (0..n).map(|_| self.next() * scale).collect();
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

/// Compares every operation the Restormer uses, at awkward sizes (odd widths,
/// channel counts that are not multiples of 8, several pixel chunks in attention).
pub fn op_parity(gpu: &CudaBackend, seed: u64) -> Result<Vec<ParityRow>> {
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed);
    let tol = op_tolerance(gpu.precision());
    let (n, h, w) = (2usize, 12usize, 20usize);
    let mut cases: Vec<(String, Op, Vec<HostTensor>)> = Vec::new();
    let conv = |rng: &mut Rng, co: usize, ci: usize, k: usize| {
        rng.tensor(vec![co, ci, k, k], 1.0 / ((ci * k * k) as f32).sqrt())
    };
    let mut add_conv = |name: &str,
                        ci: usize,
                        co: usize,
                        k: usize,
                        groups: usize,
                        bias: bool,
                        act: Activation,
                        residual: bool,
                        rng: &mut Rng| {
        let wt = conv(rng, co, ci / groups, k);
        let b = if bias {
            Some(rng.tensor(vec![co], 0.5))
        } else {
            None
        };
        let spec = ConvSpec {
            stride: 1,
            padding: k / 2,
            groups,
        };
        let mut xs = vec![rng.tensor(vec![n, ci, h, w], 1.0)];
        if residual {
            xs.push(rng.tensor(vec![n, co, h, w], 1.0));
        }
        cases.push((
            name.to_string(),
            Op::Conv {
                w: wt,
                b,
                spec,
                act,
                residual,
            },
            xs,
        ));
    };
    add_conv(
        "conv1x1 48->144 bias",
        48,
        144,
        1,
        1,
        true,
        Activation::Identity,
        false,
        &mut rng,
    );
    add_conv(
        "conv1x1 127->48 +residual",
        127,
        48,
        1,
        1,
        false,
        Activation::Identity,
        true,
        &mut rng,
    );
    add_conv(
        "conv3x3 3->48 bias",
        3,
        48,
        3,
        1,
        true,
        Activation::Identity,
        false,
        &mut rng,
    );
    add_conv(
        "conv3x3 96->192",
        96,
        192,
        3,
        1,
        false,
        Activation::Identity,
        false,
        &mut rng,
    );
    add_conv(
        "conv3x3 48->24 gelu +residual",
        48,
        24,
        3,
        1,
        true,
        Activation::Gelu,
        true,
        &mut rng,
    );
    add_conv(
        "depthwise3x3 144 bias",
        144,
        144,
        3,
        144,
        true,
        Activation::Identity,
        false,
        &mut rng,
    );
    add_conv(
        "depthwise3x3 254 +residual",
        254,
        254,
        3,
        254,
        false,
        Activation::Identity,
        true,
        &mut rng,
    );
    add_conv(
        "depthwise5x5 45 (generic kernel) relu",
        45,
        45,
        5,
        45,
        true,
        Activation::Relu,
        false,
        &mut rng,
    );
    cases.push((
        "layer_norm 96 with bias".into(),
        Op::Norm {
            w: rng.tensor(vec![96], 1.0),
            b: Some(rng.tensor(vec![96], 1.0)),
        },
        vec![rng.tensor(vec![n, 96, h, w], 3.0)],
    ));
    cases.push((
        "layer_norm 600 (generic kernel)".into(),
        Op::Norm {
            w: rng.tensor(vec![600], 1.0),
            b: Some(rng.tensor(vec![600], 1.0)),
        },
        vec![rng.tensor(vec![n, 600, 4, 6], 3.0)],
    ));
    cases.push((
        "layer_norm 48 bias-free".into(),
        Op::Norm {
            w: rng.tensor(vec![48], 1.0),
            b: None,
        },
        vec![rng.tensor(vec![n, 48, h, w], 3.0)],
    ));
    cases.push((
        "gelu_gate 254".into(),
        Op::GeluGate,
        vec![rng.tensor(vec![n, 254, h, w], 2.0)],
    ));
    // Vectorised kernels (vector.cu) on inputs taller than one 16-row strip, with
    // partial strips and odd widths.
    let (th, tw) = (37usize, 29usize);
    cases.push((
        "depthwise3x3 44 gelu +residual (vector kernel, 3 strips)".into(),
        Op::Conv {
            w: rng.tensor(vec![44, 1, 3, 3], 0.5),
            b: Some(rng.tensor(vec![44], 0.5)),
            spec: ConvSpec {
                stride: 1,
                padding: 1,
                groups: 44,
            },
            act: Activation::Gelu,
            residual: true,
        },
        vec![
            rng.tensor(vec![1, 44, th, tw], 1.0),
            rng.tensor(vec![1, 44, th, tw], 1.0),
        ],
    ));
    cases.push((
        "depthwise3x3 + gelu_gate 384->192 (vector kernel, 3 strips)".into(),
        Op::DepthwiseGate {
            w: rng.tensor(vec![384, 1, 3, 3], 0.5),
            b: Some(rng.tensor(vec![384], 0.2)),
        },
        vec![rng.tensor(vec![2, 384, th, tw], 2.0)],
    ));
    for (c, bias) in [(384usize, true), (392, false), (8, true)] {
        cases.push((
            format!(
                "layer_norm {c} {}",
                if bias { "with bias" } else { "bias-free" }
            ),
            Op::Norm {
                w: rng.tensor(vec![c], 1.0),
                b: bias.then(|| rng.tensor(vec![c], 1.0)),
            },
            vec![rng.tensor(vec![1, c, 3, 11], 3.0)],
        ));
    }
    for (c, bias) in [(256usize, true), (96, false)] {
        cases.push((
            format!("depthwise3x3 + gelu_gate {c}->{}", c / 2),
            Op::DepthwiseGate {
                w: rng.tensor(vec![c, 1, 3, 3], 0.5),
                b: bias.then(|| rng.tensor(vec![c], 0.2)),
            },
            vec![rng.tensor(vec![n, c, h, w], 2.0)],
        ));
    }
    for (c, heads, hh, ww, bias) in [
        (48usize, 1usize, 12usize, 20usize, false),
        (96, 2, 64, 72, true),
        (96, 1, 16, 24, false),
        (192, 4, 8, 8, true),
    ] {
        let temp = HostTensor::from_f32(
            vec![heads],
            (0..heads).map(|i| 0.5 + 0.3 * i as f32).collect(),
        )?;
        let wt = conv(&mut rng, c, c, 1);
        let b = if bias {
            Some(rng.tensor(vec![c], 0.5))
        } else {
            None
        };
        let xs = vec![
            rng.tensor(vec![n, 3 * c, hh, ww], 1.0),
            rng.tensor(vec![n, c, hh, ww], 1.0),
        ];
        let name = format!(
            "attention c={c} heads={heads} {hh}x{ww}{} +residual",
            if bias { " bias" } else { "" }
        );
        cases.push((
            name,
            Op::Attention {
                heads,
                temp,
                w: wt,
                b,
                residual: true,
            },
            xs,
        ));
    }
    cases.push((
        "pixel_shuffle 2 (192ch)".into(),
        Op::Shuffle(2),
        vec![rng.tensor(vec![n, 192, h, w], 1.0)],
    ));
    cases.push((
        "pixel_unshuffle 2 (24ch)".into(),
        Op::Unshuffle(2),
        vec![rng.tensor(vec![n, 24, h, w], 1.0)],
    ));
    cases.push((
        "concat 48+96".into(),
        Op::Concat,
        vec![
            rng.tensor(vec![n, 48, h, w], 1.0),
            rng.tensor(vec![n, 96, h, w], 1.0),
        ],
    ));
    cases.push((
        "add 48".into(),
        Op::Add,
        vec![
            rng.tensor(vec![n, 48, h, w], 1.0),
            rng.tensor(vec![n, 48, h, w], 1.0),
        ],
    ));

    cases.extend(igemm_conv_cases(gpu, &mut rng));
    cases.extend(depthwise_cases(&mut rng));

    gpu.set_poison(true);
    let mut rows = Vec::new();
    if gpu.kernels.igemm.failed() {
        // The kernel should be there for this precision and GPU but did not build.
        rows.push(ParityRow {
            case: format!(
                "conv_igemm kernel: {}",
                gpu.kernels.igemm.reason().unwrap_or("not loaded")
            ),
            rel_l2: f64::INFINITY,
            tolerance: tol,
        });
    }
    for (name, op, xs) in &cases {
        let want = run(&cpu, op, xs)?;
        let got = run(gpu, op, xs);
        let rel_l2 = match got {
            Ok(g) if g.shape() == want.shape() => relative_l2(&g.to_f32_vec(), &want.to_f32_vec()),
            Ok(_) => f64::INFINITY,
            Err(e) => {
                gpu.set_poison(false);
                return Err(e);
            }
        };
        rows.push(ParityRow {
            case: name.clone(),
            rel_l2,
            tolerance: tol,
        });
    }
    gpu.set_poison(false);
    rows.extend(crate::conv_concat_check::parity(gpu, seed)?);
    Ok(rows)
}

type Case = (String, Op, Vec<HostTensor>);

/// Depthwise convolutions on the strip kernels (`dwk*` in vector.cu; the generic kernel
/// under `APERTURE_DEPTHWISE=scalar`): every (k, stride) they cover, D-FINE's shapes
/// (5x5 and 3x3/2 with bias and ReLU), odd sizes, maps narrower than a strip or shorter
/// than the 5x5 window, the no-bias and residual epilogues, and the gated 3x3 at odd
/// sizes. Names read "depthwise{k}x{k}/{stride} {c} {h}x{w}x{n} ...".
fn depthwise_cases(rng: &mut Rng) -> Vec<Case> {
    // [n, h, w, c, k, stride], activation, bias, residual
    let shapes: [([usize; 6], Activation, bool, bool); 15] = [
        ([2, 17, 23, 64, 5, 1], Activation::Relu, true, false),
        ([2, 9, 10, 32, 5, 1], Activation::Identity, false, true),
        ([1, 40, 3, 8, 5, 1], Activation::Silu, true, false),
        ([2, 3, 2, 16, 5, 1], Activation::Gelu, true, true),
        ([2, 17, 23, 64, 3, 2], Activation::Identity, true, false),
        ([2, 20, 20, 128, 3, 2], Activation::Identity, true, false),
        ([1, 9, 10, 12, 3, 2], Activation::Relu, false, true),
        ([2, 17, 23, 32, 5, 2], Activation::Relu, true, false),
        ([1, 10, 9, 8, 5, 2], Activation::Identity, false, true),
        ([2, 17, 23, 24, 7, 1], Activation::Gelu, true, false),
        ([1, 9, 10, 6, 7, 2], Activation::Identity, true, true),
        ([2, 33, 5, 36, 3, 1], Activation::Silu, false, false),
        ([1, 9, 10, 6, 3, 1], Activation::Relu, true, true),
        ([2, 21, 3, 18, 5, 1], Activation::Relu, true, false),
        // Enough blocks for full 16-row strips on a 132-SM GPU (smaller grids get
        // shorter strips).
        ([3, 64, 64, 512, 5, 1], Activation::Relu, true, false),
    ];
    let mut cases = Vec::new();
    for &([n, h, w, c, k, stride], act, bias, residual) in &shapes {
        let pad = k / 2;
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let act_name = format!("{act:?}").to_lowercase();
        let name = format!(
            "depthwise{k}x{k}/{stride} {c} {h}x{w}x{n} {act_name}{}{}",
            if bias { " b" } else { "" },
            if residual { " +res" } else { "" },
        );
        let wt = rng.tensor(vec![c, 1, k, k], 1.0 / k as f32);
        let b = bias.then(|| rng.tensor(vec![c], 0.5));
        let mut xs = vec![rng.tensor(vec![n, c, h, w], 1.0)];
        if residual {
            xs.push(rng.tensor(vec![n, c, oh, ow], 1.0));
        }
        let spec = ConvSpec {
            stride,
            padding: pad,
            groups: c,
        };
        cases.push((
            name,
            Op::Conv {
                w: wt,
                b,
                spec,
                act,
                residual,
            },
            xs,
        ));
    }
    // The gated 3x3 (dwk3_gate, two columns per thread): odd widths, a width of one,
    // heights that leave partial strips, and one grid large enough for 16-row strips.
    for (n, h, w, c, bias) in [
        (2usize, 17usize, 23usize, 256usize, true),
        (1, 9, 1, 64, false),
        (2, 5, 3, 24, true),
        (1, 33, 10, 128, true),
        (2, 128, 96, 768, true),
    ] {
        cases.push((
            format!("depthwise3x3 + gelu_gate {c}->{} {h}x{w}x{n}", c / 2),
            Op::DepthwiseGate {
                w: rng.tensor(vec![c, 1, 3, 3], 0.5),
                b: bias.then(|| rng.tensor(vec![c], 0.2)),
            },
            vec![rng.tensor(vec![n, c, h, w], 2.0)],
        ));
    }
    cases
}

/// Dense convolutions for the implicit-GEMM kernel (16-bit storage; fp32 and tf32 run
/// them through im2col, still against the CPU): tails of K and of the channel tiles,
/// chunks spanning taps, strides, 5x5 and 2x2 kernels, odd output counts (Restormer's
/// 3-channel output with its residual), every activation, residuals, and one
/// D-FINE-sized 3x3 (batch 2: enough blocks for the 128-channel tile on an H100). Each
/// name says which path the GPU takes (igemm64, igemm128 or im2col).
fn igemm_conv_cases(gpu: &CudaBackend, rng: &mut Rng) -> Vec<Case> {
    use crate::conv_igemm::{DenseConv, Geometry, Tile};
    // [n, h, w, c_in, c_out, k, stride, pad], activation, residual
    let shapes: [([usize; 8], Activation, bool); 13] = [
        ([2, 17, 23, 64, 64, 3, 1, 1], Activation::Identity, false),
        ([2, 17, 23, 64, 64, 3, 1, 1], Activation::Silu, true),
        ([2, 19, 25, 128, 256, 3, 2, 1], Activation::Relu, false),
        ([2, 9, 11, 8, 8, 3, 1, 1], Activation::Gelu, false),
        ([2, 13, 7, 24, 40, 3, 1, 1], Activation::Identity, true),
        ([1, 11, 14, 16, 32, 5, 1, 2], Activation::Relu, false),
        ([2, 10, 12, 32, 16, 2, 1, 0], Activation::Identity, false),
        ([2, 16, 18, 64, 128, 1, 2, 0], Activation::Silu, false),
        ([1, 21, 20, 48, 24, 3, 2, 0], Activation::Gelu, true),
        ([2, 12, 20, 96, 192, 3, 1, 1], Activation::Gelu, false),
        ([1, 20, 24, 96, 3, 3, 1, 1], Activation::Identity, true),
        ([2, 9, 10, 16, 5, 3, 1, 1], Activation::Gelu, false),
        ([2, 80, 80, 256, 256, 3, 1, 1], Activation::Silu, false),
    ];
    let ready = gpu.kernels.igemm.reason().is_none();
    let mut cases = Vec::new();
    for (i, &(dims, act, residual)) in shapes.iter().enumerate() {
        let [n, h, w, ci, co, k, stride, pad] = dims;
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let dense = DenseConv {
            c_in: ci,
            c_out: co,
            kh: k,
            kw: k,
            stride,
            pad,
            kp: k * k * ci,
            depthwise: false,
        };
        let sms = gpu.multiprocessors().max(1) as usize;
        let tile = Tile::choose(co, n * oh * ow, sms, gpu.kernels.igemm.wide());
        let path = match Geometry::new([n, h, w, ci], (oh, ow), dense, tile) {
            Some(_) if ready => format!("igemm{}", tile.channels()),
            _ => "im2col".to_string(),
        };
        let bias = i % 3 != 1;
        let act_name = match act {
            Activation::Identity => "id",
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        };
        // e.g. "conv3x3/2 128->256 19x25x2 relu b [igemm]": stride, input size x batch.
        let name = format!(
            "conv{k}x{k}/{stride} p{pad} {ci}->{co} {h}x{w}x{n} {act_name}{}{} [{path}]",
            if bias { " b" } else { "" },
            if residual { " +res" } else { "" },
        );
        let wt = rng.tensor(vec![co, ci, k, k], 1.0 / ((ci * k * k) as f32).sqrt());
        let b = bias.then(|| rng.tensor(vec![co], 0.5));
        let mut xs = vec![rng.tensor(vec![n, ci, h, w], 1.0)];
        if residual {
            xs.push(rng.tensor(vec![n, co, oh, ow], 1.0));
        }
        let spec = ConvSpec {
            stride,
            padding: pad,
            groups: 1,
        };
        cases.push((
            name,
            Op::Conv {
                w: wt,
                b,
                spec,
                act,
                residual,
            },
            xs,
        ));
    }
    cases
}

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
