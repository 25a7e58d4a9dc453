//! `POST /v1/models/{model}/detect|enhance`: an encoded image (PNG, JPEG, WebP) in the
//! body, decoded and preprocessed on the blocking pool, then batched like any request.

use std::sync::Arc;

use aperture_vision::{DecodeLimits, EncodeOptions, Layout, OutputFormat};
use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::handlers::body_or_error;
use super::multipart::image_body;
use crate::error::{Result, ServerError};
use crate::image::ImageAdapter;
use crate::model::{InferRequest, LoadedModel};
use crate::server::Shared;

#[derive(serde::Deserialize, Default)]
pub struct ImageQuery {
    /// Output format for /enhance: png (default) or jpeg.
    #[serde(default)]
    format: Option<String>,
    /// Score threshold for /detect (default 0.5).
    #[serde(default)]
    threshold: Option<f32>,
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// Decodes, preprocesses and runs one image; returns the outputs and the image size.
async fn run_image(
    s: &Shared,
    model: &Arc<LoadedModel>,
    body: Bytes,
) -> Result<(
    Arc<dyn ImageAdapter>,
    aperture_engine::NamedTensors,
    u32,
    u32,
)> {
    let adapter = model.images.clone().ok_or_else(|| {
        ServerError::invalid(format!(
            "model '{}' (architecture {}) has no image pipeline; use /v2/models/{}/infer",
            model.name, model.config.architecture, model.name
        ))
    })?;
    let limits = DecodeLimits {
        max_pixels: s.options.max_image_pixels,
        max_file_bytes: s.options.max_body_bytes as u64,
    };
    let (inputs, w, h) =
        crate::image::decode_to_inputs(adapter.clone(), model.inputs.clone(), vec![body], limits)
            .await?;
    let req = InferRequest {
        inputs,
        ..Default::default()
    };
    let outputs = s.run_with_timeout(model, req).await?;
    Ok((adapter, outputs, w, h))
}

pub async fn detect(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
    Query(q): Query<ImageQuery>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
    let body = image_body(
        content_type(&headers),
        body_or_error(body, s.options.max_body_bytes)?,
    )?;
    let threshold = q.threshold.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(ServerError::invalid(format!(
            "threshold {threshold} must lie in [0, 1]"
        )));
    }
    let model = s.repository.get(&m, None)?;
    let (adapter, outputs, w, h) = run_image(&s, &model, body).await?;
    let dets = adapter
        .detections(&outputs, w, h, threshold)
        .ok_or_else(|| {
            ServerError::invalid(format!("model '{m}' does not detect objects; try /enhance"))
        })?
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    Ok(Json(json!({
        "model_name": model.name,
        "model_version": model.version.to_string(),
        "width": w,
        "height": h,
        "detections": dets,
    })))
}

pub async fn enhance(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
    Query(q): Query<ImageQuery>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = image_body(
        content_type(&headers),
        body_or_error(body, s.options.max_body_bytes)?,
    )?;
    let (format, mime) = match q.format.as_deref() {
        None | Some("png") => (OutputFormat::Png, "image/png"),
        Some("jpeg") | Some("jpg") => (OutputFormat::Jpeg, "image/jpeg"),
        Some(other) => {
            return Err(ServerError::invalid(format!(
                "format '{other}': expected png or jpeg"
            )))
        }
    };
    let model = s.repository.get(&m, None)?;
    let (adapter, outputs, w, h) = run_image(&s, &model, body).await?;
    let img = adapter
        .enhanced(&outputs, w, h)
        .ok_or_else(|| {
            ServerError::invalid(format!("model '{m}' does not produce images; try /detect"))
        })?
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    let encoded = tokio::task::spawn_blocking(move || {
        aperture_vision::encode_rgb_f32(
            &img.data,
            img.width,
            img.height,
            Layout::Planar,
            format,
            &EncodeOptions::default(),
        )
    })
    .await
    .map_err(|e| ServerError::Internal(format!("image encoding failed: {e}")))?
    .map_err(|e| ServerError::Internal(e.to_string()))?;
    let mut resp = Response::new(Body::from(encoded));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(mime));
    Ok(resp)
}
