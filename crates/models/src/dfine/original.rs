//! Official D-FINE checkpoints (`dfine_*.pth` from the D-FINE repository) use their own
//! parameter names. This renames them to transformers' names, following the mapping of
//! transformers' `convert_d_fine_original_pytorch_checkpoint_to_hf.py`, and splits the
//! fused `in_proj` of `nn.MultiheadAttention` into q/k/v projections.

use std::collections::BTreeMap;

use aperture_engine::HostTensor;
use aperture_weights::StateDict;

use crate::error::{ModelError, Result};

/// Whether `sd` uses the official repository's names.
pub fn is_original(sd: &StateDict) -> bool {
    let keys = sd.tensors();
    !keys.keys().any(|k| k.starts_with("model."))
        && keys
            .keys()
            .any(|k| k.starts_with("backbone.stem.") || k.starts_with("decoder.decoder."))
}

/// Renames an official checkpoint to transformers' names (tensors that are not needed,
/// such as cached anchors, are dropped).
pub fn to_hf_names(sd: StateDict) -> Result<StateDict> {
    let mut out = BTreeMap::new();
    for (key, t) in sd.into_tensors() {
        if let Some(prefix) = key
            .strip_suffix("self_attn.in_proj_weight")
            .or_else(|| key.strip_suffix("self_attn.in_proj_bias"))
        {
            let leaf = if key.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            let base = rename(&format!("{prefix}self_attn.q_proj.{leaf}")).unwrap_or_default();
            let base = base.trim_end_matches(&format!("q_proj.{leaf}")).to_string();
            for (i, part) in split_rows(&t, 3)?.into_iter().enumerate() {
                out.insert(format!("{base}{}_proj.{leaf}", ["q", "k", "v"][i]), part);
            }
        } else if let Some(name) = rename(&key) {
            out.insert(name, t);
        }
    }
    Ok(StateDict::from_tensors(out))
}

/// Splits the first axis into `n` equal parts.
fn split_rows(t: &HostTensor, n: usize) -> Result<Vec<HostTensor>> {
    let s = t.shape();
    let rows = s.first().copied().unwrap_or(0);
    if rows == 0 || rows % n != 0 {
        return Err(ModelError::Config(format!(
            "cannot split an in_proj tensor of shape {s:?} into q, k and v"
        )));
    }
    let v = t.to_f32_vec();
    let per = v.len() / n;
    let mut shape = s.to_vec();
    shape[0] = rows / n;
    (0..n)
        .map(|i| {
            Ok(HostTensor::from_f32(
                shape.clone(),
                v[i * per..(i + 1) * per].to_vec(),
            )?)
        })
        .collect()
}

/// `a.b.` -> replaces the first matching prefix of `sub`.
fn map_prefix(sub: &str, table: &[(&str, &str)]) -> String {
    for (from, to) in table {
        if let Some(rest) = sub.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    sub.to_string()
}

/// Splits `"<index>.<rest>"`.
fn index_rest(s: &str) -> Option<(&str, &str)> {
    let (i, rest) = s.split_once('.')?;
    i.chars().all(|c| c.is_ascii_digit()).then_some((i, rest))
}

fn conv_bn_numbered(rest: &str) -> String {
    // `<i>.conv.weight` -> `<i>.0.weight`, `<i>.norm.x` -> `<i>.1.x`
    match index_rest(rest) {
        Some((i, r)) => format!("{i}.{}", map_prefix(r, &[("conv.", "0."), ("norm.", "1.")])),
        None => rest.to_string(),
    }
}

fn rename(key: &str) -> Option<String> {
    if matches!(key, "decoder.anchors" | "decoder.valid_mask") {
        return None;
    }
    if let Some(rest) = key.strip_prefix("backbone.") {
        let rest = map_prefix(
            rest,
            &[("stem.", "embedder."), ("stages.", "encoder.stages.")],
        );
        let rest = rest
            .replace(".conv.weight", ".convolution.weight")
            .replace(".bn.", ".normalization.");
        return Some(format!("model.backbone.model.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("encoder.") {
        if let Some(r) = rest.strip_prefix("input_proj.") {
            return Some(format!("model.encoder_input_proj.{}", conv_bn_numbered(r)));
        }
        if let Some((i, r)) = rest.strip_prefix("encoder.").and_then(index_rest) {
            let (j, sub) = r.strip_prefix("layers.").and_then(index_rest)?;
            let sub = map_prefix(
                sub,
                &[
                    ("linear1.", "fc1."),
                    ("linear2.", "fc2."),
                    ("norm1.", "self_attn_layer_norm."),
                    ("norm2.", "final_layer_norm."),
                ],
            );
            return Some(format!("model.encoder.encoder.{i}.layers.{j}.{sub}"));
        }
        for blocks in ["fpn_blocks.", "pan_blocks."] {
            if let Some((i, sub)) = rest.strip_prefix(blocks).and_then(index_rest) {
                let sub = map_prefix(
                    sub,
                    &[
                        ("cv1.", "conv1."),
                        ("cv2.0.", "csp_rep1."),
                        ("cv2.1.", "conv2."),
                        ("cv3.0.", "csp_rep2."),
                        ("cv3.1.", "conv3."),
                        ("cv4.", "conv4."),
                    ],
                );
                return Some(format!("model.encoder.{blocks}{i}.{sub}"));
            }
        }
        if let Some((i, sub)) = rest.strip_prefix("downsample_convs.").and_then(index_rest) {
            let sub = sub.strip_prefix("0.").unwrap_or(sub);
            let sub = map_prefix(sub, &[("cv1.", "conv1."), ("cv2.", "conv2.")]);
            return Some(format!("model.encoder.downsample_convs.{i}.{sub}"));
        }
        return Some(format!("model.encoder.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("decoder.") {
        if let Some((i, sub)) = rest.strip_prefix("decoder.layers.").and_then(index_rest) {
            let sub = map_prefix(
                sub,
                &[
                    ("cross_attn.", "encoder_attn."),
                    ("norm1.", "self_attn_layer_norm."),
                    ("norm2.", "encoder_attn_layer_norm."),
                    ("norm3.", "final_layer_norm."),
                    ("linear1.", "fc1."),
                    ("linear2.", "fc2."),
                ],
            );
            return Some(format!("model.decoder.layers.{i}.{sub}"));
        }
        if let Some(r) = rest.strip_prefix("input_proj.") {
            return Some(format!("model.decoder_input_proj.{}", conv_bn_numbered(r)));
        }
        let table = [
            ("decoder.lqe_layers.", "model.decoder.lqe_layers."),
            ("dec_score_head.", "model.decoder.class_embed."),
            ("dec_bbox_head.", "model.decoder.bbox_embed."),
            ("pre_bbox_head.", "model.decoder.pre_bbox_head."),
            ("query_pos_head.", "model.decoder.query_pos_head."),
            ("denoising_class_embed.", "model.denoising_class_embed."),
            ("enc_output.proj.", "model.enc_output.0."),
            ("enc_output.norm.", "model.enc_output.1."),
            ("enc_score_head.", "model.enc_score_head."),
            ("enc_bbox_head.", "model.enc_bbox_head."),
            ("up", "model.decoder.up"),
            ("reg_scale", "model.decoder.reg_scale"),
        ];
        return Some(map_prefix(rest, &table));
    }
    Some(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_follow_the_transformers_conversion_table() {
        let pairs = [
            (
                "backbone.stem.stem2a.bn.running_var",
                "model.backbone.model.embedder.stem2a.normalization.running_var",
            ),
            (
                "backbone.stem.stem1.lab.scale",
                "model.backbone.model.embedder.stem1.lab.scale",
            ),
            (
                "backbone.stages.2.blocks.1.layers.3.conv2.conv.weight",
                "model.backbone.model.encoder.stages.2.blocks.1.layers.3.conv2.convolution.weight",
            ),
            (
                "backbone.stages.1.downsample.bn.bias",
                "model.backbone.model.encoder.stages.1.downsample.normalization.bias",
            ),
            (
                "backbone.stages.0.blocks.0.aggregation.1.conv.weight",
                "model.backbone.model.encoder.stages.0.blocks.0.aggregation.1.convolution.weight",
            ),
            (
                "encoder.input_proj.2.conv.weight",
                "model.encoder_input_proj.2.0.weight",
            ),
            (
                "encoder.input_proj.0.norm.running_mean",
                "model.encoder_input_proj.0.1.running_mean",
            ),
            (
                "encoder.encoder.0.layers.0.linear2.bias",
                "model.encoder.encoder.0.layers.0.fc2.bias",
            ),
            (
                "encoder.encoder.0.layers.0.norm1.weight",
                "model.encoder.encoder.0.layers.0.self_attn_layer_norm.weight",
            ),
            (
                "encoder.lateral_convs.1.norm.weight",
                "model.encoder.lateral_convs.1.norm.weight",
            ),
            (
                "encoder.fpn_blocks.0.cv2.0.bottlenecks.1.conv2.norm.bias",
                "model.encoder.fpn_blocks.0.csp_rep1.bottlenecks.1.conv2.norm.bias",
            ),
            (
                "encoder.pan_blocks.1.cv3.1.conv.weight",
                "model.encoder.pan_blocks.1.conv3.conv.weight",
            ),
            (
                "encoder.pan_blocks.0.cv4.norm.weight",
                "model.encoder.pan_blocks.0.conv4.norm.weight",
            ),
            (
                "encoder.downsample_convs.1.0.cv2.conv.weight",
                "model.encoder.downsample_convs.1.conv2.conv.weight",
            ),
            (
                "decoder.decoder.layers.3.cross_attn.sampling_offsets.bias",
                "model.decoder.layers.3.encoder_attn.sampling_offsets.bias",
            ),
            (
                "decoder.decoder.layers.0.norm3.weight",
                "model.decoder.layers.0.final_layer_norm.weight",
            ),
            (
                "decoder.decoder.layers.5.gateway.gate.weight",
                "model.decoder.layers.5.gateway.gate.weight",
            ),
            (
                "decoder.decoder.lqe_layers.5.reg_conf.layers.1.bias",
                "model.decoder.lqe_layers.5.reg_conf.layers.1.bias",
            ),
            (
                "decoder.dec_score_head.5.weight",
                "model.decoder.class_embed.5.weight",
            ),
            (
                "decoder.dec_bbox_head.0.layers.2.bias",
                "model.decoder.bbox_embed.0.layers.2.bias",
            ),
            (
                "decoder.input_proj.1.norm.running_var",
                "model.decoder_input_proj.1.1.running_var",
            ),
            (
                "decoder.enc_output.proj.weight",
                "model.enc_output.0.weight",
            ),
            ("decoder.enc_output.norm.bias", "model.enc_output.1.bias"),
            (
                "decoder.enc_bbox_head.layers.2.weight",
                "model.enc_bbox_head.layers.2.weight",
            ),
            ("decoder.up", "model.decoder.up"),
            ("decoder.reg_scale", "model.decoder.reg_scale"),
        ];
        for (from, to) in pairs {
            assert_eq!(rename(from).as_deref(), Some(to), "{from}");
        }
        assert_eq!(rename("decoder.anchors"), None);
    }

    #[test]
    fn fused_attention_projections_are_split() {
        let mut t = BTreeMap::new();
        let w = HostTensor::from_f32(vec![6, 2], (0..12).map(|v| v as f32).collect()).unwrap();
        t.insert(
            "decoder.decoder.layers.0.self_attn.in_proj_weight".to_string(),
            w,
        );
        t.insert(
            "backbone.stem.stem1.conv.weight".to_string(),
            HostTensor::zeros(vec![1]),
        );
        let sd = StateDict::from_tensors(t);
        assert!(is_original(&sd));
        let hf = to_hf_names(sd).unwrap();
        let k = hf
            .get("model.decoder.layers.0.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(
            (k.shape(), k.to_f32_vec()),
            (&[2usize, 2][..], vec![4.0, 5.0, 6.0, 7.0])
        );
        assert!(hf
            .get("model.decoder.layers.0.self_attn.v_proj.weight")
            .is_some());
        assert!(!is_original(&hf));
    }
}
