//! The pre-1.6 `torch.save` format (still written with
//! `_use_new_zipfile_serialization=False`): five pickles in a row, then the storages.
//!
//! Pickles: the magic number `0x1950a86a20f9469cfc6c`; the protocol version (1001);
//! system info (`little_endian`, type sizes); the object itself, whose storages are
//! persistent ids `('storage', class, key, location, numel, view_metadata)`; the
//! sorted list of storage keys. Each storage then follows in that order as an int64
//! element count and the raw elements.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use aperture_engine::HostTensor;

use crate::error::{Result, WeightsError};
use crate::pickle::{unpickle_at, Unpickled, Value};
use crate::torch::materialise;
use crate::unwrap::select_state_dict;

/// The magic number's LONG1 payload, as the first pickle holds it.
pub(crate) const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// True when the file's first bytes hold the legacy magic number pickle.
pub(crate) fn is_legacy(head: &[u8]) -> bool {
    head.first() == Some(&0x80) && head.windows(MAGIC.len()).take(24).any(|w| w == MAGIC)
}

pub(crate) fn read(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).map_err(|e| WeightsError::io(path, e))?;
    let checkpoint = |reason: String| WeightsError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let next = |start: usize| -> Result<Unpickled> {
        unpickle_at(&bytes, start).map_err(|e| WeightsError::Pickle {
            path: path.to_path_buf(),
            part: "the file",
            offset: e.offset,
            reason: e.reason,
        })
    };
    if !is_legacy(&bytes) {
        return Err(checkpoint("no legacy torch.save magic number".into()));
    }
    let magic = next(0)?;
    let version = next(magic.end)?;
    if version.value.as_usize() != Some(1001) {
        return Err(checkpoint(format!(
            "unsupported legacy protocol version ({})",
            version.value.kind()
        )));
    }
    let sys_info = next(version.end)?;
    let big_endian = matches!(
        sys_info.value.dict_get("little_endian"),
        Some(Value::Bool(false))
    );
    let main = next(sys_info.end)?;
    let keys = next(main.end)?;
    let key_list: Vec<String> = keys
        .value
        .items()
        .ok_or_else(|| checkpoint("storage key list missing after the object".into()))?
        .iter()
        .map(|k| k.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| checkpoint("storage keys are not strings".into()))?;

    let ranges = storage_ranges(&bytes, keys.end, &key_list, &main, big_endian);
    let entries = select_state_dict(&main.value).map_err(checkpoint)?;
    let mut out = BTreeMap::new();
    for (name, tensor) in entries {
        let tensor_err = |reason: String| WeightsError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let t = tensor
            .as_ref()
            .as_ref()
            .map_err(|r| tensor_err(r.clone()))?;
        let range = match ranges.get(&t.storage.key) {
            Some(Ok(r)) => r.clone(),
            Some(Err(reason)) => return Err(tensor_err(reason.clone())),
            None => {
                return Err(tensor_err(format!(
                    "storage {} is not in the file",
                    t.storage.key
                )))
            }
        };
        let host = materialise(t, &bytes[range], big_endian).map_err(tensor_err)?;
        out.insert(name, host);
    }
    Ok(out)
}

/// Byte ranges of each storage's elements. Walking stops at the first storage whose
/// size cannot be known (unknown type, truncation); later ones are unreadable, which
/// is an error only for the tensors that use them.
fn storage_ranges(
    bytes: &[u8],
    mut pos: usize,
    keys: &[String],
    main: &Unpickled,
    big_endian: bool,
) -> HashMap<String, std::result::Result<std::ops::Range<usize>, String>> {
    let elems: HashMap<&str, _> = main
        .storages
        .iter()
        .map(|s| (s.key.as_str(), &s.elem))
        .collect();
    let mut out = HashMap::new();
    let mut blocked: Option<String> = None;
    for key in keys {
        if let Some(reason) = &blocked {
            out.insert(key.clone(), Err(reason.clone()));
            continue;
        }
        let range = (|| {
            let elem_size = match elems.get(key.as_str()) {
                Some(Ok(e)) => e.size(),
                // Still skippable when the element size is known.
                Some(Err(class)) => match unsupported_elem_size(class) {
                    Some(n) => n,
                    None => {
                        return Err(format!(
                            "storage {key} has type {class}, which is not supported"
                        ))
                    }
                },
                None => return Err(format!("storage {key} is listed but never used")),
            };
            let head: [u8; 8] = bytes
                .get(pos..pos + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("storage {key}: file ends before its size (truncated?)"))?;
            let numel = if big_endian {
                i64::from_be_bytes(head)
            } else {
                i64::from_le_bytes(head)
            };
            let nbytes = usize::try_from(numel)
                .ok()
                .and_then(|n| n.checked_mul(elem_size))
                .ok_or_else(|| format!("storage {key}: invalid element count {numel}"))?;
            let start = pos + 8;
            let end = start
                .checked_add(nbytes)
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| {
                    format!("storage {key}: file ends inside its {nbytes} bytes (truncated?)")
                })?;
            Ok(start..end)
        })();
        match &range {
            Ok(r) => pos = r.end,
            Err(reason) => blocked = Some(format!("{reason}; storages after it cannot be located")),
        }
        out.insert(key.clone(), range);
    }
    out
}

/// Element sizes of storage types we cannot decode but must step over.
fn unsupported_elem_size(class: &str) -> Option<usize> {
    let name = class.strip_prefix("torch.")?;
    Some(match name {
        "ComplexDoubleStorage" => 16,
        "ComplexFloatStorage" => 8,
        "ComplexHalfStorage" | "QInt32Storage" => 4,
        n if n.starts_with("Float8") => 1,
        "QInt8Storage" | "QUInt8Storage" | "QUInt4x2Storage" | "QUInt2x4Storage" => 1,
        _ => return None,
    })
}
