//! Convolution case tables: the depthwise strip kernels' shapes and the implicit-GEMM ones.

use aperture_engine::backend::{Activation, ConvSpec};

use super::{Case, Op, Rng};
use crate::backend::CudaBackend;

/// Depthwise convolutions on the strip kernels (`dwk*` in vector.cu; the generic kernel
/// under `APERTURE_DEPTHWISE=scalar`): every (k, stride) they cover, D-FINE's shapes
/// (5x5 and 3x3/2 with bias and ReLU), odd sizes, maps narrower than a strip or shorter
/// than the 5x5 window, the no-bias and residual epilogues, and the gated 3x3 at odd
/// sizes. Names read "depthwise{k}x{k}/{stride} {c} {h}x{w}x{n} ...".
pub(super) fn depthwise_cases(rng: &mut Rng) -> Vec<Case> {
    // [n, h, w, c, k, stride], activation, bias, residual
    let shapes: [([usize; 6], Activation, bool, bool); 21] = [
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
        // The staged 5x5 (dws5): D-FINE's map widths (eight column groups of 64
        // channels; four groups of 128 with a residual), and a short strip with a
        // partial column group and no bias.
        ([2, 40, 40, 128, 5, 1], Activation::Silu, true, false),
        ([3, 20, 20, 256, 5, 1], Activation::Relu, true, true),
        ([2, 7, 13, 192, 5, 1], Activation::Gelu, false, false),
        // The tensor-core kernels (dwm*, 16-bit storage, APERTURE_DEPTHWISE_MMA=1): Restormer's 3x3 over 144
        // channels (48-channel blocks) on a map wider than one 64-column tile, 96
        // channels with a residual and a partial last column tile, and 40 channels (a
        // block with idle warps).
        ([2, 21, 150, 144, 3, 1], Activation::Identity, true, false),
        ([1, 19, 131, 96, 3, 1], Activation::Relu, false, true),
        ([2, 12, 70, 40, 5, 1], Activation::Relu, true, false),
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
/// D-FINE-sized 3x3 (batch 2: enough blocks for the 128-channel tile on an H100), one
/// large 64-channel map (enough blocks for the 128 x 64 tile; the small ones take the
/// 64 x 64 tile). Each name says which path the GPU takes (igemm{pixels}x{channels} or
/// im2col).
pub(super) fn igemm_conv_cases(gpu: &CudaBackend, rng: &mut Rng) -> Vec<Case> {
    use crate::conv_igemm::{DenseConv, Geometry, Tile};
    // [n, h, w, c_in, c_out, k, stride, pad], activation, residual
    let shapes: [([usize; 8], Activation, bool); 22] = [
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
        ([1, 160, 212, 32, 64, 3, 1, 1], Activation::Relu, true),
        // Grids that fill 132 multiprocessors with wgmma tiles (64 input channels: taps
        // innermost, the input through L1): a partial channel tile, 40 input channels (a
        // K chunk spans taps), stride 2 with 200 outputs, an odd output count
        // (element-wise stores).
        ([4, 40, 40, 64, 136, 3, 1, 1], Activation::Silu, true),
        ([8, 40, 40, 40, 96, 3, 1, 1], Activation::Gelu, true),
        ([10, 64, 60, 128, 200, 3, 2, 1], Activation::Relu, false),
        ([12, 40, 40, 64, 45, 3, 1, 1], Activation::Identity, false),
        // 192 outputs (the 192-wide tile), taps innermost (64 input channels) and not.
        ([8, 48, 44, 64, 192, 3, 1, 1], Activation::Silu, true),
        ([8, 48, 44, 40, 192, 3, 1, 1], Activation::Gelu, false),
        // 1x1 products whose activation cuBLASLt cannot apply (a wgmma tile with
        // APERTURE_WGMMA_1X1=1, else cuBLASLt + a separate pass).
        ([8, 40, 44, 64, 128, 1, 1, 0], Activation::Silu, true),
        ([8, 40, 44, 96, 192, 1, 1, 0], Activation::Gelu, false),
    ];
    let ready = gpu.kernels.igemm.reason().is_none();
    let sms = gpu.multiprocessors().max(1) as usize;
    dense_conv_cases(
        &shapes,
        rng,
        |[n, h, w, ci, co, k, stride, pad], (oh, ow)| {
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
            let tile = Tile::choose(co, n * oh * ow, sms, gpu.kernels.igemm.tiles());
            if k == 1 && stride == 1 && pad == 0 {
                let pointwise = Geometry::pointwise([n, h, w, ci], (oh, ow), dense, tile);
                return match pointwise {
                    Some(_) if ready && crate::conv_igemm::pointwise_wanted() => {
                        format!("wgmma1x1 {}x{}", tile.pixels(), tile.channels())
                    }
                    _ => "gemm".to_string(),
                };
            }
            match Geometry::new([n, h, w, ci], (oh, ow), dense, tile) {
                Some(_) if ready => {
                    let ws = gpu.kernels.igemm.tiles().warp_specialised;
                    let kind = match (Tile::WGMMA.contains(&tile), ws) {
                        (true, true) => "wgmma_ws",
                        (true, false) => "wgmma",
                        _ => "igemm",
                    };
                    format!("{kind}{}x{}", tile.pixels(), tile.channels())
                }
                _ => "im2col".to_string(),
            }
        },
    )
}

/// Dense convolutions with few taps per output (`conv_small_taps`, ops.cu: K = kh * kw *
/// c_in <= 32, c_out a multiple of 8 up to 64): D-FINE's 3-channel stride-2 stem,
/// Restormer's 3 -> 48 patch embedding, one input channel with a 5x5 and a residual, a
/// 2x2 over four channels without bias, every activation, a grid of many blocks, the stem's
/// shape at stride 1 with a residual and on a 3 x 3 output.
pub(super) fn small_taps_conv_cases(rng: &mut Rng) -> Vec<Case> {
    let shapes: [([usize; 8], Activation, bool); 7] = [
        ([2, 33, 41, 3, 32, 3, 2, 1], Activation::Relu, false),
        ([1, 20, 24, 3, 48, 3, 1, 1], Activation::Identity, false),
        ([2, 9, 10, 1, 8, 5, 2, 2], Activation::Silu, true),
        ([1, 7, 6, 4, 64, 2, 1, 0], Activation::Gelu, false),
        ([3, 96, 80, 3, 16, 3, 2, 1], Activation::Relu, true),
        ([1, 17, 19, 3, 32, 3, 1, 1], Activation::Silu, true),
        ([1, 5, 5, 3, 32, 3, 2, 1], Activation::Gelu, false),
    ];
    dense_conv_cases(&shapes, rng, |_, _| "small".to_string())
}

/// Cases for `[n, h, w, c_in, c_out, k, stride, pad]` shapes, each named with the path
/// `path(shape, output size)` says the GPU takes; every third without bias.
fn dense_conv_cases(
    shapes: &[([usize; 8], Activation, bool)],
    rng: &mut Rng,
    path: impl Fn([usize; 8], (usize, usize)) -> String,
) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, &(dims, act, residual)) in shapes.iter().enumerate() {
        let [n, h, w, ci, co, k, stride, pad] = dims;
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let path = path(dims, (oh, ow));
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

/// Restormer's fused front halves (`norm_pointwise_depthwise`, front.cu) against the
/// separate operations on the CPU: both LayerNorm variants, with and without the gate and
/// the biases, Restormer-base's widths (48, 96, 192 in; qkv 3C, hidden 2 x 128 / 256 /
/// 512), partial output tiles at every edge, a last slice only partly used (P not a
/// multiple of 64, gated half not of 32). Names say whether the GPU took the fused
/// kernel.
pub(super) fn front_half_cases(gpu: &CudaBackend, rng: &mut Rng) -> Vec<Case> {
    use crate::conv_igemm::{DenseConv, IgemmSlot};
    use crate::front::FrontLaunch;
    // [n, c, h, w, p], gate, LayerNorm bias, product and depthwise biases
    let shapes: [([usize; 5], bool, bool, bool); 7] = [
        ([1, 48, 19, 37, 144], false, false, false),
        ([2, 48, 13, 21, 256], true, true, true),
        ([1, 96, 33, 40, 512], true, false, false),
        ([1, 192, 17, 17, 576], false, true, true),
        ([1, 16, 9, 9, 68], true, true, true),
        ([1, 64, 8, 16, 100], false, false, true),
        ([2, 96, 64, 64, 288], false, true, false),
    ];
    let front_ready = matches!(&gpu.kernels.igemm, IgemmSlot::Ready(k) if k.front.is_some());
    let mut cases = Vec::new();
    for &([n, c, h, w, p], gate, norm_bias, biases) in &shapes {
        let dense = |c_in, c_out, k: usize, depthwise| DenseConv {
            c_in,
            c_out,
            kh: k,
            kw: k,
            stride: 1,
            pad: k / 2,
            kp: if depthwise { k * k } else { c_in },
            depthwise,
        };
        let fused = front_ready
            && FrontLaunch::new(
                [n, h, w, c],
                dense(c, p, 1, false),
                dense(p, p, 3, true),
                gate,
            )
            .is_some();
        let name = format!(
            "layer_norm{} + 1x1 + depthwise3x3{} {c}->{p} {h}x{w}x{n}{} [{}]",
            if norm_bias { "" } else { " (bias-free)" },
            if gate { " + gelu_gate" } else { "" },
            if biases { " b" } else { "" },
            if fused { "fused" } else { "separate" },
        );
        let bias = |rng: &mut Rng, len| biases.then(|| rng.tensor(vec![len], 0.3));
        let norm = (
            rng.tensor(vec![c], 1.0),
            norm_bias.then(|| rng.tensor(vec![c], 0.5)),
        );
        let pointwise = (
            rng.tensor(vec![p, c, 1, 1], 1.0 / (c as f32).sqrt()),
            bias(rng, p),
        );
        let depthwise = (rng.tensor(vec![p, 1, 3, 3], 0.4), bias(rng, p));
        cases.push((
            name,
            Op::Front {
                norm,
                pointwise,
                depthwise,
                gate,
            },
            // An offset so that the mean subtraction matters.
            vec![rng.tensor_around(vec![n, c, h, w], 2.0, 0.5)],
        ));
    }
    cases
}

/// LayerNorm in the prologue of a 1x1 product (`norm_pointwise`, front.cu) against the
/// two operations on the CPU: both LayerNorm variants, with and without the product's
/// bias, Restormer-base's widths, pixel counts that leave a partial last tile, and a last
/// slice only partly used (P not a multiple of 64). Names say whether the GPU took the
/// fused kernel.
pub(super) fn norm_product_cases(gpu: &CudaBackend, rng: &mut Rng) -> Vec<Case> {
    use crate::conv_igemm::{DenseConv, IgemmSlot};
    use crate::front::ProductLaunch;
    // [n, c, h, w, p], LayerNorm bias, product bias
    let shapes: [([usize; 5], bool, bool); 5] = [
        ([1, 48, 19, 37, 144], false, false),
        ([2, 96, 13, 21, 512], true, true),
        ([1, 192, 17, 17, 576], true, true),
        ([1, 16, 9, 9, 24], true, false),
        ([2, 96, 64, 64, 288], false, true),
    ];
    let ready = matches!(&gpu.kernels.igemm, IgemmSlot::Ready(k) if k.norm_product.is_some());
    let mut cases = Vec::new();
    for &([n, c, h, w, p], norm_bias, bias) in &shapes {
        let pointwise = DenseConv {
            c_in: c,
            c_out: p,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
            kp: c,
            depthwise: false,
        };
        let fused = ready && ProductLaunch::new([n, h, w, c], pointwise).is_some();
        let name = format!(
            "layer_norm{} + 1x1 {c}->{p} {h}x{w}x{n}{} [{}]",
            if norm_bias { "" } else { " (bias-free)" },
            if bias { " b" } else { "" },
            if fused { "fused" } else { "separate" },
        );
        let norm = (
            rng.tensor(vec![c], 1.0),
            norm_bias.then(|| rng.tensor(vec![c], 0.5)),
        );
        let pointwise = (
            rng.tensor(vec![p, c, 1, 1], 1.0 / (c as f32).sqrt()),
            bias.then(|| rng.tensor(vec![p], 0.3)),
        );
        cases.push((
            name,
            Op::NormProduct { norm, pointwise },
            vec![rng.tensor_around(vec![n, c, h, w], 2.0, 0.5)],
        ));
    }
    cases
}
