//! Enhancing images of any size: reflection-pad to a multiple of 8 (the network
//! downsamples three times), run, crop back.

use aperture_engine::{HostTensor, Runner};
use aperture_vision::pad::{crop, pad_to_multiple, Nchw};

use crate::error::{ModelError, Result};

/// The network's spatial granularity: three 2x downsamplings.
pub const SIZE_MULTIPLE: usize = 8;

/// Runs a Restormer runner on one CHW f32 image of any size and returns the CHW result.
pub fn enhance_chw(
    runner: &dyn Runner,
    chw: &[f32],
    c: usize,
    h: usize,
    w: usize,
) -> Result<Vec<f32>> {
    let shape = Nchw { n: 1, c, h, w };
    let (padded, padded_shape) =
        pad_to_multiple(chw, shape, SIZE_MULTIPLE).map_err(|e| ModelError::Input(e.to_string()))?;
    let x = HostTensor::from_f32(vec![1, c, padded_shape.h, padded_shape.w], padded)?;
    let out = runner.infer(&vec![("x".to_string(), x)])?;
    let y = out
        .into_iter()
        .next()
        .map(|(_, t)| t)
        .ok_or_else(|| ModelError::Input("the model returned no output".into()))?;
    if y.shape() != [1, c, padded_shape.h, padded_shape.w] {
        return Err(ModelError::Input(format!(
            "unexpected output shape {:?}",
            y.shape()
        )));
    }
    crop(&y.to_f32_vec(), padded_shape, h, w).map_err(|e| ModelError::Input(e.to_string()))
}
