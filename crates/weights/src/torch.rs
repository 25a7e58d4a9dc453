//! PyTorch checkpoints written by `torch.save` (zip format, torch >= 1.6).
//!
//! The archive holds `<prefix>/data.pkl` (the pickled object), `<prefix>/data/<key>`
//! (one raw little-endian storage per key), `<prefix>/byteorder` and
//! `<prefix>/version`; `<prefix>` is arbitrary (`archive`, or the file stem in older
//! versions). Tensors in the pickle refer to storages by key.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use aperture_engine::HostTensor;

use crate::elem::decode;
use crate::error::{Result, WeightsError};
use crate::pickle::{unpickle, TensorRef};
use crate::unwrap::select_state_dict;

/// Reads the tensors of a torch.save archive (after choosing the state dict inside it).
pub(crate) fn read(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let zip_err = |reason: String| WeightsError::Zip {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
    if file.metadata().map(|m| m.len()).unwrap_or(1) == 0 {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| zip_err(format!("{e} (the file is truncated or not a zip archive)")))?;

    // Entry names torch writes are ASCII; undecodable names cannot be ours and are skipped.
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let pkl = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.matches('/').count())
        .cloned();
    let Some(pkl) = pkl else {
        let hint = if names
            .iter()
            .any(|n| n.ends_with("constants.pkl") || n.contains("/code/"))
        {
            "it is a TorchScript archive (torch.jit.save); save the model's state_dict() with torch.save instead"
        } else {
            "it has no data.pkl, so torch.save did not write it"
        };
        return Err(zip_err(hint.to_string()));
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];

    let big_endian = match read_entry(&mut zip, &format!("{prefix}byteorder")) {
        Ok(b) => match String::from_utf8_lossy(&b).trim() {
            "little" => false,
            "big" => true,
            other => return Err(zip_err(format!("unknown byteorder {other:?}"))),
        },
        Err(EntryError::Missing) => false,
        Err(EntryError::Read(e)) => return Err(zip_err(e)),
    };

    let pickle_bytes = read_entry(&mut zip, &pkl).map_err(|e| zip_err(e.to_string()))?;
    let root = unpickle(&pickle_bytes).map_err(|e| WeightsError::Pickle {
        path: path.to_path_buf(),
        part: "data.pkl",
        offset: e.offset,
        reason: e.reason,
    })?;
    let entries = select_state_dict(&root).map_err(|reason| WeightsError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })?;

    // Several tensors may share one storage (views, tied weights): read each once, and
    // drop it after its last user so peak memory stays near one copy of the weights.
    let mut users: HashMap<String, usize> = HashMap::new();
    for (_, t) in &entries {
        if let Ok(t) = t.as_ref() {
            *users.entry(t.storage.key.clone()).or_default() += 1;
        }
    }
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
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
        let key = &t.storage.key;
        if !storages.contains_key(key) {
            let bytes = read_entry(&mut zip, &format!("{prefix}data/{key}"))
                .map_err(|e| tensor_err(format!("storage data/{key}: {e}")))?;
            storages.insert(key.clone(), bytes);
        }
        let bytes = storages.get(key).map(Vec::as_slice).unwrap_or_default();
        let host = materialise(t, bytes, big_endian).map_err(tensor_err)?;
        out.insert(name, host);
        if let Some(n) = users.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                storages.remove(key);
            }
        }
    }
    Ok(out)
}

enum EntryError {
    Missing,
    Read(String),
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryError::Missing => f.write_str("entry is missing from the archive"),
            EntryError::Read(e) => f.write_str(e),
        }
    }
}

fn read_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
) -> Result<Vec<u8>, EntryError> {
    let mut entry = match zip.by_name(name) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => return Err(EntryError::Missing),
        Err(e) => return Err(EntryError::Read(format!("{name}: {e}"))),
    };
    let mut buf = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0).min(1 << 30));
    entry
        .read_to_end(&mut buf)
        .map_err(|e| EntryError::Read(format!("{name}: {e} (truncated archive?)")))?;
    Ok(buf)
}

/// Copies the elements a (possibly strided) view selects out of its storage bytes.
pub(crate) fn materialise(
    t: &TensorRef,
    bytes: &[u8],
    big_endian: bool,
) -> Result<HostTensor, String> {
    let elem = t
        .storage
        .elem
        .clone()
        .map_err(|class| format!("storage type {class} is not supported"))?;
    let es = elem.size();
    if !bytes.len().is_multiple_of(es) {
        return Err(format!(
            "storage of {} bytes is not a whole number of {es}-byte elements",
            bytes.len()
        ));
    }
    // Legacy storage views start part-way into their root storage.
    let bytes = bytes
        .get(t.storage.offset.saturating_mul(es)..)
        .unwrap_or_default();
    let storage_len = bytes.len() / es;
    let numel = t
        .size
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("tensor size overflows")?;
    let mut packed = Vec::new();
    if numel > 0 {
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| x.checked_add(acc))
            })
            .ok_or("tensor extent overflows")?;
        if last >= storage_len {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} but the storage holds {storage_len}",
                t.offset, t.size, t.stride
            ));
        }
        if is_contiguous(&t.size, &t.stride) {
            packed.extend_from_slice(&bytes[t.offset * es..(t.offset + numel) * es]);
        } else {
            packed.reserve(numel * es);
            gather(t, bytes, es, &mut packed);
        }
    }
    HostTensor::new(t.size.clone(), decode(&packed, elem, big_endian)).map_err(|e| e.to_string())
}

fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// Row-major walk over every index of the view (bounds checked by the caller).
fn gather(t: &TensorRef, bytes: &[u8], es: usize, out: &mut Vec<u8>) {
    let rank = t.size.len();
    let mut idx = vec![0usize; rank];
    loop {
        let pos = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&bytes[pos * es..(pos + 1) * es]);
        // Advance the odometer; done when every digit has wrapped.
        let mut dim = rank;
        loop {
            if dim == 0 {
                return;
            }
            dim -= 1;
            idx[dim] += 1;
            if idx[dim] < t.size[dim] {
                break;
            }
            idx[dim] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::ElemType;
    use crate::pickle::StorageRef;

    fn view(offset: usize, size: Vec<usize>, stride: Vec<usize>) -> TensorRef {
        TensorRef {
            storage: StorageRef {
                elem: Ok(ElemType::F32),
                key: "0".into(),
                offset: 0,
            },
            offset,
            size,
            stride,
        }
    }

    fn storage(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn transposed_view_is_materialised() {
        // A 2x3 row-major storage viewed as its 3x2 transpose.
        let t = materialise(&view(0, vec![3, 2], vec![1, 3]), &storage(6), false).unwrap();
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.to_f32_vec(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn offset_slice_of_shared_storage() {
        let t = materialise(&view(2, vec![2, 2], vec![2, 1]), &storage(6), false).unwrap();
        assert_eq!(t.to_f32_vec(), vec![2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn view_past_storage_end_is_an_error() {
        let err = materialise(&view(4, vec![2, 2], vec![2, 1]), &storage(6), false).unwrap_err();
        assert!(err.contains("storage holds 6"), "{err}");
    }

    #[test]
    fn scalar_and_empty_tensors() {
        let s = materialise(&view(1, vec![], vec![]), &storage(2), false).unwrap();
        assert_eq!(s.to_f32_vec(), vec![1.0]);
        let e = materialise(&view(0, vec![0, 3], vec![3, 1]), &storage(0), false).unwrap();
        assert_eq!(e.numel(), 0);
    }

    #[test]
    fn unknown_storage_type_is_reported() {
        let mut t = view(0, vec![1], vec![1]);
        t.storage.elem = Err("torch.ComplexFloatStorage".into());
        let err = materialise(&t, &storage(2), false).unwrap_err();
        assert!(err.contains("torch.ComplexFloatStorage"), "{err}");
    }
}
