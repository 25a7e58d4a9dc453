//! KServe v2 gRPC (`inference.GRPCInferenceService`) as Triton speaks it (tonic).

mod convert;
mod service;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference;

use std::future::Future;
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::codec::CompressionEncoding;

use crate::server::{GrpcCompression, Shared};
use inference::grpc_inference_service_server::GrpcInferenceServiceServer;

pub use convert::{request_from_proto, response_to_proto};
pub use service::InferenceService;

/// Serves gRPC on `listener` until `shutdown` resolves, then finishes in-flight calls.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limit = shared.options.max_body_bytes;
    let answers = shared.options.grpc_response_compression;
    // Compressed requests (tritonclient's `compression_algorithm`) are inflated within
    // the same limit; answers go uncompressed unless the server was asked to compress
    // them (and then only to clients that accept the encoding), as Triton does.
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
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    });
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}
