//! The standard gRPC health checking protocol (`grpc.health.v1.Health`), as Kubernetes'
//! gRPC probes and `grpc_health_probe` call it. The empty service name (or the KServe
//! service's) is the server: SERVING once ready (startup load finished, no shutdown
//! begun). A model name is that model: SERVING while a version is loaded, NOT_SERVING
//! while it is known but not loaded (or the server is not ready), NOT_FOUND (Check) or
//! SERVICE_UNKNOWN (Watch) for a name the repository does not know. Open like the other
//! health endpoints (no key).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::health_proto::health_check_response::ServingStatus;
use super::health_proto::health_server::Health;
use super::health_proto::{HealthCheckRequest, HealthCheckResponse};
use crate::server::Shared;

/// The KServe service's full name, answered like the empty name.
const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";
/// How often Watch looks for a change.
const WATCH_PERIOD: Duration = Duration::from_millis(500);

pub struct HealthService {
    shared: Arc<Shared>,
}

impl HealthService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The status of `service`; None where the repository does not know the name.
fn status_of(shared: &Shared, service: &str) -> Option<ServingStatus> {
    let serving = |yes: bool| {
        if yes {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let ready = shared.is_ready();
    if service.is_empty() || service == INFERENCE_SERVICE {
        return Some(serving(ready));
    }
    if shared.repository.get(service, None).is_ok() {
        return Some(serving(ready));
    }
    shared
        .repository
        .discover()
        .contains_key(service)
        .then_some(ServingStatus::NotServing)
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        match status_of(&self.shared, &service) {
            Some(s) => Ok(Response::new(answer(s))),
            None => Err(Status::not_found(format!(
                "unknown service {service:?}: the server (\"\") or a model name"
            ))),
        }
    }

    type WatchStream = WatchStream;

    /// The current status at once, then each change, until the client goes away or the
    /// server shuts down (after NOT_SERVING, so that open watches do not hold the
    /// graceful shutdown).
    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = status_of(&shared, &service).unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(now) {
                    if tx.send(Ok(answer(now))).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                if shared.is_shutting_down() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_PERIOD) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
