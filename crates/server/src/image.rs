//! Images in, answers out: the glue between decoded images and a model, registered per
//! architecture next to its runner builder (see [`crate::ArchitectureRegistry`]).
//!
//! [`PlanarImageAdapter`] serves image-to-image models whose input and output are RGB
//! planes in [0, 1] (`[N, 3, H, W]`), e.g. Restormer or the built-in identity.

use aperture_engine::{HostTensor, NamedTensors, TensorSpec};
use aperture_vision::DecodedImage;
use serde_json::Value;

use crate::factory::BuildError;

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

    /// Detections as JSON for `/detect`, in original image pixels; `None` if this
    /// architecture does not detect.
    fn detections(
        &self,
        _outputs: &NamedTensors,
        _width: u32,
        _height: u32,
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

/// RGB planes in, RGB planes out (first input / first output), at the image's size.
pub struct PlanarImageAdapter;

impl ImageAdapter for PlanarImageAdapter {
    fn preprocess(
        &self,
        image: &DecodedImage,
        inputs: &[TensorSpec],
    ) -> Result<NamedTensors, BuildError> {
        let spec = inputs.first().ok_or("model has no inputs")?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        let t = HostTensor::from_f32(vec![1, 3, h, w], image.to_f32_planar())?.to_dtype(spec.dtype);
        Ok(vec![(spec.name.clone(), t)])
    }

    fn enhanced(
        &self,
        outputs: &NamedTensors,
        _width: u32,
        _height: u32,
    ) -> Option<Result<PlanarImage, BuildError>> {
        Some(planar_output(outputs))
    }
}

fn planar_output(outputs: &NamedTensors) -> Result<PlanarImage, BuildError> {
    let (name, t) = outputs.first().ok_or("model returned no outputs")?;
    match t.shape() {
        [1, 3, h, w] => Ok(PlanarImage {
            data: t.to_f32_vec(),
            width: u32::try_from(*w)?,
            height: u32::try_from(*h)?,
        }),
        other => Err(format!(
            "output '{name}' has shape {other:?}, expected [1, 3, H, W] for an image"
        )
        .into()),
    }
}
