//! Protobuf messages <-> server types.

use std::collections::HashMap;
use std::time::Duration;

use aperture_engine::{DType, NamedTensors};

use super::inference::{
    self as pb, infer_parameter::ParameterChoice, model_infer_response::InferOutputTensor,
};
use crate::error::{Result, ServerError};
use crate::image::split_bytes_elements;
use crate::model::{InferRequest, LoadedModel};
use crate::stats::{StatsSnapshot, Tally};
use crate::tensor_io::{
    kserve_datatype, parse_datatype, shape_to_dims, tensor_from_bytes, tensor_from_numbers,
    tensor_to_bytes,
};

/// Decodes a ModelInferRequest (raw_input_contents or typed FP32 contents).
pub fn request_from_proto(req: pb::ModelInferRequest) -> Result<InferRequest> {
    let raw = req.raw_input_contents;
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(ServerError::invalid(format!(
            "{} raw_input_contents given for {} inputs; give one per input or none",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut inputs: NamedTensors = Vec::with_capacity(req.inputs.len());
    let mut encoded_images = Vec::new();
    for (i, input) in req.inputs.into_iter().enumerate() {
        if input.datatype == "BYTES" {
            if !encoded_images.is_empty() {
                return Err(ServerError::invalid(
                    "only one BYTES input (of encoded images) is supported",
                ));
            }
            encoded_images = match (raw.get(i), &input.contents) {
                (Some(bytes), _) => {
                    split_bytes_elements(&input.name, &bytes::Bytes::copy_from_slice(bytes))?
                }
                (None, Some(c)) => c
                    .bytes_contents
                    .iter()
                    .map(|b| bytes::Bytes::copy_from_slice(b))
                    .collect(),
                (None, None) => {
                    return Err(ServerError::invalid(format!(
                        "input '{}': no data; send raw_input_contents or bytes_contents",
                        input.name
                    )))
                }
            };
            continue;
        }
        let dtype = parse_datatype(&input.datatype, &input.name)?;
        let dims = shape_to_dims(&input.shape, &input.name)?;
        let tensor = match raw.get(i) {
            Some(bytes) => tensor_from_bytes(&input.name, dims, dtype, bytes)?,
            None => {
                let values: Vec<f64> = match (&input.contents, dtype) {
                    (Some(c), DType::F32) => c.fp32_contents.iter().map(|&v| v as f64).collect(),
                    _ => {
                        return Err(ServerError::invalid(format!(
                        "input '{}': no data; send raw_input_contents (or fp32_contents for FP32)",
                        input.name
                    )))
                    }
                };
                tensor_from_numbers(&input.name, dims, dtype, values)?
            }
        };
        if inputs.iter().any(|(n, _)| n == &input.name) {
            return Err(ServerError::invalid(format!(
                "input '{}' is given twice",
                input.name
            )));
        }
        inputs.push((input.name, tensor));
    }
    let outputs = if req.outputs.is_empty() {
        None
    } else {
        Some(req.outputs.into_iter().map(|o| o.name).collect())
    };
    Ok(InferRequest {
        encoded_images,
        id: req.id,
        inputs,
        outputs,
        priority: uint_param(&req.parameters, "priority")?.unwrap_or(0),
        timeout: uint_param(&req.parameters, "timeout")?.map(Duration::from_micros),
    })
}

fn uint_param(params: &HashMap<String, pb::InferParameter>, key: &str) -> Result<Option<u64>> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(Some(*v as u64)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(*v)),
        Some(other) => Err(ServerError::invalid(format!(
            "parameter '{key}' must be a non-negative integer, got {other:?}"
        ))),
    }
}

/// Encodes outputs as raw_output_contents (what tritonclient reads).
pub fn response_to_proto(
    model: &LoadedModel,
    id: String,
    outputs: NamedTensors,
) -> pb::ModelInferResponse {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for (name, t) in outputs {
        tensors.push(InferOutputTensor {
            name,
            datatype: kserve_datatype(t.dtype()).to_string(),
            shape: t.shape().iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(tensor_to_bytes(&t));
    }
    pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id,
        parameters: HashMap::new(),
        outputs: tensors,
        raw_output_contents: raw,
    }
}

fn config_dtype(d: DType) -> i32 {
    match d {
        DType::F32 => pb::DataType::TypeFp32 as i32,
        DType::F16 => pb::DataType::TypeFp16 as i32,
        DType::BF16 => pb::DataType::TypeBf16 as i32,
    }
}

/// Triton's ModelConfig for a loaded model.
pub fn config_to_proto(m: &LoadedModel) -> pb::ModelConfig {
    use pb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let b = m.batcher_config();
    let policy = match &m.config.version_policy {
        crate::config::VersionPolicy::Latest(n) => {
            PolicyChoice::Latest(Latest { num_versions: *n })
        }
        crate::config::VersionPolicy::All => PolicyChoice::All(All {}),
        crate::config::VersionPolicy::Specific(v) => PolicyChoice::Specific(Specific {
            versions: v.iter().map(|&x| x as i64).collect(),
        }),
    };
    let kind = if m.device.starts_with("cuda") {
        pb::model_instance_group::Kind::Gpu
    } else {
        pb::model_instance_group::Kind::Cpu
    };
    pb::ModelConfig {
        name: m.name.clone(),
        platform: crate::server::PLATFORM.into(),
        backend: crate::server::BACKEND.into(),
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(policy),
        }),
        max_batch_size: b.max_batch_size as i32,
        input: m
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: config_dtype(t.dtype),
                dims: t.shape.clone(),
            })
            .collect(),
        output: m
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: config_dtype(t.dtype),
                dims: t.shape.clone(),
                label_filename: m.config.labels.clone().unwrap_or_default(),
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: format!("{}_0", m.name),
            count: m.instances as i32,
            gpus: m.config.instance_group.gpus.clone(),
            kind: kind as i32,
        }],
        default_model_filename: m.config.weights.clone().unwrap_or_default(),
        dynamic_batching: Some(pb::ModelDynamicBatching {
            preferred_batch_size: b.preferred_batch_sizes.iter().map(|&p| p as i32).collect(),
            max_queue_delay_microseconds: b.max_queue_delay.as_micros() as u64,
            preserve_ordering: b.preserve_ordering,
            priority_levels: b.priority_levels,
            default_priority_level: b.default_priority,
            default_queue_policy: Some(pb::ModelQueuePolicy {
                timeout_action: match b.timeout_action {
                    crate::config::TimeoutAction::Reject => {
                        pb::model_queue_policy::TimeoutAction::Reject as i32
                    }
                    crate::config::TimeoutAction::Delay => {
                        pb::model_queue_policy::TimeoutAction::Delay as i32
                    }
                },
                default_timeout_microseconds: b
                    .default_timeout
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0),
                allow_timeout_override: b.allow_timeout_override,
                max_queue_size: b.max_queue_size as u32,
            }),
        }),
        parameters: HashMap::new(),
    }
}

fn dur(t: &Tally) -> Option<pb::StatisticDuration> {
    Some(pb::StatisticDuration {
        count: t.count,
        ns: t.ns,
    })
}

/// Triton's ModelStatistics for one model version.
pub fn stats_to_proto(name: &str, version: u64, s: &StatsSnapshot) -> pb::ModelStatistics {
    pb::ModelStatistics {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(pb::InferStatistics {
            success: dur(&s.success),
            fail: dur(&s.fail),
            queue: dur(&s.queue),
            compute_input: dur(&s.compute_input),
            compute_infer: dur(&s.compute_infer),
            compute_output: dur(&s.compute_output),
            cache_hit: dur(&s.cache_hit),
            cache_miss: dur(&s.cache_miss),
        }),
        batch_stats: s
            .batches
            .iter()
            .map(|(&size, (_, t))| pb::InferBatchStatistics {
                batch_size: size as u64,
                compute_input: dur(&t[0]),
                compute_infer: dur(&t[1]),
                compute_output: dur(&t[2]),
            })
            .collect(),
    }
}
