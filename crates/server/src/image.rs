//! Images in, answers out: the glue between decoded images and a model, registered per
//! architecture next to its runner builder (see [`crate::ArchitectureRegistry`]).
//!
//! [`PlanarImageAdapter`] serves image-to-image models whose input and output are RGB
//! planes in [0, 1] (`[N, 3, H, W]`), e.g. Restormer or the built-in identity.

use aperture_engine::{HostTensor, NamedTensors, TensorSpec};
use aperture_vision::{crop, pad_to_multiple, DecodedImage, Nchw};
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
    let data = if (h, w) == (oh, ow) {
        t.to_f32_vec()
    } else {
        crop(&t.to_f32_vec(), Nchw { n: 1, c: 3, h, w }, oh, ow)?
    };
    Ok(PlanarImage {
        data,
        width,
        height,
    })
}
