//! [`op_parity`]: the Restormer's operations at awkward sizes, each run on both backends.

use aperture_engine::backend::{Activation, ConvSpec};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, HostTensor, Result};

use super::cases::{
    depthwise_cases, front_half_cases, igemm_conv_cases, norm_product_cases, small_taps_conv_cases,
};
use super::{op_tolerance, run, Op, ParityRow, Rng};
use crate::backend::CudaBackend;

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
    cases.extend(small_taps_conv_cases(&mut rng));
    cases.extend(depthwise_cases(&mut rng));
    cases.extend(front_half_cases(gpu, &mut rng));
    cases.extend(norm_product_cases(gpu, &mut rng));

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
        // The fused front-half kernels are checked whether or not runs use them.
        let fused = gpu.set_fused_front(matches!(op, Op::Front { .. }));
        let norm_product = gpu.set_norm_product(matches!(op, Op::NormProduct { .. }));
        let got = run(gpu, op, xs);
        gpu.set_fused_front(fused);
        gpu.set_norm_product(norm_product);
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
