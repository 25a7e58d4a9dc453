//! Self-test cases for [`crate::conv_concat`]: HG-block aggregations on the GPU (layer
//! outputs written into the concatenation) against the CPU backend's plain convolutions
//! followed by `concat_channels_n`, with every GPU allocation poisoned (NaN) first so
//! that a slice nobody wrote shows.

use aperture_engine::backend::{Activation, Backend, ConvSpec};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, HostTensor, Result};

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

/// The aggregation on one backend: NCHW input in, NCHW concatenation out.
fn run<B: Backend>(
    be: &B,
    x: &HostTensor,
    weights: &[Vec<(HostTensor, HostTensor, ConvSpec, Activation)>],
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
    be.download_nchw(&be.conv_chain_concat(&xt, &layers)?)
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
    for (i, (name, [n, c, h, w], chains)) in cases.into_iter().enumerate() {
        let base = seed.wrapping_add(1000 * i as u64);
        let x = host(base, vec![n, c, h, w], 1.0)?;
        let mut k = 0u64;
        let mut weights = Vec::new();
        for chain in chains {
            let mut convs = Vec::new();
            for (ci, co, kernel, depthwise, act) in chain {
                k += 1;
                let per_group = if depthwise { 1 } else { ci };
                let scale = 1.0 / ((per_group * kernel * kernel) as f32).sqrt();
                let wt = host(base + 2 * k, vec![co, per_group, kernel, kernel], scale)?;
                let b = host(base + 2 * k + 1, vec![co], 0.5)?;
                let spec = ConvSpec {
                    stride: 1,
                    padding: kernel / 2,
                    groups: if depthwise { ci } else { 1 },
                };
                convs.push((wt, b, spec, act));
            }
            weights.push(convs);
        }
        let want = run(&cpu, &x, &weights)?;
        gpu.set_poison(true);
        let got = run(gpu, &x, &weights);
        gpu.set_poison(false);
        let got = got?;
        let rel_l2 = if got.shape() == want.shape() {
            relative_l2(&got.to_f32_vec(), &want.to_f32_vec())
        } else {
            f64::INFINITY
        };
        rows.push(ParityRow {
            case: format!("conv_chain_concat {name}"),
            rel_l2,
            tolerance: tol,
        });
    }
    Ok(rows)
}
