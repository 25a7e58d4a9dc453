//! D-FINE's hybrid encoder: 1x1 input projections of the backbone maps, AIFI (one
//! transformer encoder layer with a 2-D sin-cos position embedding) on the coarsest
//! map, then a top-down FPN and a bottom-up PAN built from RepNCSPELAN4 blocks
//! (CSP branches of merged RepVGG blocks) and SCDown downsampling.

use aperture_engine::{Activation, Backend, ConvNode, HostTensor, NodeRef, NodeSource};

use super::blocks::{activation, copy, ConvShape, ConvUnit, LayerNorm, Linear};
use super::config::DFineConfig;
use super::weights::Loader;
use crate::error::{ModelError, Result};

const P: &str = "model.encoder";

/// One transformer encoder layer (post-norm unless `normalize_before`).
struct EncoderLayer<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    norm1: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    norm2: LayerNorm<B>,
    act: Activation,
    heads: usize,
    pre_norm: bool,
}

struct CspRep<B: Backend> {
    conv1: ConvUnit<B>,
    conv2: ConvUnit<B>,
    bottlenecks: Vec<ConvUnit<B>>,
}

/// A node block and the tensors it concatenates.
type NodeBlock<'a, B> = (Vec<ConvNode<'a, <B as Backend>::Param>>, Vec<NodeRef>);

struct Elan<B: Backend> {
    conv1: ConvUnit<B>,
    csp1: CspRep<B>,
    conv2: ConvUnit<B>,
    csp2: CspRep<B>,
    conv3: ConvUnit<B>,
    conv4: ConvUnit<B>,
    half: usize,
}

pub struct HybridEncoder<B: Backend> {
    input_proj: Vec<ConvUnit<B>>,
    aifi: Vec<(usize, Vec<EncoderLayer<B>>)>,
    lateral: Vec<ConvUnit<B>>,
    fpn: Vec<Elan<B>>,
    down: Vec<(ConvUnit<B>, ConvUnit<B>)>,
    pan: Vec<Elan<B>>,
    dim: usize,
    temperature: f64,
    position_embedding: bool,
    /// Coarsest stride: input sizes must be multiples of it.
    max_stride: usize,
}

impl<B: Backend> EncoderLayer<B> {
    fn load(b: &B, l: &mut Loader, p: &str, c: &DFineConfig) -> Result<Self> {
        let (d, f) = (c.encoder_hidden_dim, c.encoder_ffn_dim);
        Ok(Self {
            q: Linear::load(b, l, &format!("{p}.self_attn.q_proj"), d, d)?,
            k: Linear::load(b, l, &format!("{p}.self_attn.k_proj"), d, d)?,
            v: Linear::load(b, l, &format!("{p}.self_attn.v_proj"), d, d)?,
            o: Linear::load_alias(
                b,
                l,
                &[
                    &format!("{p}.self_attn.out_proj"),
                    &format!("{p}.self_attn.o_proj"),
                ],
                d,
                d,
            )?,
            norm1: LayerNorm::load(
                b,
                l,
                &format!("{p}.self_attn_layer_norm"),
                d,
                c.layer_norm_eps,
            )?,
            fc1: Linear::load_alias(
                b,
                l,
                &[&format!("{p}.fc1"), &format!("{p}.mlp.layers.0")],
                d,
                f,
            )?,
            fc2: Linear::load_alias(
                b,
                l,
                &[&format!("{p}.fc2"), &format!("{p}.mlp.layers.1")],
                f,
                d,
            )?,
            norm2: LayerNorm::load(b, l, &format!("{p}.final_layer_norm"), d, c.layer_norm_eps)?,
            act: activation(&c.encoder_activation)?,
            heads: c.encoder_attention_heads,
            pre_norm: c.normalize_before,
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor, pos: Option<&B::Tensor>) -> Result<B::Tensor> {
        let normed;
        let h = if self.pre_norm {
            normed = self.norm1.forward(b, x)?;
            &normed
        } else {
            x
        };
        let qk_in = match pos {
            Some(p) => b.add(h, p)?,
            None => copy(b, h)?,
        };
        let q = self.q.forward(b, &qk_in, Activation::Identity, None)?;
        let k = self.k.forward(b, &qk_in, Activation::Identity, None)?;
        let v = self.v.forward(b, h, Activation::Identity, None)?;
        let d = b.dims(x)[3] / self.heads;
        let a = b.attention(&q, &k, &v, self.heads, (d as f32).powf(-0.5))?;
        let mut x = self.o.forward(b, &a, Activation::Identity, Some(x))?;
        if !self.pre_norm {
            x = self.norm1.forward(b, &x)?;
        } else {
            x = self.norm2.forward(b, &x)?;
        }
        let f = self.fc1.forward(b, &x, self.act, None)?;
        let y = self.fc2.forward(b, &f, Activation::Identity, Some(&x))?;
        if self.pre_norm {
            Ok(y)
        } else {
            self.norm2.forward(b, &y)
        }
    }
}

impl<B: Backend> CspRep<B> {
    fn load(
        b: &B,
        l: &mut Loader,
        p: &str,
        cin: usize,
        cout: usize,
        blocks: usize,
        c: &DFineConfig,
    ) -> Result<Self> {
        let act = activation(&c.activation)?;
        let eps = c.batch_norm_eps;
        let unit = |l: &mut Loader, name: &str, s: ConvShape| {
            ConvUnit::load(
                b,
                l,
                &format!("{p}.{name}.conv.weight"),
                &format!("{p}.{name}.norm"),
                s,
                eps,
                act,
            )
        };
        // expansion is 1.0 in D-FINE, so hidden == out and conv3 is the identity.
        let conv1 = unit(l, "conv1", ConvShape::new(cin, cout, 1, 1, 1))?;
        let conv2 = unit(l, "conv2", ConvShape::new(cin, cout, 1, 1, 1))?;
        let bottlenecks = (0..blocks)
            .map(|i| ConvUnit::load_repvgg(b, l, &format!("{p}.bottlenecks.{i}"), cout, eps, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1,
            conv2,
            bottlenecks,
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let mut h1 = self.conv1.forward(b, x)?;
        for blk in &self.bottlenecks {
            h1 = blk.forward(b, &h1)?;
        }
        self.conv2.forward_residual(b, x, Some(&h1))
    }

    fn units(&self) -> impl Iterator<Item = &ConvUnit<B>> {
        [&self.conv1, &self.conv2]
            .into_iter()
            .chain(self.bottlenecks.iter())
    }

    /// Appends this branch on `input` and `then` (the ELAN convolution after it) to
    /// `nodes`, as [`CspRep::forward`] computes it (no unit with a learnable affine);
    /// returns `then`'s node.
    fn push_nodes<'a>(
        &'a self,
        nodes: &mut Vec<ConvNode<'a, B::Param>>,
        input: NodeSource,
        then: &'a ConvUnit<B>,
    ) -> NodeRef {
        let mut push = |u: &'a ConvUnit<B>, input: NodeSource, residual: Option<NodeRef>| {
            nodes.push(ConvNode {
                input,
                conv: &u.conv,
                act: u.act,
                residual,
            });
            NodeRef::Node(nodes.len() - 1)
        };
        let mut h = push(&self.conv1, input, None);
        for blk in &self.bottlenecks {
            h = push(blk, h.into(), None);
        }
        let c2 = push(&self.conv2, input, Some(h));
        push(then, c2.into(), None)
    }
}

impl<B: Backend> Elan<B> {
    fn load(b: &B, l: &mut Loader, p: &str, c: &DFineConfig) -> Result<Self> {
        let (hd, c4, n) = (c.encoder_hidden_dim, c.elan_width(), c.csp_blocks());
        let eps = c.batch_norm_eps;
        // RepNCSPELAN4 is built with act="silu" whatever the config says.
        let unit = |l: &mut Loader, name: &str, s: ConvShape| {
            ConvUnit::load(
                b,
                l,
                &format!("{p}.{name}.conv.weight"),
                &format!("{p}.{name}.norm"),
                s,
                eps,
                Activation::Silu,
            )
        };
        Ok(Self {
            conv1: unit(l, "conv1", ConvShape::new(2 * hd, 2 * hd, 1, 1, 1))?,
            csp1: CspRep::load(b, l, &format!("{p}.csp_rep1"), hd, c4, n, c)?,
            conv2: unit(l, "conv2", ConvShape::new(c4, c4, 3, 1, 1))?,
            csp2: CspRep::load(b, l, &format!("{p}.csp_rep2"), c4, c4, n, c)?,
            conv3: unit(l, "conv3", ConvShape::new(c4, c4, 3, 1, 1))?,
            conv4: unit(l, "conv4", ConvShape::new(2 * hd + 2 * c4, hd, 1, 1, 1))?,
            half: hd,
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let cat = match self.nodes() {
            Some((nodes, concat)) => b.conv_nodes_concat(x, &nodes, &concat)?,
            None => self.aggregate_plain(b, x)?,
        };
        self.conv4.forward(b, &cat)
    }

    /// `[y | b1 | b2]` as one node block (a GPU backend writes y, b1 and b2 straight into
    /// the concatenation and reads y's second half in place), or `None` when a unit has a
    /// learnable affine block, which is no convolution epilogue.
    fn nodes(&self) -> Option<NodeBlock<'_, B>> {
        let mut units = [&self.conv1, &self.conv2, &self.conv3]
            .into_iter()
            .chain(self.csp1.units())
            .chain(self.csp2.units());
        if units.any(|u| u.lab.is_some()) {
            return None;
        }
        let mut nodes = vec![ConvNode {
            input: NodeRef::Input.into(),
            conv: &self.conv1.conv,
            act: self.conv1.act,
            residual: None,
        }];
        let y = NodeRef::Node(0);
        let b1 = self.csp1.push_nodes(
            &mut nodes,
            NodeSource::channels(y, self.half, self.half),
            &self.conv2,
        );
        let b2 = self.csp2.push_nodes(&mut nodes, b1.into(), &self.conv3);
        Some((nodes, vec![y, b1, b2]))
    }

    /// `[y | b1 | b2]` with each tensor computed on its own and copied together.
    fn aggregate_plain(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let y = self.conv1.forward(b, x)?;
        let second = b.slice_channels(&y, self.half, self.half)?;
        let b1 = self.conv2.forward(b, &self.csp1.forward(b, &second)?)?;
        let b2 = self.conv3.forward(b, &self.csp2.forward(b, &b1)?)?;
        // [first half | second half] is y itself.
        Ok(b.concat_channels_n(&[&y, &b1, &b2])?)
    }
}

impl<B: Backend> HybridEncoder<B> {
    pub fn load(b: &B, l: &mut Loader, c: &DFineConfig) -> Result<Self> {
        let hd = c.encoder_hidden_dim;
        let eps = c.batch_norm_eps;
        let input_proj = c
            .encoder_in_channels
            .iter()
            .enumerate()
            .map(|(i, &cin)| {
                // nn.BatchNorm2d(encoder_hidden_dim) uses PyTorch's default epsilon.
                let s = ConvShape::new(cin, hd, 1, 1, 1);
                ConvUnit::load(
                    b,
                    l,
                    &format!("model.encoder_input_proj.{i}.0.weight"),
                    &format!("model.encoder_input_proj.{i}.1"),
                    s,
                    1e-5,
                    Activation::Identity,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut aifi = Vec::new();
        if c.encoder_layers > 0 {
            for (i, &level) in c.encode_proj_layers.iter().enumerate() {
                let layers = (0..c.encoder_layers)
                    .map(|j| {
                        let legacy = format!("{P}.encoder.{i}.layers.{j}");
                        let p = if l.has(&format!("{legacy}.self_attn.q_proj.weight")) {
                            legacy
                        } else {
                            format!("{P}.aifi.{i}.layers.{j}")
                        };
                        EncoderLayer::load(b, l, &p, c)
                    })
                    .collect::<Result<Vec<_>>>()?;
                aifi.push((level, layers));
            }
        }
        let stages = c.encoder_in_channels.len() - 1;
        let plain = |l: &mut Loader, p: String, s: ConvShape| {
            ConvUnit::load(
                b,
                l,
                &format!("{p}.conv.weight"),
                &format!("{p}.norm"),
                s,
                eps,
                Activation::Identity,
            )
        };
        let mut lateral = Vec::new();
        let mut fpn = Vec::new();
        let mut down = Vec::new();
        let mut pan = Vec::new();
        for i in 0..stages {
            lateral.push(plain(
                l,
                format!("{P}.lateral_convs.{i}"),
                ConvShape::new(hd, hd, 1, 1, 1),
            )?);
            fpn.push(Elan::load(b, l, &format!("{P}.fpn_blocks.{i}"), c)?);
        }
        for i in 0..stages {
            down.push((
                plain(
                    l,
                    format!("{P}.downsample_convs.{i}.conv1"),
                    ConvShape::new(hd, hd, 1, 1, 1),
                )?,
                plain(
                    l,
                    format!("{P}.downsample_convs.{i}.conv2"),
                    ConvShape::new(hd, hd, 3, 2, hd),
                )?,
            ));
            pan.push(Elan::load(b, l, &format!("{P}.pan_blocks.{i}"), c)?);
        }
        Ok(Self {
            input_proj,
            aifi,
            lateral,
            fpn,
            down,
            pan,
            dim: hd,
            temperature: c.positional_encoding_temperature,
            position_embedding: !c.eval_size_set,
            max_stride: c.feat_strides.iter().copied().max().unwrap_or(32),
        })
    }

    /// Backbone maps in, one `encoder_hidden_dim` map per level out (PAN outputs).
    pub fn forward(&self, b: &B, feats: &[B::Tensor]) -> Result<Vec<B::Tensor>> {
        if feats.len() != self.input_proj.len() {
            return Err(ModelError::Input(format!(
                "expected {} feature maps, got {}",
                self.input_proj.len(),
                feats.len()
            )));
        }
        let mut maps = feats
            .iter()
            .zip(&self.input_proj)
            .map(|(f, p)| p.forward(b, f))
            .collect::<Result<Vec<_>>>()?;
        for (level, layers) in &self.aifi {
            let [n, h, w, c] = b.dims(&maps[*level]);
            let mut x = b.reshape(maps.remove(*level), [n, 1, h * w, c])?;
            let pos = if self.position_embedding {
                Some(b.upload_nhwc(&position_embedding(n, h, w, self.dim, self.temperature)?)?)
            } else {
                None
            };
            for layer in layers {
                x = layer.forward(b, &x, pos.as_ref())?;
            }
            maps.insert(*level, b.reshape(x, [n, h, w, c])?);
        }
        let stages = self.lateral.len();
        // Top-down: fpn[0] is the coarsest map; each step upsamples and fuses one level finer.
        let mut fpn: Vec<B::Tensor> = vec![copy(b, &maps[stages])?];
        for idx in 0..stages {
            let top = self.lateral[idx].forward(b, &fpn[idx])?;
            let up = b.upsample_nearest(&top, 2)?;
            fpn[idx] = top;
            let fine = &maps[stages - idx - 1];
            if b.dims(&up)[1..3] != b.dims(fine)[1..3] {
                return Err(ModelError::Input(format!(
                    "feature maps {:?} and {:?} do not line up: the input height and width must be multiples of {}",
                    b.dims(&up),
                    b.dims(fine),
                    self.max_stride
                )));
            }
            fpn.push(self.fpn[idx].forward(b, &b.concat_channels(&up, fine)?)?);
        }
        fpn.reverse();
        let mut pan: Vec<B::Tensor> = Vec::with_capacity(stages + 1);
        let mut rest = fpn.into_iter();
        pan.push(
            rest.next()
                .ok_or_else(|| ModelError::Input("no feature maps".into()))?,
        );
        for (idx, fpn_map) in rest.enumerate() {
            let (c1, c2) = &self.down[idx];
            let d = c2.forward(b, &c1.forward(b, &pan[idx])?)?;
            pan.push(self.pan[idx].forward(b, &b.concat_channels(&d, &fpn_map)?)?);
        }
        Ok(pan)
    }
}

/// transformers' `build_2d_sinusoidal_position_embedding`: row-major (h outer) positions,
/// channels `[sin(h w_k) | cos(h w_k) | sin(w w_k) | cos(w w_k)]` with
/// `w_k = temperature^(-k / (dim / 4))`, computed in f64. Returned as `[n, 1, h*w, dim]`.
pub fn position_embedding(
    n: usize,
    h: usize,
    w: usize,
    dim: usize,
    temperature: f64,
) -> Result<HostTensor> {
    let q = dim / 4;
    let omega: Vec<f64> = (0..q)
        .map(|k| 1.0 / temperature.powf(k as f64 / q as f64))
        .collect();
    let mut one = Vec::with_capacity(h * w * dim);
    for y in 0..h {
        for x in 0..w {
            for (pos, f) in [
                (y as f64, f64::sin as fn(f64) -> f64),
                (y as f64, f64::cos),
                (x as f64, f64::sin),
                (x as f64, f64::cos),
            ] {
                one.extend(omega.iter().map(|o| f(pos * o) as f32));
            }
        }
    }
    let data: Vec<f32> = std::iter::repeat_n(one, n).flatten().collect();
    Ok(HostTensor::from_f32(vec![n, 1, h * w, dim], data)?)
}

#[cfg(test)]
mod tests {
    use aperture_engine::cpu::CpuBackend;
    use aperture_engine::ConvSpec;

    use super::*;

    fn unit(b: &CpuBackend, seed: u64, ci: usize, co: usize, k: usize) -> ConvUnit<CpuBackend> {
        let n = co * ci * k * k;
        let vals = |s: u64, n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|i| scale * (((s * 7919 + i as u64 * 104_729) % 2001) as f32 / 1000.0 - 1.0))
                .collect()
        };
        let w = HostTensor::from_f32(
            vec![co, ci, k, k],
            vals(seed, n, 1.0 / ((ci * k * k) as f32).sqrt()),
        )
        .unwrap();
        let bias = HostTensor::from_f32(vec![co], vals(seed + 1, co, 0.5)).unwrap();
        ConvUnit {
            conv: b.prepare_conv(&w, Some(&bias), ConvSpec::same(k)).unwrap(),
            act: Activation::Silu,
            lab: None,
        }
    }

    fn csp(b: &CpuBackend, seed: u64, cin: usize, c4: usize) -> CspRep<CpuBackend> {
        CspRep {
            conv1: unit(b, seed, cin, c4, 1),
            conv2: unit(b, seed + 2, cin, c4, 1),
            bottlenecks: vec![unit(b, seed + 4, c4, c4, 3), unit(b, seed + 6, c4, c4, 3)],
        }
    }

    fn elan(b: &CpuBackend, hd: usize, c4: usize) -> Elan<CpuBackend> {
        Elan {
            conv1: unit(b, 1, 2 * hd, 2 * hd, 1),
            csp1: csp(b, 10, hd, c4),
            conv2: unit(b, 20, c4, c4, 3),
            csp2: csp(b, 30, c4, c4),
            conv3: unit(b, 40, c4, c4, 3),
            conv4: unit(b, 50, 2 * hd + 2 * c4, hd, 1),
            half: hd,
        }
    }

    #[test]
    fn the_elan_node_block_computes_the_plain_aggregation_exactly() {
        let b = CpuBackend::new();
        let (hd, c4) = (6, 4);
        let x = b
            .upload_nchw(
                &HostTensor::from_f32(
                    vec![2, 2 * hd, 5, 4],
                    (0..2 * 2 * hd * 20)
                        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                        .collect(),
                )
                .unwrap(),
            )
            .unwrap();
        let mut m = elan(&b, hd, c4);
        let (nodes, concat) = m.nodes().unwrap();
        assert_eq!(nodes.len(), 1 + 2 * (2 + 2 + 1));
        assert_eq!(
            concat,
            vec![NodeRef::Node(0), NodeRef::Node(5), NodeRef::Node(10)]
        );
        let got = m.forward(&b, &x).unwrap();
        let want = m
            .conv4
            .forward(&b, &m.aggregate_plain(&b, &x).unwrap())
            .unwrap();
        assert_eq!(b.dims(&got), [2, 5, 4, hd]);
        assert_eq!(
            b.download_nchw(&got).unwrap().to_f32_vec(),
            b.download_nchw(&want).unwrap().to_f32_vec()
        );
        // A learnable affine anywhere keeps the plain path.
        m.csp2.bottlenecks[1].lab = Some((1.5, -0.25));
        assert!(m.nodes().is_none());
        let with_lab = m.forward(&b, &x).unwrap();
        let want = m
            .conv4
            .forward(&b, &m.aggregate_plain(&b, &x).unwrap())
            .unwrap();
        assert_eq!(
            b.download_nchw(&with_lab).unwrap().to_f32_vec(),
            b.download_nchw(&want).unwrap().to_f32_vec()
        );
    }
}
