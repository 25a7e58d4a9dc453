//! KServe v2 gRPC (`inference.GRPCInferenceService`) as Triton speaks it (tonic).

mod convert;
mod health;
mod service;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod health_proto;

use std::future::Future;
use std::sync::Arc;

use axum::serve::Listener;
use tonic::codec::CompressionEncoding;

use crate::connections::LimitedListener;
use crate::server::{GrpcCompression, Shared};
use health_proto::health_server::HealthServer;
use inference::grpc_inference_service_server::GrpcInferenceServiceServer;

pub use convert::{request_from_proto, response_to_proto};
pub use health::HealthService;
pub use service::InferenceService;

/// Serves gRPC on `listener` until `shutdown` resolves, then finishes in-flight calls.
fn stamp_arrival(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.extensions_mut()
        .insert(crate::trace::Arrived(std::time::Instant::now()));
    Ok(req)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limit = shared.options.max_body_bytes;
    let answers = shared.options.grpc_response_compression;
    let limit_of_connections = shared.connections.clone();
    // Compressed requests (tritonclient's `compression_algorithm`) are inflated within
    // the same limit; answers go uncompressed unless the server was asked to compress
    // them (and then only to clients that accept the encoding), as Triton does.
    let health = HealthServer::new(HealthService::new(shared.clone()));
    let mut svc = GrpcInferenceServiceServer::new(InferenceService::new(shared))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    if let Some(c) = answers {
        svc = svc.send_compressed(match c {
            GrpcCompression::Gzip => CompressionEncoding::Gzip,
            GrpcCompression::Deflate => CompressionEncoding::Deflate,
        });
    }
    // Accepted under the server's connection bound (axum's listener retries failed
    // accepts), Nagle off.
    let listener = LimitedListener::new(listener, limit_of_connections);
    let incoming = futures_util::stream::unfold(listener, |mut l| async move {
        let (conn, _) = l.accept().await;
        let _ = conn.get_ref().set_nodelay(true);
        Some((Ok::<_, std::io::Error>(conn), l))
    });
    // Stamps when a request's head arrives, before its message is read (the trace
    // extension's GRPC_WAITREAD_START).
    let svc = tonic::service::interceptor::InterceptedService::new(svc, stamp_arrival);
    tonic::transport::Server::builder()
        .add_service(svc)
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}
