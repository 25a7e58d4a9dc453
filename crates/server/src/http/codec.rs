//! KServe v2 HTTP inference requests: JSON tensors and the binary tensor data extension
//! (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data_output`).

use std::time::Duration;

use aperture_engine::{HostTensor, NamedTensors};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Result, ServerError};
use crate::image::split_bytes_elements;
use crate::model::InferRequest;
use crate::shm::{ShmRef, ShmRegistry};
use crate::tensor_io::{
    flatten_json_numbers, parse_datatype, shape_to_dims, tensor_from_numbers, TensorFill,
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
    /// Per requested output: the shared-memory place its bytes go to (empty when the
    /// request names no outputs).
    pub output_shm: Vec<Option<ShmRef>>,
}

/// Decodes a whole request body; `header_len` is the `Inference-Header-Content-Length`
/// value. (The HTTP handler streams the body through [`PendingRequest`] instead.)
pub fn decode_request(body: &[u8], header_len: Option<usize>) -> Result<DecodedRequest> {
    decode_request_with_shm(body, header_len, None)
}

/// [`decode_request`] where tensors may name regions of `shm`.
pub fn decode_request_with_shm(
    body: &[u8],
    header_len: Option<usize>,
    shm: Option<&ShmRegistry>,
) -> Result<DecodedRequest> {
    let json_len = match header_len {
        None => body.len(),
        Some(n) if n > body.len() => return Err(header_beyond_body(n, body.len())),
        Some(n) => n,
    };
    let (head, binary) = body.split_at(json_len);
    let mut pending = PendingRequest::parse_with_shm(head, BinaryLen::Exact(binary.len()), shm)?;
    pending.feed(binary)?;
    pending.finish()
}

pub(super) fn header_beyond_body(header: usize, body: usize) -> ServerError {
    ServerError::invalid(format!(
        "Inference-Header-Content-Length is {header} but the request body has only {body} bytes"
    ))
}

/// How many bytes of binary data follow the JSON header, as far as known before reading.
#[derive(Clone, Copy, Debug)]
pub enum BinaryLen {
    /// Known (a whole body, or a Content-Length).
    Exact(usize),
    /// Unknown (chunked transfer), but at most this much (the body limit).
    AtMost(usize),
}

/// Where the binary section's next bytes go.
enum Sink {
    /// Input number `usize` (in request order).
    Tensor(usize, TensorFill),
    /// The BYTES input of encoded images.
    Images { buf: Vec<u8>, want: usize },
}

impl Sink {
    fn remaining(&self) -> usize {
        match self {
            Sink::Tensor(_, f) => f.remaining(),
            Sink::Images { buf, want } => want - buf.len(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> usize {
        match self {
            Sink::Tensor(_, f) => f.write(bytes),
            Sink::Images { buf, want } => {
                let n = bytes.len().min(*want - buf.len());
                buf.extend_from_slice(bytes.get(..n).unwrap_or_default());
                n
            }
        }
    }
}

/// A request whose JSON header is parsed and whose binary data is still arriving: each
/// binary input's storage is allocated once, at its final type and size, and the body's
/// bytes are copied straight into it (no intermediate body buffer, no per-element pass).
pub struct PendingRequest {
    id: String,
    /// Inputs in request order; binary ones are `None` until their sink completes.
    inputs: Vec<(String, Option<HostTensor>)>,
    /// Binary sections in body order, and the one being filled.
    sinks: Vec<Sink>,
    current: usize,
    encoded_images: Vec<Bytes>,
    images_name: String,
    outputs: Option<Vec<String>>,
    output_binary: Option<Vec<bool>>,
    binary_default: bool,
    output_shm: Vec<Option<ShmRef>>,
    priority: u64,
    timeout: Option<Duration>,
}

impl PendingRequest {
    /// Parses the JSON header; declared binary sizes are checked against `binary`
    /// before any storage is allocated for them.
    pub fn parse(head: &[u8], binary: BinaryLen) -> Result<Self> {
        Self::parse_with_shm(head, binary, None)
    }

    /// Like [`PendingRequest::parse`]; inputs and outputs may name regions of `shm`
    /// (Triton's system shared-memory extension). Inputs in shared memory are copied
    /// into their tensors here; outputs' regions are resolved and bounds-checked.
    pub fn parse_with_shm(
        head: &[u8],
        binary: BinaryLen,
        shm: Option<&ShmRegistry>,
    ) -> Result<Self> {
        let req: RequestJson = serde_json::from_slice(head)
            .map_err(|e| ServerError::invalid(format!("failed to parse the request JSON: {e}")))?;
        let mut inputs: Vec<(String, Option<HostTensor>)> = Vec::with_capacity(req.inputs.len());
        let mut sinks = Vec::new();
        let mut encoded_images: Vec<Bytes> = Vec::new();
        let mut images_name = String::new();
        let mut declared = 0usize;
        // Reserves `size` bytes of the binary section for `name`.
        let mut claim = |name: &str, size: usize| -> Result<()> {
            let (avail, exact) = match binary {
                BinaryLen::Exact(n) => (n, true),
                BinaryLen::AtMost(n) => (n, false),
            };
            let remain = avail.saturating_sub(declared);
            if size > remain {
                return Err(if exact {
                    ServerError::invalid(format!(
                        "unexpected end of binary data for input '{name}': {size} bytes declared, {remain} remain"
                    ))
                } else {
                    ServerError::PayloadTooLarge(format!(
                        "input '{name}' declares {size} bytes of binary data, more than the request body limit allows (--max-body-mb)"
                    ))
                });
            }
            declared += size;
            Ok(())
        };
        for input in req.inputs {
            if input.datatype == "BYTES" {
                // Encoded images for a model with an image pipeline (preprocessed server-side).
                if !images_name.is_empty() {
                    return Err(ServerError::invalid(
                        "only one BYTES input (of encoded images) is supported",
                    ));
                }
                images_name = input.name.clone();
                match (input.parameters.get("binary_data_size"), &input.data) {
                    (Some(size), _) => {
                        let want = size.as_u64().unwrap_or(u64::MAX) as usize;
                        claim(&input.name, want)?;
                        sinks.push(Sink::Images {
                            buf: Vec::with_capacity(want),
                            want,
                        });
                    }
                    (None, Some(data)) => encoded_images = json_strings(&input.name, data)?,
                    (None, None) => return Err(no_data(&input.name)),
                }
                continue;
            }
            let dtype = parse_datatype(&input.datatype, &input.name)?;
            let dims = shape_to_dims(&input.shape, &input.name)?;
            if inputs.iter().any(|(n, _)| n == &input.name) {
                return Err(ServerError::invalid(format!(
                    "input '{}' is given twice",
                    input.name
                )));
            }
            let tensor = match (input.parameters.get("binary_data_size"), &input.data) {
                _ if input.parameters.contains_key("shared_memory_region") => {
                    let place = shm_place("input", &input.name, &input.parameters, shm)?;
                    let mut fill = TensorFill::new(&input.name, dims, dtype, place.byte_size)?;
                    fill.fill_with(|dst| place.region.read_into(place.offset, dst))?;
                    Some(fill.finish()?)
                }
                (Some(size), _) => {
                    let size = size.as_u64().ok_or_else(|| {
                        ServerError::invalid(format!(
                            "input '{}': binary_data_size must be an unsigned integer",
                            input.name
                        ))
                    })? as usize;
                    claim(&input.name, size)?;
                    let fill = TensorFill::new(&input.name, dims, dtype, size)?;
                    sinks.push(Sink::Tensor(inputs.len(), fill));
                    None
                }
                (None, Some(data)) => {
                    let mut values = Vec::new();
                    flatten_json_numbers(&input.name, data, &mut values)?;
                    Some(tensor_from_numbers(&input.name, dims, dtype, values)?)
                }
                (None, None) => return Err(no_data(&input.name)),
            };
            inputs.push((input.name, tensor));
        }
        if let BinaryLen::Exact(n) = binary {
            if n > declared {
                return Err(unclaimed(n - declared));
            }
        }
        let binary_default = bool_param(&req.parameters, "binary_data_output")?.unwrap_or(false);
        let mut output_shm = Vec::new();
        let (outputs, output_binary) = match req.outputs {
            None => (None, None),
            Some(outs) => {
                let mut flags = Vec::with_capacity(outs.len());
                for o in &outs {
                    flags.push(bool_param(&o.parameters, "binary_data")?.unwrap_or(binary_default));
                    output_shm.push(if o.parameters.contains_key("shared_memory_region") {
                        Some(shm_place("output", &o.name, &o.parameters, shm)?)
                    } else {
                        None
                    });
                }
                (
                    Some(outs.into_iter().map(|o| o.name).collect()),
                    Some(flags),
                )
            }
        };
        Ok(Self {
            id: req.id.unwrap_or_default(),
            inputs,
            sinks,
            current: 0,
            encoded_images,
            images_name,
            outputs,
            output_binary,
            binary_default,
            output_shm,
            priority: uint_param(&req.parameters, "priority")?.unwrap_or(0),
            timeout: uint_param(&req.parameters, "timeout")?.map(Duration::from_micros),
        })
    }

    /// Takes the next piece of the binary section.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let Some(sink) = self.sinks.get_mut(self.current) else {
                return Err(unclaimed(bytes.len()));
            };
            let n = sink.write(bytes);
            bytes = bytes.get(n..).unwrap_or_default();
            if sink.remaining() == 0 {
                self.current += 1;
            }
        }
        Ok(())
    }

    /// The request, once the body has ended; names the first input left incomplete.
    pub fn finish(mut self) -> Result<DecodedRequest> {
        for sink in self.sinks {
            match sink {
                Sink::Tensor(pos, fill) => {
                    let t = fill.finish()?;
                    if let Some((_, slot)) = self.inputs.get_mut(pos) {
                        *slot = Some(t);
                    }
                }
                Sink::Images { buf, want } => {
                    if buf.len() != want {
                        return Err(ServerError::invalid(format!(
                            "unexpected end of binary data for input '{}': {} of its bytes are missing",
                            self.images_name,
                            want - buf.len()
                        )));
                    }
                    self.encoded_images =
                        split_bytes_elements(&self.images_name, &Bytes::from(buf))?;
                }
            }
        }
        let inputs = self
            .inputs
            .into_iter()
            .map(|(name, t)| match t {
                Some(t) => Ok((name, t)),
                None => Err(ServerError::Internal(format!(
                    "input '{name}' was not filled"
                ))),
            })
            .collect::<Result<NamedTensors>>()?;
        Ok(DecodedRequest {
            request: InferRequest {
                encoded_images: self.encoded_images,
                id: self.id,
                inputs,
                outputs: self.outputs,
                priority: self.priority,
                timeout: self.timeout,
                trace: None,
            },
            output_binary: self.output_binary,
            binary_default: self.binary_default,
            output_shm: self.output_shm,
        })
    }
}

/// The shared-memory place named by a tensor's `shared_memory_region`,
/// `shared_memory_byte_size` and `shared_memory_offset` parameters.
fn shm_place(
    kind: &str,
    name: &str,
    params: &Map<String, Value>,
    shm: Option<&ShmRegistry>,
) -> Result<ShmRef> {
    let registry = shm.ok_or_else(|| {
        ServerError::Unsupported(format!(
            "{kind} '{name}': shared memory is not available on this endpoint"
        ))
    })?;
    let region = match params.get("shared_memory_region") {
        Some(Value::String(r)) => r,
        _ => {
            return Err(ServerError::invalid(format!(
                "{kind} '{name}': parameter 'shared_memory_region' must be a string"
            )))
        }
    };
    let byte_size = uint_param(params, "shared_memory_byte_size")?.ok_or_else(|| {
        ServerError::invalid(format!(
            "{kind} '{name}': 'shared_memory_region' needs a 'shared_memory_byte_size' parameter"
        ))
    })?;
    let offset = uint_param(params, "shared_memory_offset")?.unwrap_or(0);
    ShmRef::resolve(registry, region, byte_size, offset)
        .map_err(|e| ServerError::invalid(format!("{kind} '{name}': {e}")))
}

fn no_data(name: &str) -> ServerError {
    ServerError::invalid(format!(
        "input '{name}' has neither 'data' nor a 'binary_data_size' parameter"
    ))
}

fn unclaimed(extra: usize) -> ServerError {
    ServerError::invalid(format!(
        "{extra} bytes of binary data follow the request header but no input claims them"
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shared_memory_inputs_and_outputs_resolve_against_the_registry() {
        let key = format!("/aperture-codec-test-{}", std::process::id());
        let path = format!("/dev/shm/{}", key.trim_start_matches('/'));
        std::fs::write(&path, f32_bytes(&[0.0, 1.5, -2.0, 9.0])).unwrap();
        let reg = ShmRegistry::default();
        reg.register("r", &key, 0, 16).unwrap();
        let body = br#"{"inputs":[{"name":"A","shape":[1,2],"datatype":"FP32","parameters":{"shared_memory_region":"r","shared_memory_byte_size":8,"shared_memory_offset":4}}],
            "outputs":[{"name":"Y","parameters":{"shared_memory_region":"r","shared_memory_byte_size":8,"shared_memory_offset":8}},{"name":"Z"}]}"#;
        let d = decode_request_with_shm(body, None, Some(&reg));
        let bad_size = br#"{"inputs":[{"name":"A","shape":[1,2],"datatype":"FP32","parameters":{"shared_memory_region":"r","shared_memory_byte_size":12}}]}"#;
        let size_err = decode_request_with_shm(bad_size, None, Some(&reg));
        let beyond = br#"{"inputs":[],"outputs":[{"name":"Y","parameters":{"shared_memory_region":"r","shared_memory_byte_size":8,"shared_memory_offset":12}}]}"#;
        let beyond_err = decode_request_with_shm(beyond, None, Some(&reg));
        let no_reg = decode_request(body, None);
        let _ = std::fs::remove_file(&path);

        let d = d.unwrap();
        assert_eq!(d.request.inputs[0].1.to_f32_vec(), vec![1.5, -2.0]);
        assert_eq!(d.output_shm.len(), 2);
        let y = d.output_shm[0].as_ref().unwrap();
        assert_eq!((y.region.name.as_str(), y.byte_size, y.offset), ("r", 8, 8));
        assert!(d.output_shm[1].is_none());
        let e = size_err.err().unwrap();
        assert!(e.to_string().contains("needs 8 bytes"), "{e}");
        let e = beyond_err.err().unwrap();
        assert!(e.to_string().contains("Invalid offset + byte size"), "{e}");
        assert_eq!(e.http_status(), 400);
        let e = no_reg.err().unwrap();
        assert!(
            e.to_string().contains("shared memory is not available"),
            "{e}"
        );
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
}
