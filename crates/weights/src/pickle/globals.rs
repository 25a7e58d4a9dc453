//! The torch callables and persistent ids that a `torch.save` pickle refers to.

use std::rc::Rc;

use super::value::{StorageRef, TensorRef, Value};
use crate::elem::ElemType;

/// Resolves a persistent id `('storage', <storage class>, key, location, numel)`.
pub(crate) fn persistent_load(pid: &Value) -> Value {
    let Some(items) = pid.items() else {
        return Value::opaque(format!("persistent id of type {}", pid.kind()));
    };
    match items.as_slice() {
        [Value::Str(tag), class, Value::Str(key), ..] if tag == "storage" => {
            let elem = match class {
                Value::Global(g) => storage_elem(&g.0, &g.1),
                other => Err(other.kind()),
            };
            // Legacy files add view metadata `(view_key, offset, size)` for storage views.
            let offset = items
                .get(5)
                .and_then(Value::items)
                .and_then(|v| v.get(1).and_then(Value::as_usize))
                .unwrap_or(0);
            Value::Storage(Rc::new(StorageRef {
                elem,
                key: key.clone(),
                offset,
            }))
        }
        _ => Value::opaque("persistent id that is not a storage"),
    }
}

fn storage_elem(module: &str, name: &str) -> Result<ElemType, String> {
    let known = match (module, name) {
        // An untyped storage holds raw bytes.
        ("torch.storage", "UntypedStorage") | ("torch", "UntypedStorage") => Some(ElemType::U8),
        ("torch", n) => ElemType::from_torch_storage(n),
        _ => None,
    };
    known.ok_or_else(|| format!("{module}.{name}"))
}

/// Calls a module-level torch function with the given argument tuple. Unknown
/// callables yield opaque values, or unloadable tensors for torch's `_rebuild_*`
/// family (quantised, sparse, ...), so that the rest of the file still loads.
pub(crate) fn call_global(module: &str, name: &str, args: Value) -> Value {
    let args = args.items().unwrap_or_default();
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2")
        | ("torch._utils", "_rebuild_tensor_v3")
        | ("torch._utils", "_rebuild_tensor") => Value::Tensor(Rc::new(rebuild_tensor(&args))),
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => match args.first() {
            Some(t @ Value::Tensor(_)) => t.clone(),
            _ => Value::Tensor(Rc::new(Err(format!(
                "{module}.{name} without a tensor argument"
            )))),
        },
        // Tensor subclasses: `_rebuild_from_type_v2(func, new_type, args, state)` calls func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") => match args.as_slice() {
            // Not itself again: a self-referencing list could otherwise recurse forever.
            [Value::Global(f), _, inner, ..] if f.1 != "_rebuild_from_type_v2" => {
                super::vm::call(&Value::Global(f.clone()), inner.clone())
            }
            _ => Value::Tensor(Rc::new(Err(format!("malformed {module}.{name} arguments")))),
        },
        ("torch", "Size") => match args.into_iter().next() {
            Some(dims) => Value::tuple(dims.items().unwrap_or_default()),
            None => Value::tuple(Vec::new()),
        },
        (m, n) if m.starts_with("torch") && n.starts_with("_rebuild") => {
            Value::Tensor(Rc::new(Err(format!(
                "tensors built by {m}.{n} are not supported (only dense CPU tensors are)"
            ))))
        }
        (m, n) => Value::opaque(format!("{m}.{n}(...)")),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, ...)`.
fn rebuild_tensor(args: &[Value]) -> Result<TensorRef, String> {
    let [storage, offset, size, stride, ..] = args else {
        return Err(format!(
            "_rebuild_tensor_v2 called with {} arguments, expected at least 4",
            args.len()
        ));
    };
    let storage = match storage {
        Value::Storage(s) => s.as_ref().clone(),
        other => {
            return Err(format!(
                "tensor storage is a {}, not a saved storage",
                other.kind()
            ))
        }
    };
    let offset = offset
        .as_usize()
        .ok_or("storage offset is not a non-negative integer")?;
    let dims = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
        let items = v
            .items()
            .ok_or_else(|| format!("tensor {what} is a {}, not a tuple", v.kind()))?;
        items
            .iter()
            .map(|d| {
                d.as_usize()
                    .ok_or_else(|| format!("tensor {what} holds a non-integer or negative value"))
            })
            .collect()
    };
    let size = dims(size, "size")?;
    let stride = dims(stride, "stride")?;
    if size.len() != stride.len() {
        return Err(format!(
            "size {size:?} and stride {stride:?} differ in rank"
        ));
    }
    Ok(TensorRef {
        storage,
        offset,
        size,
        stride,
    })
}
