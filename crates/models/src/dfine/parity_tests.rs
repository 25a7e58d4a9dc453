//! Parity with transformers' `DFineForObjectDetection` (goldens written by
//! `tools/dfine_golden.py` with seeded weights; see tests/fixtures/dfine/).

use std::path::PathBuf;

use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, HostTensor};

use super::*;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/dfine")
        .join(case)
}

fn golden(case: &str) -> aperture_weights::StateDict {
    aperture_weights::load(&fixture(case).join("golden.safetensors")).expect("golden outputs")
}

fn get(g: &aperture_weights::StateDict, name: &str) -> HostTensor {
    g.get(name)
        .unwrap_or_else(|| panic!("golden has no {name}"))
        .clone()
}

#[test]
fn tiny_model_matches_transformers() {
    let snap = load_dfine(&fixture("tiny")).unwrap();
    let g = golden("tiny");
    let runner = DFineRunner::new(CpuBackend::new(), &snap, 0).unwrap();
    let (logits, boxes) = runner.detect(&get(&g, "pixel_values")).unwrap();
    let (want_l, want_b) = (get(&g, "logits"), get(&g, "pred_boxes"));
    assert_eq!(logits.shape(), want_l.shape());
    assert_eq!(boxes.shape(), want_b.shape());
    let el = relative_l2(&logits.to_f32_vec(), &want_l.to_f32_vec());
    let eb = relative_l2(&boxes.to_f32_vec(), &want_b.to_f32_vec());
    eprintln!("tiny D-FINE vs transformers: relative L2 logits {el:.3e}, pred_boxes {eb:.3e}");
    assert!(
        el <= 1e-4 && eb <= 1e-4,
        "relative L2: logits {el:e}, boxes {eb:e}"
    );
    // Identical top-k labels after post-processing, and the same detections.
    let dets: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny").join("detections.json")).unwrap(),
    )
    .unwrap();
    let threshold = dets["threshold"].as_f64().unwrap() as f32;
    let (q, c) = (snap.config.num_queries, snap.config.num_labels);
    let (lv, bv) = (logits.to_f32_vec(), boxes.to_f32_vec());
    for (i, img) in dets["images"].as_array().unwrap().iter().enumerate() {
        let size = &dets["target_sizes"][i];
        let size = (
            size[0].as_u64().unwrap() as u32,
            size[1].as_u64().unwrap() as u32,
        );
        let ours = post_process(
            &lv[i * q * c..(i + 1) * q * c],
            &bv[i * q * 4..(i + 1) * q * 4],
            c,
            threshold,
            size,
        )
        .unwrap();
        let labels: Vec<usize> = img["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            ours.iter().map(|d| d.label).collect::<Vec<_>>(),
            labels,
            "image {i}"
        );
        for (d, (s, bx)) in ours.iter().zip(
            img["scores"]
                .as_array()
                .unwrap()
                .iter()
                .zip(img["boxes"].as_array().unwrap()),
        ) {
            assert!((d.score - s.as_f64().unwrap() as f32).abs() < 1e-4);
            for (a, e) in d.bbox.iter().zip(bx.as_array().unwrap()) {
                assert!(
                    (a - e.as_f64().unwrap() as f32).abs()
                        < 1e-2 * size.1.max(size.0) as f32 * 1e-2,
                    "{a} vs {e}"
                );
            }
        }
        let names: Vec<String> = ours.iter().map(|d| snap.config.label(d.label)).collect();
        assert_eq!(serde_json::json!(names), img["names"]);
    }
}

#[test]
fn config_of_another_architecture_is_refused() {
    let dir = std::env::temp_dir().join(format!("aperture-dfine-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["RTDetrForObjectDetection"], "model_type": "rt_detr"}"#,
    )
    .unwrap();
    let err = load_dfine(&dir).err().expect("must fail").to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("rt_detr") && err.contains("not D-FINE"),
        "{err}"
    );
}

#[test]
fn missing_and_misshaped_weights_are_listed_together() {
    let mut snap = load_dfine(&fixture("tiny")).unwrap();
    let mut t = snap.weights.clone().into_tensors();
    t.remove("model.enc_score_head.weight");
    t.remove("model.decoder.up");
    t.insert(
        "model.decoder.layers.0.fc1.bias".into(),
        HostTensor::zeros(vec![3]),
    );
    t.insert(
        "model.some_new_head.weight".into(),
        HostTensor::zeros(vec![2, 2]),
    );
    snap.weights = aperture_weights::StateDict::from_tensors(t);
    let err = DFineRunner::new(CpuBackend::new(), &snap, 0)
        .err()
        .expect("must fail")
        .to_string();
    for part in [
        "missing      model.enc_score_head.weight (expected shape [5, 32])",
        "missing      model.decoder.up (expected shape [1])",
        "model.decoder.layers.0.fc1.bias: expected [64], found [3]",
        "unexpected   model.some_new_head.weight",
        "4 problems",
    ] {
        assert!(err.contains(part), "'{part}' not in:\n{err}");
    }
}

#[test]
fn tiny_images_are_refused_without_panicking() {
    let snap = load_dfine(&fixture("tiny")).unwrap();
    let runner = DFineRunner::new(CpuBackend::new(), &snap, 0).unwrap();
    let err = runner
        .detect(&HostTensor::zeros(vec![1, 3, 96, 100]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 32"), "{err}");
    for shape in [
        vec![1, 3, 1, 1],
        vec![1, 3, 40, 40],
        vec![1, 1, 64, 64],
        vec![3, 64, 64],
    ] {
        let err = runner.detect(&HostTensor::zeros(shape.clone()));
        assert!(err.is_err(), "{shape:?} should be refused");
    }
}

/// The official repository's name for a transformers name (inverse of the conversion
/// table in transformers' convert script), for the tiny fixture's keys.
fn original_name(k: &str) -> String {
    let reps: &[(&str, &str)] = &[
        ("model.backbone.model.embedder.", "backbone.stem."),
        ("model.backbone.model.encoder.stages.", "backbone.stages."),
        ("model.encoder_input_proj.", "encoder.input_proj."),
        ("model.decoder_input_proj.", "decoder.input_proj."),
        ("model.encoder.encoder.", "encoder.encoder."),
        ("model.encoder.", "encoder."),
        ("model.decoder.layers.", "decoder.decoder.layers."),
        ("model.decoder.lqe_layers.", "decoder.decoder.lqe_layers."),
        ("model.decoder.class_embed.", "decoder.dec_score_head."),
        ("model.decoder.bbox_embed.", "decoder.dec_bbox_head."),
        ("model.decoder.", "decoder."),
        ("model.enc_output.0.", "decoder.enc_output.proj."),
        ("model.enc_output.1.", "decoder.enc_output.norm."),
        ("model.", "decoder."),
    ];
    let (from, to) = reps
        .iter()
        .find(|(f, _)| k.starts_with(f))
        .copied()
        .unwrap_or(("", ""));
    let mut s = format!("{to}{}", &k[from.len()..]);
    for (a, b) in [
        (".convolution.weight", ".conv.weight"),
        (".normalization.", ".bn."),
        (".fc1.", ".linear1."),
        (".fc2.", ".linear2."),
        (".encoder_attn.", ".cross_attn."),
        ("csp_rep1.", "cv2.0."),
        ("csp_rep2.", "cv3.0."),
    ] {
        s = s.replace(a, b);
    }
    if s.starts_with("encoder.encoder.") {
        s = s
            .replace(".self_attn_layer_norm.", ".norm1.")
            .replace(".final_layer_norm.", ".norm2.");
    } else {
        s = s
            .replace(".self_attn_layer_norm.", ".norm1.")
            .replace(".final_layer_norm.", ".norm3.");
    }
    if s.starts_with("encoder.fpn_blocks.") || s.starts_with("encoder.pan_blocks.") {
        let (head, tail) = s.split_at(s.find("_blocks.").unwrap() + 8);
        let (i, rest) = tail.split_once('.').unwrap();
        let rest = ["conv1.", "conv2.", "conv3.", "conv4."]
            .iter()
            .zip(["cv1.", "cv2.1.", "cv3.1.", "cv4."])
            .find(|(f, _)| rest.starts_with(**f))
            .map_or(rest.to_string(), |(f, t)| {
                format!("{t}{}", &rest[f.len()..])
            });
        s = format!("{head}{i}.{rest}");
    }
    if let Some(rest) = s.strip_prefix("encoder.downsample_convs.") {
        let (i, r) = rest.split_once('.').unwrap();
        s = format!(
            "encoder.downsample_convs.{i}.0.{}",
            r.replacen("conv", "cv", 1)
        );
    }
    for p in ["encoder.input_proj.", "decoder.input_proj."] {
        if let Some(rest) = s.strip_prefix(p) {
            let (i, r) = rest.split_once('.').unwrap();
            let r = r.replacen("0.", "conv.", 1).replacen("1.", "norm.", 1);
            s = format!("{p}{i}.{r}");
        }
    }
    s
}

#[test]
fn official_checkpoint_names_load_and_match() {
    let snap = load_dfine(&fixture("tiny")).unwrap();
    let mut orig = std::collections::BTreeMap::new();
    let hf = snap.weights.tensors();
    for (k, t) in hf {
        if k.contains("self_attn.k_proj") || k.contains("self_attn.v_proj") {
            continue;
        }
        if let Some(pre) = k.split_once("self_attn.q_proj.") {
            let leaf = pre.1;
            let parts: Vec<f32> = ["q", "k", "v"]
                .iter()
                .flat_map(|p| hf[&format!("{}self_attn.{p}_proj.{leaf}", pre.0)].to_f32_vec())
                .collect();
            let mut shape = t.shape().to_vec();
            shape[0] *= 3;
            let name = original_name(&format!("{}self_attn.in_proj_{leaf}", pre.0));
            orig.insert(name, HostTensor::from_f32(shape, parts).unwrap());
            continue;
        }
        orig.insert(original_name(k), t.clone());
    }
    let orig = aperture_weights::StateDict::from_tensors(orig);
    assert!(original::is_original(&orig));
    let converted = original::to_hf_names(orig).unwrap();
    let snap2 = DFineSnapshot {
        config: snap.config.clone(),
        processor: snap.processor.clone(),
        weights: converted,
    };
    let g = golden("tiny");
    let (logits, _) = DFineRunner::new(CpuBackend::new(), &snap2, 0)
        .unwrap()
        .detect(&get(&g, "pixel_values"))
        .unwrap();
    assert!(relative_l2(&logits.to_f32_vec(), &get(&g, "logits").to_f32_vec()) <= 1e-4);
}

#[test]
fn query_selection_can_keep_fewer_queries() {
    let snap = load_dfine(&fixture("tiny")).unwrap();
    let g = golden("tiny");
    let pixels = get(&g, "pixel_values");
    let mut runner = DFineRunner::new(CpuBackend::new(), &snap, 0).unwrap();
    let (full_l, full_b) = runner.detect(&pixels).unwrap();
    let (q, c) = (snap.config.num_queries, snap.config.num_labels);
    assert!(runner.set_num_queries(0).is_err());
    assert!(runner.set_num_queries(q + 1).is_err());
    runner.set_num_queries(q / 2).unwrap();
    let (l, b) = runner.detect(&pixels).unwrap();
    let n = pixels.shape()[0];
    assert_eq!(l.shape(), &[n, q / 2, c]);
    assert_eq!(b.shape(), &[n, q / 2, 4]);
    assert!(l
        .to_f32_vec()
        .iter()
        .chain(&b.to_f32_vec())
        .all(|v| v.is_finite()));
    // Back to all queries: the full model's outputs, exactly.
    runner.set_num_queries(q).unwrap();
    let (l, b) = runner.detect(&pixels).unwrap();
    assert_eq!(l.to_f32_vec(), full_l.to_f32_vec());
    assert_eq!(b.to_f32_vec(), full_b.to_f32_vec());
}
