//! The deterministic tensor fill of `tools/dfine_golden.py`: SplitMix64 over a seed
//! derived from the tensor's name. Rebuilds the large golden models (e.g. the
//! dfine_x_coco shapes, ~250 MB) bit-exactly from a small manifest instead of storing
//! their weights.

use std::collections::BTreeMap;

use aperture_engine::HostTensor;
use aperture_weights::StateDict;
use serde_json::Value;

use crate::error::{ModelError, Result};

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `dfine_golden.name_seed(name)`.
pub fn name_seed(name: &str) -> u64 {
    ((crc32(name.as_bytes()) as u128 * 2_654_435_761 + 12_345) & u64::MAX as u128) as u64
}

/// `dfine_golden.uniform(name_seed(name), n)` scaled to `[lo, hi)` in f64, then f32.
pub fn fill(name: &str, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let seed = name_seed(name);
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

fn bad(what: &str) -> ModelError {
    ModelError::Config(format!("golden manifest: {what}"))
}

/// Rebuilds the weights a manifest describes: per tensor a `shape` and either a
/// `fill: [name, lo, hi]` or literal `values`.
pub fn materialize(manifest: &Value) -> Result<StateDict> {
    let tensors = manifest["tensors"]
        .as_object()
        .ok_or_else(|| bad("no 'tensors' object"))?;
    let mut out = BTreeMap::new();
    for (key, e) in tensors {
        let shape = e["shape"]
            .as_array()
            .ok_or_else(|| bad(&format!("{key}: no shape")))?
            .iter()
            .map(|v| v.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad(&format!("{key}: shape entries must be integers")))?;
        let n = shape.iter().product();
        let data = match (e.get("fill"), e.get("values")) {
            (Some(f), _) => match (f[0].as_str(), f[1].as_f64(), f[2].as_f64()) {
                (Some(name), Some(lo), Some(hi)) => fill(name, n, lo, hi),
                _ => return Err(bad(&format!("{key}: fill must be [name, lo, hi]"))),
            },
            (None, Some(Value::Array(vals))) => vals
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| bad(&format!("{key}: values must be numbers")))?,
            _ => return Err(bad(&format!("{key}: needs fill or values"))),
        };
        out.insert(key.clone(), HostTensor::from_f32(shape, data)?);
    }
    Ok(StateDict::from_tensors(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_the_python_generator() {
        // dfine_golden.uniform(dfine_golden.name_seed("pixel_values"), 3)
        let v = fill("pixel_values", 3, 0.0, 1.0);
        assert_eq!(v, vec![0.148_040_3, 0.423_079_43, 0.054_527_46]);
    }

    #[test]
    fn malformed_manifests_are_errors() {
        let m: Value = serde_json::json!({"tensors": {"w": {"shape": [2]}}});
        assert!(materialize(&m)
            .unwrap_err()
            .to_string()
            .contains("needs fill or values"));
        let m: Value = serde_json::json!({"tensors": {"w": {"shape": [2], "values": [1.0, 2.0]}}});
        assert_eq!(
            materialize(&m).unwrap().get("w").unwrap().to_f32_vec(),
            vec![1.0, 2.0]
        );
    }
}
