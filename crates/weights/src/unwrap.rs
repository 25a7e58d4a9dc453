//! Finding the state dict inside whatever object a checkpoint holds.
//!
//! Training scripts save either the bare `model.state_dict()` or a dict such as
//! `{'epoch': 3, 'model_state_dict': ..., 'optimizer_state_dict': ...}`. The weights
//! are taken from the first of [`WRAPPER_KEYS`] whose value is a dict holding tensors
//! (looked up recursively, so `{'state_dict': {'model': {...}}}` works too); if none
//! matches, the top-level dict's own tensor entries are the weights. Entries that are
//! not tensors (epoch counters, optimizer state, config objects) are ignored.

use std::collections::HashMap;
use std::rc::Rc;

use crate::pickle::{TensorRef, Value};

/// Keys under which checkpoints nest their weights, most preferred first: the
/// conventional names, then BasicSR's EMA weights before its plain ones, then the
/// generic `model` / `ema`.
pub const WRAPPER_KEYS: [&str; 6] = [
    "model_state_dict",
    "state_dict",
    "params_ema",
    "params",
    "model",
    "ema",
];

/// Nesting deeper than this is not searched (and guards against cyclic pickles).
const MAX_DEPTH: usize = 4;

pub(crate) type TensorEntry = (String, Rc<Result<TensorRef, String>>);

/// Returns the `(name, tensor)` entries of the chosen state dict, in file order.
pub(crate) fn select_state_dict(root: &Value) -> Result<Vec<TensorEntry>, String> {
    match root {
        Value::Dict(_) => find(root, 0).ok_or_else(|| describe_missing(root)),
        Value::Tensor(_) => Err("the file holds a single tensor, not a dict of named tensors".into()),
        Value::Opaque(what) => Err(format!(
            "the file holds a pickled Python object ({what}), e.g. a whole model saved with torch.save(model); \
             save model.state_dict() instead"
        )),
        other => Err(format!("the file holds a {}, not a dict of tensors", other.kind())),
    }
}

fn find(dict: &Value, depth: usize) -> Option<Vec<TensorEntry>> {
    if depth > MAX_DEPTH {
        return None;
    }
    for key in WRAPPER_KEYS {
        if let Some(inner @ Value::Dict(_)) = dict.dict_get(key) {
            if let Some(found) = find(&inner, depth + 1) {
                return Some(found);
            }
        }
    }
    let tensors = direct_tensors(dict);
    (!tensors.is_empty()).then_some(tensors)
}

fn direct_tensors(dict: &Value) -> Vec<TensorEntry> {
    let Value::Dict(d) = dict else {
        return Vec::new();
    };
    let d = d.borrow();
    let mut out: Vec<TensorEntry> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (k, v) in d.iter() {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            // A repeated key replaces the earlier value, as in Python.
            match index.get(name.as_str()) {
                Some(&i) => out[i].1 = t.clone(),
                None => {
                    index.insert(name, out.len());
                    out.push((name.clone(), t.clone()));
                }
            }
        }
    }
    out
}

fn describe_missing(root: &Value) -> String {
    let keys: Vec<String> = match root {
        Value::Dict(d) => d
            .borrow()
            .iter()
            .take(20)
            .map(|(k, v)| {
                format!(
                    "{} ({})",
                    k.as_str().unwrap_or("<non-string key>"),
                    v.kind()
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    format!(
        "no tensors found: neither the top-level dict nor any of {WRAPPER_KEYS:?} holds tensors; top-level entries: [{}]",
        keys.join(", ")
    )
}
