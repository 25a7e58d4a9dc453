//! Large binary tensors through the HTTP API in process: the streamed request path, the
//! chunked zero-copy answer, batch-filling requests (moved, not concatenated), merged
//! batches (concatenated into pooled storage) and storage recycled between requests.

use std::sync::Arc;

use aperture_server::{
    ArchitectureRegistry, ModelConfig, ModelSource, Repository, ServeOptions, Server, Shared,
};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Per-item shape: 3x128x128 f32 = 192 KiB a row, so 8 rows pass the pool's minimum.
const ITEM: [usize; 3] = [3, 128, 128];
const MAX_BATCH: usize = 8;

async fn identity_server() -> Arc<Shared> {
    let repo = Repository::new(None, Arc::new(ArchitectureRegistry::with_builtins()));
    let mut cfg = ModelConfig::with_architecture("identity");
    cfg.input_size = Some(ITEM.iter().map(|&d| d as i64).collect());
    cfg.max_batch_size = MAX_BATCH;
    cfg.dynamic_batching.max_queue_delay_microseconds = 20_000;
    repo.add_source(
        "ident",
        ModelSource::Inline {
            config: Box::new(cfg),
            dir: ".".into(),
        },
    );
    let server = Server::new(ServeOptions::default(), repo);
    let shared = server.shared();
    assert!(shared.repository.load_all().await.is_empty());
    shared
}

/// Distinct values per request and element.
fn values(rows: usize, seed: u32) -> Vec<f32> {
    let n = rows * ITEM.iter().product::<usize>();
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-6)
        .collect()
}

/// Sends one binary request (with a Content-Length when `sized`); returns the answer's
/// binary output as f32.
async fn echo(s: &Arc<Shared>, rows: usize, seed: u32, sized: bool) -> Vec<f32> {
    let data = values(rows, seed);
    let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut shape = vec![rows];
    shape.extend(ITEM);
    let head = json!({
        "inputs": [{"name": "INPUT0", "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend(&raw);
    let mut req = Request::post("/v2/models/ident/infer")
        .header("inference-header-content-length", head.len());
    if sized {
        req = req.header("content-length", body.len());
    }
    let resp = aperture_server::http::router(s.clone())
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let hl: usize = resp.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let out: Value = serde_json::from_slice(&body[..hl]).unwrap();
    assert_eq!(out["outputs"][0]["shape"][0], rows);
    assert_eq!(
        out["outputs"][0]["parameters"]["binary_data_size"],
        raw.len()
    );
    assert_eq!(body.len() - hl, raw.len());
    let got: Vec<f32> = body[hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(got == data, "request {seed}: answer differs from its input");
    got
}

#[tokio::test]
async fn batch_filling_requests_echo_exactly_one_after_another() {
    let s = identity_server().await;
    // Recycled storage must never leak one request's values into the next.
    for seed in 0..4 {
        echo(&s, MAX_BATCH, seed, seed % 2 == 0).await;
    }
    let stats = s.repository.get("ident", None).unwrap().stats.snapshot();
    assert_eq!(stats.success.count, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_batches_answer_each_request_with_its_own_rows() {
    let s = identity_server().await;
    let mut tasks = Vec::new();
    for seed in 0..8u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            echo(&s, 1 + seed as usize % 3, 100 + seed, seed % 2 == 1).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = s.repository.get("ident", None).unwrap().stats.snapshot();
    assert_eq!(stats.success.count, 8);
    assert!(
        stats.execution_count < 8,
        "no two requests were merged into one batch"
    );
}
