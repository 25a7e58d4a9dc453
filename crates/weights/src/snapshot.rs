//! Hugging Face style model folders: `model.safetensors`, a sharded
//! `model.safetensors.index.json`, `pytorch_model.bin` (a torch.save archive) or its
//! sharded index, optionally with a `config.json` beside them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use aperture_engine::HostTensor;
use serde_json::Value;

use crate::error::{Result, WeightsError};

/// File names tried in a folder, in order; a folder with none of them but exactly one
/// weights-looking file (`.safetensors`, `.pt`, `.pth`, `.bin`, `.ckpt`) loads that file.
pub const FOLDER_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

const WEIGHT_EXTENSIONS: [&str; 5] = ["safetensors", "pt", "pth", "bin", "ckpt"];

pub(crate) fn read_dir(dir: &Path) -> Result<BTreeMap<String, HostTensor>> {
    for name in FOLDER_FILES {
        let p = dir.join(name);
        if p.is_file() {
            return if name.ends_with(".index.json") {
                read_sharded(&p)
            } else {
                crate::load_file_raw(&p)
            };
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|e| WeightsError::io(dir, e))?;
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    candidates.sort();
    match candidates.as_slice() {
        [one] => crate::load_file_raw(one),
        [] => Err(WeightsError::Folder {
            path: dir.to_path_buf(),
            reason: format!("no weights found: expected one of {FOLDER_FILES:?} or a single .safetensors/.pt/.pth file"),
        }),
        many => Err(WeightsError::Folder {
            path: dir.to_path_buf(),
            reason: format!(
                "several weight files and none of {FOLDER_FILES:?}; pass the file to use: {}",
                many.iter().filter_map(|p| p.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// Loads every shard named in an index's `weight_map` and checks each listed tensor
/// was found in its shard.
fn read_sharded(index_path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bad = |reason: String| WeightsError::Folder {
        path: index_path.to_path_buf(),
        reason,
    };
    let text = std::fs::read(index_path).map_err(|e| WeightsError::io(index_path, e))?;
    let index: Value = serde_json::from_slice(&text).map_err(|e| WeightsError::Json {
        path: index_path.to_path_buf(),
        source: e,
    })?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));

    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("shard of '{tensor}' is not a file name")))?;
        let plain = Path::new(shard)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(bad(format!(
                "shard name {shard:?} must be a plain file name in the same folder"
            )));
        }
        shards.insert(shard.to_string());
    }
    let mut out = BTreeMap::new();
    for shard in &shards {
        let p = dir.join(shard);
        if !p.is_file() {
            return Err(WeightsError::MissingShard {
                path: index_path.to_path_buf(),
                shard: shard.clone(),
            });
        }
        out.extend(crate::load_file_raw(&p)?);
    }
    for (tensor, shard) in map {
        if !out.contains_key(tensor) {
            return Err(bad(format!(
                "'{tensor}' is listed in shard {shard} but that shard does not contain it"
            )));
        }
    }
    Ok(out)
}

/// Reads `config.json` from a model folder (or from the folder of a weights file).
/// `Ok(None)` when there is none; an error when it exists but is not valid JSON.
pub fn read_json_config(path: &Path) -> Result<Option<Value>> {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let p = dir.join("config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&p).map_err(|e| WeightsError::io(&p, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| WeightsError::Json { path: p, source: e })
}
