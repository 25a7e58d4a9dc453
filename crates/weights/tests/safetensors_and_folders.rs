//! safetensors reading and writing, HF folders and the errors a user can run into.

mod common;

use std::collections::BTreeMap;

use aperture_engine::{DType, HostTensor, TensorData};
use aperture_weights::{load, load_safetensors, read_json_config, save_safetensors, WeightsError};
use common::{fixture, Scratch};
use half::{bf16, f16};

fn sample() -> BTreeMap<String, HostTensor> {
    let mut m = BTreeMap::new();
    m.insert(
        "a.weight".to_string(),
        HostTensor::from_f32(vec![2, 3], vec![0.5, -1.0, 2.0, 3.25, -0.0, 1e-7]).unwrap(),
    );
    let h = TensorData::F16(
        [0.1f32, -7.5, 65504.0]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect(),
    );
    m.insert("b.half".to_string(), HostTensor::new(vec![3], h).unwrap());
    let b = TensorData::BF16(
        [1.0f32, -3.0e38]
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect(),
    );
    m.insert(
        "c.bf16".to_string(),
        HostTensor::new(vec![1, 2], b).unwrap(),
    );
    m.insert(
        "d.scalar".to_string(),
        HostTensor::from_f32(vec![], vec![42.0]).unwrap(),
    );
    m.insert(
        "e.empty".to_string(),
        HostTensor::from_f32(vec![0, 4], vec![]).unwrap(),
    );
    m
}

/// A safetensors file from a raw header and data section.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn round_trip_keeps_dtypes_shapes_and_bits() {
    let s = Scratch::new("roundtrip");
    let p = s.path("w.safetensors");
    save_safetensors(&p, &sample()).unwrap();
    let back = load_safetensors(&p).unwrap();
    assert_eq!(back.into_tensors(), sample());
    // The data section starts 8-byte aligned, as the format recommends.
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(n % 8, 0);
}

#[test]
fn written_header_is_standard_json() {
    let s = Scratch::new("header");
    let p = s.path("w.safetensors");
    save_safetensors(&p, &sample()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["b.half"]["dtype"], "F16");
    assert_eq!(header["c.bf16"]["shape"], serde_json::json!([1, 2]));
    assert_eq!(
        header["a.weight"]["data_offsets"],
        serde_json::json!([0, 24])
    );
    assert_eq!(bytes.len(), 8 + n + 24 + 6 + 4 + 4);
}

#[test]
fn python_written_integers_and_doubles_become_f32() {
    let sd = load_safetensors(&fixture("bare.safetensors")).unwrap();
    assert_eq!(
        sd.get("norm.num_batches_tracked").unwrap().to_f32_vec(),
        vec![123456.0]
    );
    assert_eq!(sd.get("norm.running_mean").unwrap().dtype(), DType::F32);
    assert_eq!(sd.get("norm.bias").unwrap().dtype(), DType::BF16);
}

#[test]
fn empty_file() {
    let s = Scratch::new("empty");
    let p = s.write("w.safetensors", b"");
    for err in [load(&p).unwrap_err(), load_safetensors(&p).unwrap_err()] {
        assert!(matches!(err, WeightsError::Empty { .. }), "{err}");
        assert!(
            err.to_string().contains("w.safetensors") && err.to_string().contains("empty"),
            "{err}"
        );
    }
}

#[test]
fn truncated_data_section() {
    let s = Scratch::new("trunc");
    let p = s.path("w.safetensors");
    save_safetensors(&p, &sample()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let cut = s.write("cut.safetensors", &bytes[..bytes.len() - 10]);
    let err = load(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // Cut inside the length field.
    let stub = s.write("stub.safetensors", &bytes[..5]);
    let err = load_safetensors(&stub).unwrap_err().to_string();
    assert!(
        err.contains("too short") && err.contains("truncated"),
        "{err}"
    );
    assert!(load(&stub).is_err());
}

#[test]
fn header_that_is_not_an_object() {
    let s = Scratch::new("not-object");
    let p = s.write("w.safetensors", &raw_safetensors("[1, 2, 3]  ", &[]));
    let err = load_safetensors(&p).unwrap_err().to_string();
    assert!(err.contains("not a JSON object"), "{err}");
    let p = s.write("v.safetensors", &raw_safetensors("{\"a\": ", &[]));
    let err = load(&p).unwrap_err().to_string();
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn header_longer_than_file() {
    let s = Scratch::new("long-header");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":");
    let p = s.write("w.safetensors", &bytes);
    let err = load(&p).unwrap_err().to_string();
    assert!(err.contains("header claims 1000 bytes"), "{err}");
}

#[test]
fn data_offsets_past_end_of_file() {
    let s = Scratch::new("offsets");
    let header = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let p = s.write("w.safetensors", &raw_safetensors(header, &[0u8; 8]));
    let err = load(&p).unwrap_err().to_string();
    assert!(
        err.contains("'x'") && err.contains("holds only 8 bytes"),
        "{err}"
    );
}

#[test]
fn size_mismatch_between_shape_and_offsets() {
    let s = Scratch::new("mismatch");
    let header = r#"{"x":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#;
    let p = s.write("w.safetensors", &raw_safetensors(header, &[0u8; 8]));
    let err = load(&p).unwrap_err().to_string();
    assert!(
        err.contains("needs 6 bytes") && err.contains("span 8"),
        "{err}"
    );
}

#[test]
fn unknown_dtype_names_tensor_and_dtype() {
    let s = Scratch::new("dtype");
    let header = r#"{"layer.scale":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
    let p = s.write("w.safetensors", &raw_safetensors(header, &[0u8; 2]));
    let err = load(&p).unwrap_err();
    assert!(
        matches!(err, WeightsError::UnsupportedDType { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("layer.scale") && err.to_string().contains("F8_E4M3"),
        "{err}"
    );
}

#[test]
fn images_and_text_are_not_weights() {
    let s = Scratch::new("not-weights");
    let png = s.write("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00");
    let err = load(&png).unwrap_err();
    assert!(matches!(err, WeightsError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("PNG image"), "{err}");
    let txt = s.write("notes.pt", b"hello, these are not weights\n");
    let err = load(&txt).unwrap_err().to_string();
    assert!(
        err.contains("text file") && err.contains("notes.pt"),
        "{err}"
    );
    let jpg = s.write(
        "x.bin",
        &[0xff, 0xd8, 0xff, 0xe0, 0, 0x10, b'J', b'F', b'I', b'F', 0],
    );
    assert!(load(&jpg).unwrap_err().to_string().contains("JPEG"));
}

#[test]
fn missing_file_is_an_io_error() {
    let err = load(std::path::Path::new("/nonexistent/weights.safetensors")).unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }), "{err}");
}

#[test]
fn data_parallel_prefix_is_stripped_everywhere() {
    let s = Scratch::new("prefix");
    let mut m = BTreeMap::new();
    m.insert(
        "module.conv.weight".to_string(),
        HostTensor::from_f32(vec![1], vec![1.0]).unwrap(),
    );
    m.insert(
        "head.bias".to_string(),
        HostTensor::from_f32(vec![1], vec![2.0]).unwrap(),
    );
    let p = s.path("dp.safetensors");
    save_safetensors(&p, &m).unwrap();
    let sd = load(&p).unwrap();
    assert_eq!(
        sd.keys().collect::<Vec<_>>(),
        vec!["conv.weight", "head.bias"]
    );

    m.insert(
        "conv.weight".to_string(),
        HostTensor::from_f32(vec![1], vec![3.0]).unwrap(),
    );
    save_safetensors(&p, &m).unwrap();
    let err = load(&p).unwrap_err().to_string();
    assert!(
        err.contains("'conv.weight'") && err.contains("module."),
        "{err}"
    );
}

#[test]
fn folder_with_model_safetensors_and_config() {
    let s = Scratch::new("folder");
    save_safetensors(&s.path("model.safetensors"), &sample()).unwrap();
    std::fs::write(s.path("config.json"), br#"{"dim": 48, "heads": [1, 2]}"#).unwrap();
    assert_eq!(load(&s.0).unwrap().into_tensors(), sample());
    let cfg = read_json_config(&s.0).unwrap().unwrap();
    assert_eq!(cfg["dim"], 48);
    // Given the weights file, the config beside it is found too.
    assert!(read_json_config(&s.path("model.safetensors"))
        .unwrap()
        .is_some());
}

#[test]
fn config_absent_or_malformed() {
    let s = Scratch::new("config");
    assert!(read_json_config(&s.0).unwrap().is_none());
    std::fs::write(s.path("config.json"), b"{not json").unwrap();
    let err = read_json_config(&s.0).unwrap_err();
    assert!(
        matches!(err, WeightsError::Json { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );
}

fn write_sharded(s: &Scratch) -> BTreeMap<String, HostTensor> {
    let all = sample();
    let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) = all
        .clone()
        .into_iter()
        .partition(|(k, _)| k < &"c".to_string());
    save_safetensors(&s.path("model-00001-of-00002.safetensors"), &first).unwrap();
    save_safetensors(&s.path("model-00002-of-00002.safetensors"), &second).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = all
        .keys()
        .map(|k| {
            let shard = if first.contains_key(k) {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            (k.clone(), serde_json::Value::from(shard))
        })
        .collect();
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
    std::fs::write(s.path("model.safetensors.index.json"), index.to_string()).unwrap();
    all
}

#[test]
fn sharded_folder_loads_every_shard() {
    let s = Scratch::new("sharded");
    let all = write_sharded(&s);
    assert_eq!(load(&s.0).unwrap().into_tensors(), all);
}

#[test]
fn missing_shard_is_named() {
    let s = Scratch::new("missing-shard");
    write_sharded(&s);
    std::fs::remove_file(s.path("model-00002-of-00002.safetensors")).unwrap();
    let err = load(&s.0).unwrap_err();
    assert!(matches!(err, WeightsError::MissingShard { .. }), "{err}");
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn pytorch_model_bin_folder_and_single_file_folder() {
    let s = Scratch::new("bin-folder");
    std::fs::copy(fixture("nested_module.pt"), s.path("pytorch_model.bin")).unwrap();
    let sd = load(&s.0).unwrap();
    assert_eq!(
        sd.keys().collect::<Vec<_>>(),
        vec!["head.bias", "head.weight"]
    );

    let t = Scratch::new("single-file-folder");
    std::fs::copy(fixture("bare.pt"), t.path("net_g_latest.pth")).unwrap();
    assert_eq!(load(&t.0).unwrap().len(), 10);
    std::fs::copy(fixture("bare.safetensors"), t.path("other.safetensors")).unwrap();
    let err = load(&t.0).unwrap_err().to_string();
    assert!(
        err.contains("net_g_latest.pth") && err.contains("other.safetensors"),
        "{err}"
    );
}

#[test]
fn empty_folder_says_what_was_expected() {
    let s = Scratch::new("empty-folder");
    let err = load(&s.0).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("no weights"),
        "{err}"
    );
}
