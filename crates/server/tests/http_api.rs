//! The HTTP API in process (no sockets): status codes and messages of the KServe v2
//! endpoints, including every malformed-request case.

use std::sync::Arc;

use aperture_server::logging::{LogControl, LogHandle, LogLevel};
use aperture_server::{
    ArchitectureRegistry, ModelConfig, ModelSource, Repository, ServeOptions, Server, Shared,
};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

async fn shared(options: ServeOptions) -> Arc<Shared> {
    let repo = Repository::new(None, Arc::new(ArchitectureRegistry::with_builtins()));
    let mut simple = ModelConfig::with_architecture("add_sub");
    simple.input_size = Some(vec![4]);
    repo.add_source(
        "simple",
        ModelSource::Inline {
            config: Box::new(simple),
            dir: ".".into(),
        },
    );
    let server = Server::new(options, repo);
    let shared = server.shared();
    assert!(shared.repository.load_all().await.is_empty());
    shared
}

async fn call(s: &Arc<Shared>, req: Request<Body>) -> (StatusCode, Vec<u8>, Option<String>) {
    let resp = aperture_server::http::router(s.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let hl = resp
        .headers()
        .get("inference-header-content-length")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body, hl)
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).body(body.into()).unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

async fn error_of(s: &Arc<Shared>, req: Request<Body>, status: StatusCode) -> String {
    let (got, body, _) = call(s, req).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, status, "{v}");
    v["error"].as_str().unwrap().to_string()
}

fn simple_json(a: &[f32], b: &[f32], datatype: &str) -> String {
    json!({"inputs": [
        {"name": "INPUT0", "shape": [1, a.len()], "datatype": datatype, "data": a},
        {"name": "INPUT1", "shape": [1, b.len()], "datatype": datatype, "data": b},
    ]})
    .to_string()
}

#[tokio::test]
async fn json_and_binary_inference() {
    let s = shared(ServeOptions::default()).await;
    let (st, body, hl) = call(
        &s,
        post(
            "/v2/models/simple/infer",
            simple_json(&[1., 2., 3., 4.], &[1., 1., 1., 1.], "FP32"),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(hl.is_none());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["outputs"][0]["name"], "OUTPUT0");
    assert_eq!(v["outputs"][0]["data"], json!([2.0, 3.0, 4.0, 5.0]));
    assert_eq!(v["outputs"][1]["data"], json!([0.0, 1.0, 2.0, 3.0]));

    let head = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
            {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
        ],
        "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend(f32s(&[5., 6., 7., 8.]));
    body.extend(f32s(&[1., 2., 3., 4.]));
    let req = Request::post("/v2/models/simple/infer")
        .header("Inference-Header-Content-Length", head.len())
        .body(Body::from(body))
        .unwrap();
    let (st, body, hl) = call(&s, req).await;
    assert_eq!(st, StatusCode::OK);
    let n: usize = hl.unwrap().parse().unwrap();
    let v: Value = serde_json::from_slice(&body[..n]).unwrap();
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 16);
    assert_eq!(&body[n..], f32s(&[4., 4., 4., 4.]).as_slice());
}

#[tokio::test]
async fn malformed_requests_are_4xx_with_a_message() {
    let s = shared(ServeOptions {
        max_body_bytes: 4096,
        ..Default::default()
    })
    .await;
    let bad = StatusCode::BAD_REQUEST;
    let e = error_of(&s, post("/v2/models/simple/infer", "{\"inputs\": ["), bad).await;
    assert!(e.contains("failed to parse the request JSON"), "{e}");
    let e = error_of(
        &s,
        post(
            "/v2/models/simple/infer",
            simple_json(&[1.; 4], &[1.; 4], "INT32"),
        ),
        bad,
    )
    .await;
    assert!(e.contains("INT32"), "{e}");
    let e = error_of(
        &s,
        post(
            "/v2/models/simple/infer",
            simple_json(&[1.; 3], &[1.; 3], "FP32"),
        ),
        bad,
    )
    .await;
    assert!(e.contains("unexpected shape for input 'INPUT0'"), "{e}");
    let e = error_of(
        &s,
        post(
            "/v2/models/simple/infer",
            simple_json(&[1.; 4], &[1.; 3], "FP32"),
        ),
        bad,
    )
    .await;
    assert!(e.contains("INPUT1"), "{e}");

    let head = json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
        {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
    ]})
    .to_string();
    let mut truncated = head.clone().into_bytes();
    truncated.extend(f32s(&[1.; 6]));
    let req = Request::post("/v2/models/simple/infer")
        .header("Inference-Header-Content-Length", head.len())
        .body(Body::from(truncated))
        .unwrap();
    let e = error_of(&s, req, bad).await;
    assert!(
        e.contains("unexpected end of binary data for input 'INPUT1'"),
        "{e}"
    );

    let req = Request::post("/v2/models/simple/infer")
        .header("Inference-Header-Content-Length", "99999")
        .body(Body::from(head.clone()))
        .unwrap();
    let e = error_of(&s, req, bad).await;
    assert!(
        e.contains("Inference-Header-Content-Length is 99999"),
        "{e}"
    );

    let req = Request::post("/v2/models/simple/infer")
        .header("Inference-Header-Content-Length", "twelve")
        .body(Body::from(head))
        .unwrap();
    assert!(error_of(&s, req, bad)
        .await
        .contains("non-negative integer"));

    let e = error_of(
        &s,
        post("/v2/models/nope/infer", "{}"),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(e.contains("unknown model: 'nope'"), "{e}");
    let e = error_of(
        &s,
        post("/v2/models/simple/versions/3/infer", "{}"),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(e.contains("version 3"), "{e}");
    let e = error_of(
        &s,
        post("/v2/models/simple/infer", vec![b' '; 5000]),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(e.contains("4096 bytes"), "{e}");
    let req = Request::post("/v2/models/simple/infer")
        .header("content-encoding", "br")
        .body(Body::from("x"))
        .unwrap();
    assert!(error_of(&s, req, bad)
        .await
        .contains("Content-Encoding 'br'"));
    let req = Request::post("/v2/models/simple/infer")
        .header("content-encoding", "gzip")
        .body(Body::from("not gzip"))
        .unwrap();
    assert!(error_of(&s, req, bad)
        .await
        .contains("failed to decompress the gzip request body"));
    assert!(error_of(&s, get("/v2/nothing/here"), StatusCode::NOT_FOUND)
        .await
        .contains("Not Found"));

    // Still serving.
    let (st, _, _) = call(
        &s,
        post(
            "/v2/models/simple/infer",
            simple_json(&[1.; 4], &[1.; 4], "FP32"),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn metadata_config_stats_and_repository() {
    let s = shared(ServeOptions::default()).await;
    let (st, body, _) = call(&s, get("/v2")).await;
    assert_eq!(st, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "binary_tensor_data"));

    let (_, body, _) = call(&s, get("/v2/models/simple/config")).await;
    let cfg: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(cfg["max_batch_size"], 8);
    assert_eq!(cfg["input"][1]["name"], "INPUT1");
    assert_eq!(cfg["input"][1]["data_type"], "TYPE_FP32");
    assert_eq!(cfg["input"][1]["dims"], json!([4]));
    assert_eq!(
        cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"],
        1024
    );

    call(
        &s,
        post(
            "/v2/models/simple/infer",
            simple_json(&[1.; 4], &[1.; 4], "FP32"),
        ),
    )
    .await;
    let (_, body, _) = call(&s, get("/v2/models/simple/versions/1/stats")).await;
    let st: Value = serde_json::from_slice(&body).unwrap();
    let inf = &st["model_stats"][0]["inference_stats"];
    for k in [
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ] {
        assert!(inf[k]["count"].is_u64() && inf[k]["ns"].is_u64(), "{k}");
    }
    assert_eq!(inf["success"]["count"], 1);

    assert_eq!(
        call(&s, get("/v2/models/simple/ready")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, post("/v2/repository/models/simple/unload", ""))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, get("/v2/models/simple/ready")).await.0,
        StatusCode::BAD_REQUEST
    );
    let (_, body, _) = call(&s, post("/v2/repository/index", "")).await;
    let idx: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(idx[0]["state"], "UNAVAILABLE");
    assert_eq!(
        call(&s, post("/v2/repository/models/simple/load", "{}"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, get("/v2/models/simple/ready")).await.0,
        StatusCode::OK
    );
    let e = error_of(
        &s,
        post("/v2/repository/models/ghost/load", ""),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(e.contains("ghost"), "{e}");
}

#[tokio::test]
async fn api_keys_guard_inference_and_repository_separately() {
    let s = shared(ServeOptions {
        api_key: Some("k1".into()),
        admin_key: Some("k2".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(call(&s, get("/v2/health/ready")).await.0, StatusCode::OK);
    assert_eq!(
        call(&s, get("/v2/models/simple")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let with = |path: &str, key: &str| {
        Request::get(path)
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        call(&s, with("/v2/models/simple", "k1")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, with("/v2/models/simple", "k2")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let idx = |key: &str| {
        Request::post("/v2/repository/index")
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(call(&s, idx("k1")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, idx("k2")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn shared_memory_can_be_switched_off() {
    let s = shared(ServeOptions {
        shared_memory: false,
        ..Default::default()
    })
    .await;
    let body = "{\"key\": \"/aperture_test_region\", \"offset\": 0, \"byte_size\": 64}";
    let e = error_of(
        &s,
        post("/v2/systemsharedmemory/region/r/register", body),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(e.contains("disabled"), "{e}");
}

/// A log level held in memory, as the test's stand-in for the process's logger.
struct MemoryLog(std::sync::Mutex<LogLevel>);

impl LogControl for MemoryLog {
    fn level(&self) -> LogLevel {
        *self.0.lock().unwrap()
    }
    fn set_level(&self, level: LogLevel) -> Result<(), String> {
        *self.0.lock().unwrap() = level;
        Ok(())
    }
}

fn memory_log(level: LogLevel) -> (Arc<MemoryLog>, LogHandle) {
    let log = Arc::new(MemoryLog(std::sync::Mutex::new(level)));
    (log.clone(), LogHandle(log))
}

#[tokio::test]
async fn log_settings_are_read_and_changed_as_triton_does() {
    let (log, handle) = memory_log(LogLevel::Warn);
    let s = shared(ServeOptions {
        log_control: Some(handle),
        ..Default::default()
    })
    .await;
    let (status, body, _) = call(&s, get("/v2/logging")).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"log_file": "", "log_info": false, "log_warnings": true, "log_errors": true,
               "log_verbose_level": 0, "log_format": "default"})
    );
    // A partial update answers every setting, and the logger follows.
    let (status, body, _) = call(
        &s,
        post(
            "/v2/logging",
            r#"{"log_info": true, "log_verbose_level": 1}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["log_verbose_level"], 1);
    assert_eq!(v["log_info"], true);
    assert_eq!(log.level(), LogLevel::Debug);
    // What cannot be done is refused with the reason, and changes nothing.
    let bad = StatusCode::BAD_REQUEST;
    for (body, says) in [
        (r#"{"log_file": "/var/log/a.log"}"#, "standard error"),
        (r#"{"log_errors": false}"#, "thresholds"),
        (r#"{"log_verbose": 1}"#, "unknown log setting"),
        (r#"{"log_info": "yes"}"#, "takes a boolean"),
        ("{", "failed to parse"),
    ] {
        let e = error_of(&s, post("/v2/logging", body), bad).await;
        assert!(e.contains(says), "{body}: {e}");
    }
    assert_eq!(log.level(), LogLevel::Debug);
    // The server metadata lists the extension.
    let (_, body, _) = call(&s, get("/v2")).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("logging")));
}

#[tokio::test]
async fn log_settings_need_a_logger_and_the_admin_key() {
    let s = shared(ServeOptions::default()).await;
    let e = error_of(&s, get("/v2/logging"), StatusCode::BAD_REQUEST).await;
    assert!(e.contains("no log control"), "{e}");
    let (_, handle) = memory_log(LogLevel::Warn);
    let s = shared(ServeOptions {
        api_key: Some("k1".into()),
        admin_key: Some("k2".into()),
        log_control: Some(handle),
        ..Default::default()
    })
    .await;
    let with = |key: &str| {
        Request::post("/v2/logging")
            .header("x-api-key", key)
            .body(Body::from(r#"{"log_info": true}"#))
            .unwrap()
    };
    assert_eq!(call(&s, with("k1")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, with("k2")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn trace_settings_and_traced_requests_as_triton_writes_them() {
    let dir = std::env::temp_dir().join(format!("aperture-http-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("trace.json");
    let s = shared(ServeOptions {
        trace: aperture_server::trace::TraceSettings {
            file: Some(file.clone()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let (status, body, _) = call(&s, get("/v2/trace/setting")).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["trace_level"], json!(["OFF"]));
    assert_eq!(v["trace_rate"], json!("1000"));
    assert_eq!(v["trace_file"], json!(file.display().to_string()));
    // The model traces every request; the server stays off.
    let (status, body, _) = call(
        &s,
        post(
            "/v2/models/simple/trace/setting",
            r#"{"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["trace_level"].clone(), v["trace_rate"].clone()),
        (json!(["TIMESTAMPS"]), json!("1"))
    );
    let (_, body, _) = call(&s, get("/v2/trace/setting")).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["trace_level"], json!(["OFF"]));
    // Refusals name the problem.
    let bad = StatusCode::BAD_REQUEST;
    for (path, body, says) in [
        (
            "/v2/trace/setting",
            r#"{"trace_file": "/tmp/elsewhere.json"}"#,
            "--trace-file",
        ),
        (
            "/v2/trace/setting",
            r#"{"trace_rate": "0"}"#,
            "integer >= 1",
        ),
        (
            "/v2/trace/setting",
            r#"{"trace_level": ["TENSORS"]}"#,
            "TENSORS",
        ),
        (
            "/v2/models/simple/trace/setting",
            r#"{"log_frequency": "5"}"#,
            "without a model name",
        ),
        ("/v2/trace/setting", "[", "not valid JSON"),
    ] {
        let e = error_of(&s, post(path, body), bad).await;
        assert!(e.contains(says), "{body}: {e}");
    }
    let e = error_of(
        &s,
        get("/v2/models/nope/trace/setting"),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(e.contains("nope"), "{e}");
    // Two requests, both traced; written when the server stops (log_frequency 0).
    for id in ["a1", "a2"] {
        let mut body: Value =
            serde_json::from_str(&simple_json(&[1., 2., 3., 4.], &[1.; 4], "FP32")).unwrap();
        body["id"] = json!(id);
        let (status, _, _) = call(&s, post("/v2/models/simple/infer", body.to_string())).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(!file.exists());
    s.tracer.flush();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let objects = v.as_array().unwrap();
    assert_eq!(objects.len(), 4);
    assert_eq!(objects[0]["model_name"], json!("simple"));
    assert_eq!(objects[0]["request_id"], json!("a1"));
    let names: Vec<&str> = objects[1]["timestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "HTTP_RECV_START",
            "HTTP_RECV_END",
            "REQUEST_START",
            "QUEUE_START",
            "COMPUTE_START",
            "COMPUTE_INPUT_END",
            "COMPUTE_OUTPUT_START",
            "COMPUTE_END",
            "REQUEST_END",
            "HTTP_SEND_START",
            "HTTP_SEND_END"
        ]
    );
    // The server metadata lists the extension.
    let (_, body, _) = call(&s, get("/v2")).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("trace")));
    let _ = std::fs::remove_dir_all(&dir);
}
