//! Restormer hyper-parameters: read from `config.json`, or inferred from weight shapes.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use aperture_weights::StateDict;

/// LayerNorm flavour: `WithBias` subtracts the mean and adds a shift; `BiasFree` does neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerNormType {
    WithBias,
    BiasFree,
}

/// The constructor arguments of the published Restormer (same names as its code).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestormerConfig {
    #[serde(default = "three")]
    pub inp_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub dim: usize,
    pub num_blocks: [usize; 4],
    pub num_refinement_blocks: usize,
    pub heads: [usize; 4],
    pub ffn_expansion_factor: f64,
    pub bias: bool,
    #[serde(rename = "LayerNorm_type")]
    pub layer_norm_type: LayerNormType,
}

fn three() -> usize {
    3
}

impl Default for RestormerConfig {
    /// The published base model (26,126,644 parameters).
    fn default() -> Self {
        Self {
            inp_channels: 3,
            out_channels: 3,
            dim: 48,
            num_blocks: [4, 6, 6, 8],
            num_refinement_blocks: 4,
            heads: [1, 2, 4, 8],
            ffn_expansion_factor: 2.66,
            bias: false,
            layer_norm_type: LayerNormType::WithBias,
        }
    }
}

impl RestormerConfig {
    /// Parses `config.json` (extra keys such as `architecture` are ignored).
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of the feed-forward hidden layer at `dim` channels: `int(dim * factor)`.
    pub fn ffn_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.ffn_expansion_factor) as usize
    }

    /// Channel count of each level: encoder 1..3 and the latent, as in the paper.
    pub fn level_dims(&self) -> [usize; 4] {
        [self.dim, self.dim * 2, self.dim * 4, self.dim * 8]
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.dim == 0 || !self.dim.is_multiple_of(2) {
            return bad(format!(
                "dim must be a positive even number, got {}",
                self.dim
            ));
        }
        if self.inp_channels == 0 || self.inp_channels != self.out_channels {
            return bad(format!(
                "inp_channels ({}) and out_channels ({}) must be equal and positive: the output adds the input image",
                self.inp_channels, self.out_channels
            ));
        }
        if !(self.ffn_expansion_factor > 0.0 && self.ffn_expansion_factor.is_finite()) {
            return bad(format!(
                "ffn_expansion_factor must be positive, got {}",
                self.ffn_expansion_factor
            ));
        }
        for (level, (&d, &h)) in self.level_dims().iter().zip(&self.heads).enumerate() {
            if h == 0 || !d.is_multiple_of(h) {
                return bad(format!(
                    "level {} has {d} channels, not divisible by {h} heads",
                    level + 1
                ));
            }
        }
        let d1 = self.dim * 2;
        if !d1.is_multiple_of(self.heads[0]) {
            return bad(format!(
                "decoder level 1 has {d1} channels, not divisible by {} heads",
                self.heads[0]
            ));
        }
        if self.ffn_hidden(self.dim) == 0 {
            return bad("ffn_expansion_factor gives an empty hidden layer".into());
        }
        Ok(())
    }

    /// Reads the configuration off the weight shapes of a Restormer checkpoint.
    pub fn infer_from_weights(sd: &StateDict) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            sd.get(name).map(|t| t.shape().to_vec()).ok_or_else(|| {
                ModelError::Config(format!(
                    "cannot infer the Restormer configuration: no '{name}' in the weights (is this a Restormer checkpoint?)"
                ))
            })
        };
        let patch = shape("patch_embed.proj.weight")?;
        let output = shape("output.weight")?;
        if patch.len() != 4 || output.len() != 4 {
            return Err(ModelError::Config(
                "patch_embed.proj.weight and output.weight must be 4-D".into(),
            ));
        }
        let dim = patch[0];
        let count = |prefix: &str| {
            let mut idx: Vec<usize> = sd
                .keys()
                .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
                .collect();
            idx.sort_unstable();
            idx.dedup();
            idx.len()
        };
        let levels = [
            "encoder_level1.",
            "encoder_level2.",
            "encoder_level3.",
            "latent.",
        ];
        let mut num_blocks = [0; 4];
        let mut heads = [0; 4];
        for (i, p) in levels.iter().enumerate() {
            num_blocks[i] = count(p);
            heads[i] = shape(&format!("{p}0.attn.temperature"))?[0];
        }
        let mut hidden = Vec::new();
        for (p, d) in levels.iter().zip([dim, dim * 2, dim * 4, dim * 8]) {
            hidden.push((d, shape(&format!("{p}0.ffn.project_out.weight"))?[1]));
        }
        let cfg = Self {
            inp_channels: patch[1],
            out_channels: output[0],
            dim,
            num_blocks,
            num_refinement_blocks: count("refinement."),
            heads,
            ffn_expansion_factor: factor_for_hidden(&hidden)?,
            bias: sd.get("patch_embed.proj.bias").is_some(),
            layer_norm_type: if sd.get("encoder_level1.0.norm1.body.bias").is_some() {
                LayerNormType::WithBias
            } else {
                LayerNormType::BiasFree
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Finds the shortest decimal `f` with `int(d * f) == hidden` at every level, so that an
/// inferred config reads like the one the model was trained with (e.g. 2.66).
fn factor_for_hidden(levels: &[(usize, usize)]) -> Result<f64> {
    let (mut lo, mut hi) = (0f64, f64::INFINITY);
    for &(d, h) in levels {
        lo = lo.max(h as f64 / d as f64);
        hi = hi.min((h + 1) as f64 / d as f64);
    }
    let fits = |f: f64| levels.iter().all(|&(d, h)| (d as f64 * f) as usize == h);
    for digits in 0..8 {
        let scale = 10f64.powi(digits);
        let f = (lo * scale).ceil() / scale;
        if f < hi && fits(f) {
            return Ok(f);
        }
    }
    Err(ModelError::Config(format!(
        "no ffn_expansion_factor gives the feed-forward widths found in the weights ({levels:?})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_recovers_published_value() {
        let cfg = RestormerConfig::default();
        let levels: Vec<_> = cfg
            .level_dims()
            .iter()
            .map(|&d| (d, cfg.ffn_hidden(d)))
            .collect();
        assert_eq!(levels[0], (48, 127));
        assert_eq!(factor_for_hidden(&levels).unwrap(), 2.66);
    }

    #[test]
    fn parses_reference_config_json() {
        let text = r#"{"dim": 8, "num_blocks": [1, 2, 2, 2], "num_refinement_blocks": 1, "heads": [1, 2, 4, 8],
            "ffn_expansion_factor": 2.66, "bias": false, "LayerNorm_type": "WithBias", "architecture": "Restormer"}"#;
        let cfg = RestormerConfig::from_json(text).unwrap();
        assert_eq!(cfg.dim, 8);
        assert_eq!(cfg.inp_channels, 3);
    }

    #[test]
    fn rejects_heads_that_do_not_divide() {
        let cfg = RestormerConfig {
            heads: [1, 2, 5, 8],
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("not divisible by 5 heads"), "{err}");
    }
}
