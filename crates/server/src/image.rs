//! Images in, answers out: the glue between decoded images and a model, registered per
//! architecture next to its runner builder (see [`crate::ArchitectureRegistry`]).
//!
//! [`PlanarImageAdapter`] serves image-to-image models whose input and output are RGB
//! planes in [0, 1] (`[N, 3, H, W]`), e.g. Restormer or the built-in identity.

use aperture_engine::{HostTensor, NamedTensors, TensorSpec};
use std::sync::Arc;

use aperture_vision::{crop, pad_to_multiple, DecodeLimits, DecodedImage, Nchw, VisionError};
use serde_json::Value;

use crate::error::ServerError;
use crate::factory::BuildError;
use crate::tensor_io::concat_batch;

/// An enhanced image: RGB planes (CHW) in [0, 1].
pub struct PlanarImage {
    pub data: Vec<f32>,
    pub width: u32,
    pub height: u32,
}

/// Pre- and post-processing of one architecture for the `/v1` image endpoints.
pub trait ImageAdapter: Send + Sync {
    /// Model inputs (batch of one) for a decoded image. Runs on a blocking thread.
    fn preprocess(
        &self,
        image: &DecodedImage,
        inputs: &[TensorSpec],
    ) -> Result<NamedTensors, BuildError>;

    /// Detections as JSON for `/detect`, in original image pixels, keeping scores above
    /// `threshold`; `None` if this architecture does not detect.
    fn detections(
        &self,
        _outputs: &NamedTensors,
        _width: u32,
        _height: u32,
        _threshold: f32,
    ) -> Option<Result<Value, BuildError>> {
        None
    }

    /// The enhanced image for `/enhance`; `None` if this architecture does not enhance.
    fn enhanced(
        &self,
        _outputs: &NamedTensors,
        _width: u32,
        _height: u32,
    ) -> Option<Result<PlanarImage, BuildError>> {
        None
    }
}

/// RGB planes in, RGB planes out (first input / first output) at the image's size;
/// with `multiple > 1` the image is reflect-padded to a multiple of it on the way in
/// (e.g. 8 for Restormer's three downsamplings) and cropped back on the way out.
pub struct PlanarImageAdapter {
    multiple: usize,
}

impl PlanarImageAdapter {
    pub fn new() -> Self {
        Self { multiple: 1 }
    }

    pub fn padded(multiple: usize) -> Self {
        Self {
            multiple: multiple.max(1),
        }
    }
}

impl Default for PlanarImageAdapter {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageAdapter for PlanarImageAdapter {
    fn preprocess(
        &self,
        image: &DecodedImage,
        inputs: &[TensorSpec],
    ) -> Result<NamedTensors, BuildError> {
        let spec = inputs.first().ok_or("model has no inputs")?;
        let shape = Nchw {
            n: 1,
            c: 3,
            h: image.height() as usize,
            w: image.width() as usize,
        };
        let mut data = image.to_f32_planar();
        let mut padded = shape;
        if self.multiple > 1 {
            (data, padded) = pad_to_multiple(&data, shape, self.multiple)?;
        }
        let t = HostTensor::from_f32(vec![1, 3, padded.h, padded.w], data)?.to_dtype(spec.dtype);
        Ok(vec![(spec.name.clone(), t)])
    }

    fn enhanced(
        &self,
        outputs: &NamedTensors,
        width: u32,
        height: u32,
    ) -> Option<Result<PlanarImage, BuildError>> {
        Some(planar_output(outputs, width, height))
    }
}

/// The first output as an image, cropped to the original size if it was padded.
fn planar_output(
    outputs: &NamedTensors,
    width: u32,
    height: u32,
) -> Result<PlanarImage, BuildError> {
    let (name, t) = outputs.first().ok_or("model returned no outputs")?;
    let (h, w) = match t.shape() {
        [1, 3, h, w] => (*h, *w),
        other => {
            return Err(format!(
                "output '{name}' has shape {other:?}, expected [1, 3, H, W] for an image"
            )
            .into())
        }
    };
    let (oh, ow) = (height as usize, width as usize);
    // Cropping reads the f32 storage in place; only other dtypes are widened first.
    let wide;
    let src = match t.as_f32() {
        Some(s) => s,
        None => {
            wide = t.to_f32_vec();
            &wide
        }
    };
    let data = if (h, w) == (oh, ow) {
        src.to_vec()
    } else {
        crop(src, Nchw { n: 1, c: 3, h, w }, oh, ow)?
    };
    Ok(PlanarImage {
        data,
        width,
        height,
    })
}

/// Maps a decoding failure: oversized images are 413, anything else 400.
pub fn vision_error(e: VisionError) -> ServerError {
    match e {
        VisionError::TooManyPixels { .. } | VisionError::FileTooLarge { .. } => {
            ServerError::PayloadTooLarge(e.to_string())
        }
        other => ServerError::invalid(other.to_string()),
    }
}

/// Decodes and preprocesses encoded images (on the blocking pool) into one batch of
/// model inputs; returns it with the size of the first image.
pub async fn decode_to_inputs(
    adapter: Arc<dyn ImageAdapter>,
    specs: Vec<TensorSpec>,
    images: Vec<bytes::Bytes>,
    limits: DecodeLimits,
) -> Result<(NamedTensors, u32, u32), ServerError> {
    tokio::task::spawn_blocking(move || {
        let mut per_image: Vec<NamedTensors> = Vec::with_capacity(images.len());
        let mut size = (0, 0);
        for (i, bytes) in images.iter().enumerate() {
            // The decoder reads the header first and refuses oversized images before decoding.
            let started = std::time::Instant::now();
            let img = aperture_vision::decode_bytes(bytes, &limits).map_err(vision_error)?;
            let decoded = started.elapsed();
            if i == 0 {
                size = (img.width(), img.height());
            }
            per_image.push(adapter.preprocess(&img, &specs).map_err(|e| ServerError::invalid(e.to_string()))?);
            tracing::debug!(
                bytes = bytes.len(),
                width = img.width(),
                height = img.height(),
                decode_us = decoded.as_micros() as u64,
                preprocess_us = (started.elapsed() - decoded).as_micros() as u64,
                "image decoded and preprocessed"
            );
        }
        let first = per_image.first().ok_or_else(|| ServerError::invalid("no images given"))?;
        let mut batch = Vec::with_capacity(first.len());
        for (k, (name, _)) in first.iter().enumerate() {
            let parts: Vec<&HostTensor> = per_image.iter().filter_map(|p| p.get(k).map(|(_, t)| t)).collect();
            let t = if parts.len() == 1 {
                parts[0].clone()
            } else {
                concat_batch(&parts).map_err(|_| {
                    ServerError::invalid(
                        "these images preprocess to different sizes and cannot share a request; send them separately",
                    )
                })?
            };
            batch.push((name.clone(), t));
        }
        Ok((batch, size.0, size.1))
    })
    .await
    .map_err(|e| ServerError::Internal(format!("image decoding failed: {e}")))?
}

/// Splits KServe BYTES tensor data (each element: u32 little-endian length, then bytes).
pub fn split_bytes_elements(
    name: &str,
    raw: &bytes::Bytes,
) -> Result<Vec<bytes::Bytes>, ServerError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() {
        let len_bytes = raw.get(pos..pos + 4).ok_or_else(|| {
            ServerError::invalid(format!("input '{name}': truncated BYTES element length"))
        })?;
        let len =
            u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        let start = pos + 4;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= raw.len())
            .ok_or_else(|| {
                ServerError::invalid(format!(
                    "input '{name}': BYTES element of {len} bytes runs past the data"
                ))
            })?;
        out.push(raw.slice(start..end));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_split_and_truncation_is_an_error() {
        let mut raw = Vec::new();
        for e in [&b"abc"[..], b"", b"xy"] {
            raw.extend((e.len() as u32).to_le_bytes());
            raw.extend_from_slice(e);
        }
        let got = split_bytes_elements("x", &bytes::Bytes::from(raw.clone())).unwrap();
        assert_eq!(got, vec![&b"abc"[..], b"", b"xy"]);
        raw.pop();
        let e = split_bytes_elements("x", &bytes::Bytes::from(raw)).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        let e = split_bytes_elements("x", &bytes::Bytes::from_static(&[1, 0])).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
