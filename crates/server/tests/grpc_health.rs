//! `grpc.health.v1.Health` over real sockets, as Kubernetes' gRPC probes call it: the
//! server (empty name or the KServe service) SERVING once ready, a loaded model SERVING,
//! a known model that failed to load NOT_SERVING, an unknown name NOT_FOUND in Check and
//! SERVICE_UNKNOWN in Watch.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_server::grpc::health_proto::health_check_response::ServingStatus;
use aperture_server::grpc::health_proto::health_client::HealthClient;
use aperture_server::grpc::health_proto::{HealthCheckRequest, HealthCheckResponse};
use aperture_server::{
    ArchitectureRegistry, BuildError, ModelConfig, ModelSource, Repository, ServeOptions,
};
use common::{add_simple, free_port, grpc_channel, loopback, spawn_server};
use tonic::transport::Channel;
use tonic::Streaming;

/// A server with "simple" (loads) and "broken" (its build fails), gRPC on the port.
fn start() -> (u16, tokio::sync::oneshot::Sender<()>) {
    let mut registry = ArchitectureRegistry::with_builtins();
    registry.register("refuses", |_| -> Result<_, BuildError> {
        Err("this model refuses to build".into())
    });
    let repo = Repository::new(None, Arc::new(registry));
    add_simple(&repo);
    repo.add_source(
        "broken",
        ModelSource::Inline {
            config: Box::new(ModelConfig::with_architecture("refuses")),
            dir: ".".into(),
        },
    );
    let grpc = free_port();
    let options = ServeOptions {
        http_addr: loopback(free_port()),
        grpc_addr: Some(loopback(grpc)),
        metrics_addr: None,
        ..ServeOptions::default()
    };
    (grpc, spawn_server(options, repo))
}

async fn client(port: u16) -> HealthClient<Channel> {
    HealthClient::new(grpc_channel(port).await)
}

async fn check(c: &mut HealthClient<Channel>, service: &str) -> Result<ServingStatus, tonic::Code> {
    c.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .map(|r| r.into_inner().status())
    .map_err(|s| s.code())
}

async fn watch(c: &mut HealthClient<Channel>, service: &str) -> Streaming<HealthCheckResponse> {
    c.watch(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .expect("watch starts")
    .into_inner()
}

/// The next status on `stream`, within 20 s.
async fn next_status(stream: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a status within the deadline")
        .expect("a message")
        .expect("the stream is open")
        .status()
}

/// Reads the server's watch until SERVING (NOT_SERVING before it, while loading).
async fn until_serving(stream: &mut Streaming<HealthCheckResponse>) {
    loop {
        match next_status(stream).await {
            ServingStatus::Serving => return,
            other => assert_eq!(other, ServingStatus::NotServing),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_server_and_each_model() {
    let (port, _stop) = start();
    let mut c = client(port).await;
    // The server turns SERVING once the startup load has finished.
    let deadline = Instant::now() + Duration::from_secs(20);
    while check(&mut c, "").await != Ok(ServingStatus::Serving) {
        assert!(Instant::now() < deadline, "the server never became SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        check(&mut c, "inference.GRPCInferenceService").await,
        Ok(ServingStatus::Serving)
    );
    assert_eq!(check(&mut c, "simple").await, Ok(ServingStatus::Serving));
    assert_eq!(check(&mut c, "broken").await, Ok(ServingStatus::NotServing));
    assert_eq!(
        check(&mut c, "no_such_model").await,
        Err(tonic::Code::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_the_current_status_first() {
    let (port, _stop) = start();
    let mut c = client(port).await;
    let mut unknown = watch(&mut c, "no_such_model").await;
    assert_eq!(
        next_status(&mut unknown).await,
        ServingStatus::ServiceUnknown
    );
    // The server's stream reaches SERVING once the load has finished (if it started
    // NOT_SERVING, the change follows).
    until_serving(&mut watch(&mut c, "").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_end_when_the_server_shuts_down() {
    let (port, stop) = start();
    let mut c = client(port).await;
    let mut server = watch(&mut c, "").await;
    // Wait for SERVING, then shut down: the stream reports NOT_SERVING and ends well
    // within the shutdown grace (30 s by default) instead of holding it.
    until_serving(&mut server).await;
    stop.send(()).expect("the server runs");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match server.message().await {
                Ok(Some(m)) => assert_eq!(m.status(), ServingStatus::NotServing),
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived the shutdown");
}
