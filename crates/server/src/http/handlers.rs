//! One function per KServe v2 HTTP endpoint.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::body::{drain_body, read_infer_request_with_shm};
use super::codec::HEADER_LENGTH;
use super::compression::{
    compress, header_value as compression_header, request_coding, response_coding, Coding,
};
use super::response::{encode_response_placed, OutputPlace};
use crate::error::{Result, ServerError};
use crate::model::LoadedModel;
use crate::server::{Shared, EXTENSIONS, SERVER_NAME};
use crate::tensor_io::{config_datatype, kserve_datatype};

type S = State<Arc<Shared>>;

pub async fn server_metadata() -> Json<Value> {
    Json(
        json!({ "name": SERVER_NAME, "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS }),
    )
}

pub async fn live() -> StatusCode {
    StatusCode::OK
}

pub async fn ready(State(s): S) -> StatusCode {
    if s.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// `GET /v2/logging`: the log settings (Triton's logging extension).
pub async fn logging(State(s): S) -> Result<Json<Value>> {
    let now = crate::logging::settings(s.options.log_control.as_ref(), &[])?;
    Ok(Json(now.to_json()))
}

/// `POST /v2/logging`: changes the settings the body names, answers all of them.
pub async fn update_logging(State(s): S, body: axum::body::Bytes) -> Result<Json<Value>> {
    let changes = crate::logging::changes_from_json(&body)?;
    let now = crate::logging::settings(s.options.log_control.as_ref(), &changes)?;
    Ok(Json(now.to_json()))
}

/// `GET /v2/trace/setting`: the server's trace settings (Triton's trace extension).
pub async fn trace_setting(State(s): S) -> Result<Json<Value>> {
    Ok(Json(s.trace_settings(None, &[])?.to_json()))
}

/// `POST /v2/trace/setting`: changes the server's settings the body names.
pub async fn update_trace_setting(State(s): S, body: axum::body::Bytes) -> Result<Json<Value>> {
    let changes = crate::trace::changes_from_json(&body)?;
    Ok(Json(s.trace_settings(None, &changes)?.to_json()))
}

/// `GET /v2/models/{m}/trace/setting`: the settings in force for one model.
pub async fn model_trace_setting(State(s): S, Path(m): Path<String>) -> Result<Json<Value>> {
    Ok(Json(s.trace_settings(Some(&m), &[])?.to_json()))
}

/// `POST /v2/models/{m}/trace/setting`: the model's own level, rate or count (null: the
/// server's again).
pub async fn update_model_trace_setting(
    State(s): S,
    Path(m): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>> {
    let changes = crate::trace::changes_from_json(&body)?;
    Ok(Json(s.trace_settings(Some(&m), &changes)?.to_json()))
}

pub async fn not_found() -> ServerError {
    ServerError::NotFound("Not Found".into())
}

pub async fn model_metadata(State(s): S, Path(m): Path<String>) -> Result<Json<Value>> {
    metadata(&s, &m, None)
}

pub async fn model_metadata_v(
    State(s): S,
    Path((m, v)): Path<(String, String)>,
) -> Result<Json<Value>> {
    metadata(&s, &m, Some(&v))
}

fn metadata(s: &Shared, name: &str, version: Option<&str>) -> Result<Json<Value>> {
    let model = s.repository.get(name, version)?;
    let specs = |specs: &[aperture_engine::TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|t| {
                let mut shape = vec![-1i64];
                shape.extend(&t.shape);
                json!({ "name": t.name, "datatype": kserve_datatype(t.dtype), "shape": shape })
            })
            .collect()
    };
    let versions: Vec<String> = s
        .repository
        .versions(name)
        .iter()
        .map(|v| v.to_string())
        .collect();
    Ok(Json(json!({
        "name": model.name,
        "versions": versions,
        "platform": crate::server::PLATFORM,
        "inputs": specs(&model.inputs),
        "outputs": specs(&model.outputs),
    })))
}

pub async fn model_ready(State(s): S, Path(m): Path<String>) -> StatusCode {
    ready_status(&s, &m, None)
}

pub async fn model_ready_v(State(s): S, Path((m, v)): Path<(String, String)>) -> StatusCode {
    ready_status(&s, &m, Some(&v))
}

fn ready_status(s: &Shared, name: &str, version: Option<&str>) -> StatusCode {
    match s.repository.get(name, version) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

pub async fn model_config(State(s): S, Path(m): Path<String>) -> Result<Json<Value>> {
    Ok(Json(config_json(&*s.repository.get(&m, None)?)))
}

pub async fn model_config_v(
    State(s): S,
    Path((m, v)): Path<(String, String)>,
) -> Result<Json<Value>> {
    Ok(Json(config_json(&*s.repository.get(&m, Some(&v))?)))
}

/// Triton's JSON model configuration.
pub fn config_json(m: &LoadedModel) -> Value {
    let b = m.batcher_config();
    let inputs: Vec<Value> = m
        .inputs
        .iter()
        .map(|t| {
            json!({
                "name": t.name, "data_type": config_datatype(t.dtype), "format": "FORMAT_NONE",
                "dims": t.shape, "is_shape_tensor": false, "allow_ragged_batch": false, "optional": false,
            })
        })
        .collect();
    let outputs: Vec<Value> = m
        .outputs
        .iter()
        .map(|t| {
            json!({
                "name": t.name, "data_type": config_datatype(t.dtype), "dims": t.shape,
                "label_filename": m.config.labels.clone().unwrap_or_default(), "is_shape_tensor": false,
            })
        })
        .collect();
    let policy = match &m.config.version_policy {
        crate::config::VersionPolicy::Latest(n) => json!({ "latest": { "num_versions": n } }),
        crate::config::VersionPolicy::All => json!({ "all": {} }),
        crate::config::VersionPolicy::Specific(v) => json!({ "specific": { "versions": v } }),
    };
    let kind = match m.config.instance_group.kind.as_deref() {
        Some("gpu") | Some("GPU") => "KIND_GPU",
        Some("auto") | Some("AUTO") => "KIND_AUTO",
        _ if m.device.starts_with("cuda") => "KIND_GPU",
        _ => "KIND_CPU",
    };
    json!({
        "name": m.name,
        "platform": crate::server::PLATFORM,
        "backend": crate::server::BACKEND,
        "version_policy": policy,
        "max_batch_size": b.max_batch_size,
        "input": inputs,
        "output": outputs,
        "batch_input": [],
        "batch_output": [],
        "dynamic_batching": {
            "preferred_batch_size": b.preferred_batch_sizes,
            "max_queue_delay_microseconds": b.max_queue_delay.as_micros() as u64,
            "preserve_ordering": b.preserve_ordering,
            "priority_levels": b.priority_levels,
            "default_priority_level": b.default_priority,
            "default_queue_policy": {
                "timeout_action": if b.timeout_action == crate::config::TimeoutAction::Delay { "DELAY" } else { "REJECT" },
                "default_timeout_microseconds": b.default_timeout.map(|d| d.as_micros() as u64).unwrap_or(0),
                "allow_timeout_override": b.allow_timeout_override,
                "max_queue_size": b.max_queue_size,
            },
            "priority_queue_policy": {},
        },
        "instance_group": [{
            "name": format!("{}_0", m.name), "kind": kind, "count": m.instances,
            "gpus": m.config.instance_group.gpus, "secondary_devices": [], "profile": [],
            "passive": false, "host_policy": "",
        }],
        "default_model_filename": m.config.weights.clone().unwrap_or_default(),
        "cc_model_filenames": {},
        "metric_tags": {},
        "parameters": {},
        "model_warmup": [],
    })
}

pub async fn all_stats(State(s): S) -> Json<Value> {
    let stats: Vec<Value> = s
        .repository
        .loaded()
        .iter()
        .map(|m| m.stats.snapshot().to_json(&m.name, &m.version.to_string()))
        .collect();
    Json(json!({ "model_stats": stats }))
}

pub async fn model_stats(State(s): S, Path(m): Path<String>) -> Result<Json<Value>> {
    s.repository.get(&m, None)?;
    let stats: Vec<Value> = s
        .repository
        .loaded()
        .iter()
        .filter(|x| x.name == m)
        .map(|x| x.stats.snapshot().to_json(&x.name, &x.version.to_string()))
        .collect();
    Ok(Json(json!({ "model_stats": stats })))
}

pub async fn model_stats_v(
    State(s): S,
    Path((m, v)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let x = s.repository.get(&m, Some(&v))?;
    Ok(Json(
        json!({ "model_stats": [x.stats.snapshot().to_json(&x.name, &x.version.to_string())] }),
    ))
}

pub async fn infer(State(s): S, Path(m): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let start = std::time::Instant::now();
    let resp = run_infer(&s, &m, None, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    log_infer(&m, &resp, start);
    resp
}

pub async fn infer_v(
    State(s): S,
    Path((m, v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = std::time::Instant::now();
    let resp = run_infer(&s, &m, Some(&v), &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    log_infer(&m, &resp, start);
    resp
}

/// One structured line per request (`RUST_LOG=aperture_server=debug`).
fn log_infer(model: &str, resp: &Response, start: std::time::Instant) {
    tracing::debug!(
        model,
        status = resp.status().as_u16(),
        elapsed_us = start.elapsed().as_micros() as u64,
        "http infer"
    );
}

/// Maps a body-read failure: over the limit is 413 with the limit in the message.
pub fn body_or_error(
    body: std::result::Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServerError::PayloadTooLarge(format!(
                "request body exceeds the limit of {limit} bytes (--max-body-mb)"
            ))
        } else {
            ServerError::invalid(format!(
                "failed to read the request body: {}",
                e.body_text()
            ))
        }
    })
}

async fn run_infer(
    s: &Shared,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let arrived = std::time::Instant::now();
    let limit = s.options.max_body_bytes;
    let model = match request_coding(headers).and_then(|_| s.repository.get(name, version)) {
        Ok(m) => m,
        Err(e) => {
            drain_body(body, limit).await;
            return Err(e);
        }
    };
    let decoded = read_infer_request_with_shm(body, headers, limit, Some(&s.shared_memory)).await?;
    let received = crate::trace::Received {
        names: ("HTTP_RECV_START", "HTTP_RECV_END"),
        start: arrived,
        end: std::time::Instant::now(),
    };
    let id = decoded.request.id.clone();
    let (result, trace) = s.run_traced(&model, decoded.request, Some(received)).await;
    if let Some(t) = &trace {
        t.mark("HTTP_SEND_START");
    }
    let answer = match result {
        Ok(outputs) => {
            let places = (
                decoded.output_binary,
                decoded.binary_default,
                decoded.output_shm,
            );
            encode_answer(&model, &id, outputs, places, headers).await
        }
        Err(e) => Err(e),
    };
    if let Some(t) = trace {
        // The answer is encoded and handed to the connection.
        t.mark("HTTP_SEND_END");
        s.tracer.finish(t);
    }
    answer
}

/// Where each output goes: per-output binary flags (None: the default), the default,
/// and shared-memory places.
type AnswerPlaces = (Option<Vec<bool>>, bool, Vec<Option<crate::shm::ShmRef>>);

/// The HTTP answer to an inference: JSON and binary outputs (or shared memory), the
/// body compressed as the client accepts.
async fn encode_answer(
    model: &LoadedModel,
    id: &str,
    outputs: aperture_engine::NamedTensors,
    (output_binary, binary_default, output_shm): AnswerPlaces,
    headers: &HeaderMap,
) -> Result<Response> {
    let binary: Vec<bool> = match output_binary {
        Some(flags) => flags,
        None => vec![binary_default; outputs.len()],
    };
    let mut shm = output_shm.into_iter();
    let places: Vec<OutputPlace> = binary
        .iter()
        .map(|&b| match shm.next().flatten() {
            Some(place) => OutputPlace::SharedMemory(place),
            None if b => OutputPlace::Binary,
            None => OutputPlace::Json,
        })
        .collect();
    let enc = encode_response_placed(&model.name, model.version, id, outputs, places)?;
    let header_len = enc.header_len;
    let coding = response_coding(headers);
    let mut resp = if coding == Coding::Identity {
        Response::new(Body::new(enc.into_body()))
    } else {
        let plain = enc.to_vec();
        let packed = tokio::task::spawn_blocking(move || compress(&plain, coding))
            .await
            .map_err(|e| ServerError::Internal(format!("compressing the answer: {e}")))??;
        let mut resp = Response::new(Body::from(packed));
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, compression_header(coding));
        resp
    };
    let h = resp.headers_mut();
    match header_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LENGTH, header::HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(resp)
}

#[derive(serde::Deserialize, Default)]
struct IndexBody {
    #[serde(default)]
    ready: bool,
}

pub async fn repository_index(State(s): S, body: Bytes) -> Result<Json<Value>> {
    let req: IndexBody = if body.iter().all(|b| b.is_ascii_whitespace()) {
        IndexBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ServerError::invalid(format!("failed to parse the request JSON: {e}")))?
    };
    let rows: Vec<Value> = s
        .repository
        .index(req.ready)
        .into_iter()
        .map(|e| {
            let mut v = json!({ "name": e.name, "state": e.state });
            if !e.version.is_empty() {
                v["version"] = json!(e.version);
            }
            if !e.reason.is_empty() {
                v["reason"] = json!(e.reason);
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

pub async fn repository_load(State(s): S, Path(m): Path<String>) -> Result<StatusCode> {
    s.repository.load(&m).await?;
    Ok(StatusCode::OK)
}

pub async fn repository_unload(State(s): S, Path(m): Path<String>) -> Result<StatusCode> {
    s.repository.unload(&m).await?;
    Ok(StatusCode::OK)
}
