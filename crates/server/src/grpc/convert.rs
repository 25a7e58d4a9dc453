//! Protobuf messages <-> server types.

use std::collections::HashMap;
use std::time::Duration;

use aperture_engine::{DType, HostTensor, NamedTensors};

use super::inference::{
    self as pb, infer_parameter::ParameterChoice, model_infer_response::InferOutputTensor,
};
use crate::error::{Result, ServerError};
use crate::image::split_bytes_elements;
use crate::model::{InferRequest, LoadedModel};
use crate::shm::{ShmRef, ShmRegistry};
use crate::stats::{StatsSnapshot, Tally};
use crate::tensor_io::{
    kserve_datatype, parse_datatype, shape_to_dims, tensor_from_bytes, tensor_from_numbers,
    tensor_to_bytes, with_le_bytes, TensorFill,
};

/// Decodes a ModelInferRequest (raw_input_contents or typed FP32 contents).
pub fn request_from_proto(req: pb::ModelInferRequest) -> Result<InferRequest> {
    Ok(request_from_proto_with_shm(req, None)?.0)
}

/// Decodes a ModelInferRequest whose tensors may name regions of `shm` (Triton's system
/// shared-memory extension); also returns, per requested output, its shared-memory place.
/// raw_input_contents hold the inputs that are not in shared memory, in order.
pub fn request_from_proto_with_shm(
    req: pb::ModelInferRequest,
    shm: Option<&ShmRegistry>,
) -> Result<(InferRequest, Vec<Option<ShmRef>>)> {
    let raw = req.raw_input_contents;
    let in_body = req
        .inputs
        .iter()
        .filter(|i| !i.parameters.contains_key(SHM_REGION))
        .count();
    if !raw.is_empty() && raw.len() != in_body {
        return Err(ServerError::invalid(format!(
            "{} raw_input_contents given for {in_body} inputs outside shared memory; give one per input or none",
            raw.len(),
        )));
    }
    let mut inputs: NamedTensors = Vec::with_capacity(req.inputs.len());
    let mut encoded_images = Vec::new();
    let mut raw_at = 0;
    for input in req.inputs {
        if input.parameters.contains_key(SHM_REGION) {
            let dtype = parse_datatype(&input.datatype, &input.name)?;
            let dims = shape_to_dims(&input.shape, &input.name)?;
            let place = shm_place("input", &input.name, &input.parameters, shm)?;
            let mut fill = TensorFill::new(&input.name, dims, dtype, place.byte_size)?;
            fill.fill_with(|dst| place.region.read_into(place.offset, dst))?;
            push_input(&mut inputs, input.name, fill.finish()?)?;
            continue;
        }
        let i = raw_at;
        raw_at += 1;
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
        push_input(&mut inputs, input.name, tensor)?;
    }
    let output_shm = req
        .outputs
        .iter()
        .map(|o| {
            o.parameters
                .contains_key(SHM_REGION)
                .then(|| shm_place("output", &o.name, &o.parameters, shm))
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = if req.outputs.is_empty() {
        None
    } else {
        Some(req.outputs.into_iter().map(|o| o.name).collect())
    };
    let request = InferRequest {
        encoded_images,
        id: req.id,
        inputs,
        outputs,
        priority: uint_param(&req.parameters, "priority")?.unwrap_or(0),
        timeout: uint_param(&req.parameters, "timeout")?.map(Duration::from_micros),
        trace: None,
    };
    Ok((request, output_shm))
}

const SHM_REGION: &str = "shared_memory_region";

fn push_input(inputs: &mut NamedTensors, name: String, t: HostTensor) -> Result<()> {
    if inputs.iter().any(|(n, _)| n == &name) {
        return Err(ServerError::invalid(format!(
            "input '{name}' is given twice"
        )));
    }
    inputs.push((name, t));
    Ok(())
}

/// The shared-memory place named by a tensor's `shared_memory_region`,
/// `shared_memory_byte_size` and `shared_memory_offset` parameters.
fn shm_place(
    kind: &str,
    name: &str,
    params: &HashMap<String, pb::InferParameter>,
    shm: Option<&ShmRegistry>,
) -> Result<ShmRef> {
    let registry = shm.ok_or_else(|| {
        ServerError::Unsupported(format!(
            "{kind} '{name}': shared memory is not available here"
        ))
    })?;
    let region = match params
        .get(SHM_REGION)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::StringParam(r)) => r,
        _ => {
            return Err(ServerError::invalid(format!(
                "{kind} '{name}': parameter '{SHM_REGION}' must be a string"
            )))
        }
    };
    let byte_size = uint_param(params, "shared_memory_byte_size")?.ok_or_else(|| {
        ServerError::invalid(format!(
            "{kind} '{name}': '{SHM_REGION}' needs a 'shared_memory_byte_size' parameter"
        ))
    })?;
    let offset = uint_param(params, "shared_memory_offset")?.unwrap_or(0);
    ShmRef::resolve(registry, region, byte_size, offset)
        .map_err(|e| ServerError::invalid(format!("{kind} '{name}': {e}")))
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
        tensors.push(output_tensor(name, &t, HashMap::new()));
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

/// Like [`response_to_proto`], writing each output that has a place in `shm` into its
/// region (which may be larger than the output, never smaller) and naming the region
/// in the output's parameters instead of sending its bytes. raw_output_contents stay
/// aligned with the outputs (an empty entry for one in shared memory), and are left
/// out when every output is in shared memory.
pub fn response_to_proto_with_shm(
    model: &LoadedModel,
    id: String,
    outputs: NamedTensors,
    shm: &[Option<ShmRef>],
) -> Result<pb::ModelInferResponse> {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    let mut any_in_body = false;
    for (i, (name, t)) in outputs.into_iter().enumerate() {
        let size = t.numel() * t.dtype().size_bytes();
        match shm.get(i).and_then(Option::as_ref) {
            Some(place) => {
                if size > place.byte_size {
                    return Err(ServerError::invalid(format!(
                        "shared memory size specified with the request for output '{name}' \
                         ({} bytes) should be at least {size} bytes to hold the results",
                        place.byte_size
                    )));
                }
                with_le_bytes(&t, |b| place.region.write_from(place.offset, b))?;
                let mut params = HashMap::new();
                params.insert(SHM_REGION.to_string(), string_param(&place.region.name));
                params.insert("shared_memory_byte_size".into(), int_param(size));
                if place.offset != 0 {
                    params.insert("shared_memory_offset".into(), int_param(place.offset));
                }
                tensors.push(output_tensor(name, &t, params));
                raw.push(Vec::new());
                crate::pool::give(t.into_data());
            }
            None => {
                any_in_body = true;
                tensors.push(output_tensor(name, &t, HashMap::new()));
                raw.push(tensor_to_bytes(&t));
            }
        }
    }
    if !any_in_body {
        raw.clear();
    }
    Ok(pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id,
        parameters: HashMap::new(),
        outputs: tensors,
        raw_output_contents: raw,
    })
}

fn output_tensor(
    name: String,
    t: &HostTensor,
    parameters: HashMap<String, pb::InferParameter>,
) -> InferOutputTensor {
    InferOutputTensor {
        name,
        datatype: kserve_datatype(t.dtype()).to_string(),
        shape: t.shape().iter().map(|&d| d as i64).collect(),
        parameters,
        contents: None,
    }
}

fn string_param(s: &str) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s.to_string())),
    }
}

fn int_param(v: usize) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v as i64)),
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
