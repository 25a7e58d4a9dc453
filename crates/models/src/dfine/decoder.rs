//! D-FINE's decoder: layers of self-attention, multi-scale deformable cross-attention
//! with a learned gate, and an FFN; boxes refined layer by layer with fine-grained
//! distribution refinement (FDR), and the location-quality estimator (LQE) adding to
//! the class scores of the evaluation layer.

use aperture_engine::backend::DeformableSpec;
use aperture_engine::{Activation, Backend, HostTensor};

use super::blocks::{activation, mlp_dims, LayerNorm, Linear, Mlp};
use super::config::DFineConfig;
use super::weights::Loader;
use crate::error::Result;

const P: &str = "model.decoder";

struct DecoderLayer<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    norm1: LayerNorm<B>,
    offsets: Linear<B>,
    weights: Linear<B>,
    gate: Linear<B>,
    gate_norm: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    norm3: LayerNorm<B>,
}

pub struct Decoder<B: Backend> {
    layers: Vec<DecoderLayer<B>>,
    bbox_embed: Vec<Mlp<B>>,
    query_pos: Mlp<B>,
    pre_bbox: Mlp<B>,
    class_head: Linear<B>,
    /// LQE MLP whose last layer is replicated over the classes so that it can add its
    /// quality score to every class logit in one epilogue.
    lqe: Mlp<B>,
    /// Weighting function W(n), from `up` and `reg_scale` as stored in the weights.
    project: Vec<f32>,
    reg_scale: f32,
    heads: usize,
    act: Activation,
    bins: usize,
    top_prob: usize,
}

/// Decoder outputs of the evaluation layer.
pub struct DecoderOutput<T> {
    pub logits: T,
    pub boxes: T,
}

/// transformers' `weighting_function(max_num_bins, up, reg_scale)`, in f32 like PyTorch.
pub fn weighting_function(bins: usize, up: f32, reg_scale: f32) -> Vec<f32> {
    let ub1 = up.abs() * reg_scale.abs();
    let ub2 = up.abs() * reg_scale.abs() * 2.0;
    let step = (ub1 + 1.0).powf(2.0 / (bins as f32 - 2.0));
    let half = bins / 2;
    let mut v = vec![-ub2];
    v.extend((1..half).rev().map(|i| -step.powi(i as i32) + 1.0));
    v.push(0.0);
    v.extend((1..half).map(|i| step.powi(i as i32) - 1.0));
    v.push(ub2);
    v
}

impl<B: Backend> DecoderLayer<B> {
    fn load(b: &B, l: &mut Loader, p: &str, c: &DFineConfig) -> Result<Self> {
        let (d, f, eps) = (c.d_model, c.decoder_ffn_dim, c.layer_norm_eps);
        let tp = c.decoder_attention_heads * c.total_points();
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
            norm1: LayerNorm::load(b, l, &format!("{p}.self_attn_layer_norm"), d, eps)?,
            offsets: Linear::load(
                b,
                l,
                &format!("{p}.encoder_attn.sampling_offsets"),
                d,
                tp * 2,
            )?,
            weights: Linear::load(b, l, &format!("{p}.encoder_attn.attention_weights"), d, tp)?,
            gate: Linear::load(b, l, &format!("{p}.gateway.gate"), 2 * d, 2 * d)?,
            // DFineGate's LayerNorm uses PyTorch's default epsilon.
            gate_norm: LayerNorm::load(b, l, &format!("{p}.gateway.norm"), d, 1e-5)?,
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
            norm3: LayerNorm::load(b, l, &format!("{p}.final_layer_norm"), d, eps)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        pos: &B::Tensor,
        boxes: &B::Tensor,
        memory: &B::Tensor,
        spec: &DeformableSpec,
        heads: usize,
        act: Activation,
    ) -> Result<B::Tensor> {
        let qk = b.add(x, pos)?;
        let q = self.q.forward(b, &qk, Activation::Identity, None)?;
        let k = self.k.forward(b, &qk, Activation::Identity, None)?;
        let v = self.v.forward(b, x, Activation::Identity, None)?;
        let d = b.dims(x)[3] / heads;
        let a = b.attention(&q, &k, &v, heads, (d as f32).powf(-0.5))?;
        let h = self
            .norm1
            .forward(b, &self.o.forward(b, &a, Activation::Identity, Some(x))?)?;
        let hq = b.add(&h, pos)?;
        let offsets = self.offsets.forward(b, &hq, Activation::Identity, None)?;
        let logits = self.weights.forward(b, &hq, Activation::Identity, None)?;
        let cross = b.deformable_attention(memory, &offsets, &logits, boxes, spec)?;
        let gates = self.gate.forward(
            b,
            &b.concat_channels(&h, &cross)?,
            Activation::Identity,
            None,
        )?;
        let h = self
            .gate_norm
            .forward(b, &b.gated_sum(&h, &cross, &gates)?)?;
        let f = self.fc1.forward(b, &h, act, None)?;
        let y = self.fc2.forward(b, &f, Activation::Identity, Some(&h))?;
        self.norm3.forward(b, &b.clamp(&y, -65504.0, 65504.0)?)
    }
}

impl<B: Backend> Decoder<B> {
    pub fn load(b: &B, l: &mut Loader, c: &DFineConfig) -> Result<Self> {
        let (d, e) = (c.d_model, c.eval_idx);
        let relu = Activation::Relu;
        let layers = (0..=e)
            .map(|i| DecoderLayer::load(b, l, &format!("{P}.layers.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let corners = 4 * (c.max_num_bins + 1);
        let bbox_embed = (0..=e)
            .map(|i| {
                let (a, t) = (format!("{P}.bbox_embed.{i}"), format!("bbox_embed.{i}"));
                Mlp::load(b, l, &[&a, &t], &mlp_dims(d, d, corners, 3), relu)
            })
            .collect::<Result<Vec<_>>>()?;
        let query_pos = Mlp::load(
            b,
            l,
            &[&format!("{P}.query_pos_head")],
            &[4, 2 * d, d],
            relu,
        )?;
        let pre_bbox = Mlp::load(
            b,
            l,
            &[&format!("{P}.pre_bbox_head")],
            &mlp_dims(d, d, 4, 3),
            relu,
        )?;
        let class_head = Linear::load_alias(
            b,
            l,
            &[&format!("{P}.class_embed.{e}"), &format!("class_embed.{e}")],
            d,
            c.num_labels,
        )?;
        let stats = 4 * (c.top_prob_values + 1);
        let dims = mlp_dims(stats, c.lqe_hidden_dim, 1, c.lqe_layers);
        let lp = format!("{P}.lqe_layers.{e}.reg_conf");
        let mut lqe_layers = Vec::new();
        for i in 0..dims.len() - 1 {
            let w = l.tensor(&format!("{lp}.layers.{i}.weight"), &[dims[i + 1], dims[i]]);
            let bias = l.tensor(&format!("{lp}.layers.{i}.bias"), &[dims[i + 1]]);
            let (w, bias) = if i + 2 == dims.len() {
                replicate_rows(&w, &bias, c.num_labels)?
            } else {
                (w, bias)
            };
            lqe_layers.push(Linear::from_host(b, &w, &bias)?);
        }
        let up = l.scalar(&format!("{P}.up"));
        let reg_scale = l.scalar(&format!("{P}.reg_scale"));
        Ok(Self {
            layers,
            bbox_embed,
            query_pos,
            pre_bbox,
            class_head,
            lqe: Mlp::from_layers(lqe_layers, relu),
            project: weighting_function(c.max_num_bins, up, reg_scale),
            reg_scale,
            heads: c.decoder_attention_heads,
            act: activation(&c.decoder_activation)?,
            bins: c.max_num_bins + 1,
            top_prob: c.top_prob_values,
        })
    }

    /// `target`: query features `[B, 1, Q, d]`; `ref_unact`: box logits `[B, 1, Q, 4]`;
    /// `memory`: the flattened multi-level features `[B, 1, S, d]`.
    pub fn forward(
        &self,
        b: &B,
        target: &B::Tensor,
        ref_unact: &B::Tensor,
        memory: &B::Tensor,
        spec: &DeformableSpec,
    ) -> Result<DecoderOutput<B::Tensor>> {
        let mut boxes = b.sigmoid(ref_unact)?;
        let mut initial: Option<B::Tensor> = None;
        // Output of the previous layer (its "detached" copy feeds the next box head too).
        let mut prev: Option<B::Tensor> = None;
        let mut corners: Option<B::Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let pos = b.clamp(&self.query_pos.forward(b, &boxes, None)?, -10.0, 10.0)?;
            let h = layer.forward(
                b,
                prev.as_ref().unwrap_or(target),
                &pos,
                &boxes,
                memory,
                spec,
                self.heads,
                self.act,
            )?;
            if i == 0 {
                initial = Some(b.refine_boxes(&self.pre_bbox.forward(b, &h, None)?, &boxes)?);
            }
            let c = match &prev {
                Some(p) => self.bbox_embed[i].forward(b, &b.add(&h, p)?, corners.as_ref())?,
                None => self.bbox_embed[i].forward(b, &h, corners.as_ref())?,
            };
            let reference = initial.as_ref().ok_or_else(no_layers)?;
            boxes = b.distribution_boxes(&c, reference, &self.project, self.reg_scale)?;
            corners = Some(c);
            prev = Some(h);
        }
        let (h, corners) = (prev.ok_or_else(no_layers)?, corners.ok_or_else(no_layers)?);
        let scores = self.class_head.forward(b, &h, Activation::Identity, None)?;
        let stats = b.corner_stats(&corners, self.bins, self.top_prob)?;
        let logits = self.lqe.forward(b, &stats, Some(&scores))?;
        Ok(DecoderOutput { logits, boxes })
    }
}

fn no_layers() -> crate::error::ModelError {
    crate::error::ModelError::Config("the decoder has no layers".into())
}

/// Repeats a `[1, k]` linear layer `n` times so that its single output lands on every
/// one of `n` channels.
fn replicate_rows(w: &HostTensor, bias: &HostTensor, n: usize) -> Result<(HostTensor, HostTensor)> {
    let row = w.to_f32_vec();
    let k = row.len();
    let wd: Vec<f32> = std::iter::repeat_n(row, n).flatten().collect();
    let bd = vec![bias.to_f32_vec().first().copied().unwrap_or(0.0); n];
    Ok((
        HostTensor::from_f32(vec![n, k], wd)?,
        HostTensor::from_f32(vec![n], bd)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighting_function_is_symmetric_and_bounded() {
        let w = weighting_function(32, 0.5, 8.0);
        assert_eq!(w.len(), 33);
        assert_eq!((w[0], w[16], w[32]), (-8.0, 0.0, 8.0));
        for i in 0..33 {
            assert!((w[i] + w[32 - i]).abs() < 1e-5);
        }
        // step^(bins/2 - 1) - 1 = (up * reg_scale + 1)^(1 - 2/bins) - 1
        let expect = 5f32.powf(2.0 / 30.0 * 15.0) - 1.0;
        assert!((w[31] - expect).abs() < 1e-4, "{} {expect}", w[31]);
        assert!(w.windows(2).all(|p| p[0] < p[1]));
    }
}
