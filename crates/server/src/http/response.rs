//! KServe v2 HTTP inference responses: the JSON header, then each binary output's
//! bytes as its own body chunk, taken from the tensor's storage without a copy.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use aperture_engine::NamedTensors;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::{Result, ServerError};
use crate::shm::ShmRef;
use crate::tensor_io::{kserve_datatype, tensor_into_bytes};

/// An encoded answer: body chunks (JSON header first) and, when any output is binary,
/// the header's length.
pub struct EncodedResponse {
    pub chunks: Vec<Bytes>,
    pub header_len: Option<usize>,
}

impl EncodedResponse {
    /// The body with an exact length (so it goes out with Content-Length, written
    /// chunk by chunk from the tensors' memory).
    pub fn into_body(self) -> ChunkedBody {
        ChunkedBody::new(self.chunks)
    }

    /// All chunks joined (tests, small answers).
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// Where one output's values go.
pub enum OutputPlace {
    /// Numbers in the JSON header.
    Json,
    /// Raw bytes after the header (binary tensor extension).
    Binary,
    /// Written into a registered shared-memory region; the header only names it.
    SharedMemory(ShmRef),
}

/// Encodes outputs (already in the requested order) as JSON or binary per output.
pub fn encode_response(
    model: &str,
    version: u64,
    id: &str,
    outputs: NamedTensors,
    binary: &[bool],
) -> Result<EncodedResponse> {
    let places: Vec<OutputPlace> = (0..outputs.len())
        .map(|i| match binary.get(i) {
            Some(true) => OutputPlace::Binary,
            _ => OutputPlace::Json,
        })
        .collect();
    encode_response_placed(model, version, id, outputs, places)
}

/// Encodes outputs (already in the requested order), each to its place; outputs bound
/// for shared memory are written into their regions here (a region may be larger than
/// the output, as in Triton, never smaller).
pub fn encode_response_placed(
    model: &str,
    version: u64,
    id: &str,
    outputs: NamedTensors,
    mut places: Vec<OutputPlace>,
) -> Result<EncodedResponse> {
    places.resize_with(outputs.len(), || OutputPlace::Json);
    for ((name, t), place) in outputs.iter().zip(&places) {
        if let OutputPlace::SharedMemory(shm) = place {
            let size = t.numel() * t.dtype().size_bytes();
            if size > shm.byte_size {
                return Err(ServerError::invalid(format!(
                    "shared memory size specified with the request for output '{name}' \
                     ({} bytes) should be at least {size} bytes to hold the results",
                    shm.byte_size
                )));
            }
            crate::tensor_io::with_le_bytes(t, |b| shm.region.write_from(shm.offset, b))?;
        }
    }
    let is_binary = |i: usize| matches!(places.get(i), Some(OutputPlace::Binary));
    let any_binary = (0..outputs.len()).any(is_binary);
    let head = {
        let widened: Vec<Option<Vec<f32>>> = outputs
            .iter()
            .zip(&places)
            .map(|((_, t), p)| match (p, t.as_f32()) {
                (OutputPlace::Json, None) => Some(t.to_f32_vec()),
                _ => None,
            })
            .collect();
        let outs: Vec<OutputHead> = outputs
            .iter()
            .zip(&widened)
            .zip(&places)
            .map(|(((name, t), wide), place)| {
                let size = t.numel() * t.dtype().size_bytes();
                let (parameters, data) = match place {
                    OutputPlace::Json => (None, wide.as_deref().or_else(|| t.as_f32())),
                    OutputPlace::Binary => (
                        Some(OutputParams {
                            binary_data_size: Some(size),
                            ..Default::default()
                        }),
                        None,
                    ),
                    OutputPlace::SharedMemory(shm) => (
                        Some(OutputParams {
                            shared_memory_region: Some(&shm.region.name),
                            shared_memory_byte_size: Some(size),
                            shared_memory_offset: (shm.offset != 0).then_some(shm.offset),
                            ..Default::default()
                        }),
                        None,
                    ),
                };
                OutputHead {
                    name,
                    datatype: kserve_datatype(t.dtype()),
                    shape: t.shape(),
                    parameters,
                    data,
                }
            })
            .collect();
        let head = ResponseHead {
            model_name: model,
            model_version: version.to_string(),
            id,
            outputs: outs,
        };
        serde_json::to_vec(&head)
            .map_err(|e| ServerError::Internal(format!("encoding response: {e}")))?
    };
    let header_len = any_binary.then_some(head.len());
    let mut chunks = vec![Bytes::from(head)];
    for (i, (_, t)) in outputs.into_iter().enumerate() {
        if is_binary(i) {
            chunks.push(tensor_into_bytes(t));
        } else {
            crate::pool::give(t.into_data());
        }
    }
    Ok(EncodedResponse { chunks, header_len })
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
    parameters: Option<OutputParams<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
}

#[derive(serde::Serialize, Default)]
struct OutputParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    binary_data_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_memory_region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_memory_byte_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_memory_offset: Option<usize>,
}

/// A body of known chunks with an exact size hint.
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl ChunkedBody {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            remaining,
        }
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.chunks.pop_front().map(|c| {
            this.remaining -= c.len() as u64;
            Ok(Frame::data(c))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::{json, Value};

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn response_mixes_binary_and_json_outputs() {
        let t = aperture_engine::HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
        let outs = vec![("X".to_string(), t.clone()), ("Y".to_string(), t)];
        let r = encode_response("m", 3, "abc", outs, &[true, false]).unwrap();
        let n = r.header_len.unwrap();
        let body = r.to_vec();
        let head: Value = serde_json::from_slice(&body[..n]).unwrap();
        assert_eq!(head["model_version"], "3");
        assert_eq!(head["id"], "abc");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["outputs"][1]["data"], json!([1.0, 2.0]));
        assert_eq!(&body[n..], f32_bytes(&[1.0, 2.0]).as_slice());
    }

    #[test]
    fn json_only_answer_has_no_header_length() {
        let t = aperture_engine::HostTensor::from_f32(vec![1, 1], vec![4.0]).unwrap();
        let r = encode_response("m", 1, "", vec![("X".into(), t)], &[false]).unwrap();
        assert!(r.header_len.is_none());
        let head: Value = serde_json::from_slice(&r.to_vec()).unwrap();
        assert_eq!(head["outputs"][0]["data"], json!([4.0]));
    }

    #[tokio::test]
    async fn chunked_body_reports_exact_length_and_yields_all_bytes() {
        let chunks = vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
        ];
        let body = ChunkedBody::new(chunks);
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(5));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcde");
    }
}
