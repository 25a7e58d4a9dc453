//! Self-test cases for [`crate::conv_concat`]: HG-block aggregations and node blocks
//! (ELAN-shaped) on the GPU (outputs written into the concatenation, channel ranges read
//! in place) against the CPU backend's plain convolutions followed by
//! `concat_channels_n`, with every GPU allocation poisoned (NaN) first so that a slice
//! nobody wrote shows.

use aperture_engine::backend::{Activation, Backend, ConvSpec};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, ConvNode, HostTensor, NodeRef, NodeSource, Result};

use crate::backend::CudaBackend;
use crate::selftest::{op_tolerance, ParityRow};

/// One convolution of a chain: `(c_in, c_out, kernel, depthwise, activation)`.
type ConvCase = (usize, usize, usize, bool, Activation);
/// A case: name, NCHW input shape, the chains.
type ChainCase = (&'static str, [usize; 4], Vec<Vec<ConvCase>>);

/// Deterministic values in `[-scale, scale)` (SplitMix64).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            scale * (2.0 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
        })
        .collect()
}

fn host(seed: u64, shape: Vec<usize>, scale: f32) -> Result<HostTensor> {
    let n = shape.iter().product();
    HostTensor::from_f32(shape, values(seed, n, scale))
}

/// Weights (seed `seed`), bias (seed `seed + 1`) and a same-size spec of a stride-1
/// convolution `(c_in, c_out, kernel, depthwise)`, scaled to keep activations near unit.
fn seeded_conv(
    seed: u64,
    (ci, co, kernel, depthwise): (usize, usize, usize, bool),
) -> Result<(HostTensor, HostTensor, ConvSpec)> {
    let per_group = if depthwise { 1 } else { ci };
    let scale = 1.0 / ((per_group * kernel * kernel) as f32).sqrt();
    let wt = host(seed, vec![co, per_group, kernel, kernel], scale)?;
    let b = host(seed + 1, vec![co], 0.5)?;
    let spec = ConvSpec {
        stride: 1,
        padding: kernel / 2,
        groups: if depthwise { ci } else { 1 },
    };
    Ok((wt, b, spec))
}

/// Host weights of a case's chains: `(weight, bias, spec, activation)` per convolution.
type ChainWeights = Vec<Vec<(HostTensor, HostTensor, ConvSpec, Activation)>>;

/// The aggregation on one backend: NCHW input in, NCHW concatenation out, or with a
/// squeeze `(weight, bias, activation)` its output.
fn run<B: Backend>(
    be: &B,
    x: &HostTensor,
    weights: &ChainWeights,
    squeeze: Option<&(HostTensor, HostTensor, Activation)>,
) -> Result<HostTensor> {
    let params = weights
        .iter()
        .map(|chain| {
            chain
                .iter()
                .map(|(w, b, spec, act)| Ok((be.prepare_conv(w, Some(b), *spec)?, *act)))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let layers: Vec<Vec<(&B::Param, Activation)>> = params
        .iter()
        .map(|chain| chain.iter().map(|(p, a)| (p, *a)).collect())
        .collect();
    let xt = be.upload_nchw(x)?;
    let out = match squeeze {
        None => be.conv_chain_concat(&xt, &layers)?,
        Some((w, b, act)) => {
            let spec = ConvSpec {
                stride: 1,
                padding: 0,
                groups: 1,
            };
            let p = be.prepare_conv(w, Some(b), spec)?;
            be.conv_chain_aggregate(&xt, &layers, &p, *act)?
        }
    };
    be.download_nchw(&out)
}

/// The case's input and seeded chain weights.
fn case_weights(
    base: u64,
    [n, c, h, w]: [usize; 4],
    chains: Vec<Vec<ConvCase>>,
) -> Result<(HostTensor, ChainWeights)> {
    let x = host(base, vec![n, c, h, w], 1.0)?;
    let mut k = 0u64;
    let mut weights = Vec::new();
    for chain in chains {
        let mut convs = Vec::new();
        for (ci, co, kernel, depthwise, act) in chain {
            k += 1;
            let (wt, b, spec) = seeded_conv(base + 2 * k, (ci, co, kernel, depthwise))?;
            convs.push((wt, b, spec, act));
        }
        weights.push(convs);
    }
    Ok((x, weights))
}

/// Cases: D-FINE's two block kinds (3x3 chains on the implicit GEMM; 1x1 + depthwise
/// 5x5 light layers on cuBLASLt and the strip kernels) at odd sizes, a 1x1 with an
/// activation (whole output, then a copy), and channel counts that are not multiples
/// of 8 (the fallbacks: im2col, copies of strided inputs).
pub(crate) fn parity(gpu: &CudaBackend, seed: u64) -> Result<Vec<ParityRow>> {
    let cpu = CpuBackend::new();
    let tol = op_tolerance(gpu.precision());
    let relu = Activation::Relu;
    let id = Activation::Identity;
    let cases: Vec<ChainCase> = vec![
        (
            "hg 3x3 64+3x32 relu 13x11x2",
            [2, 64, 13, 11],
            vec![
                vec![(64, 32, 3, false, relu)],
                vec![(32, 32, 3, false, relu)],
                vec![(32, 32, 3, false, relu)],
            ],
        ),
        (
            "hg light 1x1+dw5x5 48+3x24 relu 9x14x2",
            [2, 48, 9, 14],
            vec![
                vec![(48, 24, 1, false, id), (24, 24, 5, true, relu)],
                vec![(24, 24, 1, false, id), (24, 24, 5, true, relu)],
                vec![(24, 24, 1, false, id), (24, 24, 5, true, relu)],
            ],
        ),
        (
            "hg 1x1 silu + dw3x3 16+2x16 7x5x3",
            [3, 16, 7, 5],
            vec![
                vec![(16, 16, 1, false, Activation::Silu)],
                vec![(16, 16, 3, true, relu)],
            ],
        ),
        (
            "hg odd channels 3x3 12+20+20 8x9x2",
            [2, 12, 8, 9],
            vec![vec![(12, 20, 3, false, relu)], vec![(20, 20, 3, false, id)]],
        ),
    ];
    let mut rows = Vec::new();
    for (i, (name, shape, chains)) in cases.into_iter().enumerate() {
        let (x, weights) = case_weights(seed.wrapping_add(1000 * i as u64), shape, chains)?;
        let want = run(&cpu, &x, &weights, None)?;
        rows.push(poisoned_row(
            gpu,
            format!("conv_chain_concat {name}"),
            tol,
            &want,
            || run(gpu, &x, &weights, None),
        )?);
    }
    rows.extend(aggregate_parity(gpu, &cpu, seed.wrapping_add(40_000))?);
    rows.extend(node_parity(gpu, &cpu, seed.wrapping_add(50_000))?);
    Ok(rows)
}

/// The aggregation with its squeeze (`conv_chain_aggregate`): blocks whose parts the
/// concatenation-free product reads (channel counts of 64s; 64 and 128 output tiles, a
/// partial last tile of pixels and of channels) and a light block that keeps the
/// concatenation.
fn aggregate_parity(gpu: &CudaBackend, cpu: &CpuBackend, seed: u64) -> Result<Vec<ParityRow>> {
    let tol = op_tolerance(gpu.precision());
    let relu = Activation::Relu;
    let cases: Vec<(ChainCase, usize)> = vec![
        (
            (
                "hg 3x3 128+2x64 squeeze 256->64 13x11x2",
                [2, 128, 13, 11],
                vec![
                    vec![(128, 64, 3, false, relu)],
                    vec![(64, 64, 3, false, relu)],
                ],
            ),
            64,
        ),
        (
            (
                "hg 3x3 64+3x64 squeeze 256->192 9x15x3",
                [3, 64, 9, 15],
                vec![
                    vec![(64, 64, 3, false, relu)],
                    vec![(64, 64, 3, false, relu)],
                    vec![(64, 64, 3, false, relu)],
                ],
            ),
            192,
        ),
        (
            (
                "hg light 1x1+dw5x5 64+2x64 squeeze 192->128 7x9x2",
                [2, 64, 7, 9],
                vec![
                    vec![
                        (64, 64, 1, false, Activation::Identity),
                        (64, 64, 5, true, relu),
                    ],
                    vec![
                        (64, 64, 1, false, Activation::Identity),
                        (64, 64, 5, true, relu),
                    ],
                ],
            ),
            128,
        ),
    ];
    let mut rows = Vec::new();
    for (i, ((name, shape, chains), c_out)) in cases.into_iter().enumerate() {
        let base = seed.wrapping_add(1000 * i as u64);
        let k: usize = shape[1]
            + chains
                .iter()
                .map(|c| c.last().map_or(0, |l| l.1))
                .sum::<usize>();
        let (x, weights) = case_weights(base, shape, chains)?;
        let (wt, b, _) = seeded_conv(base + 500, (k, c_out, 1, false))?;
        let squeeze = (wt, b, relu);
        let want = run(cpu, &x, &weights, Some(&squeeze))?;
        rows.push(poisoned_row(
            gpu,
            format!("conv_chain_aggregate {name}"),
            tol,
            &want,
            || run(gpu, &x, &weights, Some(&squeeze)),
        )?);
    }
    Ok(rows)
}

/// One node of a case: what it reads, its convolution `(c_in, c_out, kernel,
/// depthwise)`, activation and residual.
struct NodeSpec {
    input: NodeSource,
    conv: (usize, usize, usize, bool),
    act: Activation,
    residual: Option<NodeRef>,
}

/// A node case: name, NCHW input shape, the nodes, the concatenation.
type NodeCase = (&'static str, [usize; 4], Vec<NodeSpec>, Vec<NodeRef>);

/// RepNCSPELAN4 as D-FINE's encoder runs it, for an input of `cx` channels: `y` = 1x1
/// SiLU to `2 * half` channels (concatenated), a CSP branch on `y`'s second half read in
/// place (1x1 SiLU, `blocks` 3x3 SiLU bottlenecks, 1x1 SiLU plus the bottleneck output),
/// `b1` = 3x3 SiLU (concatenated), the same branch on `b1`, `b2` = 3x3 SiLU
/// (concatenated).
fn elan(cx: usize, half: usize, c4: usize, blocks: usize) -> (Vec<NodeSpec>, Vec<NodeRef>) {
    let silu = Activation::Silu;
    let mut nodes = vec![NodeSpec {
        input: NodeSource::whole(NodeRef::Input),
        conv: (cx, 2 * half, 1, false),
        act: silu,
        residual: None,
    }];
    let mut concat = vec![NodeRef::Node(0)];
    let mut branch_in = NodeSource::channels(NodeRef::Node(0), half, half);
    let mut c_in = half;
    for _ in 0..2 {
        nodes.push(NodeSpec {
            input: branch_in,
            conv: (c_in, c4, 1, false),
            act: silu,
            residual: None,
        });
        for _ in 0..blocks {
            nodes.push(NodeSpec {
                input: NodeSource::whole(NodeRef::Node(nodes.len() - 1)),
                conv: (c4, c4, 3, false),
                act: silu,
                residual: None,
            });
        }
        nodes.push(NodeSpec {
            input: branch_in,
            conv: (c_in, c4, 1, false),
            act: silu,
            residual: Some(NodeRef::Node(nodes.len() - 1)),
        });
        nodes.push(NodeSpec {
            input: NodeSource::whole(NodeRef::Node(nodes.len() - 1)),
            conv: (c4, c4, 3, false),
            act: silu,
            residual: None,
        });
        let b = NodeRef::Node(nodes.len() - 1);
        concat.push(b);
        branch_in = NodeSource::whole(b);
        c_in = c4;
    }
    (nodes, concat)
}

/// Residuals into concatenation slices on every kernel kind: a 1x1 ReLU (in the
/// product), a depthwise 3x3 with a residual that lives in a slice (copied out), a 1x1
/// without activation on a channel range of the input plus a residual (vector pass in
/// place), a 3x3 GELU plus a residual; the block input and one node concatenated twice.
fn residuals(cx: usize, c: usize) -> (Vec<NodeSpec>, Vec<NodeRef>) {
    let n = NodeRef::Node;
    let nodes = vec![
        NodeSpec {
            input: NodeSource::whole(NodeRef::Input),
            conv: (cx, c, 1, false),
            act: Activation::Relu,
            residual: None,
        },
        NodeSpec {
            input: NodeSource::whole(n(0)),
            conv: (c, c, 3, true),
            act: Activation::Relu,
            residual: Some(n(0)),
        },
        NodeSpec {
            input: NodeSource::channels(NodeRef::Input, cx - c, c),
            conv: (c, c, 1, false),
            act: Activation::Identity,
            residual: Some(n(1)),
        },
        NodeSpec {
            input: NodeSource::whole(n(2)),
            conv: (c, c, 3, false),
            act: Activation::Gelu,
            residual: Some(n(0)),
        },
    ];
    let concat = vec![NodeRef::Input, n(0), n(1), n(2), n(3), n(0)];
    (nodes, concat)
}

/// A node block on one backend: NCHW input in, NCHW concatenation out.
fn run_nodes<B: Backend>(
    be: &B,
    x: &HostTensor,
    specs: &[NodeSpec],
    weights: &[(HostTensor, HostTensor, ConvSpec)],
    concat: &[NodeRef],
) -> Result<HostTensor> {
    let params = weights
        .iter()
        .map(|(w, b, spec)| be.prepare_conv(w, Some(b), *spec))
        .collect::<Result<Vec<_>>>()?;
    let nodes: Vec<ConvNode<'_, B::Param>> = specs
        .iter()
        .zip(&params)
        .map(|(s, p)| ConvNode {
            input: s.input,
            conv: p,
            act: s.act,
            residual: s.residual,
        })
        .collect();
    let xt = be.upload_nchw(x)?;
    be.download_nchw(&be.conv_nodes_concat(&xt, &nodes, concat)?)
}

/// Node blocks ([`Backend::conv_nodes_concat`]): ELAN-shaped with channel counts in
/// whole 16-byte vectors (1x1s into and out of slices, the 3x3s on the implicit GEMM)
/// and with odd ones (the fallbacks: copies of strided inputs and residuals, whole
/// outputs copied into the slices), and the residual case.
fn node_parity(gpu: &CudaBackend, cpu: &CpuBackend, seed: u64) -> Result<Vec<ParityRow>> {
    let tol = op_tolerance(gpu.precision());
    let cases: Vec<NodeCase> = {
        let (a, ac) = elan(48, 32, 16, 2);
        let (b, bc) = elan(14, 10, 6, 1);
        let (r, rc) = residuals(32, 16);
        vec![
            (
                "elan 48->2x32, c4 16, 2 blocks 11x9x2",
                [2, 48, 11, 9],
                a,
                ac,
            ),
            ("elan odd 14->2x10, c4 6 7x6x2", [2, 14, 7, 6], b, bc),
            (
                "residuals dw/1x1/3x3 into slices 9x10x2",
                [2, 32, 9, 10],
                r,
                rc,
            ),
        ]
    };
    let mut rows = Vec::new();
    for (i, (name, [n, c, h, w], specs, concat)) in cases.into_iter().enumerate() {
        let base = seed.wrapping_add(1000 * i as u64);
        let x = host(base, vec![n, c, h, w], 1.0)?;
        let mut weights = Vec::new();
        for (k, s) in specs.iter().enumerate() {
            let k = k as u64 + 1;
            weights.push(seeded_conv(base + 2 * k, s.conv)?);
        }
        let want = run_nodes(cpu, &x, &specs, &weights, &concat)?;
        rows.push(poisoned_row(
            gpu,
            format!("conv_nodes_concat {name}"),
            tol,
            &want,
            || run_nodes(gpu, &x, &specs, &weights, &concat),
        )?);
    }
    Ok(rows)
}

/// The row of `case`: `on_gpu` run with every GPU allocation poisoned (NaN), so an
/// unwritten element fails, against the CPU's `want` (a shape mismatch is an infinite
/// error).
fn poisoned_row(
    gpu: &CudaBackend,
    case: String,
    tolerance: f64,
    want: &HostTensor,
    on_gpu: impl FnOnce() -> Result<HostTensor>,
) -> Result<ParityRow> {
    gpu.set_poison(true);
    let got = on_gpu();
    gpu.set_poison(false);
    let got = got?;
    let rel_l2 = if got.shape() == want.shape() {
        relative_l2(&got.to_f32_vec(), &want.to_f32_vec())
    } else {
        f64::INFINITY
    };
    Ok(ParityRow {
        case,
        rel_l2,
        tolerance,
    })
}
