//! The Restormer forward graph on any [`Backend`].

use aperture_engine::{Activation, Backend, ConvSpec, FrontHalf, HostTensor};
use aperture_weights::StateDict;

use super::config::{LayerNormType, RestormerConfig};
use super::params::{check_weights, levels};
use super::widen::{pad_gate_halves, pad_input_channels};
use crate::error::{ModelError, Result};

const LN_EPS: f32 = 1e-5;

struct Norm<P> {
    weight: P,
    bias: Option<P>,
}

/// One transformer block: MDTA attention then the gated-dconv feed-forward network.
struct Block<P> {
    heads: usize,
    norm1: Norm<P>,
    temperature: P,
    qkv: P,
    qkv_dwconv: P,
    attn_project_out: P,
    norm2: Norm<P>,
    project_in: P,
    ffn_dwconv: P,
    ffn_project_out: P,
}

/// A Restormer with its weights prepared on a backend.
pub struct Restormer<B: Backend> {
    config: RestormerConfig,
    patch_embed: B::Param,
    /// Encoder 1..3, latent, decoder 3..1, refinement.
    levels: Vec<Vec<Block<B::Param>>>,
    down1_2: B::Param,
    down2_3: B::Param,
    down3_4: B::Param,
    up4_3: B::Param,
    reduce_chan_level3: B::Param,
    up3_2: B::Param,
    reduce_chan_level2: B::Param,
    up2_1: B::Param,
    output: B::Param,
}

/// Looks up tensors by name and hands them to the backend in the right form.
struct Loader<'a, B: Backend> {
    backend: &'a B,
    sd: &'a StateDict,
    bias: bool,
    /// Feed-forward hidden widths are padded with zero channels to a multiple of this.
    width_multiple: usize,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor(&self, name: &str) -> Result<&HostTensor> {
        self.sd
            .get(name)
            .ok_or_else(|| ModelError::Config(format!("weight '{name}' is missing")))
    }

    fn conv(&self, name: &str, spec: ConvSpec, has_bias: bool) -> Result<B::Param> {
        self.conv_reshaped(name, spec, has_bias, |t| Ok(t.clone()), |t| Ok(t.clone()))
    }

    /// Like [`Loader::conv`], with the weight and bias passed through transforms first.
    fn conv_reshaped(
        &self,
        name: &str,
        spec: ConvSpec,
        has_bias: bool,
        weight: impl Fn(&HostTensor) -> Result<HostTensor>,
        bias: impl Fn(&HostTensor) -> Result<HostTensor>,
    ) -> Result<B::Param> {
        let w = weight(self.tensor(&format!("{name}.weight"))?)?;
        let b = if has_bias {
            Some(bias(self.tensor(&format!("{name}.bias"))?)?)
        } else {
            None
        };
        Ok(self.backend.prepare_conv(&w, b.as_ref(), spec)?)
    }

    fn vector(&self, name: &str) -> Result<B::Param> {
        Ok(self.backend.prepare_vector(self.tensor(name)?)?)
    }

    fn norm(&self, prefix: &str, with_bias: bool) -> Result<Norm<B::Param>> {
        Ok(Norm {
            weight: self.vector(&format!("{prefix}.body.weight"))?,
            bias: if with_bias {
                Some(self.vector(&format!("{prefix}.body.bias"))?)
            } else {
                None
            },
        })
    }

    fn block(
        &self,
        p: &str,
        dim: usize,
        hidden: usize,
        heads: usize,
        ln_bias: bool,
    ) -> Result<Block<B::Param>> {
        let b = self.bias;
        let padded = hidden.div_ceil(self.width_multiple) * self.width_multiple;
        let halves = |t: &HostTensor| pad_gate_halves(t, hidden, padded);
        let ffn_in = |name: &str, spec| self.conv_reshaped(name, spec, b, halves, halves);
        Ok(Block {
            heads,
            norm1: self.norm(&format!("{p}.norm1"), ln_bias)?,
            temperature: self.vector(&format!("{p}.attn.temperature"))?,
            qkv: self.conv(&format!("{p}.attn.qkv"), ConvSpec::same(1), b)?,
            qkv_dwconv: self.conv(
                &format!("{p}.attn.qkv_dwconv"),
                ConvSpec::depthwise(3 * dim, 3),
                b,
            )?,
            attn_project_out: self.conv(&format!("{p}.attn.project_out"), ConvSpec::same(1), b)?,
            norm2: self.norm(&format!("{p}.norm2"), ln_bias)?,
            project_in: ffn_in(&format!("{p}.ffn.project_in"), ConvSpec::same(1))?,
            ffn_dwconv: ffn_in(
                &format!("{p}.ffn.dwconv"),
                ConvSpec::depthwise(2 * padded, 3),
            )?,
            ffn_project_out: self.conv_reshaped(
                &format!("{p}.ffn.project_out"),
                ConvSpec::same(1),
                b,
                |t| pad_input_channels(t, hidden, padded),
                |t| Ok(t.clone()),
            )?,
        })
    }
}

impl<B: Backend> Restormer<B> {
    /// Checks the weights against the configuration, then prepares them on `backend`.
    pub fn prepare(backend: &B, config: RestormerConfig, sd: &StateDict) -> Result<Self> {
        Self::prepare_with_width_multiple(backend, config, sd, backend.preferred_channel_multiple())
    }

    /// [`Restormer::prepare`] with the feed-forward hidden width padded (with exact zero
    /// channels) to a multiple of `width_multiple` instead of the backend's preference.
    pub fn prepare_with_width_multiple(
        backend: &B,
        config: RestormerConfig,
        sd: &StateDict,
        width_multiple: usize,
    ) -> Result<Self> {
        config.validate()?;
        check_weights(&config, sd)?;
        let ld = Loader {
            backend,
            sd,
            bias: config.bias,
            width_multiple: width_multiple.max(1),
        };
        let ln_bias = config.layer_norm_type == LayerNormType::WithBias;
        let mut all_levels = Vec::new();
        for l in levels(&config) {
            let hidden = config.ffn_hidden(l.dim);
            let blocks = (0..l.blocks)
                .map(|i| {
                    ld.block(
                        &format!("{}.{i}", l.prefix),
                        l.dim,
                        hidden,
                        l.heads,
                        ln_bias,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            all_levels.push(blocks);
        }
        let b = config.bias;
        let same3 = ConvSpec::same(3);
        let one = ConvSpec::same(1);
        Ok(Self {
            patch_embed: ld.conv("patch_embed.proj", same3, b)?,
            levels: all_levels,
            down1_2: ld.conv("down1_2.body.0", same3, false)?,
            down2_3: ld.conv("down2_3.body.0", same3, false)?,
            down3_4: ld.conv("down3_4.body.0", same3, false)?,
            up4_3: ld.conv("up4_3.body.0", same3, false)?,
            reduce_chan_level3: ld.conv("reduce_chan_level3", one, b)?,
            up3_2: ld.conv("up3_2.body.0", same3, false)?,
            reduce_chan_level2: ld.conv("reduce_chan_level2", one, b)?,
            up2_1: ld.conv("up2_1.body.0", same3, false)?,
            output: ld.conv("output", same3, b)?,
            config,
        })
    }

    pub fn config(&self) -> &RestormerConfig {
        &self.config
    }

    /// Runs the network on an NHWC image batch whose height and width are multiples of 8.
    pub fn forward(&self, b: &B, img: &B::Tensor) -> Result<B::Tensor> {
        let [_, h, w, c] = b.dims(img);
        if !h.is_multiple_of(8) || !w.is_multiple_of(8) || h == 0 || w == 0 {
            return Err(ModelError::Input(format!(
                "Restormer needs height and width that are multiples of 8, got {h}x{w} (pad the image first)"
            )));
        }
        if c != self.config.inp_channels {
            return Err(ModelError::Input(format!(
                "Restormer expects {} input channels, got {c}",
                self.config.inp_channels
            )));
        }
        // Each intermediate is dropped as soon as its last reader is enqueued, so the
        // activation memory (and a captured graph's planned block) holds only what is
        // still needed: the three skip connections, the image and the current level.
        let level = |i: usize, x: B::Tensor| self.run_level(b, &self.levels[i], x);
        let none = Activation::Identity;
        let conv = |x: &B::Tensor, p: &B::Param| b.conv2d(x, p, none, None);
        let e1 = level(0, conv(img, &self.patch_embed)?)?;
        let e2 = level(1, b.pixel_unshuffle(&conv(&e1, &self.down1_2)?, 2)?)?;
        let e3 = level(2, b.pixel_unshuffle(&conv(&e2, &self.down2_3)?, 2)?)?;
        let lat = level(3, b.pixel_unshuffle(&conv(&e3, &self.down3_4)?, 2)?)?;
        let up3 = b.pixel_shuffle(&conv(&lat, &self.up4_3)?, 2)?;
        drop(lat);
        let cat3 = b.concat_channels(&up3, &e3)?;
        drop((up3, e3));
        let d3 = level(4, conv(&cat3, &self.reduce_chan_level3)?)?;
        drop(cat3);
        let up2 = b.pixel_shuffle(&conv(&d3, &self.up3_2)?, 2)?;
        drop(d3);
        let cat2 = b.concat_channels(&up2, &e2)?;
        drop((up2, e2));
        let d2 = level(5, conv(&cat2, &self.reduce_chan_level2)?)?;
        drop(cat2);
        let up1 = b.pixel_shuffle(&conv(&d2, &self.up2_1)?, 2)?;
        drop(d2);
        let cat1 = b.concat_channels(&up1, &e1)?;
        drop((up1, e1));
        let refined = level(7, level(6, cat1)?)?;
        // Global residual: the network predicts a correction to the input image.
        Ok(b.conv2d(&refined, &self.output, none, Some(img))?)
    }

    fn run_level(&self, b: &B, blocks: &[Block<B::Param>], mut x: B::Tensor) -> Result<B::Tensor> {
        for blk in blocks {
            x = self.run_block(b, blk, x)?;
        }
        Ok(x)
    }

    /// One transformer block; `x` is consumed so that it can be freed once the attention
    /// residual has read it.
    fn run_block(&self, b: &B, blk: &Block<B::Param>, x: B::Tensor) -> Result<B::Tensor> {
        let none = Activation::Identity;
        let attention_front = FrontHalf {
            norm_weight: &blk.norm1.weight,
            norm_bias: blk.norm1.bias.as_ref(),
            eps: LN_EPS,
            pointwise: &blk.qkv,
            depthwise: &blk.qkv_dwconv,
            gate: false,
        };
        let qkv_dw = b.norm_pointwise_depthwise(&x, &attention_front)?;
        let y = b.channel_attention(
            &qkv_dw,
            blk.heads,
            &blk.temperature,
            &blk.attn_project_out,
            Some(&x),
        )?;
        drop((qkv_dw, x));
        let ffn_front = FrontHalf {
            norm_weight: &blk.norm2.weight,
            norm_bias: blk.norm2.bias.as_ref(),
            eps: LN_EPS,
            pointwise: &blk.project_in,
            depthwise: &blk.ffn_dwconv,
            gate: true,
        };
        let gated = b.norm_pointwise_depthwise(&y, &ffn_front)?;
        Ok(b.conv2d(&gated, &blk.ffn_project_out, none, Some(&y))?)
    }
}
