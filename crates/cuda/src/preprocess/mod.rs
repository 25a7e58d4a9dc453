//! Image preprocessing on the GPU: decoded 8-bit RGB images go up as bytes; Pillow's
//! bilinear resize (the taps of `aperture_vision::resize_plan`, the same integer
//! arithmetic), rescale and optional mean/std normalisation run on the device and
//! write f32 NCHW (or NHWC) batch slots. [`preprocess_cpu`] is the CPU twin (today's
//! CPU path); [`Preprocessor`] picks one of the two once, at model load.
//!
//! ```
//! use aperture_cuda::preprocess::{PreprocessSpec, Preprocessor};
//! use aperture_vision::RgbImage;
//! let pre = Preprocessor::new(None).unwrap(); // the CPU path; Some(gpu) for the GPU
//! let img = RgbImage::from_raw(320, 240, vec![128; 320 * 240 * 3]).unwrap();
//! let spec = PreprocessSpec::resize(64, 64).rescale(1.0 / 255.0);
//! let t = pre.run(&[&img], &spec).unwrap();
//! assert_eq!(t.shape(), &[1, 3, 64, 64]);
//! ```

pub mod check;
mod device;
pub(crate) mod plan;
pub(crate) mod steps;

pub use device::GpuPreprocessor;
pub(crate) use device::{Pinned, PREPROCESS_KERNELS, PREPROCESS_SOURCE};

use aperture_engine::{EngineError, HostTensor, Result};
use aperture_vision::{normalize_chw, pil_bilinear, to_nchw_f32, RgbImage};

/// The output tensor's layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorLayout {
    /// `[N, 3, H, W]`, what the runners take.
    #[default]
    Nchw,
    /// `[N, H, W, 3]`.
    Nhwc,
}

/// What to do to each image.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessSpec {
    /// Target `(height, width)`; `None` keeps the size (then a batch's images must
    /// share it).
    pub size: Option<(usize, usize)>,
    /// Each byte becomes `v as f32 * scale` (computed in f32).
    pub scale: f32,
    /// Then `(x - mean[c]) / std[c]`, in f32.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    pub layout: TensorLayout,
}

impl PreprocessSpec {
    /// Resize to `height x width`, scale 1, no normalisation, NCHW.
    pub fn resize(height: usize, width: usize) -> Self {
        Self {
            size: Some((height, width)),
            ..Self::keep_size()
        }
    }

    /// No resize, scale 1, no normalisation, NCHW.
    pub fn keep_size() -> Self {
        Self {
            size: None,
            scale: 1.0,
            normalize: None,
            layout: TensorLayout::Nchw,
        }
    }

    pub fn rescale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    pub fn normalized(mut self, mean: [f32; 3], std: [f32; 3]) -> Self {
        self.normalize = Some((mean, std));
        self
    }

    pub fn with_layout(mut self, layout: TensorLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Refuses sizes of zero, a non-finite scale and a zero or non-finite std.
    pub fn validate(&self) -> Result<()> {
        if let Some((h, w)) = self.size {
            if h == 0 || w == 0 {
                return Err(EngineError::Invalid(format!(
                    "preprocessing target size {w}x{h} must be positive"
                )));
            }
        }
        if !self.scale.is_finite() {
            return Err(EngineError::Invalid(format!(
                "preprocessing scale {} must be finite",
                self.scale
            )));
        }
        if let Some((mean, std)) = self.normalize {
            if std.iter().any(|&s| s == 0.0 || !s.is_finite())
                || !mean.iter().all(|m| m.is_finite())
            {
                return Err(EngineError::Invalid(format!(
                    "normalisation mean {mean:?} / std {std:?}: std must be finite and non-zero"
                )));
            }
        }
        Ok(())
    }
}

fn vision(e: aperture_vision::VisionError) -> EngineError {
    EngineError::Invalid(e.to_string())
}

/// The CPU path: `pil_bilinear` (when the size changes), `to_nchw_f32`, then
/// `normalize_chw`, image by image into one `[N, 3, H, W]` (or NHWC) tensor.
pub fn preprocess_cpu(images: &[&RgbImage], spec: &PreprocessSpec) -> Result<HostTensor> {
    spec.validate()?;
    let first = images
        .first()
        .ok_or_else(|| EngineError::Invalid("no images to preprocess".into()))?;
    let (h, w) = spec
        .size
        .unwrap_or((first.height() as usize, first.width() as usize));
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        let resized;
        let src = if (img.height() as usize, img.width() as usize) == (h, w) {
            *img
        } else if spec.size.is_some() {
            resized = pil_bilinear(img, w as u32, h as u32).map_err(vision)?;
            &resized
        } else {
            return Err(EngineError::Invalid(
                "images of different sizes need a target size to share a batch".into(),
            ));
        };
        let mut planes = to_nchw_f32(src, spec.scale);
        if let Some((mean, std)) = spec.normalize {
            normalize_chw(&mut planes, mean, std).map_err(vision)?;
        }
        match spec.layout {
            TensorLayout::Nchw => data.extend_from_slice(&planes),
            TensorLayout::Nhwc => data.extend(nchw_to_nhwc(&planes, h * w)),
        }
    }
    let n = images.len();
    let shape = match spec.layout {
        TensorLayout::Nchw => vec![n, 3, h, w],
        TensorLayout::Nhwc => vec![n, h, w, 3],
    };
    HostTensor::from_f32(shape, data)
}

/// One image's 3 planes of `plane` values, interleaved per pixel.
fn nchw_to_nhwc(planes: &[f32], plane: usize) -> impl Iterator<Item = f32> + '_ {
    (0..plane * 3).map(move |i| planes[(i % 3) * plane + i / 3])
}

/// Where preprocessing runs, chosen once when a model is loaded.
pub enum Preprocessor {
    Cpu,
    Gpu(Box<GpuPreprocessor>),
}

impl Preprocessor {
    /// The GPU path on device `gpu`, or the CPU path for `None`. Fails where the GPU
    /// is not usable; callers that can live with the CPU path fall back to
    /// [`Preprocessor::Cpu`].
    pub fn new(gpu: Option<usize>) -> crate::CudaResult<Self> {
        Ok(match gpu {
            Some(ordinal) => Preprocessor::Gpu(Box::new(GpuPreprocessor::new(ordinal)?)),
            None => Preprocessor::Cpu,
        })
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Preprocessor::Gpu(_))
    }

    /// Preprocesses a batch into one host tensor (image `i` in slot `i`).
    pub fn run(&self, images: &[&RgbImage], spec: &PreprocessSpec) -> Result<HostTensor> {
        match self {
            Preprocessor::Cpu => preprocess_cpu(images, spec),
            Preprocessor::Gpu(g) => g.run(images, spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, seed: u32) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        RgbImage::from_raw(w, h, data).unwrap()
    }

    #[test]
    fn cpu_path_is_the_vision_crates_functions() {
        let img = image(37, 23, 1);
        let spec = PreprocessSpec::resize(16, 20)
            .rescale(aperture_vision::HF_RESCALE_FACTOR)
            .normalized([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let got = preprocess_cpu(&[&img, &img], &spec).unwrap();
        let mut want = to_nchw_f32(
            &pil_bilinear(&img, 20, 16).unwrap(),
            aperture_vision::HF_RESCALE_FACTOR,
        );
        normalize_chw(&mut want, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).unwrap();
        assert_eq!(got.shape(), &[2, 3, 16, 20]);
        let v = got.to_f32_vec();
        assert_eq!(&v[..want.len()], &want[..]);
        assert_eq!(&v[want.len()..], &want[..]);
    }

    #[test]
    fn nhwc_interleaves_the_planes() {
        let img = image(5, 4, 2);
        let nchw = preprocess_cpu(&[&img], &PreprocessSpec::keep_size()).unwrap();
        let nhwc = preprocess_cpu(
            &[&img],
            &PreprocessSpec::keep_size().with_layout(TensorLayout::Nhwc),
        )
        .unwrap();
        assert_eq!(nhwc.shape(), &[1, 4, 5, 3]);
        let (a, b) = (nchw.to_f32_vec(), nhwc.to_f32_vec());
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                assert_eq!(b[i * 3 + c], f32::from(px[c]));
                assert_eq!(a[c * 20 + i], f32::from(px[c]));
            }
        }
    }

    #[test]
    fn bad_specs_and_mixed_sizes_are_errors() {
        let (a, b) = (image(4, 4, 0), image(5, 4, 0));
        let e = preprocess_cpu(&[&a, &b], &PreprocessSpec::keep_size()).unwrap_err();
        assert!(e.to_string().contains("target size"), "{e}");
        assert!(preprocess_cpu(&[], &PreprocessSpec::keep_size()).is_err());
        let zero = PreprocessSpec::keep_size().normalized([0.0; 3], [1.0, 0.0, 1.0]);
        assert!(preprocess_cpu(&[&a], &zero).is_err());
        assert!(PreprocessSpec::resize(0, 4).validate().is_err());
        assert!(PreprocessSpec::keep_size()
            .rescale(f32::NAN)
            .validate()
            .is_err());
        // Mixed sizes are fine with a target size.
        let t = preprocess_cpu(&[&a, &b], &PreprocessSpec::resize(3, 3)).unwrap();
        assert_eq!(t.shape(), &[2, 3, 3, 3]);
    }

    #[test]
    fn without_a_gpu_the_preprocessor_is_the_cpu_path() {
        match Preprocessor::new(Some(0)) {
            Ok(pre) => assert!(pre.is_gpu() && crate::cuda_available()),
            Err(e) => assert!(!crate::cuda_available() || !e.to_string().is_empty()),
        }
        assert!(!Preprocessor::new(None).unwrap().is_gpu());
    }
}
