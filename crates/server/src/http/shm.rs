//! Triton's system shared-memory endpoints (`/v2/systemsharedmemory/...`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;

use crate::error::{Result, ServerError};
use crate::server::Shared;
use crate::shm::RegionStatus;

type S = State<Arc<Shared>>;

#[derive(serde::Deserialize)]
struct RegisterBody {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

pub async fn status(State(s): S) -> Result<Json<Vec<RegionStatus>>> {
    Ok(Json(s.shared_memory.status(None)?))
}

pub async fn region_status(
    State(s): S,
    Path(name): Path<String>,
) -> Result<Json<Vec<RegionStatus>>> {
    Ok(Json(s.shared_memory.status(Some(&name))?))
}

pub async fn register(State(s): S, Path(name): Path<String>, body: Bytes) -> Result<StatusCode> {
    let req: RegisterBody = serde_json::from_slice(&body).map_err(|e| {
        ServerError::invalid(format!(
            "failed to parse the register request (expected {{\"key\", \"offset\", \"byte_size\"}}): {e}"
        ))
    })?;
    s.shared_memory
        .register(&name, &req.key, req.offset, req.byte_size)?;
    Ok(StatusCode::OK)
}

pub async fn unregister(State(s): S, Path(name): Path<String>) -> StatusCode {
    s.shared_memory.unregister(&name);
    StatusCode::OK
}

pub async fn unregister_all(State(s): S) -> StatusCode {
    s.shared_memory.unregister_all();
    StatusCode::OK
}
