//! KServe v2 HTTP inference bodies: JSON tensors and the binary tensor data extension
//! (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data_output`).

use std::time::Duration;

use aperture_engine::NamedTensors;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Result, ServerError};
use crate::image::split_bytes_elements;
use crate::model::InferRequest;
use crate::tensor_io::{
    flatten_json_numbers, kserve_datatype, parse_datatype, shape_to_dims, tensor_from_bytes,
    tensor_from_numbers, tensor_to_bytes,
};

pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Deserialize)]
struct RequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A decoded request plus how each output should be encoded in the answer.
pub struct DecodedRequest {
    pub request: InferRequest,
    /// Per requested output: binary or JSON (None: all outputs, `binary_default` each).
    pub output_binary: Option<Vec<bool>>,
    pub binary_default: bool,
}

/// Decodes a request body; `header_len` is the `Inference-Header-Content-Length` value.
pub fn decode_request(body: &[u8], header_len: Option<usize>) -> Result<DecodedRequest> {
    let json_len = match header_len {
        None => body.len(),
        Some(n) if n > body.len() => {
            return Err(ServerError::invalid(format!(
                "Inference-Header-Content-Length is {n} but the request body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => n,
    };
    let (head, mut binary) = body.split_at(json_len);
    let req: RequestJson = serde_json::from_slice(head)
        .map_err(|e| ServerError::invalid(format!("failed to parse the request JSON: {e}")))?;
    let mut inputs: NamedTensors = Vec::with_capacity(req.inputs.len());
    let mut encoded_images: Vec<Bytes> = Vec::new();
    for input in req.inputs {
        if input.datatype == "BYTES" {
            // Encoded images for a model with an image pipeline (preprocessed server-side).
            if !encoded_images.is_empty() {
                return Err(ServerError::invalid(
                    "only one BYTES input (of encoded images) is supported",
                ));
            }
            encoded_images = match (input.parameters.get("binary_data_size"), &input.data) {
                (Some(size), _) => {
                    let size = size.as_u64().unwrap_or(u64::MAX) as usize;
                    if size > binary.len() {
                        return Err(ServerError::invalid(format!(
                            "unexpected end of binary data for input '{}': {size} bytes declared, {} remain",
                            input.name,
                            binary.len()
                        )));
                    }
                    let (mine, rest) = binary.split_at(size);
                    binary = rest;
                    split_bytes_elements(&input.name, &Bytes::copy_from_slice(mine))?
                }
                (None, Some(data)) => json_strings(&input.name, data)?,
                (None, None) => {
                    return Err(ServerError::invalid(format!(
                        "input '{}' has neither 'data' nor a 'binary_data_size' parameter",
                        input.name
                    )))
                }
            };
            continue;
        }
        let dtype = parse_datatype(&input.datatype, &input.name)?;
        let dims = shape_to_dims(&input.shape, &input.name)?;
        let tensor = match (input.parameters.get("binary_data_size"), &input.data) {
            (Some(size), _) => {
                let size = size.as_u64().ok_or_else(|| {
                    ServerError::invalid(format!(
                        "input '{}': binary_data_size must be an unsigned integer",
                        input.name
                    ))
                })? as usize;
                if size > binary.len() {
                    return Err(ServerError::invalid(format!(
                        "unexpected end of binary data for input '{}': {size} bytes declared, {} remain",
                        input.name,
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                tensor_from_bytes(&input.name, dims, dtype, mine)?
            }
            (None, Some(data)) => {
                let mut values = Vec::new();
                flatten_json_numbers(&input.name, data, &mut values)?;
                tensor_from_numbers(&input.name, dims, dtype, values)?
            }
            (None, None) => {
                return Err(ServerError::invalid(format!(
                    "input '{}' has neither 'data' nor a 'binary_data_size' parameter",
                    input.name
                )))
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
    if !binary.is_empty() {
        return Err(ServerError::invalid(format!(
            "{} bytes of binary data follow the request header but no input claims them",
            binary.len()
        )));
    }
    let binary_default = bool_param(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let (names, output_binary) = match req.outputs {
        None => (None, None),
        Some(outs) => {
            let mut flags = Vec::with_capacity(outs.len());
            for o in &outs {
                flags.push(bool_param(&o.parameters, "binary_data")?.unwrap_or(binary_default));
            }
            (
                Some(outs.into_iter().map(|o| o.name).collect::<Vec<_>>()),
                Some(flags),
            )
        }
    };
    let priority = uint_param(&req.parameters, "priority")?.unwrap_or(0);
    let timeout = uint_param(&req.parameters, "timeout")?.map(Duration::from_micros);
    Ok(DecodedRequest {
        request: InferRequest {
            encoded_images,
            id: req.id.unwrap_or_default(),
            inputs,
            outputs: names,
            priority,
            timeout,
        },
        output_binary,
        binary_default,
    })
}

/// BYTES elements given as JSON strings.
fn json_strings(name: &str, data: &Value) -> Result<Vec<Bytes>> {
    let items = match data {
        Value::Array(items) => items.as_slice(),
        other => std::slice::from_ref(other),
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(Bytes::from(s.clone().into_bytes())),
            _ => Err(ServerError::invalid(format!(
                "input '{name}': BYTES data must be strings"
            ))),
        })
        .collect()
}

fn bool_param(params: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ServerError::invalid(format!(
            "parameter '{key}' must be a boolean, got {other}"
        ))),
    }
}

fn uint_param(params: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match params.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ServerError::invalid(format!(
                "parameter '{key}' must be an unsigned integer, got {v}"
            ))
        }),
    }
}

/// An encoded answer: the JSON header and, when any output is binary, its length.
pub struct EncodedResponse {
    pub body: Bytes,
    pub header_len: Option<usize>,
}

/// Encodes outputs (already in the requested order) as JSON or binary per output.
pub fn encode_response(
    model: &str,
    version: u64,
    id: &str,
    outputs: &NamedTensors,
    binary: &[bool],
) -> Result<EncodedResponse> {
    let is_binary = |i: usize| binary.get(i).copied().unwrap_or(false);
    let widened: Vec<Option<Vec<f32>>> = outputs
        .iter()
        .enumerate()
        .map(|(i, (_, t))| match (is_binary(i), t.as_f32()) {
            (false, None) => Some(t.to_f32_vec()),
            _ => None,
        })
        .collect();
    let outs: Vec<OutputHead> = outputs
        .iter()
        .zip(&widened)
        .enumerate()
        .map(|(i, ((name, t), wide))| OutputHead {
            name,
            datatype: kserve_datatype(t.dtype()),
            shape: t.shape(),
            parameters: is_binary(i).then(|| BinaryParams {
                binary_data_size: t.numel() * t.dtype().size_bytes(),
            }),
            data: if is_binary(i) {
                None
            } else {
                wide.as_deref().or_else(|| t.as_f32())
            },
        })
        .collect();
    let head = ResponseHead {
        model_name: model,
        model_version: version.to_string(),
        id,
        outputs: outs,
    };
    let mut body = serde_json::to_vec(&head)
        .map_err(|e| ServerError::Internal(format!("encoding response: {e}")))?;
    if !(0..outputs.len()).any(is_binary) {
        return Ok(EncodedResponse {
            body: Bytes::from(body),
            header_len: None,
        });
    }
    let header_len = body.len();
    for (i, (_, t)) in outputs.iter().enumerate() {
        if is_binary(i) {
            body.extend_from_slice(&tensor_to_bytes(t));
        }
    }
    Ok(EncodedResponse {
        body: Bytes::from(body),
        header_len: Some(header_len),
    })
}

/// The JSON part of a response, serialised without building a `Value` tree
/// (non-finite numbers become null, as Triton writes them).
#[derive(serde::Serialize)]
struct ResponseHead<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    outputs: Vec<OutputHead<'a>>,
}

#[derive(serde::Serialize)]
struct OutputHead<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
}

#[derive(serde::Serialize)]
struct BinaryParams {
    binary_data_size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn json_request_decodes() {
        let body = br#"{"id":"7","inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[[1,2.5]]}],
            "outputs":[{"name":"OUTPUT0","parameters":{"binary_data":true}}],"parameters":{"priority":2,"timeout":500}}"#;
        let d = decode_request(body, None).unwrap();
        assert_eq!(d.request.id, "7");
        assert_eq!(d.request.inputs[0].1.to_f32_vec(), vec![1.0, 2.5]);
        assert_eq!(d.request.outputs, Some(vec!["OUTPUT0".to_string()]));
        assert_eq!(d.output_binary, Some(vec![true]));
        assert_eq!(d.request.priority, 2);
        assert_eq!(d.request.timeout, Some(Duration::from_micros(500)));
    }

    #[test]
    fn binary_request_decodes() {
        let head = br#"{"inputs":[{"name":"A","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"B","shape":[1],"datatype":"FP32","data":[3]}]}"#;
        let mut body = head.to_vec();
        body.extend(f32_bytes(&[4.0, 5.0]));
        let d = decode_request(&body, Some(head.len())).unwrap();
        assert_eq!(d.request.inputs[0].1.to_f32_vec(), vec![4.0, 5.0]);
        assert_eq!(d.request.inputs[1].1.to_f32_vec(), vec![3.0]);
    }

    fn err_of(body: &[u8], header: Option<usize>) -> String {
        match decode_request(body, header) {
            Ok(_) => panic!("accepted a bad request"),
            Err(e) => {
                assert_eq!(e.http_status(), 400, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn malformed_requests_get_clear_messages() {
        assert!(err_of(b"{not json", None).contains("failed to parse the request JSON"));
        assert!(err_of(
            br#"{"inputs":[{"name":"A","shape":[1],"datatype":"INT8","data":[1]}]}"#,
            None
        )
        .contains("datatype INT8"));
        assert!(err_of(
            br#"{"inputs":[{"name":"A","shape":[1,3],"datatype":"FP32","data":[1,2]}]}"#,
            None
        )
        .contains("needs 3"));
        assert!(err_of(
            br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32","data":["x"]}]}"#,
            None
        )
        .contains("numbers"));
        assert!(err_of(
            br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32"}]}"#,
            None
        )
        .contains("neither"));
        let head = br#"{"inputs":[{"name":"A","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}"#;
        let mut truncated = head.to_vec();
        truncated.extend(f32_bytes(&[1.0, 2.0]));
        assert!(err_of(&truncated, Some(head.len())).contains("unexpected end of binary data"));
        assert!(err_of(head, Some(head.len() + 100)).contains("Inference-Header-Content-Length"));
        let mut extra = head.to_vec();
        extra.extend(f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0]));
        assert!(err_of(&extra, Some(head.len())).contains("no input claims"));
        assert!(err_of(
            br#"{"inputs":[{"name":"A","shape":[-2],"datatype":"FP32","data":[]}]}"#,
            None
        )
        .contains("negative"));
    }

    #[test]
    fn response_mixes_binary_and_json_outputs() {
        let t = aperture_engine::HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
        let outs = vec![("X".to_string(), t.clone()), ("Y".to_string(), t)];
        let r = encode_response("m", 3, "abc", &outs, &[true, false]).unwrap();
        let n = r.header_len.unwrap();
        let head: Value = serde_json::from_slice(&r.body[..n]).unwrap();
        assert_eq!(head["model_version"], "3");
        assert_eq!(head["id"], "abc");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["outputs"][1]["data"], json!([1.0, 2.0]));
        assert_eq!(&r.body[n..], f32_bytes(&[1.0, 2.0]).as_slice());
    }
}
