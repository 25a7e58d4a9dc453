//! Every D-FINE backend operation on random inputs, run on two backends and compared.

use aperture_engine::backend::DeformableSpec;
use aperture_engine::{Backend, ConvNode, HostTensor, NodeRef, NodeSource, Result};

/// Deterministic pseudo-random values in `[lo, hi)` (SplitMix64).
pub fn random(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn tensor(seed: u64, dims: [usize; 4], lo: f32, hi: f32) -> Result<HostTensor> {
    HostTensor::from_f32(dims.to_vec(), random(seed, dims.iter().product(), lo, hi))
}

/// Runs each operation once on `b`; returns `(name, output)` pairs in a fixed order.
/// Top-k indices come back as a tensor of f32 indices.
pub fn run_ops<B: Backend>(b: &B) -> Result<Vec<(String, HostTensor)>> {
    let mut out = Vec::new();
    let up = |t: &HostTensor| b.upload_nhwc(t);
    let img = up(&tensor(1, [2, 17, 19, 24], -2.0, 2.0)?)?;
    let padded = b.pad_zeros(&img, 0, 1, 2, 1)?;
    out.push(("pad_zeros".into(), b.download_nhwc(&padded)?));
    out.push((
        "max_pool2d k2 s1".into(),
        b.download_nhwc(&b.max_pool2d(&padded, 2, 1)?)?,
    ));
    out.push((
        "max_pool2d k3 s2".into(),
        b.download_nhwc(&b.max_pool2d(&img, 3, 2)?)?,
    ));
    out.push((
        "upsample_nearest x2".into(),
        b.download_nhwc(&b.upsample_nearest(&img, 2)?)?,
    ));
    out.push((
        "affine".into(),
        b.download_nhwc(&b.affine(&img, 1.37, -0.21)?)?,
    ));
    out.push(("sigmoid".into(), b.download_nhwc(&b.sigmoid(&img)?)?));
    out.push((
        "clamp".into(),
        b.download_nhwc(&b.clamp(&img, -0.5, 0.75)?)?,
    ));
    let s1 = b.slice_channels(&img, 3, 10)?;
    out.push(("slice_channels".into(), b.download_nhwc(&s1)?));
    let s2 = b.slice_channels(&img, 0, 7)?;
    out.push((
        "concat_channels_n".into(),
        b.download_nhwc(&b.concat_channels_n(&[&s1, &img, &s2])?)?,
    ));
    let mask = up(&tensor(2, [2, 17, 19, 1], 0.0, 1.0)?)?;
    out.push((
        "mul broadcast".into(),
        b.download_nhwc(&b.mul(&img, &mask)?)?,
    ));
    out.push((
        "mul".into(),
        b.download_nhwc(&b.mul(&img, &padded_like(b, &img)?)?)?,
    ));

    // Sequences (8 heads): the decoder's self-attention (300 x 256, head size 32) and the
    // encoder's (400 x 384, head size 48), then shapes for the tensor-core kernels' edges:
    // fewer rows than one tile, cross attention both ways (Lq != Lk), and head sizes 16
    // and 128 (64- and 32-key tiles); none of the lengths is a multiple of 16.
    let shapes = [
        (300usize, 300usize, 256usize),
        (400, 400, 384),
        (37, 37, 256),
        (37, 300, 256),
        (300, 75, 256),
        (129, 97, 128),
        (70, 131, 1024),
    ];
    for (i, (lq, lk, c)) in shapes.into_iter().enumerate() {
        let s = 100 + 3 * i as u64;
        let q = up(&tensor(s, [2, 1, lq, c], -1.5, 1.5)?)?;
        let k = up(&tensor(s + 1, [2, 1, lk, c], -1.5, 1.5)?)?;
        let v = up(&tensor(s + 2, [2, 1, lk, c], -1.0, 1.0)?)?;
        let y = b.attention(&q, &k, &v, 8, 1.0 / ((c / 8) as f32).sqrt())?;
        let name = if lq == lk {
            format!("attention {lq}x{c}")
        } else {
            format!("attention {lq}x{c} over {lk} keys")
        };
        out.push((name, b.download_nhwc(&y)?));
    }
    let a = up(&tensor(20, [2, 1, 300, 256], -1.0, 1.0)?)?;
    let a2 = up(&tensor(21, [2, 1, 300, 256], -1.0, 1.0)?)?;
    let g = up(&tensor(22, [2, 1, 300, 512], -3.0, 3.0)?)?;
    out.push((
        "gated_sum".into(),
        b.download_nhwc(&b.gated_sum(&a, &a2, &g)?)?,
    ));
    let r = up(&tensor(23, [2, 1, 7, 256], -1.0, 1.0)?)?;
    out.push((
        "concat_rows".into(),
        b.download_nhwc(&b.concat_rows(&[&a, &r, &a2])?)?,
    ));

    // Deformable attention over three levels of a 640x640 input (stride 8, 16, 32):
    // D-FINE-X's 8 heads of 32 channels and 12 points, 4 heads of 64 (two channel groups
    // per lane set), and 2 heads of 128 with 36 points (more points than lanes).
    let shapes = vec![(80, 80), (40, 40), (20, 20)];
    let s_total: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let value = up(&tensor(30, [2, 1, s_total, 256], -1.0, 1.0)?)?;
    let mut boxes = random(33, 2 * 300 * 4, 0.02, 0.98);
    // Some boxes hang over the border so that zero padding is exercised.
    boxes
        .iter_mut()
        .step_by(7)
        .for_each(|v| *v = *v * 1.4 - 0.2);
    let boxes = up(&HostTensor::from_f32(vec![2, 1, 300, 4], boxes)?)?;
    for (heads, points) in [
        (8, vec![3, 6, 3]),
        (4, vec![4, 4, 4]),
        (2, vec![12, 12, 12]),
    ] {
        let p_total: usize = points.iter().sum();
        let offsets = up(&tensor(31, [2, 1, 300, heads * p_total * 2], -3.0, 3.0)?)?;
        let logits = up(&tensor(32, [2, 1, 300, heads * p_total], -2.0, 2.0)?)?;
        for discrete in [false, true] {
            let spec = DeformableSpec {
                heads,
                shapes: shapes.clone(),
                points: points.clone(),
                offset_scale: 0.5,
                discrete,
            };
            let y = b.deformable_attention(&value, &offsets, &logits, &boxes, &spec)?;
            out.push((
                format!(
                    "deformable_attention {heads}x{} {points:?} discrete={discrete}",
                    256 / heads
                ),
                b.download_nhwc(&y)?,
            ));
        }
    }

    // Query selection and boxes.
    let scores = up(&tensor(40, [2, 1, 8400, 80], -6.0, 2.0)?)?;
    let top = b.top_k_rows(&scores, 300)?;
    let flat: Vec<f32> = top.iter().flatten().map(|&i| i as f32).collect();
    out.push((
        "top_k_rows".into(),
        HostTensor::from_f32(vec![2, 1, 300, 1], flat)?,
    ));
    let feats = up(&tensor(41, [2, 1, 8400, 256], -1.0, 1.0)?)?;
    out.push((
        "gather_rows".into(),
        b.download_nhwc(&b.gather_rows(&feats, &top)?)?,
    ));
    let picked = b.select_rows(&scores, 300, &[&feats, &scores])?;
    for (i, t) in picked.iter().enumerate() {
        out.push((format!("select_rows source {i}"), b.download_nhwc(t)?));
    }
    let delta = up(&tensor(42, [2, 1, 300, 4], -2.0, 2.0)?)?;
    let mut bx = random(43, 2 * 300 * 4, -0.1, 1.1);
    bx[0] = 0.0;
    bx[1] = 1.0;
    let bx = up(&HostTensor::from_f32(vec![2, 1, 300, 4], bx)?)?;
    out.push((
        "refine_boxes".into(),
        b.download_nhwc(&b.refine_boxes(&delta, &bx)?)?,
    ));
    let project = aperture_models::dfine::weighting_function(32, 0.5, 4.0);
    let bins = project.len();
    let corners = up(&tensor(44, [2, 1, 300, 4 * bins], -4.0, 4.0)?)?;
    let reference = up(&tensor(45, [2, 1, 300, 4], 0.1, 0.9)?)?;
    out.push((
        "distribution_boxes".into(),
        b.download_nhwc(&b.distribution_boxes(&corners, &reference, &project, 4.0)?)?,
    ));
    out.push((
        "corner_stats".into(),
        b.download_nhwc(&b.corner_stats(&corners, bins, 4)?)?,
    ));
    let back = b.reshape(
        b.upload_nhwc(&tensor(46, [2, 4, 5, 6], 0.0, 1.0)?)?,
        [2, 1, 20, 6],
    )?;
    out.push(("reshape + download".into(), b.download_nhwc(&back)?));

    // HGNetV2 aggregations: [x | y_1 | y_2 | y_3] with y_j a chain of convolutions of
    // y_{j-1}; the GPU writes each y_j into its channels (3x3 chains on the implicit
    // GEMM, 1x1 + depthwise 5x5 light layers), next to the plain conv2d + concat.
    let relu = aperture_engine::Activation::Relu;
    let ident = aperture_engine::Activation::Identity;
    let conv = |seed: u64, co: usize, ci: usize, k: usize, groups: usize| -> Result<B::Param> {
        let fan = (ci / groups * k * k) as f32;
        let w = HostTensor::from_f32(
            vec![co, ci / groups, k, k],
            random(seed, co * ci / groups * k * k, -1.0, 1.0)
                .into_iter()
                .map(|v| v / fan.sqrt())
                .collect(),
        )?;
        let bias = HostTensor::from_f32(vec![co], random(seed + 1, co, -0.5, 0.5))?;
        let spec = aperture_engine::ConvSpec {
            stride: 1,
            padding: k / 2,
            groups,
        };
        b.prepare_conv(&w, Some(&bias), spec)
    };
    let hx = up(&tensor(60, [2, 11, 13, 32], -1.0, 1.0)?)?;
    let dense = [
        conv(61, 16, 32, 3, 1)?,
        conv(63, 16, 16, 3, 1)?,
        conv(65, 16, 16, 3, 1)?,
    ];
    let mut plain = vec![b.conv2d(&hx, &dense[0], relu, None)?];
    for c in &dense[1..] {
        let prev = plain.last().unwrap_or(&hx);
        let y = b.conv2d(prev, c, relu, None)?;
        plain.push(y);
    }
    let mut parts = vec![&hx];
    parts.extend(plain.iter());
    out.push((
        "hg conv3x3 + concat_channels_n".into(),
        b.download_nhwc(&b.concat_channels_n(&parts)?)?,
    ));
    let chains: Vec<Vec<(&B::Param, aperture_engine::Activation)>> =
        dense.iter().map(|c| vec![(c, relu)]).collect();
    out.push((
        "conv_chain_concat hg 3x3".into(),
        b.download_nhwc(&b.conv_chain_concat(&hx, &chains)?)?,
    ));
    let light = [
        (conv(71, 16, 32, 1, 1)?, conv(73, 16, 16, 5, 16)?),
        (conv(75, 16, 16, 1, 1)?, conv(77, 16, 16, 5, 16)?),
        (conv(79, 16, 16, 1, 1)?, conv(81, 16, 16, 5, 16)?),
    ];
    let chains: Vec<Vec<(&B::Param, aperture_engine::Activation)>> = light
        .iter()
        .map(|(pw, dw)| vec![(pw, ident), (dw, relu)])
        .collect();
    out.push((
        "conv_chain_concat hg light 1x1+dw5x5".into(),
        b.download_nhwc(&b.conv_chain_concat(&hx, &chains)?)?,
    ));
    // HGNetV2's stem: the 3-channel 3x3 stride-2 convolution with its output padded by
    // a row and a column (one pass on a GPU), and the max pool of that written into a
    // concatenation with the other branch.
    let stem_w = HostTensor::from_f32(vec![32, 3, 3, 3], random(111, 32 * 27, -0.3, 0.3))?;
    let stem_b = HostTensor::from_f32(vec![32], random(112, 32, -0.5, 0.5))?;
    let stride2 = aperture_engine::ConvSpec {
        stride: 2,
        padding: 1,
        groups: 1,
    };
    let stem = b.prepare_conv(&stem_w, Some(&stem_b), stride2)?;
    let rgb = up(&tensor(113, [2, 23, 30, 3], -1.0, 1.0)?)?;
    let stem_out = b.conv2d_pad_after(&rgb, &stem, relu, 1, 1)?;
    out.push((
        "conv2d_pad_after stem 3x3 s2 3->32".into(),
        b.download_nhwc(&stem_out)?,
    ));
    let branch = up(&tensor(114, [2, 12, 15, 32], -1.0, 1.0)?)?;
    out.push((
        "max_pool_concat k2 s1".into(),
        b.download_nhwc(&b.max_pool_concat(&stem_out, 2, 1, &branch)?)?,
    ));
    // The encoder's first projection over anchors with masked positions (the same in
    // both images): on a GPU, the product on the unmasked input with the bias written
    // into the masked rows.
    let memory = up(&tensor(115, [2, 1, 37, 24], -2.0, 2.0)?)?;
    let keep_row: Vec<f32> = (0..37)
        .map(|i| if i % 5 == 0 || i == 36 { 0.0 } else { 1.0 })
        .collect();
    let keep = HostTensor::from_f32(vec![2, 1, 37, 1], [keep_row.clone(), keep_row].concat())?;
    let proj = conv(117, 16, 24, 1, 1)?;
    out.push((
        "conv2d_masked 1x1 24->16, 8 of 37 rows masked".into(),
        b.download_nhwc(&b.conv2d_masked(&memory, &keep, &proj, ident)?)?,
    ));
    // RepNCSPELAN4 as a node block: y = 1x1 SiLU (concatenated), a CSP branch on y's
    // second half read in place (1x1 SiLU, a 3x3 bottleneck, 1x1 SiLU plus the
    // bottleneck's output), b1 = 3x3 SiLU (concatenated), the same branch on b1, b2 =
    // 3x3 SiLU (concatenated).
    let silu = aperture_engine::Activation::Silu;
    let e = [
        conv(91, 32, 32, 1, 1)?,
        conv(93, 16, 16, 1, 1)?,
        conv(95, 16, 16, 3, 1)?,
        conv(97, 16, 16, 1, 1)?,
        conv(99, 16, 16, 3, 1)?,
        conv(101, 16, 16, 1, 1)?,
        conv(103, 16, 16, 3, 1)?,
        conv(105, 16, 16, 1, 1)?,
        conv(107, 16, 16, 3, 1)?,
    ];
    let node = |i: usize, input: NodeSource, residual: Option<NodeRef>| ConvNode {
        input,
        conv: &e[i],
        act: silu,
        residual,
    };
    let n = NodeRef::Node;
    let half = NodeSource::channels(n(0), 16, 16);
    let nodes = [
        node(0, NodeRef::Input.into(), None),
        node(1, half, None),
        node(2, n(1).into(), None),
        node(3, half, Some(n(2))),
        node(4, n(3).into(), None),
        node(5, n(4).into(), None),
        node(6, n(5).into(), None),
        node(7, n(4).into(), Some(n(6))),
        node(8, n(7).into(), None),
    ];
    out.push((
        "conv_nodes_concat elan".into(),
        b.download_nhwc(&b.conv_nodes_concat(&hx, &nodes, &[n(0), n(4), n(8)])?)?,
    ));
    // Slices and concatenations in whole 8-channel vectors (the 16-byte copy kernel in
    // 16-bit storage; the rows above use odd counts, the element-wise one).
    let s16 = b.slice_channels(&hx, 8, 16)?;
    out.push(("slice_channels 8-aligned".into(), b.download_nhwc(&s16)?));
    out.push((
        "concat_channels_n 8-aligned".into(),
        b.download_nhwc(&b.concat_channels_n(&[&s16, &hx, &s16])?)?,
    ));
    Ok(out)
}

fn padded_like<B: Backend>(b: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let [n, h, w, c] = b.dims(x);
    b.upload_nhwc(&tensor(3, [n, h, w, c], -1.0, 1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_engine::cpu::CpuBackend;

    #[test]
    fn every_operation_runs_on_the_cpu_and_gives_finite_values() {
        let outs = run_ops(&CpuBackend::new()).unwrap();
        assert!(outs.len() >= 25, "{} operations", outs.len());
        for (name, t) in &outs {
            let v = t.to_f32_vec();
            assert!(!v.is_empty() && v.iter().all(|x| x.is_finite()), "{name}");
        }
        // Top-k indices are distinct rows of the 8400.
        let (_, top) = outs.iter().find(|(n, _)| n == "top_k_rows").unwrap();
        let mut idx: Vec<u32> = top.to_f32_vec()[..300].iter().map(|&v| v as u32).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), 300);
        // The masked anchors' projections are the bias (seed 117 + 1), in both images.
        let (_, proj) = outs
            .iter()
            .find(|(n, _)| n.starts_with("conv2d_masked"))
            .unwrap();
        let (v, bias) = (proj.to_f32_vec(), random(118, 16, -0.5, 0.5));
        for image in 0..2 {
            for row in [0, 5, 35, 36] {
                let at = (image * 37 + row) * 16;
                assert_eq!(&v[at..at + 16], &bias[..], "image {image} row {row}");
            }
            let at = (image * 37 + 1) * 16;
            assert_ne!(&v[at..at + 16], &bias[..]);
        }
    }

    #[test]
    fn random_values_stay_in_range_and_differ_by_seed() {
        let a = random(1, 1000, -2.0, 3.0);
        assert!(a.iter().all(|&v| (-2.0..3.0).contains(&v)));
        assert_ne!(a, random(2, 1000, -2.0, 3.0));
    }
}
