//! The whole D-FINE detector (`DFineForObjectDetection`): backbone, hybrid encoder,
//! query selection and decoder, prepared once on a backend.

use aperture_engine::backend::DeformableSpec;
use aperture_engine::{Activation, Backend, HostTensor};
use aperture_weights::StateDict;

use super::backbone::Backbone;
use super::blocks::{mlp_dims, ConvShape, ConvUnit, LayerNorm, Linear, Mlp};
use super::config::DFineConfig;
use super::decoder::{Decoder, DecoderOutput};
use super::encoder::HybridEncoder;
use super::weights::Loader;
use crate::error::{ModelError, Result};

pub struct DFine<B: Backend> {
    config: DFineConfig,
    backbone: Backbone<B>,
    encoder: HybridEncoder<B>,
    /// `None` per level when `d_model` equals the encoder width (identity projection).
    decoder_proj: Vec<Option<ConvUnit<B>>>,
    enc_output: Linear<B>,
    enc_norm: LayerNorm<B>,
    enc_score: Linear<B>,
    enc_bbox: Mlp<B>,
    /// `learn_initial_query`: a fixed `[Q, d]` query embedding.
    query_embedding: Option<HostTensor>,
    decoder: Decoder<B>,
    /// Queries kept by query selection (`num_queries` unless reduced at run time).
    queries: usize,
}

impl<B: Backend> DFine<B> {
    /// Checks `sd` against `config` (one error listing every mismatch) and prepares all
    /// weights on `b`: batch norms folded, RepVGG branches merged.
    pub fn prepare(b: &B, config: DFineConfig, sd: &StateDict) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let mut l = Loader::new(sd);
        for p in [
            "model.denoising_class_embed.",
            "model.decoder.class_embed.",
            "class_embed.",
            "model.decoder.lqe_layers.",
        ] {
            l.ignore_prefix(p);
        }
        for j in c.eval_idx + 1..2 * c.decoder_layers {
            for p in [
                "model.decoder.layers",
                "model.decoder.bbox_embed",
                "bbox_embed",
            ] {
                l.ignore_prefix(format!("{p}.{j}."));
            }
        }
        for j in 0..2 * c.decoder_layers {
            l.ignore_prefix(format!(
                "model.decoder.layers.{j}.encoder_attn.num_points_scale"
            ));
        }
        let backbone = Backbone::load(b, &mut l, &c.backbone)?;
        let encoder = HybridEncoder::load(b, &mut l, c)?;
        let d = c.d_model;
        let last_in = c.decoder_in_channels.last().copied().unwrap_or(d);
        let levels = c.decoder_in_channels.len();
        let mut decoder_proj = Vec::new();
        for i in 0..c.num_feature_levels {
            decoder_proj.push(if d == last_in {
                None
            } else {
                let s = if i < levels {
                    ConvShape::new(last_in, d, 1, 1, 1)
                } else {
                    ConvShape::new(last_in, d, 3, 2, 1)
                };
                let p = format!("model.decoder_input_proj.{i}");
                Some(ConvUnit::load(
                    b,
                    &mut l,
                    &format!("{p}.0.weight"),
                    &format!("{p}.1"),
                    s,
                    c.batch_norm_eps,
                    Activation::Identity,
                )?)
            });
        }
        let enc_output = Linear::load(b, &mut l, "model.enc_output.0", d, d)?;
        let enc_norm = LayerNorm::load(b, &mut l, "model.enc_output.1", d, c.layer_norm_eps)?;
        let enc_score = Linear::load(b, &mut l, "model.enc_score_head", d, c.num_labels)?;
        let enc_bbox = Mlp::load(
            b,
            &mut l,
            &["model.enc_bbox_head"],
            &mlp_dims(d, d, 4, 3),
            Activation::Relu,
        )?;
        let query_embedding = if c.learn_initial_query {
            Some(l.tensor("model.weight_embedding.weight", &[c.num_queries, d]))
        } else {
            None
        };
        let decoder = Decoder::load(b, &mut l, c)?;
        l.finish("D-FINE")?;
        let queries = config.num_queries;
        Ok(Self {
            queries,
            config,
            backbone,
            encoder,
            decoder_proj,
            enc_output,
            enc_norm,
            enc_score,
            enc_bbox,
            query_embedding,
            decoder,
        })
    }

    pub fn config(&self) -> &DFineConfig {
        &self.config
    }

    /// Queries the decoder refines (and the outputs have).
    pub fn num_queries(&self) -> usize {
        self.queries
    }

    /// Keeps only the `queries` best-scoring queries of query selection (the model's
    /// `num_queries` at most): less decoder work, fewer candidate detections.
    pub fn set_num_queries(&mut self, queries: usize) -> Result<()> {
        if queries == 0 || queries > self.config.num_queries {
            return Err(ModelError::Config(format!(
                "queries must be between 1 and the model's num_queries ({}), got {queries}",
                self.config.num_queries
            )));
        }
        self.queries = queries;
        Ok(())
    }

    /// `pixels`: NHWC images. Returns `logits [B, 1, Q, classes]` and cxcywh
    /// `boxes [B, 1, Q, 4]` (normalised to the input size).
    pub fn forward(&self, b: &B, pixels: &B::Tensor) -> Result<DecoderOutput<B::Tensor>> {
        let c = &self.config;
        let [n, h, w, ch] = b.dims(pixels);
        if ch != 3 {
            return Err(ModelError::Input(format!(
                "D-FINE expects 3-channel images, got {ch} channels"
            )));
        }
        let min = 1usize << (c.encoder_in_channels.len() + 2);
        if h < min || w < min {
            return Err(ModelError::Input(format!(
                "a {w}x{h} input is too small for D-FINE (at least {min}x{min})"
            )));
        }
        let feats = self.backbone.forward(b, pixels)?;
        let pan = self.encoder.forward(b, &feats)?;
        drop(feats);
        // Decoder input projections and the extra (strided) levels, then flatten.
        let mut levels: Vec<B::Tensor> = Vec::new();
        let last = pan.len() - 1;
        for (i, proj) in self.decoder_proj.iter().enumerate() {
            let src = &pan[i.min(last)];
            levels.push(match proj {
                Some(p) => p.forward(b, src)?,
                None => super::blocks::copy(b, src)?,
            });
        }
        let shapes: Vec<(usize, usize)> = levels
            .iter()
            .map(|t| (b.dims(t)[1], b.dims(t)[2]))
            .collect();
        let flat: Vec<B::Tensor> = levels
            .into_iter()
            .map(|t| {
                let [n, h, w, c] = b.dims(&t);
                b.reshape(t, [n, 1, h * w, c])
            })
            .collect::<std::result::Result<_, _>>()?;
        let memory = b.concat_rows(&flat.iter().collect::<Vec<_>>())?;
        drop(flat);
        // Query selection over anchors that lie inside the image.
        let (anchors, valid) = anchors(&shapes, n);
        let out_mem = self.enc_norm.forward(
            b,
            &b.conv2d_masked(
                &memory,
                &valid,
                &self.enc_output.param,
                Activation::Identity,
            )?,
        )?;
        let scores = self
            .enc_score
            .forward(b, &out_mem, Activation::Identity, None)?;
        let coords = self
            .enc_bbox
            .forward(b, &out_mem, Some(&b.upload_nhwc(&anchors)?))?;
        let q = self.queries;
        let positions = b.dims(&scores)[2];
        if positions < q {
            return Err(ModelError::Input(format!(
                "a {w}x{h} input gives {positions} feature positions, fewer than the {} queries; use a larger input",
                q
            )));
        }
        // One selection for the boxes and (without a learnt query) the targets, so that
        // a GPU backend keeps the indices on the device.
        let mut picked = match &self.query_embedding {
            Some(_) => b.select_rows(&scores, q, &[&coords])?,
            None => b.select_rows(&scores, q, &[&coords, &out_mem])?,
        };
        let target = match &self.query_embedding {
            Some(emb) => {
                // The first q learnt queries go with the q best-ranked anchors.
                let rows = emb.to_f32_vec();
                let first = rows.get(..q * c.d_model).ok_or_else(|| {
                    ModelError::Config("query embedding smaller than num_queries".into())
                })?;
                let data: Vec<f32> = std::iter::repeat_n(first, n).flatten().copied().collect();
                b.upload_nhwc(&HostTensor::from_f32(vec![n, 1, q, c.d_model], data)?)?
            }
            None => picked
                .pop()
                .ok_or_else(|| ModelError::Input("query selection returned no targets".into()))?,
        };
        let ref_unact = picked
            .pop()
            .ok_or_else(|| ModelError::Input("query selection returned no boxes".into()))?;
        let spec = DeformableSpec {
            heads: c.decoder_attention_heads,
            shapes,
            points: c.decoder_n_points.clone(),
            offset_scale: c.decoder_offset_scale,
            discrete: c.decoder_method_discrete,
        };
        self.decoder.forward(b, &target, &ref_unact, &memory, &spec)
    }
}

/// Anchor boxes (logits) for every position of every level and their validity mask,
/// as transformers' `generate_anchors(grid_size=0.05)`: invalid anchors (any coordinate
/// outside (0.01, 0.99)) get `f32::MAX` and a mask of 0. Shapes `[n, 1, S, 4]` and
/// `[n, 1, S, 1]`.
pub fn anchors(shapes: &[(usize, usize)], n: usize) -> (HostTensor, HostTensor) {
    let mut a = Vec::new();
    let mut m = Vec::new();
    for (level, &(h, w)) in shapes.iter().enumerate() {
        let wh = 0.05f32 * 2f32.powi(level as i32);
        for y in 0..h {
            for x in 0..w {
                let v = [
                    (x as f32 + 0.5) / w as f32,
                    (y as f32 + 0.5) / h as f32,
                    wh,
                    wh,
                ];
                let ok = v.iter().all(|&t| t > 0.01f32 && t < 0.99f32);
                m.push(if ok { 1.0 } else { 0.0 });
                a.extend(
                    v.iter()
                        .map(|&t| if ok { (t / (1.0 - t)).ln() } else { f32::MAX }),
                );
            }
        }
    }
    let s = m.len();
    let a: Vec<f32> = std::iter::repeat_n(a, n).flatten().collect();
    let m: Vec<f32> = std::iter::repeat_n(m, n).flatten().collect();
    // Lengths match the shapes by construction.
    let at = HostTensor::from_f32(vec![n, 1, s, 4], a)
        .unwrap_or_else(|_| HostTensor::zeros(vec![n, 1, s, 4]));
    let mt = HostTensor::from_f32(vec![n, 1, s, 1], m)
        .unwrap_or_else(|_| HostTensor::zeros(vec![n, 1, s, 1]));
    (at, mt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_anchors_of_fine_levels_are_invalid() {
        let (a, m) = anchors(&[(2, 60), (1, 1)], 1);
        assert_eq!(a.shape(), &[1, 1, 121, 4]);
        let m = m.to_f32_vec();
        // 0.5 / 60 < 0.01: first and last columns of level 0 are masked.
        assert_eq!((m[0], m[1], m[59], m[60]), (0.0, 1.0, 0.0, 0.0));
        let a = a.to_f32_vec();
        assert_eq!(a[0], f32::MAX);
        assert!((a[4] - ((1.5f32 / 60.0) / (1.0 - 1.5 / 60.0)).ln()).abs() < 1e-6);
        // The 1x1 level: centre 0.5, size 0.1.
        assert_eq!(m[120], 1.0);
        assert!((a[480] - 0.0).abs() < 1e-7 && (a[482] - (0.1f32 / 0.9).ln()).abs() < 1e-6);
    }
}
