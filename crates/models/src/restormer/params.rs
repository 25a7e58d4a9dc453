//! The parameter names and shapes of a Restormer, as PyTorch's `state_dict()` lists them
//! for the published code, and checking a checkpoint against them.

use std::collections::BTreeMap;

use aperture_engine::HostTensor;
use aperture_weights::StateDict;

use super::config::{LayerNormType, RestormerConfig};
use crate::error::{ModelError, Result, WeightIssue};
use crate::rng::SplitMix64;

/// One transformer level: its state-dict prefix, channels, heads and number of blocks.
pub struct Level {
    pub prefix: &'static str,
    pub dim: usize,
    pub heads: usize,
    pub blocks: usize,
}

/// Every level in execution order: encoder 1..3, latent, decoder 3..1, refinement.
pub fn levels(cfg: &RestormerConfig) -> [Level; 8] {
    let [d1, d2, d3, d4] = cfg.level_dims();
    let [h1, h2, h3, h4] = cfg.heads;
    let [b1, b2, b3, b4] = cfg.num_blocks;
    [
        Level {
            prefix: "encoder_level1",
            dim: d1,
            heads: h1,
            blocks: b1,
        },
        Level {
            prefix: "encoder_level2",
            dim: d2,
            heads: h2,
            blocks: b2,
        },
        Level {
            prefix: "encoder_level3",
            dim: d3,
            heads: h3,
            blocks: b3,
        },
        Level {
            prefix: "latent",
            dim: d4,
            heads: h4,
            blocks: b4,
        },
        Level {
            prefix: "decoder_level3",
            dim: d3,
            heads: h3,
            blocks: b3,
        },
        Level {
            prefix: "decoder_level2",
            dim: d2,
            heads: h2,
            blocks: b2,
        },
        // The decoder's level 1 keeps the concatenated 2*dim channels (no reduction).
        Level {
            prefix: "decoder_level1",
            dim: d2,
            heads: h1,
            blocks: b1,
        },
        Level {
            prefix: "refinement",
            dim: d2,
            heads: h1,
            blocks: cfg.num_refinement_blocks,
        },
    ]
}

/// `(name, shape)` for every parameter, in the order of the published `state_dict()`.
pub fn parameter_shapes(cfg: &RestormerConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let conv = |out: &mut Vec<(String, Vec<usize>)>,
                name: &str,
                o: usize,
                i: usize,
                k: usize,
                bias: bool| {
        out.push((format!("{name}.weight"), vec![o, i, k, k]));
        if bias {
            out.push((format!("{name}.bias"), vec![o]));
        }
    };
    let b = cfg.bias;
    let dim = cfg.dim;
    conv(&mut out, "patch_embed.proj", dim, cfg.inp_channels, 3, b);
    let lv = levels(cfg);
    let push_level = |out: &mut Vec<(String, Vec<usize>)>, l: &Level| {
        for i in 0..l.blocks {
            let p = format!("{}.{i}", l.prefix);
            let d = l.dim;
            let hid = cfg.ffn_hidden(d);
            let norm = |out: &mut Vec<(String, Vec<usize>)>, n: &str| {
                out.push((format!("{p}.{n}.body.weight"), vec![d]));
                if cfg.layer_norm_type == LayerNormType::WithBias {
                    out.push((format!("{p}.{n}.body.bias"), vec![d]));
                }
            };
            norm(out, "norm1");
            out.push((format!("{p}.attn.temperature"), vec![l.heads, 1, 1]));
            conv(out, &format!("{p}.attn.qkv"), 3 * d, d, 1, b);
            conv(out, &format!("{p}.attn.qkv_dwconv"), 3 * d, 1, 3, b);
            conv(out, &format!("{p}.attn.project_out"), d, d, 1, b);
            norm(out, "norm2");
            conv(out, &format!("{p}.ffn.project_in"), 2 * hid, d, 1, b);
            conv(out, &format!("{p}.ffn.dwconv"), 2 * hid, 1, 3, b);
            conv(out, &format!("{p}.ffn.project_out"), d, hid, 1, b);
        }
    };
    push_level(&mut out, &lv[0]);
    conv(&mut out, "down1_2.body.0", dim / 2, dim, 3, false);
    push_level(&mut out, &lv[1]);
    conv(&mut out, "down2_3.body.0", dim, dim * 2, 3, false);
    push_level(&mut out, &lv[2]);
    conv(&mut out, "down3_4.body.0", dim * 2, dim * 4, 3, false);
    push_level(&mut out, &lv[3]);
    conv(&mut out, "up4_3.body.0", dim * 16, dim * 8, 3, false);
    conv(&mut out, "reduce_chan_level3", dim * 4, dim * 8, 1, b);
    push_level(&mut out, &lv[4]);
    conv(&mut out, "up3_2.body.0", dim * 8, dim * 4, 3, false);
    conv(&mut out, "reduce_chan_level2", dim * 2, dim * 4, 1, b);
    push_level(&mut out, &lv[5]);
    conv(&mut out, "up2_1.body.0", dim * 4, dim * 2, 3, false);
    push_level(&mut out, &lv[6]);
    push_level(&mut out, &lv[7]);
    conv(&mut out, "output", cfg.out_channels, dim * 2, 3, b);
    out
}

pub fn parameter_count(cfg: &RestormerConfig) -> usize {
    parameter_shapes(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Checks names and shapes; returns one error listing every problem.
pub fn check_weights(cfg: &RestormerConfig, sd: &StateDict) -> Result<()> {
    let expected: BTreeMap<String, Vec<usize>> = parameter_shapes(cfg).into_iter().collect();
    let mut issues = Vec::new();
    for (name, shape) in &expected {
        match sd.get(name) {
            None => issues.push(WeightIssue::Missing {
                name: name.clone(),
                expected: shape.clone(),
            }),
            Some(t) if t.shape() != shape.as_slice() => issues.push(WeightIssue::WrongShape {
                name: name.clone(),
                expected: shape.clone(),
                found: t.shape().to_vec(),
            }),
            Some(_) => {}
        }
    }
    for (name, t) in sd.iter() {
        if !expected.contains_key(name) {
            issues.push(WeightIssue::Unexpected {
                name: name.clone(),
                found: t.shape().to_vec(),
            });
        }
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ModelError::WeightMismatch {
            model: "Restormer".into(),
            issues,
        })
    }
}

/// Seeded random weights of the right shapes: convolutions scaled by 1/sqrt(fan_in),
/// norms near one, temperatures near one. For demos and tests, not for real use.
pub fn random_state_dict(cfg: &RestormerConfig, seed: u64) -> Result<StateDict> {
    let mut rng = SplitMix64::new(seed);
    let mut tensors = BTreeMap::new();
    for (name, shape) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("temperature") || name.contains(".body.weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| 0.02 * rng.normal()).collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let scale = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| scale * rng.normal()).collect()
        };
        tensors.insert(name, HostTensor::from_f32(shape, data)?);
    }
    Ok(StateDict::from_tensors(tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_config_has_published_parameter_count() {
        assert_eq!(parameter_count(&RestormerConfig::default()), 26_126_644);
    }

    #[test]
    fn random_weights_pass_the_check_and_infer_the_config() {
        let cfg = RestormerConfig {
            dim: 8,
            num_blocks: [1, 2, 1, 1],
            heads: [1, 2, 2, 4],
            ..Default::default()
        };
        let sd = random_state_dict(&cfg, 7).unwrap();
        check_weights(&cfg, &sd).unwrap();
        assert_eq!(RestormerConfig::infer_from_weights(&sd).unwrap(), cfg);
    }

    #[test]
    fn mismatch_lists_every_problem() {
        let cfg = RestormerConfig {
            dim: 8,
            num_blocks: [1, 1, 1, 1],
            num_refinement_blocks: 1,
            ..Default::default()
        };
        let mut tensors = random_state_dict(&cfg, 1).unwrap().into_tensors();
        tensors.remove("output.weight");
        tensors.insert(
            "latent.0.attn.temperature".into(),
            HostTensor::zeros(vec![3, 1, 1]),
        );
        tensors.insert("extra.weight".into(), HostTensor::zeros(vec![2]));
        let err = check_weights(&cfg, &StateDict::from_tensors(tensors))
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 problems"), "{err}");
        assert!(
            err.contains("missing      output.weight (expected shape [3, 16, 3, 3])"),
            "{err}"
        );
        assert!(
            err.contains("latent.0.attn.temperature: expected [8, 1, 1], found [3, 1, 1]"),
            "{err}"
        );
        assert!(err.contains("unexpected   extra.weight"), "{err}");
    }
}
