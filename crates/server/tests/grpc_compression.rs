//! gRPC answers over real sockets: uncompressed by default (as Triton), gzip or deflate
//! with `grpc_response_compression` for clients that accept it, and plain for clients
//! that do not, whatever the server was asked.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_server::grpc::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use aperture_server::grpc::inference::model_infer_request::InferInputTensor;
use aperture_server::grpc::inference::{ModelInferRequest, ServerReadyRequest};
use aperture_server::{ArchitectureRegistry, GrpcCompression, Repository, ServeOptions};
use common::{add_simple, free_port, grpc_channel, loopback, spawn_server};
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

/// A server with Triton's "simple" model answering gRPC on the returned port; dropping
/// the sender stops it.
fn start(compression: Option<GrpcCompression>) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let repo = Repository::new(None, Arc::new(ArchitectureRegistry::with_builtins()));
    add_simple(&repo);
    let grpc = free_port();
    let options = ServeOptions {
        http_addr: loopback(free_port()),
        grpc_addr: Some(loopback(grpc)),
        metrics_addr: None,
        grpc_response_compression: compression,
        ..ServeOptions::default()
    };
    (grpc, spawn_server(options, repo))
}

/// A client once the server reports ready.
async fn ready_client(port: u16) -> GrpcInferenceServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = GrpcInferenceServiceClient::new(grpc_channel(port).await);
    loop {
        if let Ok(r) = c.server_ready(ServerReadyRequest {}).await {
            if r.into_inner().ready {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the gRPC server never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn simple_request() -> ModelInferRequest {
    let a: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let raw: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "simple".into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![raw.clone(), raw],
        ..Default::default()
    }
}

/// The answer's `grpc-encoding` (None when sent plain) and OUTPUT0 (2 x INPUT0).
async fn infer(client: &mut GrpcInferenceServiceClient<Channel>) -> (Option<String>, Vec<f32>) {
    let r = client
        .model_infer(simple_request())
        .await
        .expect("the simple model answers");
    let encoding = r
        .metadata()
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let out = r.into_inner();
    let idx = out
        .outputs
        .iter()
        .position(|o| o.name == "OUTPUT0")
        .expect("OUTPUT0 in the answer");
    let values = out.raw_output_contents[idx]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (encoding, values)
}

fn doubled() -> Vec<f32> {
    (0..16).map(|v| 2.0 * v as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_plain_unless_compression_is_asked_for() {
    let (port, _stop) = start(None);
    let mut client = ready_client(port)
        .await
        .accept_compressed(CompressionEncoding::Gzip);
    let (encoding, values) = infer(&mut client).await;
    assert_eq!(encoding, None, "Triton's default: uncompressed answers");
    assert_eq!(values, doubled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_compressed_for_clients_that_accept_the_encoding() {
    for (setting, name) in [
        (GrpcCompression::Gzip, "gzip"),
        (GrpcCompression::Deflate, "deflate"),
    ] {
        let (port, _stop) = start(Some(setting));
        let encoding = if name == "gzip" {
            CompressionEncoding::Gzip
        } else {
            CompressionEncoding::Deflate
        };
        let mut accepting = ready_client(port).await.accept_compressed(encoding);
        let (got, values) = infer(&mut accepting).await;
        assert_eq!(got.as_deref(), Some(name));
        assert_eq!(
            values,
            doubled(),
            "{name} answers decode to the same values"
        );

        // A client that does not accept the encoding gets plain answers.
        let mut plain = ready_client(port).await;
        let (got, values) = infer(&mut plain).await;
        assert_eq!(got, None);
        assert_eq!(values, doubled());
    }
}

#[test]
fn compression_names_parse_and_unknown_ones_are_refused() {
    assert_eq!("gzip".parse::<GrpcCompression>(), Ok(GrpcCompression::Gzip));
    assert_eq!(
        "Deflate".parse::<GrpcCompression>(),
        Ok(GrpcCompression::Deflate)
    );
    let err = "brotli".parse::<GrpcCompression>().unwrap_err();
    assert!(err.contains("brotli") && err.contains("gzip"), "{err}");
}
