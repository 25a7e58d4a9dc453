//! HGNetV2 backbone (transformers' `HGNetV2Backbone`): a stem with a pooled and a
//! convolved branch, then stages of HG blocks whose layer outputs are concatenated and
//! aggregated by two 1x1 convolutions. Batch norm is folded at load time; the
//! learnable affine blocks (LAB) stay a scalar `scale * x + bias` after the activation.

use aperture_engine::{Activation, Backend};

use super::blocks::{activation, ConvShape, ConvUnit};
use super::config::BackboneConfig;
use super::weights::Loader;
use crate::error::Result;

const PREFIX: &str = "model.backbone.model";
/// HGNetV2 builds its batch norms with PyTorch's default epsilon.
const BN_EPS: f32 = 1e-5;

struct HgBlock<B: Backend> {
    /// Light blocks: a 1x1 convolution (no activation) then a depthwise one.
    layers: Vec<Vec<ConvUnit<B>>>,
    squeeze: ConvUnit<B>,
    excite: ConvUnit<B>,
    residual: bool,
}

struct Stage<B: Backend> {
    downsample: Option<ConvUnit<B>>,
    blocks: Vec<HgBlock<B>>,
}

pub struct Backbone<B: Backend> {
    stem1: ConvUnit<B>,
    stem2a: ConvUnit<B>,
    stem2b: ConvUnit<B>,
    stem3: ConvUnit<B>,
    stem4: ConvUnit<B>,
    stages: Vec<Stage<B>>,
    out_indices: Vec<usize>,
}

/// A ConvLayer: convolution + batch norm + activation, with a LAB when configured and
/// the layer has an activation.
fn conv_layer<B: Backend>(
    b: &B,
    l: &mut Loader,
    prefix: &str,
    s: ConvShape,
    act: Option<Activation>,
    lab: bool,
) -> Result<ConvUnit<B>> {
    let mut u = ConvUnit::load(
        b,
        l,
        &format!("{prefix}.convolution.weight"),
        &format!("{prefix}.normalization"),
        s,
        BN_EPS,
        act.unwrap_or(Activation::Identity),
    )?;
    if act.is_some() && lab {
        u.lab = Some((
            l.scalar(&format!("{prefix}.lab.scale")),
            l.scalar(&format!("{prefix}.lab.bias")),
        ));
    }
    Ok(u)
}

impl<B: Backend> Backbone<B> {
    pub fn load(b: &B, l: &mut Loader, c: &BackboneConfig) -> Result<Self> {
        let act = Some(activation(&c.hidden_act)?);
        let lab = c.use_learnable_affine_block;
        let [_, mid, out] = c.stem_channels;
        let st = c.stem_strides;
        let e = format!("{PREFIX}.embedder");
        let stem1 = conv_layer(
            b,
            l,
            &format!("{e}.stem1"),
            ConvShape::new(3, mid, 3, st[0], 1),
            act,
            lab,
        )?;
        let stem2a = conv_layer(
            b,
            l,
            &format!("{e}.stem2a"),
            ConvShape::new(mid, mid / 2, 2, st[1], 1),
            act,
            lab,
        )?;
        let stem2b = conv_layer(
            b,
            l,
            &format!("{e}.stem2b"),
            ConvShape::new(mid / 2, mid, 2, st[2], 1),
            act,
            lab,
        )?;
        let stem3 = conv_layer(
            b,
            l,
            &format!("{e}.stem3"),
            ConvShape::new(mid * 2, mid, 3, st[3], 1),
            act,
            lab,
        )?;
        let stem4 = conv_layer(
            b,
            l,
            &format!("{e}.stem4"),
            ConvShape::new(mid, out, 1, st[4], 1),
            act,
            lab,
        )?;
        let mut stages = Vec::new();
        for s in 0..c.stage_in_channels.len() {
            let p = format!("{PREFIX}.encoder.stages.{s}");
            let (cin, cmid, cout) = (
                c.stage_in_channels[s],
                c.stage_mid_channels[s],
                c.stage_out_channels[s],
            );
            let k = c.stage_kernel_size[s];
            let downsample = if c.stage_downsample[s] {
                let shape = ConvShape::new(cin, cin, 3, c.stage_downsample_strides[s], cin);
                Some(conv_layer(
                    b,
                    l,
                    &format!("{p}.downsample"),
                    shape,
                    None,
                    lab,
                )?)
            } else {
                None
            };
            let mut blocks = Vec::new();
            for i in 0..c.stage_num_blocks[s] {
                let bp = format!("{p}.blocks.{i}");
                let block_in = if i == 0 { cin } else { cout };
                let mut layers = Vec::new();
                for j in 0..c.stage_numb_of_layers[s] {
                    let lp = format!("{bp}.layers.{j}");
                    let lin = if j == 0 { block_in } else { cmid };
                    layers.push(if c.stage_light_block[s] {
                        vec![
                            conv_layer(
                                b,
                                l,
                                &format!("{lp}.conv1"),
                                ConvShape::new(lin, cmid, 1, 1, 1),
                                None,
                                lab,
                            )?,
                            conv_layer(
                                b,
                                l,
                                &format!("{lp}.conv2"),
                                ConvShape::new(cmid, cmid, k, 1, cmid),
                                act,
                                lab,
                            )?,
                        ]
                    } else {
                        vec![conv_layer(
                            b,
                            l,
                            &lp,
                            ConvShape::new(lin, cmid, k, 1, 1),
                            act,
                            lab,
                        )?]
                    });
                }
                let total = block_in + c.stage_numb_of_layers[s] * cmid;
                let squeeze = conv_layer(
                    b,
                    l,
                    &format!("{bp}.aggregation.0"),
                    ConvShape::new(total, cout / 2, 1, 1, 1),
                    act,
                    lab,
                )?;
                let excite = conv_layer(
                    b,
                    l,
                    &format!("{bp}.aggregation.1"),
                    ConvShape::new(cout / 2, cout, 1, 1, 1),
                    act,
                    lab,
                )?;
                blocks.push(HgBlock {
                    layers,
                    squeeze,
                    excite,
                    residual: i > 0,
                });
            }
            stages.push(Stage { downsample, blocks });
        }
        Ok(Self {
            stem1,
            stem2a,
            stem2b,
            stem3,
            stem4,
            stages,
            out_indices: c.out_indices.clone(),
        })
    }

    /// Returns the feature maps named by `out_indices` (1 = first stage).
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<Vec<B::Tensor>> {
        // stem1's output padded by one row and column, in one step where the backend can.
        let padded = match self.stem1.lab {
            None => b.conv2d_pad_after(x, &self.stem1.conv, self.stem1.act, 1, 1)?,
            Some(_) => b.pad_zeros(&self.stem1.forward(b, x)?, 0, 1, 0, 1)?,
        };
        let a = self.stem2a.forward(b, &padded)?;
        let a = self.stem2b.forward(b, &b.pad_zeros(&a, 0, 1, 0, 1)?)?;
        let x = self
            .stem3
            .forward(b, &b.max_pool_concat(&padded, 2, 1, &a)?)?;
        // The last computed map lives either in `cur` or, when it is an output, in `outs`.
        let mut cur = Some(self.stem4.forward(b, &x)?);
        let mut outs: Vec<B::Tensor> = Vec::new();
        for (s, stage) in self.stages.iter().enumerate() {
            let input = match (&cur, outs.last()) {
                (Some(t), _) | (None, Some(t)) => t,
                (None, None) => {
                    return Err(crate::error::ModelError::Config("empty backbone".into()))
                }
            };
            let mut h = match &stage.downsample {
                Some(d) => Some(d.forward(b, input)?),
                None => None,
            };
            for block in &stage.blocks {
                h = Some(block.forward(b, h.as_ref().unwrap_or(input))?);
            }
            let h = match h {
                Some(h) => h,
                None => super::blocks::copy(b, input)?,
            };
            if self.out_indices.contains(&(s + 1)) {
                outs.push(h);
                cur = None;
            } else {
                cur = Some(h);
            }
        }
        Ok(outs)
    }
}

impl<B: Backend> HgBlock<B> {
    /// The layers as chains of plain convolutions, unless one has a learnable affine
    /// block (no plain convolution).
    #[allow(clippy::type_complexity)]
    fn plain_chains(&self) -> Option<Vec<Vec<(&B::Param, Activation)>>> {
        self.layers
            .iter()
            .flatten()
            .all(|u| u.lab.is_none())
            .then(|| {
                self.layers
                    .iter()
                    .map(|layer| layer.iter().map(|u| (&u.conv, u.act)).collect())
                    .collect()
            })
    }

    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let y = match self.plain_chains() {
            Some(chains) if self.squeeze.lab.is_none() => {
                b.conv_chain_aggregate(x, &chains, &self.squeeze.conv, self.squeeze.act)?
            }
            _ => self.squeeze.forward(b, &self.aggregate(b, x)?)?,
        };
        self.excite
            .forward_residual(b, &y, if self.residual { Some(x) } else { None })
    }

    /// `[x | layer outputs]`: one backend call (outputs written in place on a GPU) unless a
    /// layer has a learnable affine block, which is no plain convolution.
    fn aggregate(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        if let Some(chains) = self.plain_chains() {
            return Ok(b.conv_chain_concat(x, &chains)?);
        }
        let mut outs: Vec<B::Tensor> = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut h = layer[0].forward(b, outs.last().unwrap_or(x))?;
            for unit in &layer[1..] {
                h = unit.forward(b, &h)?;
            }
            outs.push(h);
        }
        let mut parts: Vec<&B::Tensor> = vec![x];
        parts.extend(outs.iter());
        Ok(b.concat_channels_n(&parts)?)
    }
}
