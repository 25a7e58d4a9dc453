//! Restormer on the CPU backend against fixtures written by the PyTorch reference
//! (tools/restormer_ref.py via tools/make_restormer_goldens.py).

use std::collections::BTreeMap;
use std::path::PathBuf;

use aperture_engine::{cpu::CpuBackend, relative_l2, DType, HostTensor};
use aperture_models::restormer::{load_restormer, RestormerConfig, RestormerRunner};
use aperture_weights::StateDict;

/// Relative L2 tolerance against PyTorch's fp32 output.
const TOL_F32: f64 = 1e-5;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/restormer")
        .join(case)
}

fn io(case: &str) -> (HostTensor, HostTensor, HostTensor) {
    let sd = aperture_weights::load(&fixture(case).join("io.safetensors")).expect("io fixture");
    let get = |n: &str| {
        sd.get(n)
            .unwrap_or_else(|| panic!("io.safetensors lacks {n}"))
            .clone()
    };
    (get("x"), get("y"), get("y_f64"))
}

fn run(config: RestormerConfig, sd: &StateDict, x: &HostTensor) -> HostTensor {
    let runner = RestormerRunner::new(CpuBackend::new(), config, sd, 0).expect("prepare");
    runner.enhance(x).expect("forward")
}

fn check_case(case: &str) {
    let (config, sd) = load_restormer(&fixture(case).join("model.safetensors")).expect("load");
    let (x, y, y64) = io(case);
    let out = run(config, &sd, &x);
    assert_eq!(out.shape(), y.shape());
    let err = relative_l2(&out.to_f32_vec(), &y.to_f32_vec());
    let err64 = relative_l2(&out.to_f32_vec(), &y64.to_f32_vec());
    println!("{case}: rel L2 vs torch fp32 {err:.3e}, vs torch fp64 {err64:.3e}");
    assert!(err <= TOL_F32, "{case}: relative L2 {err:e} > {TOL_F32:e}");
    assert!(
        err64 <= TOL_F32,
        "{case}: relative L2 vs fp64 {err64:e} > {TOL_F32:e}"
    );
}

#[test]
fn with_bias_layernorm_matches_pytorch() {
    check_case("withbias");
}

#[test]
fn bias_free_layernorm_matches_pytorch() {
    check_case("biasfree");
}

#[test]
fn conv_bias_config_matches_pytorch() {
    check_case("conv_bias");
}

#[test]
fn config_inferred_from_weights_equals_config_json() {
    for case in ["withbias", "biasfree", "conv_bias"] {
        let (from_json, sd) =
            load_restormer(&fixture(case).join("model.safetensors")).expect("load");
        let inferred = RestormerConfig::infer_from_weights(&sd).expect("infer");
        assert_eq!(inferred, from_json, "{case}");
    }
}

#[test]
fn torch_checkpoint_nested_under_model_state_dict_gives_same_output() {
    let dir = fixture("withbias");
    let (config, from_safetensors) =
        load_restormer(&dir.join("model.safetensors")).expect("safetensors");
    let (_, from_torch) = load_restormer(&dir.join("checkpoint.pt")).expect("checkpoint.pt");
    assert_eq!(from_torch.len(), from_safetensors.len());
    let (x, _, _) = io("withbias");
    let a = run(config.clone(), &from_safetensors, &x);
    let b = run(config, &from_torch, &x);
    assert_eq!(a, b, "checkpoint.pt must give bit-identical output");
}

#[test]
fn fp16_torch_checkpoint_equals_fp16_rounded_weights() {
    let dir = fixture("withbias");
    let (config, sd32) = load_restormer(&dir.join("model.safetensors")).expect("safetensors");
    let (_, sd16) = load_restormer(&dir.join("bare_fp16.pt")).expect("bare_fp16.pt");
    for (name, t) in sd16.iter() {
        assert_eq!(t.dtype(), DType::F16, "{name}");
    }
    let rounded: BTreeMap<String, HostTensor> = sd32
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16)))
        .collect();
    let (x, y, _) = io("withbias");
    let a = run(config.clone(), &sd16, &x);
    let b = run(config, &StateDict::from_tensors(rounded), &x);
    assert_eq!(a, b);
    // fp16 weights move the output a little, but not far.
    let err = relative_l2(&a.to_f32_vec(), &y.to_f32_vec());
    assert!(err < 1e-2, "fp16 weights: relative L2 {err:e}");
}

#[test]
fn zero_padded_hidden_width_gives_the_same_output() {
    use aperture_engine::Backend;
    use aperture_models::restormer::Restormer;
    // dim 8 * 2.66 -> hidden 21 at level 1: padding to 8 and 16 adds zero channels.
    let (config, sd) =
        load_restormer(&fixture("withbias").join("model.safetensors")).expect("load");
    let (x, y, _) = io("withbias");
    let cpu = CpuBackend::new();
    for multiple in [8, 16] {
        let model = Restormer::prepare_with_width_multiple(&cpu, config.clone(), &sd, multiple)
            .expect("prepare");
        let t = cpu.upload_nchw(&x).expect("upload");
        let out = cpu
            .download_nchw(&model.forward(&cpu, &t).expect("forward"))
            .expect("download");
        let err = relative_l2(&out.to_f32_vec(), &y.to_f32_vec());
        assert!(
            err <= TOL_F32,
            "width multiple {multiple}: relative L2 {err:e}"
        );
    }
}
