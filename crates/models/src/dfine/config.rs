//! D-FINE configuration as HF `DFineConfig` writes it to `config.json` (with its nested
//! `HGNetV2Config` backbone). Missing fields take transformers' defaults; fields this
//! implementation cannot honour are refused with a message naming them.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// HGNetV2 backbone settings (`backbone_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct BackboneConfig {
    pub hidden_act: String,
    pub use_learnable_affine_block: bool,
    pub stem_channels: [usize; 3],
    pub stem_strides: [usize; 5],
    pub stage_in_channels: Vec<usize>,
    pub stage_mid_channels: Vec<usize>,
    pub stage_out_channels: Vec<usize>,
    pub stage_num_blocks: Vec<usize>,
    pub stage_numb_of_layers: Vec<usize>,
    pub stage_downsample: Vec<bool>,
    pub stage_downsample_strides: Vec<usize>,
    pub stage_light_block: Vec<bool>,
    pub stage_kernel_size: Vec<usize>,
    /// Indices into `[stem, stage1, ..]` of the feature maps handed to the encoder.
    pub out_indices: Vec<usize>,
}

/// Everything the D-FINE forward pass depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct DFineConfig {
    pub backbone: BackboneConfig,
    pub num_labels: usize,
    pub id2label: BTreeMap<usize, String>,
    pub layer_norm_eps: f32,
    pub batch_norm_eps: f32,
    pub encoder_hidden_dim: usize,
    pub encoder_in_channels: Vec<usize>,
    pub feat_strides: Vec<usize>,
    pub encoder_layers: usize,
    pub encoder_ffn_dim: usize,
    pub encoder_attention_heads: usize,
    pub encode_proj_layers: Vec<usize>,
    pub positional_encoding_temperature: f64,
    pub encoder_activation: String,
    pub activation: String,
    pub eval_size_set: bool,
    pub normalize_before: bool,
    pub hidden_expansion: f64,
    pub depth_mult: f64,
    pub d_model: usize,
    pub num_queries: usize,
    pub decoder_in_channels: Vec<usize>,
    pub decoder_ffn_dim: usize,
    pub num_feature_levels: usize,
    pub decoder_n_points: Vec<usize>,
    pub decoder_layers: usize,
    pub decoder_attention_heads: usize,
    pub decoder_activation: String,
    pub learn_initial_query: bool,
    pub num_denoising: usize,
    pub eval_idx: usize,
    pub layer_scale: f64,
    pub max_num_bins: usize,
    pub reg_scale: f32,
    pub up: f32,
    pub top_prob_values: usize,
    pub lqe_hidden_dim: usize,
    pub lqe_layers: usize,
    pub decoder_offset_scale: f32,
    pub decoder_method_discrete: bool,
}

struct Fields<'a> {
    v: &'a Value,
    ctx: &'a str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }
    fn err(&self, key: &str, what: &str) -> ModelError {
        ModelError::Config(format!("{}{key}: expected {what}", self.ctx))
    }
    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, "a non-negative integer")),
        }
    }
    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| self.err(key, "a number")),
        }
    }
    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }
    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(x) => x
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(key, "a string")),
        }
    }
    fn usizes(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.err(key, "a list of integers"))
                })
                .collect(),
            Some(_) => Err(self.err(key, "a list of integers")),
        }
    }
    fn bools(&self, key: &str, default: &[bool]) -> Result<Vec<bool>> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_bool()
                        .ok_or_else(|| self.err(key, "a list of booleans"))
                })
                .collect(),
            Some(_) => Err(self.err(key, "a list of booleans")),
        }
    }
    /// Strides may be ints or `[sy, sx]` pairs; only equal pairs are supported.
    fn strides(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        let Some(Value::Array(a)) = self.get(key) else {
            return match self.get(key) {
                None => Ok(default.to_vec()),
                Some(_) => Err(self.err(key, "a list of strides")),
            };
        };
        a.iter()
            .map(|x| match x {
                Value::Array(p) if p.len() == 2 && p[0] == p[1] => {
                    p[0].as_u64().map(|n| n as usize)
                }
                other => other.as_u64().map(|n| n as usize),
            })
            .map(|s| {
                s.filter(|&s| s > 0)
                    .ok_or_else(|| self.err(key, "positive integer strides (equal in y and x)"))
            })
            .collect()
    }
}

/// Python's `round()` (halves to even), as `round(3 * depth_mult)` in transformers.
pub fn py_round(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

impl DFineConfig {
    /// Parses HF's `config.json`. Refuses a config of another architecture.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("invalid JSON: {e}")))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let is_dfine = model_type == "d_fine" || archs.iter().any(|a| a.starts_with("DFine"));
        if !is_dfine {
            let named = if model_type.is_empty() {
                archs.join(", ")
            } else {
                model_type.to_string()
            };
            return Err(ModelError::Config(format!(
                "this config.json describes a '{}' model, not D-FINE (expected model_type \"d_fine\")",
                if named.is_empty() { "unknown" } else { &named }
            )));
        }
        let f = Fields { v: &v, ctx: "" };
        let bb_value = v
            .get("backbone_config")
            .filter(|b| !b.is_null())
            .ok_or_else(|| {
                ModelError::Config(
                    "backbone_config is missing: only D-FINE with an HGNetV2 backbone is supported"
                        .into(),
                )
            })?;
        let bt = bb_value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("hgnet_v2");
        if bt != "hgnet_v2" {
            return Err(ModelError::Config(format!(
                "backbone '{bt}' is not supported (only hgnet_v2)"
            )));
        }
        let backbone = parse_backbone(&Fields {
            v: bb_value,
            ctx: "backbone_config.",
        })?;
        let num_labels = match v.get("id2label").and_then(Value::as_object) {
            Some(m) if !m.is_empty() => m.len(),
            _ => f.usize("num_labels", 80)?,
        };
        let mut id2label = BTreeMap::new();
        if let Some(m) = v.get("id2label").and_then(Value::as_object) {
            for (k, name) in m {
                let id: usize = k.parse().map_err(|_| {
                    ModelError::Config(format!("id2label key '{k}' is not a number"))
                })?;
                id2label.insert(id, name.as_str().unwrap_or_default().to_string());
            }
        }
        let decoder_layers = f.usize("decoder_layers", 6)?;
        let eval_idx_raw = v.get("eval_idx").and_then(Value::as_i64).unwrap_or(-1);
        let eval_idx = if eval_idx_raw < 0 {
            decoder_layers as i64 + eval_idx_raw
        } else {
            eval_idx_raw
        };
        let num_feature_levels = f.usize("num_feature_levels", 3)?;
        let n_points = match f.get("decoder_n_points") {
            Some(Value::Array(_)) => f.usizes("decoder_n_points", &[])?,
            _ => vec![f.usize("decoder_n_points", 4)?; num_feature_levels],
        };
        let max_num_bins = match f.get("max_num_bins") {
            Some(_) => f.usize("max_num_bins", 32)?,
            None => f.usize("reg_max", 32)?,
        };
        let method = f.string("decoder_method", "default")?;
        let cfg = DFineConfig {
            backbone,
            num_labels,
            id2label,
            layer_norm_eps: f.f64("layer_norm_eps", 1e-5)? as f32,
            batch_norm_eps: f.f64("batch_norm_eps", 1e-5)? as f32,
            encoder_hidden_dim: f.usize("encoder_hidden_dim", 256)?,
            encoder_in_channels: f.usizes("encoder_in_channels", &[512, 1024, 2048])?,
            feat_strides: f.usizes("feat_strides", &[8, 16, 32])?,
            encoder_layers: f.usize("encoder_layers", 1)?,
            encoder_ffn_dim: f.usize("encoder_ffn_dim", 1024)?,
            encoder_attention_heads: f.usize("encoder_attention_heads", 8)?,
            encode_proj_layers: f.usizes("encode_proj_layers", &[2])?,
            positional_encoding_temperature: f.f64("positional_encoding_temperature", 10000.0)?,
            encoder_activation: f.string("encoder_activation_function", "gelu")?,
            activation: f.string("activation_function", "silu")?,
            eval_size_set: f.get("eval_size").is_some(),
            normalize_before: f.bool("normalize_before", false)?,
            hidden_expansion: f.f64("hidden_expansion", 1.0)?,
            depth_mult: f.f64("depth_mult", 1.0)?,
            d_model: f.usize("d_model", 256)?,
            num_queries: f.usize("num_queries", 300)?,
            decoder_in_channels: f.usizes("decoder_in_channels", &[256, 256, 256])?,
            decoder_ffn_dim: f.usize("decoder_ffn_dim", 1024)?,
            num_feature_levels,
            decoder_n_points: n_points,
            decoder_layers,
            decoder_attention_heads: f.usize("decoder_attention_heads", 8)?,
            decoder_activation: f.string("decoder_activation_function", "relu")?,
            learn_initial_query: f.bool("learn_initial_query", false)?,
            num_denoising: f.usize("num_denoising", 100)?,
            eval_idx: usize::try_from(eval_idx).map_err(|_| {
                ModelError::Config(format!("eval_idx {eval_idx_raw} is out of range"))
            })?,
            layer_scale: f.f64("layer_scale", 1.0)?,
            max_num_bins,
            reg_scale: f.f64("reg_scale", 4.0)? as f32,
            up: f.f64("up", 0.5)? as f32,
            top_prob_values: f.usize("top_prob_values", 4)?,
            lqe_hidden_dim: f.usize("lqe_hidden_dim", 64)?,
            lqe_layers: f.usize("lqe_layers", 2)?,
            decoder_offset_scale: f.f64("decoder_offset_scale", 0.5)? as f32,
            decoder_method_discrete: method == "discrete",
        };
        if method != "default" && method != "discrete" {
            return Err(ModelError::Config(format!(
                "decoder_method '{method}' is not supported (default, discrete)"
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between sizes that the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        let b = &self.backbone;
        let stages = b.stage_in_channels.len();
        let lens = [
            b.stage_mid_channels.len(),
            b.stage_out_channels.len(),
            b.stage_num_blocks.len(),
            b.stage_numb_of_layers.len(),
            b.stage_downsample.len(),
            b.stage_downsample_strides.len(),
            b.stage_light_block.len(),
            b.stage_kernel_size.len(),
        ];
        if stages == 0 || lens.iter().any(|&l| l != stages) {
            return bad("backbone_config: every stage_* list must have one entry per stage".into());
        }
        if b.stage_in_channels[0] != b.stem_channels[2]
            || (1..stages).any(|s| b.stage_in_channels[s] != b.stage_out_channels[s - 1])
        {
            return bad(format!(
                "backbone_config: each stage must take the previous one's channels (stem {:?}, stage_in_channels {:?}, stage_out_channels {:?})",
                b.stem_channels, b.stage_in_channels, b.stage_out_channels
            ));
        }
        if b.out_indices.iter().any(|&i| i == 0 || i > stages) {
            return bad(format!(
                "backbone_config.out_indices {:?} must name stages 1..={stages}",
                b.out_indices
            ));
        }
        let levels = self.encoder_in_channels.len();
        if b.out_indices.len() != levels
            || self.feat_strides.len() != levels
            || self.decoder_in_channels.len() != levels
        {
            return bad(format!(
                "backbone outputs ({}), encoder_in_channels ({levels}), feat_strides and decoder_in_channels must agree in length",
                b.out_indices.len()
            ));
        }
        for (i, &ix) in b.out_indices.iter().enumerate() {
            if b.stage_out_channels[ix - 1] != self.encoder_in_channels[i] {
                return bad(format!(
                    "encoder_in_channels[{i}] = {} but backbone stage {ix} outputs {} channels",
                    self.encoder_in_channels[i],
                    b.stage_out_channels[ix - 1]
                ));
            }
        }
        if self.num_feature_levels < levels
            || self.decoder_n_points.len() != self.num_feature_levels
        {
            return bad(format!(
                "num_feature_levels {} must be >= {levels} and match decoder_n_points {:?}",
                self.num_feature_levels, self.decoder_n_points
            ));
        }
        if self.encode_proj_layers.iter().any(|&i| i >= levels) {
            return bad(format!(
                "encode_proj_layers {:?} must index the {levels} levels",
                self.encode_proj_layers
            ));
        }
        for (name, dim, heads) in [
            (
                "encoder",
                self.encoder_hidden_dim,
                self.encoder_attention_heads,
            ),
            ("decoder", self.d_model, self.decoder_attention_heads),
        ] {
            if heads == 0 || dim % heads != 0 {
                return bad(format!(
                    "{name} width {dim} is not divisible by {heads} attention heads"
                ));
            }
        }
        if !self.encoder_hidden_dim.is_multiple_of(4) {
            return bad(
                "encoder_hidden_dim must be divisible by 4 (2-D sin-cos position embedding)".into(),
            );
        }
        if self.eval_idx >= self.decoder_layers {
            return bad(format!(
                "eval_idx {} is beyond the {} decoder layers",
                self.eval_idx, self.decoder_layers
            ));
        }
        if self.max_num_bins < 4 || !self.max_num_bins.is_multiple_of(2) {
            return bad(format!(
                "max_num_bins must be an even number >= 4, got {}",
                self.max_num_bins
            ));
        }
        if self.top_prob_values == 0
            || self.top_prob_values > self.max_num_bins + 1
            || self.lqe_layers == 0
        {
            return bad("top_prob_values and lqe_layers must be positive (top_prob_values <= max_num_bins + 1)".into());
        }
        if self.num_queries == 0 || self.num_labels == 0 {
            return bad("num_queries and num_labels must be positive".into());
        }
        for act in [
            &self.activation,
            &self.encoder_activation,
            &self.decoder_activation,
            &b.hidden_act,
        ] {
            super::blocks::activation(act)?;
        }
        Ok(())
    }

    /// Blocks per RepNCSPELAN4 CSP branch: `round(3 * depth_mult)`.
    pub fn csp_blocks(&self) -> usize {
        py_round(3.0 * self.depth_mult)
    }

    /// Width of RepNCSPELAN4's inner branches: `round(hidden_expansion * hidden // 2)`.
    pub fn elan_width(&self) -> usize {
        py_round((self.hidden_expansion * self.encoder_hidden_dim as f64 / 2.0).floor())
    }

    /// Total sampling points per head over all levels.
    pub fn total_points(&self) -> usize {
        self.decoder_n_points.iter().sum()
    }

    /// Human-readable name of class `id` (falls back to the number).
    pub fn label(&self, id: usize) -> String {
        self.id2label
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

fn parse_backbone(f: &Fields) -> Result<BackboneConfig> {
    let stem = f.usizes("stem_channels", &[3, 32, 48])?;
    let stem_channels: [usize; 3] = stem
        .as_slice()
        .try_into()
        .map_err(|_| f.err("stem_channels", "three integers"))?;
    if stem_channels[0] != 3 {
        return Err(f.err("stem_channels", "3 input channels first"));
    }
    let stem_strides: [usize; 5] = f
        .strides("stem_strides", &[2, 1, 1, 2, 1])?
        .as_slice()
        .try_into()
        .map_err(|_| f.err("stem_strides", "five strides"))?;
    let stages = f.usizes("stage_in_channels", &[48, 128, 512, 1024])?.len();
    let names: Vec<String> = match f.get("out_features") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    let out_indices = if !names.is_empty() {
        names
            .iter()
            .map(|n| {
                n.strip_prefix("stage")
                    .and_then(|k| k.parse::<usize>().ok())
                    .ok_or_else(|| f.err("out_features", "names like \"stage2\""))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        f.usizes(
            "out_indices",
            &[stages.saturating_sub(2), stages.saturating_sub(1), stages],
        )?
    };
    Ok(BackboneConfig {
        hidden_act: f.string("hidden_act", "relu")?,
        use_learnable_affine_block: f.bool("use_learnable_affine_block", false)?,
        stem_channels,
        stem_strides,
        stage_in_channels: f.usizes("stage_in_channels", &[48, 128, 512, 1024])?,
        stage_mid_channels: f.usizes("stage_mid_channels", &[48, 96, 192, 384])?,
        stage_out_channels: f.usizes("stage_out_channels", &[128, 512, 1024, 2048])?,
        stage_num_blocks: f.usizes("stage_num_blocks", &[1, 1, 3, 1])?,
        stage_numb_of_layers: f.usizes("stage_numb_of_layers", &[6, 6, 6, 6])?,
        stage_downsample: f.bools("stage_downsample", &[false, true, true, true])?,
        stage_downsample_strides: f.strides("stage_downsample_strides", &[2, 2, 2, 2])?,
        stage_light_block: f.bools("stage_light_block", &[false, false, true, true])?,
        stage_kernel_size: f.usizes("stage_kernel_size", &[3, 3, 5, 5])?,
        out_indices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../../../tests/fixtures/dfine/tiny/config.json");
    const X: &str = include_str!("../../../../tests/fixtures/dfine/x/config.json");

    #[test]
    fn parses_the_tiny_and_x_configs() {
        let t = DFineConfig::from_json(TINY).unwrap();
        assert_eq!(
            (t.d_model, t.num_queries, t.num_labels, t.max_num_bins),
            (32, 20, 5, 16)
        );
        assert_eq!(t.decoder_n_points, vec![2, 3, 2]);
        assert_eq!(t.backbone.out_indices, vec![2, 3, 4]);
        assert_eq!((t.csp_blocks(), t.elan_width(), t.eval_idx), (2, 12, 2));
        let x = DFineConfig::from_json(X).unwrap();
        assert_eq!(
            (
                x.encoder_hidden_dim,
                x.d_model,
                x.decoder_layers,
                x.num_labels
            ),
            (384, 256, 6, 80)
        );
        assert_eq!((x.csp_blocks(), x.elan_width()), (3, 192));
        assert_eq!(x.label(15), "cat");
    }

    #[test]
    fn python_rounding_goes_to_even() {
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(1.5), 2);
        assert_eq!(py_round(1.02), 1);
    }

    #[test]
    fn refuses_other_architectures_and_bad_sizes() {
        let err = DFineConfig::from_json(
            r#"{"model_type": "detr", "architectures": ["DetrForObjectDetection"]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("'detr'"), "{err}");
        let err =
            DFineConfig::from_json(r#"{"architecture": "Restormer", "dim": 48}"#).unwrap_err();
        assert!(err.to_string().contains("not D-FINE"), "{err}");
        let bad = TINY.replace(
            "\"decoder_attention_heads\": 4",
            "\"decoder_attention_heads\": 5",
        );
        assert!(DFineConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("divisible"));
    }
}
