//! The GRPCInferenceService implementation over the shared server state.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{
    config_to_proto, request_from_proto_with_shm, response_to_proto_with_shm, stats_to_proto,
};
use super::inference::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use crate::error::ServerError;
use crate::server::{Shared, EXTENSIONS, PLATFORM, SERVER_NAME};
use crate::tensor_io::kserve_datatype;

pub struct InferenceService {
    shared: Arc<Shared>,
}

impl InferenceService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// API-key check from `authorization: Bearer KEY` or `x-api-key` metadata.
    fn authorize<T>(&self, req: &Request<T>, admin: bool) -> Result<(), Status> {
        let o = &self.shared.options;
        let needed = if admin {
            o.admin_key.as_deref().or(o.api_key.as_deref())
        } else {
            o.api_key.as_deref()
        };
        let Some(key) = needed else { return Ok(()) };
        let md = req.metadata();
        let given = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| md.get("x-api-key").and_then(|v| v.to_str().ok()));
        match given {
            Some(g) if crate::http::keys_match(g, key) => Ok(()),
            _ => Err(ServerError::Unauthorized("missing or invalid API key".into()).into()),
        }
    }
}

async fn infer_one(
    shared: Arc<Shared>,
    req: pb::ModelInferRequest,
    received: Option<crate::trace::Received>,
) -> Result<pb::ModelInferResponse, ServerError> {
    let start = std::time::Instant::now();
    let model = req.model_name.clone();
    let result = infer_inner(shared, req, received).await;
    tracing::debug!(
        model = %model,
        ok = result.is_ok(),
        elapsed_us = start.elapsed().as_micros() as u64,
        "grpc infer"
    );
    if let Err(e) = &result {
        if e.http_status() >= 500 {
            tracing::warn!(error = %e, "request failed");
        }
    }
    result
}

async fn infer_inner(
    shared: Arc<Shared>,
    req: pb::ModelInferRequest,
    received: Option<crate::trace::Received>,
) -> Result<pb::ModelInferResponse, ServerError> {
    let model = shared
        .repository
        .get(&req.model_name, Some(&req.model_version))?;
    let (request, output_shm) = request_from_proto_with_shm(req, Some(&shared.shared_memory))?;
    let id = request.id.clone();
    let (result, trace) = shared.run_traced(&model, request, received).await;
    if let Some(t) = &trace {
        t.mark("GRPC_SEND_START");
    }
    let answer =
        result.and_then(|outputs| response_to_proto_with_shm(&model, id, outputs, &output_shm));
    if let Some(t) = trace {
        // The answer is built and handed to tonic to encode and send.
        t.mark("GRPC_SEND_END");
        shared.tracer.finish(t);
    }
    answer
}

type StreamOut =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
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
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.shared.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.into_inner();
        let ready = self
            .shared
            .repository
            .get(&r.name, Some(&r.version))
            .is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        req: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        self.authorize(&req, false)?;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.into_inner();
        let m = self.shared.repository.get(&r.name, Some(&r.version))?;
        let meta = |specs: &[aperture_engine::TensorSpec]| {
            specs
                .iter()
                .map(|t| pb::model_metadata_response::TensorMetadata {
                    name: t.name.clone(),
                    datatype: kserve_datatype(t.dtype).into(),
                    shape: std::iter::once(-1).chain(t.shape.iter().copied()).collect(),
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: self
                .shared
                .repository
                .versions(&r.name)
                .iter()
                .map(|v| v.to_string())
                .collect(),
            platform: PLATFORM.into(),
            inputs: meta(&m.inputs),
            outputs: meta(&m.outputs),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.authorize(&req, false)?;
        // When the request's head arrived (the interceptor) and when its message was read.
        let received =
            req.extensions()
                .get::<crate::trace::Arrived>()
                .map(|a| crate::trace::Received {
                    names: ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END"),
                    start: a.0,
                    end: std::time::Instant::now(),
                });
        Ok(Response::new(
            infer_one(self.shared.clone(), req.into_inner(), received).await?,
        ))
    }

    type ModelStreamInferStream = StreamOut;

    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        self.authorize(&req, false)?;
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Each request runs on its own task so a stream feeds the batcher concurrently.
            while let Ok(Some(msg)) = incoming.message().await {
                let (tx, shared) = (tx.clone(), shared.clone());
                tokio::spawn(async move {
                    let out = match infer_one(shared, msg, None).await {
                        Ok(r) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(r),
                        },
                        Err(e) => pb::ModelStreamInferResponse {
                            error_message: e.to_string(),
                            infer_response: None,
                        },
                    };
                    let _ = tx.send(Ok(out)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.into_inner();
        let m = self.shared.repository.get(&r.name, Some(&r.version))?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config_to_proto(&m)),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.into_inner();
        if !r.name.is_empty() {
            self.shared.repository.get(&r.name, Some(&r.version))?;
        }
        let model_stats = self
            .shared
            .repository
            .loaded()
            .iter()
            .filter(|m| r.name.is_empty() || m.name == r.name)
            .filter(|m| r.version.is_empty() || m.version.to_string() == r.version)
            .map(|m| stats_to_proto(&m.name, m.version, &m.stats.snapshot()))
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn log_settings(
        &self,
        req: Request<pb::LogSettingsRequest>,
    ) -> Result<Response<pb::LogSettingsResponse>, Status> {
        use crate::logging::SettingValue as V;
        use pb::log_settings_request::setting_value::ParameterChoice as In;
        use pb::log_settings_response::setting_value::ParameterChoice as Out;
        self.authorize(&req, true)?;
        let changes = req
            .into_inner()
            .settings
            .into_iter()
            .map(|(name, v)| {
                let value = match v.parameter_choice {
                    Some(In::BoolParam(b)) => V::Bool(b),
                    Some(In::Uint32Param(u)) => V::Uint(u),
                    Some(In::StringParam(s)) => V::Str(s),
                    None => {
                        return Err(ServerError::invalid(format!(
                            "log setting {name} has no value"
                        )))
                    }
                };
                Ok((name, value))
            })
            .collect::<crate::error::Result<Vec<_>>>()?;
        let now = crate::logging::settings(self.shared.options.log_control.as_ref(), &changes)?;
        let settings = now
            .entries()
            .into_iter()
            .map(|(k, v)| {
                let choice = match v {
                    V::Bool(b) => Out::BoolParam(b),
                    V::Uint(u) => Out::Uint32Param(u),
                    V::Str(s) => Out::StringParam(s),
                };
                let value = pb::log_settings_response::SettingValue {
                    parameter_choice: Some(choice),
                };
                (k.to_string(), value)
            })
            .collect();
        Ok(Response::new(pb::LogSettingsResponse { settings }))
    }

    async fn trace_setting(
        &self,
        req: Request<pb::TraceSettingRequest>,
    ) -> Result<Response<pb::TraceSettingResponse>, Status> {
        self.authorize(&req, true)?;
        let r = req.into_inner();
        // No values: back to the server's setting (Triton's "clear").
        let changes: Vec<crate::trace::TraceChange> = r
            .settings
            .into_iter()
            .map(|(name, v)| crate::trace::TraceChange {
                name,
                values: Some(v.value).filter(|v| !v.is_empty()),
            })
            .collect();
        let model = Some(r.model_name.as_str()).filter(|m| !m.is_empty());
        let now = self.shared.trace_settings(model, &changes)?;
        let settings = now
            .entries()
            .into_iter()
            .map(|(k, value)| {
                let v = pb::trace_setting_response::SettingValue { value };
                (k.to_string(), v)
            })
            .collect();
        Ok(Response::new(pb::TraceSettingResponse { settings }))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.authorize(&req, true)?;
        let ready = req.into_inner().ready;
        let models = self
            .shared
            .repository
            .index(ready)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state,
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.authorize(&req, true)?;
        self.shared
            .repository
            .load(&req.into_inner().model_name)
            .await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.authorize(&req, true)?;
        self.shared
            .repository
            .unload(&req.into_inner().model_name)
            .await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        use pb::system_shared_memory_status_response::RegionStatus;
        self.authorize(&req, false)?;
        let name = req.into_inner().name;
        let regions = self
            .shared
            .shared_memory
            .status((!name.is_empty()).then_some(name.as_str()))?
            .into_iter()
            .map(|r| {
                let status = RegionStatus {
                    name: r.name.clone(),
                    key: r.key,
                    offset: r.offset,
                    byte_size: r.byte_size,
                };
                (r.name, status)
            })
            .collect();
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse {
            regions,
        }))
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        self.authorize(&req, false)?;
        let r = req.into_inner();
        self.shared
            .shared_memory
            .register(&r.name, &r.key, r.offset, r.byte_size)?;
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        self.authorize(&req, false)?;
        let name = req.into_inner().name;
        if name.is_empty() {
            self.shared.shared_memory.unregister_all();
        } else {
            self.shared.shared_memory.unregister(&name);
        }
        Ok(Response::new(pb::SystemSharedMemoryUnregisterResponse {}))
    }
}
