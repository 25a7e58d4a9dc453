//! One connection per load-generator worker: HTTP/1.1 (hyper) or gRPC (tonic).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::grpc::inference::{
    self as pb, grpc_inference_service_client::GrpcInferenceServiceClient,
};

/// An input tensor the generator sends: name, KServe datatype, shape, raw bytes.
#[derive(Clone, Debug)]
pub struct WireInput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub raw: Vec<u8>,
    /// The same values as JSON numbers (for JSON requests).
    pub values: Vec<f32>,
}

/// How one request is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Binary,
    /// Inputs in registered system shared-memory regions (`super::shm`), outputs as
    /// binary data in the answer.
    SharedMemory,
}

pub struct HttpClient {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
    api_key: Option<String>,
}

impl HttpClient {
    pub async fn connect(addr: &str, api_key: Option<String>) -> Result<Self, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            host: addr.to_string(),
            api_key,
        })
    }

    /// Sends one request; returns status and body (the body of a 200 answer only with
    /// `keep_ok_body`; it is read and dropped otherwise).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
        header_len: Option<usize>,
        keep_ok_body: bool,
    ) -> Result<(u16, Bytes), String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(n) = header_len {
            req = req
                .header("inference-header-content-length", n)
                .header("content-type", "application/octet-stream");
        } else {
            req = req.header("content-type", "application/json");
        }
        if let Some(k) = &self.api_key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status == 200 && !keep_ok_body {
            // Read the answer to its end without gathering it: a 157 MB answer would
            // otherwise cost the generator a fresh buffer and a copy per request.
            while let Some(frame) = body.frame().await {
                frame.map_err(|e| format!("body: {e}"))?;
            }
            return Ok((status, Bytes::new()));
        }
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }

    pub async fn get_json(&mut self, path: &str) -> Result<Value, String> {
        let (status, body) = self.send("GET", path, Bytes::new(), None, true).await?;
        if status != 200 {
            return Err(format!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))
    }
}

/// Builds a KServe HTTP infer body for `inputs`; returns body and header length.
pub fn http_infer_body(inputs: &[WireInput], encoding: Encoding) -> (Bytes, Option<usize>) {
    let tensors: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, i)| match encoding {
            Encoding::Json => json!({ "name": i.name, "datatype": i.datatype, "shape": i.shape, "data": i.values }),
            Encoding::Binary => json!({
                "name": i.name, "datatype": i.datatype, "shape": i.shape,
                "parameters": { "binary_data_size": i.raw.len() },
            }),
            Encoding::SharedMemory => json!({
                "name": i.name, "datatype": i.datatype, "shape": i.shape,
                "parameters": {
                    "shared_memory_region": super::shm::region_name(index),
                    "shared_memory_byte_size": i.raw.len(),
                },
            }),
        })
        .collect();
    let mut head = json!({ "inputs": tensors });
    if encoding != Encoding::Json {
        head["parameters"] = json!({ "binary_data_output": true });
    }
    let head = serde_json::to_vec(&head).unwrap_or_default();
    match encoding {
        Encoding::Json | Encoding::SharedMemory => (Bytes::from(head), None),
        Encoding::Binary => {
            let n = head.len();
            let mut body = head;
            for i in inputs {
                body.extend_from_slice(&i.raw);
            }
            (Bytes::from(body), Some(n))
        }
    }
}

pub struct GrpcClient {
    inner: GrpcInferenceServiceClient<tonic::transport::Channel>,
    api_key: Option<String>,
}

impl GrpcClient {
    pub async fn connect(addr: &str, api_key: Option<String>) -> Result<Self, String> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("{addr}: {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let inner = GrpcInferenceServiceClient::new(ch).max_decoding_message_size(usize::MAX);
        Ok(Self { inner, api_key })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(k) = &self.api_key {
            if let Ok(v) = format!("Bearer {k}").parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }

    pub async fn infer(&mut self, model: &str, inputs: &[WireInput]) -> Result<(), String> {
        let msg = pb::ModelInferRequest {
            model_name: model.to_string(),
            inputs: inputs
                .iter()
                .map(|i| pb::model_infer_request::InferInputTensor {
                    name: i.name.clone(),
                    datatype: i.datatype.clone(),
                    shape: i.shape.clone(),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: inputs.iter().map(|i| i.raw.clone()).collect(),
            ..Default::default()
        };
        let req = self.request(msg);
        self.inner
            .model_infer(req)
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    pub async fn stats(&mut self, model: &str) -> Result<Vec<pb::ModelStatistics>, String> {
        let req = self.request(pb::ModelStatisticsRequest {
            name: model.to_string(),
            version: String::new(),
        });
        let r = self
            .inner
            .model_statistics(req)
            .await
            .map_err(|s| s.message().to_string())?;
        Ok(r.into_inner().model_stats)
    }

    pub async fn metadata(&mut self, model: &str) -> Result<pb::ModelMetadataResponse, String> {
        let req = self.request(pb::ModelMetadataRequest {
            name: model.to_string(),
            version: String::new(),
        });
        Ok(self
            .inner
            .model_metadata(req)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner())
    }
}
