//! torch.save archives: fixtures written by `tools/make_torch_like_checkpoint.py`
//! (CPython's pickler, torch's zip layout) compared with their safetensors twins, and
//! hand-built archives for the failure cases.

mod common;

use std::io::Read;

use aperture_engine::DType;
use aperture_weights::{load, load_torch, StateDict, WeightsError};
use common::{fixture, write_archive, Scratch};

/// Same names, shapes, dtypes and bit-identical values.
fn assert_same(got: &StateDict, want: &StateDict) {
    let got_keys: Vec<_> = got.keys().collect();
    let want_keys: Vec<_> = want.keys().collect();
    assert_eq!(got_keys, want_keys);
    for (name, w) in want.iter() {
        let g = got.get(name).unwrap();
        assert_eq!(g.shape(), w.shape(), "{name}");
        assert_eq!(g.to_f32_vec(), w.to_f32_vec(), "{name}");
    }
}

#[test]
fn bare_state_dict_matches_twin() {
    let sd = load(&fixture("bare.pt")).unwrap();
    let twin = load(&fixture("bare.safetensors")).unwrap();
    assert_same(&sd, &twin);
    // Float storages keep their type, everything else becomes f32.
    assert_eq!(sd.get("norm.weight").unwrap().dtype(), DType::F16);
    assert_eq!(sd.get("norm.bias").unwrap().dtype(), DType::BF16);
    assert_eq!(sd.get("norm.running_mean").unwrap().dtype(), DType::F32);
    let tracked = sd.get("norm.num_batches_tracked").unwrap();
    assert_eq!(tracked.shape(), &[] as &[usize]);
    assert_eq!(tracked.to_f32_vec(), vec![123456.0]);
    assert_eq!(sd.get("mask").unwrap().to_f32_vec(), vec![1.0, 0.0, 1.0]);
    assert_eq!(
        sd.get("pixels").unwrap().to_f32_vec(),
        vec![0.0, 128.0, 255.0]
    );
    // ids is the transpose of the storage [-5, 0, 7, 9] viewed as 2x2.
    assert_eq!(
        sd.get("ids").unwrap().to_f32_vec(),
        vec![-5.0, 7.0, 0.0, 9.0]
    );
    // The transposed view shares conv.weight's storage, starting at element 4.
    let w = sd.get("conv.weight").unwrap().to_f32_vec();
    let wt = sd.get("conv.weight_t").unwrap().to_f32_vec();
    assert_eq!(wt, vec![w[4], w[7], w[5], w[8], w[6], w[9]]);
}

#[test]
fn nested_checkpoint_with_prefix_and_optimizer_state() {
    let sd = load_torch(&fixture("nested_module.pt")).unwrap();
    let twin = load(&fixture("nested_module.safetensors")).unwrap();
    assert_same(&sd, &twin);
    assert_eq!(
        sd.keys().collect::<Vec<_>>(),
        vec!["head.bias", "head.weight"]
    );
}

#[test]
fn protocol4_parameters_prefer_ema_weights() {
    let sd = load(&fixture("params_ema_proto4.pt")).unwrap();
    let twin = load(&fixture("params_ema_proto4.safetensors")).unwrap();
    assert_same(&sd, &twin);
}

#[test]
fn needed_tensor_of_unsupported_type_is_named() {
    let err = load(&fixture("complex_weight.pt")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::Tensor { .. }), "{msg}");
    assert!(
        msg.contains("'weight'") && msg.contains("ComplexFloatStorage"),
        "{msg}"
    );
}

#[test]
fn truncated_archive_is_reported() {
    let s = Scratch::new("trunc-zip");
    let bytes = std::fs::read(fixture("bare.pt")).unwrap();
    let p = s.write("cut.pt", &bytes[..bytes.len() / 2]);
    let err = load(&p).unwrap_err();
    assert!(matches!(err, WeightsError::Zip { .. }), "{err}");
    assert!(
        err.to_string().contains("cut.pt") && err.to_string().contains("truncated"),
        "{err}"
    );
}

/// `{'w': tensor}` with one storage of the given class holding two elements.
fn one_tensor_pickle(storage_class: &str) -> Vec<u8> {
    let mut p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
    p.extend_from_slice(format!("ctorch\n{storage_class}\n").as_bytes());
    p.extend_from_slice(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

#[test]
fn big_endian_archive_and_any_folder_name() {
    let s = Scratch::new("big-endian");
    let p = s.path("be.pt");
    let data: Vec<u8> = [1.5f32, -2.25]
        .iter()
        .flat_map(|x| x.to_be_bytes())
        .collect();
    let pkl = one_tensor_pickle("FloatStorage");
    write_archive(
        &p,
        &[
            ("weights_v2/data.pkl", &pkl),
            ("weights_v2/byteorder", b"big"),
            ("weights_v2/data/0", &data),
        ],
    );
    let sd = load(&p).unwrap();
    assert_eq!(sd.get("w").unwrap().to_f32_vec(), vec![1.5, -2.25]);
}

#[test]
fn missing_storage_entry_names_tensor() {
    let s = Scratch::new("no-storage");
    let p = s.path("m.pt");
    write_archive(
        &p,
        &[("archive/data.pkl", &one_tensor_pickle("FloatStorage"))],
    );
    let err = load(&p).unwrap_err().to_string();
    assert!(err.contains("'w'") && err.contains("data/0"), "{err}");
}

#[test]
fn unknown_storage_class_is_an_error_only_when_needed() {
    let s = Scratch::new("unknown-storage");
    let p = s.path("f8.pt");
    write_archive(
        &p,
        &[
            (
                "archive/data.pkl",
                &one_tensor_pickle("Float8_e4m3fnStorage"),
            ),
            ("archive/data/0", &[0, 0]),
        ],
    );
    let err = load(&p).unwrap_err().to_string();
    assert!(
        err.contains("torch.Float8_e4m3fnStorage") && err.contains("'w'"),
        "{err}"
    );
}

#[test]
fn unsupported_opcode_is_reported_with_position() {
    let s = Scratch::new("opcode");
    let p = s.path("ext.pt");
    // EXT1 (0x82) uses the copyreg extension registry, which torch.save never does.
    write_archive(&p, &[("archive/data.pkl", b"\x80\x02\x82\x01.")]);
    let err = load(&p).unwrap_err();
    assert!(
        matches!(err, WeightsError::Pickle { offset: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("0x82"), "{err}");
}

#[test]
fn pickle_cut_short_is_an_error() {
    let s = Scratch::new("short-pickle");
    let p = s.path("short.pt");
    let full = one_tensor_pickle("FloatStorage");
    write_archive(&p, &[("archive/data.pkl", &full[..full.len() - 5])]);
    let err = load(&p).unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { .. }), "{err}");
}

#[test]
fn whole_pickled_module_is_explained() {
    let s = Scratch::new("module");
    let p = s.path("model.pt");
    write_archive(
        &p,
        &[(
            "archive/data.pkl",
            b"\x80\x02cmymodels\nNet\n)\x81}X\x01\x00\x00\x00aK\x01sb.",
        )],
    );
    let err = load(&p).unwrap_err().to_string();
    assert!(
        err.contains("mymodels.Net") && err.contains("state_dict()"),
        "{err}"
    );
}

#[test]
fn torchscript_archive_is_explained() {
    let s = Scratch::new("jit");
    let p = s.path("scripted.pt");
    write_archive(
        &p,
        &[
            ("scripted/constants.pkl", b"\x80\x02).".as_slice()),
            ("scripted/code/__torch__.py", b""),
        ],
    );
    let err = load(&p).unwrap_err().to_string();
    assert!(err.contains("TorchScript"), "{err}");
}

#[test]
fn legacy_format_matches_twins() {
    let sd = load(&fixture("legacy_bare.pt")).unwrap();
    assert_same(&sd, &load(&fixture("bare.safetensors")).unwrap());
    assert_eq!(sd.get("norm.weight").unwrap().dtype(), DType::F16);
    // The optimizer's complex storage sits before the weights' and is stepped over.
    let sd = load_torch(&fixture("legacy_nested_module.pt")).unwrap();
    assert_same(&sd, &load(&fixture("nested_module.safetensors")).unwrap());
}

#[test]
fn every_truncation_of_a_legacy_file_is_an_error() {
    let s = Scratch::new("legacy-cut");
    let bytes = std::fs::read(fixture("legacy_bare.pt")).unwrap();
    for cut in 0..bytes.len() {
        let p = s.write("cut.pt", &bytes[..cut]);
        assert!(load(&p).is_err(), "cut at {cut} loaded");
    }
    let p = s.write("old.pth", &bytes[..40]);
    let err = load(&p).unwrap_err();
    assert!(
        matches!(
            err,
            WeightsError::Pickle {
                part: "the file",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn load_torch_rejects_a_safetensors_file() {
    let err = load_torch(&fixture("bare.safetensors")).unwrap_err();
    assert!(matches!(err, WeightsError::Zip { .. }), "{err}");
}

#[test]
fn fixture_archives_store_entries_uncompressed() {
    // Guards the fixtures' realism: torch.save writes stored entries, data.pkl first.
    let mut zip = zip::ZipArchive::new(std::fs::File::open(fixture("bare.pt")).unwrap()).unwrap();
    let mut first = zip.by_index(0).unwrap();
    assert_eq!(first.name().unwrap(), "archive/data.pkl");
    assert_eq!(first.compression(), zip::CompressionMethod::Stored);
    let mut head = [0u8; 2];
    first.read_exact(&mut head).unwrap();
    assert_eq!(head, [0x80, 0x02]);
}

#[test]
fn every_truncation_of_an_archive_is_an_error() {
    let s = Scratch::new("every-cut");
    let bytes = std::fs::read(fixture("params_ema_proto4.pt")).unwrap();
    for cut in 0..bytes.len() {
        let p = s.write("cut.pt", &bytes[..cut]);
        assert!(load(&p).is_err(), "cut at {cut} loaded");
    }
    let p = s.write("whole.pt", &bytes);
    assert!(load(&p).is_ok());
}
