//! KServe v2 over HTTP/REST as Triton speaks it (axum).

mod body;
mod codec;
mod compression;
mod handlers;
mod image;
mod multipart;
mod response;
mod shm;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;

use crate::connections::LimitedListener;
use crate::error::ServerError;
use crate::server::Shared;

pub use body::{read_infer_request, read_infer_request_with_shm};
pub use codec::{
    decode_request, decode_request_with_shm, BinaryLen, DecodedRequest, PendingRequest,
    HEADER_LENGTH,
};
pub use response::{
    encode_response, encode_response_placed, ChunkedBody, EncodedResponse, OutputPlace,
};

/// The HTTP router over the shared server state.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.options.max_body_bytes;
    let router = Router::new()
        .route("/v2", get(handlers::server_metadata))
        .route("/v2/health/live", get(handlers::live))
        .route("/v2/health/ready", get(handlers::ready))
        .route("/v2/models/stats", get(handlers::all_stats))
        .route("/v2/models/{model}", get(handlers::model_metadata))
        .route("/v2/models/{model}/ready", get(handlers::model_ready))
        .route("/v2/models/{model}/config", get(handlers::model_config))
        .route("/v2/models/{model}/stats", get(handlers::model_stats))
        .route("/v2/models/{model}/infer", post(handlers::infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(handlers::model_metadata_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(handlers::model_ready_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(handlers::model_config_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(handlers::model_stats_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(handlers::infer_v),
        )
        .route(
            "/v2/logging",
            get(handlers::logging).post(handlers::update_logging),
        )
        .route(
            "/v2/trace/setting",
            get(handlers::trace_setting).post(handlers::update_trace_setting),
        )
        .route(
            "/v2/models/{model}/trace/setting",
            get(handlers::model_trace_setting).post(handlers::update_model_trace_setting),
        )
        .route("/v2/repository/index", post(handlers::repository_index))
        .route(
            "/v2/repository/models/{model}/load",
            post(handlers::repository_load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(handlers::repository_unload),
        )
        .route("/v2/systemsharedmemory/status", get(shm::status))
        .route(
            "/v2/systemsharedmemory/region/{name}/status",
            get(shm::region_status),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/register",
            post(shm::register),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/unregister",
            post(shm::unregister),
        )
        .route(
            "/v2/systemsharedmemory/unregister",
            post(shm::unregister_all),
        )
        .route("/v1/models/{model}/detect", post(image::detect))
        .route("/v1/models/{model}/enhance", post(image::enhance))
        .fallback(handlers::not_found);
    // Without keys there is nothing to check: no middleware on the hot path.
    let router = if shared.options.api_key.is_some() || shared.options.admin_key.is_some() {
        router.layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ))
    } else {
        router
    };
    router
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// API keys: `--api-key` guards everything but health, `--admin-key` guards repository
/// control and the log settings. Accepted as `Authorization: Bearer KEY` or
/// `X-Api-Key: KEY`.
async fn authorize(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let needed = if path.starts_with("/v2/health") {
        None
    } else if path.starts_with("/v2/repository")
        || path == "/v2/logging"
        || path.ends_with("/trace/setting")
    {
        shared
            .options
            .admin_key
            .as_deref()
            .or(shared.options.api_key.as_deref())
    } else {
        shared.options.api_key.as_deref()
    };
    if let Some(key) = needed {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()));
        if !given.is_some_and(|g| keys_match(g, key)) {
            return ServerError::Unauthorized("missing or invalid API key".into()).into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so timing does not reveal the key's prefix.
pub(crate) fn keys_match(given: &str, key: &str) -> bool {
    let (a, b) = (given.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves HTTP on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
    });
    let listener = LimitedListener::new(listener, shared.connections.clone());
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(shutdown)
        .await
}
