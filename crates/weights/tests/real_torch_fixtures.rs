//! Checkpoints written by a real `torch.save` (PyTorch 2.11, see
//! tests/fixtures/restormer/README.md) against the safetensors twin in the same folder.

use std::path::PathBuf;

use aperture_engine::DType;
use aperture_weights::{load, load_torch};
use half::f16;

fn withbias(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/restormer/withbias")
        .join(name)
}

#[test]
fn nested_checkpoint_with_module_prefix_matches_safetensors() {
    let twin = load(&withbias("model.safetensors")).unwrap();
    let sd = load_torch(&withbias("checkpoint.pt")).unwrap();
    assert!(twin.len() > 100, "twin holds {} tensors", twin.len());
    assert_eq!(
        sd.keys().collect::<Vec<_>>(),
        twin.keys().collect::<Vec<_>>()
    );
    for (name, want) in twin.iter() {
        let got = sd.get(name).unwrap();
        assert_eq!(got.dtype(), DType::F32, "{name}");
        assert_eq!(got.shape(), want.shape(), "{name}");
        assert_eq!(got.to_f32_vec(), want.to_f32_vec(), "{name}");
    }
}

#[test]
fn bare_fp16_state_dict_keeps_half_storage() {
    let twin = load(&withbias("model.safetensors")).unwrap();
    let sd = load(&withbias("bare_fp16.pt")).unwrap();
    assert_eq!(sd.len(), twin.len());
    for (name, want) in twin.iter() {
        let got = sd.get(name).unwrap();
        assert_eq!(got.dtype(), DType::F16, "{name}");
        assert_eq!(got.shape(), want.shape(), "{name}");
        // torch's .half() rounds to nearest even, as half's from_f32 does.
        let expect: Vec<f32> = want
            .to_f32_vec()
            .iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(got.to_f32_vec(), expect, "{name}");
    }
}

#[test]
fn folder_load_picks_model_safetensors() {
    let dir = withbias("");
    let sd = load(&dir).unwrap();
    assert_eq!(sd, load(&withbias("model.safetensors")).unwrap());
    assert!(aperture_weights::read_json_config(&dir).unwrap().is_some());
}
