//! Starting and stopping the server: HTTP, gRPC and metrics listeners over one shared
//! state, graceful shutdown on SIGTERM / ctrl-c.
//!
//! ```no_run
//! use std::sync::Arc;
//! use aperture_server::{ArchitectureRegistry, Repository, ServeOptions, Server};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let repo = Repository::new(Some("models".into()), Arc::new(ArchitectureRegistry::with_builtins()));
//! let server = Server::new(ServeOptions::default(), repo);
//! server.run(aperture_server::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aperture_engine::NamedTensors;

use crate::connections::ConnectionLimit;
use crate::error::{Result, ServerError};
use crate::metrics::GpuMetrics;
use crate::model::{InferRequest, LoadedModel};
use crate::repository::Repository;
use crate::shm::ShmRegistry;

pub const SERVER_NAME: &str = "aperture";
pub const PLATFORM: &str = "aperture";
pub const BACKEND: &str = "aperture";
/// KServe / Triton protocol extensions this server implements.
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "logging",
    "model_configuration",
    "model_repository",
    "schedule_policy",
    "statistics",
    "system_shared_memory",
    "trace",
];

/// Listener addresses and limits.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub http_addr: SocketAddr,
    /// None: no gRPC endpoint.
    pub grpc_addr: Option<SocketAddr>,
    /// None: no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    pub max_body_bytes: usize,
    /// Largest image (width x height) the image endpoints decode.
    pub max_image_pixels: u64,
    /// Longest a request may take end to end (queue + compute).
    pub request_timeout: Duration,
    /// Required for inference and metadata (health stays open).
    pub api_key: Option<String>,
    /// Required for repository load/unload/index and the log settings (falls back to
    /// `api_key`).
    pub admin_key: Option<String>,
    /// How long shutdown waits for open connections before closing them.
    pub shutdown_grace: Duration,
    /// Triton's system shared-memory extension (clients on this host register regions
    /// of /dev/shm the server then reads and writes).
    pub shared_memory: bool,
    /// Compression of gRPC answers for clients that accept it (Triton's
    /// `--grpc-infer-response-compression-level`); none by default, as Triton.
    pub grpc_response_compression: Option<GrpcCompression>,
    /// Most HTTP and gRPC connections open at once (together); past it new clients wait
    /// in the accept queue. None: unbounded (as Triton).
    pub max_connections: Option<usize>,
    /// The process's logger for Triton's logging extension (`/v2/logging`, gRPC
    /// `LogSettings`); None: those answer that log settings are unavailable.
    pub log_control: Option<crate::logging::LogHandle>,
    /// Triton's trace extension at start (`--trace-file`, `--trace-level`, ...); the
    /// trace settings API changes them while the server runs.
    pub trace: crate::trace::TraceSettings,
}

/// A gRPC message compression the server can send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcCompression {
    Gzip,
    Deflate,
}

impl std::str::FromStr for GrpcCompression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gzip" => Ok(Self::Gzip),
            "deflate" => Ok(Self::Deflate),
            other => Err(format!(
                "unknown gRPC compression {other:?} (expected gzip or deflate)"
            )),
        }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8000)),
            grpc_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8001))),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8002))),
            max_body_bytes: 64 << 20,
            max_image_pixels: 50_000_000,
            request_timeout: Duration::from_secs(60),
            api_key: None,
            admin_key: None,
            shutdown_grace: Duration::from_secs(30),
            shared_memory: true,
            grpc_response_compression: None,
            max_connections: None,
            log_control: None,
            trace: crate::trace::TraceSettings::default(),
        }
    }
}

/// State every endpoint shares.
pub struct Shared {
    pub repository: Repository,
    pub options: ServeOptions,
    pub gpu_metrics: Option<Arc<dyn GpuMetrics>>,
    /// Registered system shared-memory regions (Triton's extension).
    pub shared_memory: ShmRegistry,
    /// Permits for open connections (`max_connections`), shared by HTTP and gRPC.
    pub connections: ConnectionLimit,
    /// Request tracing (Triton's trace extension).
    pub tracer: crate::trace::Tracer,
    /// The startup load of the repository is under way (endpoints answer, not ready).
    starting: AtomicBool,
    shutting_down: AtomicBool,
}

impl Shared {
    /// Ready for inference: the startup load has finished and no shutdown has begun
    /// (live is always true while the process answers).
    pub fn is_ready(&self) -> bool {
        !self.starting.load(Ordering::Relaxed) && !self.shutting_down.load(Ordering::Relaxed)
    }

    /// A shutdown has begun (the listeners drain and close).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Reads or changes trace settings, the server's or a model's (HTTP and gRPC): a
    /// model name must be one the repository knows.
    pub fn trace_settings(
        &self,
        model: Option<&str>,
        changes: &[crate::trace::TraceChange],
    ) -> Result<crate::trace::TraceSettings> {
        if let Some(m) = model {
            if !self.repository.index(false).iter().any(|e| e.name == m) {
                return Err(ServerError::NotFound(format!("unknown model '{m}'")));
            }
        }
        self.tracer.settings(model, changes)
    }

    /// Runs a request under the server-wide timeout; encoded images (a KServe BYTES
    /// input) are decoded and preprocessed by the model's image pipeline first. A request
    /// the trace settings sample is traced from here to its answer.
    pub async fn run_with_timeout(
        &self,
        model: &LoadedModel,
        req: InferRequest,
    ) -> Result<NamedTensors> {
        let (result, trace) = self.run_traced(model, req, None).await;
        if let Some(t) = trace {
            self.tracer.finish(t);
        }
        result
    }

    /// [`Shared::run_with_timeout`] for a protocol front end that stamps its own receive
    /// and send times: a traced request comes back with its trace, for the caller to mark
    /// the sending and hand to `tracer.finish`.
    pub async fn run_traced(
        &self,
        model: &LoadedModel,
        mut req: InferRequest,
        received: Option<crate::trace::Received>,
    ) -> (Result<NamedTensors>, Option<crate::trace::ActiveTrace>) {
        let trace = self.tracer.start(&model.name, model.version, &req.id);
        if let Some(t) = &trace {
            if let Some(r) = received {
                t.stamps().mark_at(r.names.0, r.start);
                t.stamps().mark_at(r.names.1, r.end);
            }
            t.mark("REQUEST_START");
            req.trace = Some(t.stamps());
        }
        let result = self.run_timed(model, req).await;
        if let Some(t) = &trace {
            t.mark("REQUEST_END");
        }
        (result, trace)
    }

    async fn run_timed(&self, model: &LoadedModel, mut req: InferRequest) -> Result<NamedTensors> {
        let limit = self.options.request_timeout;
        let work = async {
            if !req.encoded_images.is_empty() {
                let adapter = model.images.clone().ok_or_else(|| {
                    ServerError::invalid(format!(
                        "model '{}' has no image pipeline, so it cannot take a BYTES input of encoded images",
                        model.name
                    ))
                })?;
                if !req.inputs.is_empty() {
                    return Err(ServerError::invalid(
                        "send either a BYTES input of encoded images or the model's tensors, not both",
                    ));
                }
                let limits = aperture_vision::DecodeLimits {
                    max_pixels: self.options.max_image_pixels,
                    max_file_bytes: self.options.max_body_bytes as u64,
                };
                let images = std::mem::take(&mut req.encoded_images);
                let (inputs, _, _) =
                    crate::image::decode_to_inputs(adapter, model.inputs.clone(), images, limits)
                        .await?;
                req.inputs = inputs;
            }
            model.infer(req).await
        };
        tokio::time::timeout(limit, work).await.map_err(|_| {
            ServerError::Timeout(format!(
                "request did not finish within {} ms (--request-timeout-ms)",
                limit.as_millis()
            ))
        })?
    }
}

/// The server: build with [`Server::new`], then [`Server::run`].
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    pub fn new(options: ServeOptions, repository: Repository) -> Self {
        Self::with_gpu_metrics(options, repository, None)
    }

    /// Like [`Server::new`], with a source of GPU metrics (NVML) for `/metrics`.
    pub fn with_gpu_metrics(
        options: ServeOptions,
        repository: Repository,
        gpu: Option<Arc<dyn GpuMetrics>>,
    ) -> Self {
        let shared_memory = options.shared_memory;
        let connections = ConnectionLimit::new(options.max_connections);
        let tracer = crate::trace::Tracer::new(options.trace.clone());
        Self {
            shared: Arc::new(Shared {
                repository,
                options,
                gpu_metrics: gpu,
                shared_memory: ShmRegistry::new(shared_memory),
                connections,
                tracer,
                starting: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Opens the endpoints, loads every model (live but not ready meanwhile: a first GPU
    /// start compiles kernels for a minute or more, and a liveness probe must not kill
    /// it), serves until `shutdown` resolves, then drains in-flight work.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shared = self.shared;
        shared.starting.store(true, Ordering::Relaxed);
        let opts = shared.options.clone();
        let http = tokio::net::TcpListener::bind(opts.http_addr).await?;
        tracing::info!(addr = %http.local_addr()?, "HTTP listening");
        let grpc = match opts.grpc_addr {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
            None => None,
        };
        let metrics = match opts.metrics_addr {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|&s| s).await;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(crate::http::serve(http, shared.clone(), stopped()));
        if let Some(l) = grpc {
            tracing::info!(addr = %l.local_addr()?, "gRPC listening");
            tasks.spawn(crate::grpc::serve(l, shared.clone(), stopped()));
        }
        if let Some(l) = metrics {
            tracing::info!(addr = %l.local_addr()?, "metrics listening");
            tasks.spawn(crate::metrics::serve(l, shared.clone(), stopped()));
        }
        // Not among `tasks`: a shutdown during the load must not wait for it.
        let loading = shared.clone();
        tokio::spawn(async move {
            for (name, err) in loading.repository.load_all().await {
                tracing::warn!(model = %name, error = %err, "model not loaded; fix it and load it through the repository API");
            }
            loading.starting.store(false, Ordering::Relaxed);
            tracing::info!("startup load finished: ready");
        });
        let sh = shared.clone();
        let grace = opts.shutdown_grace;
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutting down: finishing in-flight requests"
            );
            sh.shutting_down.store(true, Ordering::Relaxed);
            let _ = stop_tx.send(true);
            let _ = stopping_tx.send(true);
        });
        let mut result = Ok(());
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let next = match deadline {
                // Connections that stay open (an idle gRPC stream) must not hold the
                // process forever: after the grace period the rest are dropped.
                Some(d) => match tokio::time::timeout_at(d, tasks.join_next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        tracing::warn!("grace period over; closing the remaining connections");
                        tasks.abort_all();
                        break;
                    }
                },
                None => tokio::select! {
                    n = tasks.join_next() => n,
                    _ = stopping.wait_for(|&s| s) => {
                        deadline = Some(tokio::time::Instant::now() + grace);
                        continue;
                    }
                },
            };
            match next {
                None => break,
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "listener failed");
                    result = Err(e);
                }
                Some(Err(e)) => tracing::error!(error = %e, "listener task panicked"),
                Some(Ok(Ok(()))) => {}
            }
        }
        // Traces still held go to the trace file now (Triton writes it at shutdown).
        shared.tracer.flush();
        result
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the server on a new multi-threaded runtime until SIGTERM / ctrl-c (for the CLI).
pub fn run_until_signal(
    options: ServeOptions,
    repository: Repository,
    gpu: Option<Arc<dyn GpuMetrics>>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aperture-serve")
        .build()?;
    rt.block_on(Server::with_gpu_metrics(options, repository, gpu).run(shutdown_signal()))
}
