//! A minimal echo peer for measuring the server's own overhead: the same routes and
//! RPCs that `aperture loadgen` uses, answered without parsing, batching or a model.
//! `aperture serve --echo` runs it; compare `loadgen` against both in one session.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

use crate::grpc::inference::{self as pb, grpc_inference_service_server as srv};
use crate::tensor_io::kserve_datatype;

/// The tensors the echo peer advertises (those of the model it stands in for).
#[derive(Clone, Debug)]
pub struct EchoSpec {
    pub model: String,
    pub inputs: Vec<aperture_engine::TensorSpec>,
}

impl EchoSpec {
    fn metadata_json(&self) -> Value {
        let inputs: Vec<Value> = self
            .inputs
            .iter()
            .map(|t| {
                let mut shape = vec![-1i64];
                shape.extend(&t.shape);
                json!({ "name": t.name, "datatype": kserve_datatype(t.dtype), "shape": shape })
            })
            .collect();
        json!({ "name": self.model, "versions": ["1"], "platform": "echo", "inputs": inputs, "outputs": [] })
    }
}

async fn echo_infer(headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let mut h = HeaderMap::new();
    if let Some(v) = headers.get(crate::http::HEADER_LENGTH) {
        h.insert(crate::http::HEADER_LENGTH, v.clone());
    }
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    (h, body)
}

/// Serves the HTTP echo until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    spec: Arc<EchoSpec>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/v2/models/{m}",
            get(|State(s): State<Arc<EchoSpec>>| async move { Json(s.metadata_json()) }),
        )
        .route(
            "/v2/models/{m}/stats",
            get(|| async { Json(json!({ "model_stats": [] })) }),
        )
        .route("/v2/models/{m}/infer", post(echo_infer))
        .route("/v2/health/ready", get(|| async { "" }))
        .with_state(spec);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

struct EchoGrpc(Arc<EchoSpec>);

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("echo peer"))
}

#[tonic::async_trait]
impl srv::GrpcInferenceService for EchoGrpc {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: true }))
    }
    async fn model_ready(
        &self,
        _: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        Ok(Response::new(pb::ModelReadyResponse { ready: true }))
    }
    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        unimplemented()
    }
    async fn model_metadata(
        &self,
        _: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let inputs = self
            .0
            .inputs
            .iter()
            .map(|t| pb::model_metadata_response::TensorMetadata {
                name: t.name.clone(),
                datatype: kserve_datatype(t.dtype).into(),
                shape: std::iter::once(-1).chain(t.shape.iter().copied()).collect(),
            })
            .collect();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: self.0.model.clone(),
            versions: vec!["1".into()],
            platform: "echo".into(),
            inputs,
            outputs: vec![],
        }))
    }
    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::ModelInferResponse {
            model_name: r.model_name,
            raw_output_contents: r.raw_input_contents,
            ..Default::default()
        }))
    }
    type ModelStreamInferStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>,
    >;
    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        unimplemented()
    }
    async fn model_config(
        &self,
        _: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        unimplemented()
    }
    async fn log_settings(
        &self,
        _: Request<pb::LogSettingsRequest>,
    ) -> Result<Response<pb::LogSettingsResponse>, Status> {
        unimplemented()
    }
    async fn trace_setting(
        &self,
        _: Request<pb::TraceSettingRequest>,
    ) -> Result<Response<pb::TraceSettingResponse>, Status> {
        unimplemented()
    }
    async fn model_statistics(
        &self,
        _: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        Ok(Response::new(pb::ModelStatisticsResponse::default()))
    }
    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        unimplemented()
    }
    async fn repository_model_load(
        &self,
        _: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        unimplemented()
    }
    async fn repository_model_unload(
        &self,
        _: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        unimplemented()
    }
    async fn system_shared_memory_status(
        &self,
        _: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }
    async fn system_shared_memory_register(
        &self,
        _: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }
    async fn system_shared_memory_unregister(
        &self,
        _: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }
}

/// Serves the gRPC echo until `shutdown` resolves.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    spec: Arc<EchoSpec>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tokio_stream::StreamExt;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
        c.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    });
    tonic::transport::Server::builder()
        .add_service(
            srv::GrpcInferenceServiceServer::new(EchoGrpc(spec))
                .max_decoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}

/// Runs both echo listeners on a new runtime until SIGTERM / ctrl-c (for the CLI).
pub fn run_until_signal(
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
    spec: EchoSpec,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let spec = Arc::new(spec);
        let h = tokio::net::TcpListener::bind(http).await?;
        let g = tokio::net::TcpListener::bind(grpc).await?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stop = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|&s| s).await;
            }
        };
        let a = tokio::spawn(serve_http(h, spec.clone(), stop()));
        let b = tokio::spawn(serve_grpc(g, spec, stop()));
        crate::server::shutdown_signal().await;
        let _ = tx.send(true);
        let _ = a.await;
        let _ = b.await;
        Ok(())
    })
}
