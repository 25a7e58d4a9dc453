//! Which graph a batch of decoded images runs in when preprocessing is captured with
//! the forward pass: the graph's input is the images' bytes, a fixed size per graph, so
//! one graph serves one (batch, source height, source width, preprocessing) tuple.
//! Batches of mixed sizes (or an NHWC spec, which the model does not take) keep the
//! separate preprocessing step.

use std::collections::HashMap;
use std::sync::Mutex;

use aperture_engine::{EngineError, Result};
use aperture_vision::RgbImage;

use crate::preprocess::{PreprocessSpec, TensorLayout};

/// The preprocessing part of a key: the spec's f32 values as bit patterns, so that
/// keys hash and compare exactly (two specs share a graph only if every value does).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SpecKey {
    size: Option<(usize, usize)>,
    scale: u32,
    normalize: Option<([u32; 3], [u32; 3])>,
}

fn bits(v: [f32; 3]) -> [u32; 3] {
    v.map(f32::to_bits)
}

fn floats(v: [u32; 3]) -> [f32; 3] {
    v.map(f32::from_bits)
}

/// A graph of preprocessing + forward pass + post-processing: `batch` 8-bit RGB images
/// of `height x width` each, preprocessed by one spec (NCHW output).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PixelGraphKey {
    pub batch: usize,
    /// Every source image's height and width.
    pub height: usize,
    pub width: usize,
    spec: SpecKey,
}

impl PixelGraphKey {
    /// The key for images of `sizes` = (height, width) each under `spec`; `None` where
    /// the batch must take the separate preprocessing step: images of different sizes
    /// (a graph's input has one fixed size) or an NHWC spec (the model takes NCHW).
    /// Errors on an empty batch, an image of zero size or an invalid spec.
    pub fn for_sizes(sizes: &[(usize, usize)], spec: &PreprocessSpec) -> Result<Option<Self>> {
        spec.validate()?;
        let &(height, width) = sizes
            .first()
            .ok_or_else(|| EngineError::Invalid("no images to detect in".into()))?;
        if let Some(&(h, w)) = sizes.iter().find(|&&(h, w)| h == 0 || w == 0) {
            return Err(EngineError::Invalid(format!(
                "an image of {w}x{h} pixels has nothing to detect in"
            )));
        }
        if spec.layout != TensorLayout::Nchw || sizes.iter().any(|&s| s != (height, width)) {
            return Ok(None);
        }
        Ok(Some(Self {
            batch: sizes.len(),
            height,
            width,
            spec: SpecKey {
                size: spec.size,
                scale: spec.scale.to_bits(),
                normalize: spec.normalize.map(|(m, s)| (bits(m), bits(s))),
            },
        }))
    }

    /// [`PixelGraphKey::for_sizes`] for decoded images.
    pub fn for_images(images: &[&RgbImage], spec: &PreprocessSpec) -> Result<Option<Self>> {
        let sizes: Vec<(usize, usize)> = images
            .iter()
            .map(|i| (i.height() as usize, i.width() as usize))
            .collect();
        Self::for_sizes(&sizes, spec)
    }

    /// The preprocessing this graph runs (the spec the key was made from).
    pub fn spec(&self) -> PreprocessSpec {
        let s = &self.spec;
        PreprocessSpec {
            size: s.size,
            scale: f32::from_bits(s.scale),
            normalize: s.normalize.map(|(m, d)| (floats(m), floats(d))),
            layout: TensorLayout::Nchw,
        }
    }

    /// The model's input `[N, 3, H, W]`: the spec's size, else the images' own.
    pub fn model_input_shape(&self) -> [usize; 4] {
        let (h, w) = self.spec.size.unwrap_or((self.height, self.width));
        [self.batch, 3, h, w]
    }

    /// The bytes of one batch of images (8-bit HWC RGB).
    pub fn pixel_bytes(&self) -> usize {
        self.batch * self.height * self.width * 3
    }

    /// Whether `images` are what this graph takes: `batch` images of its size.
    pub fn check_images(&self, images: &[&RgbImage]) -> Result<()> {
        if images.len() != self.batch {
            return Err(EngineError::Invalid(format!(
                "the graph for a batch of {} got {} images",
                self.batch,
                images.len()
            )));
        }
        match images
            .iter()
            .find(|i| (i.height() as usize, i.width() as usize) != (self.height, self.width))
        {
            Some(i) => Err(EngineError::Invalid(format!(
                "the graph for {}x{} images got one of {}x{}",
                self.width,
                self.height,
                i.width(),
                i.height()
            ))),
            None => Ok(()),
        }
    }
}

/// Which keys get a pixel graph of their own. A capture costs seconds and holds device
/// memory for a whole forward pass, while the separate preprocessing step shares one
/// graph per model input size: so a key gets its graph from its `after`-th batch on
/// (image sizes met once, as in a folder of photos, keep the separate step) and at
/// most `max` keys get one.
pub struct PixelGraphAdmission {
    after: u32,
    max: usize,
    state: Mutex<Admitted>,
}

#[derive(Default)]
struct Admitted {
    /// Batches seen per key not admitted yet.
    seen: HashMap<PixelGraphKey, u32>,
    admitted: Vec<PixelGraphKey>,
}

/// Keys counted before the counts start over (a stream of ever new sizes).
const MAX_COUNTED: usize = 4096;

impl Default for PixelGraphAdmission {
    fn default() -> Self {
        Self::new(Self::AFTER, Self::MAX)
    }
}

impl PixelGraphAdmission {
    /// A key's graph is captured at its second batch...
    pub const AFTER: u32 = 2;
    /// ...for at most this many keys.
    pub const MAX: usize = 8;

    pub fn new(after: u32, max: usize) -> Self {
        Self {
            after: after.max(1),
            max,
            state: Mutex::new(Admitted::default()),
        }
    }

    /// Counts one batch of `key`; whether it runs in its pixel graph.
    pub fn admit(&self, key: &PixelGraphKey) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.admitted.contains(key) {
            return true;
        }
        if s.admitted.len() >= self.max {
            return false;
        }
        if s.seen.len() >= MAX_COUNTED && !s.seen.contains_key(key) {
            s.seen.clear();
        }
        let n = s.seen.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n < self.after {
            return false;
        }
        s.seen.remove(key);
        s.admitted.push(key.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PreprocessSpec {
        PreprocessSpec::resize(640, 640).rescale(1.0 / 255.0)
    }

    #[test]
    fn one_size_gives_a_key_with_the_model_input_shape() {
        let k = PixelGraphKey::for_sizes(&[(480, 640); 3], &spec())
            .unwrap()
            .unwrap();
        assert_eq!((k.batch, k.height, k.width), (3, 480, 640));
        assert_eq!(k.model_input_shape(), [3, 3, 640, 640]);
        assert_eq!(k.pixel_bytes(), 3 * 480 * 640 * 3);
        assert_eq!(k.spec(), spec());
        // Without a target size the model sees the images' own size.
        let keep = PixelGraphKey::for_sizes(&[(333, 500)], &PreprocessSpec::keep_size())
            .unwrap()
            .unwrap();
        assert_eq!(keep.model_input_shape(), [1, 3, 333, 500]);
    }

    #[test]
    fn mixed_sizes_and_channels_last_fall_back() {
        let mixed = PixelGraphKey::for_sizes(&[(480, 640), (640, 480)], &spec()).unwrap();
        assert_eq!(mixed, None);
        let nhwc = spec().with_layout(TensorLayout::Nhwc);
        assert_eq!(
            PixelGraphKey::for_sizes(&[(480, 640)], &nhwc).unwrap(),
            None
        );
    }

    #[test]
    fn empty_batches_zero_sizes_and_bad_specs_are_errors() {
        let e = PixelGraphKey::for_sizes(&[], &spec()).unwrap_err();
        assert!(e.to_string().contains("no images"), "{e}");
        let e = PixelGraphKey::for_sizes(&[(480, 640), (0, 640)], &spec()).unwrap_err();
        assert!(e.to_string().contains("640x0"), "{e}");
        let bad = spec().normalized([0.0; 3], [1.0, 0.0, 1.0]);
        assert!(PixelGraphKey::for_sizes(&[(4, 4)], &bad).is_err());
    }

    #[test]
    fn keys_differ_by_batch_size_and_every_spec_value() {
        let key = |n: usize, s: &PreprocessSpec| {
            PixelGraphKey::for_sizes(&vec![(480, 640); n], s)
                .unwrap()
                .unwrap()
        };
        let base = key(2, &spec());
        assert_eq!(base, key(2, &spec()));
        assert_ne!(base, key(1, &spec()));
        assert_ne!(base, key(2, &spec().rescale(1.0)));
        assert_ne!(
            base,
            key(2, &PreprocessSpec::resize(640, 320).rescale(1.0 / 255.0))
        );
        let norm = spec().normalized([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let k = key(2, &norm);
        assert_ne!(base, k);
        assert_eq!(k.spec(), norm, "the spec comes back bit for bit");
        let other = PixelGraphKey::for_sizes(&[(481, 640); 2], &spec())
            .unwrap()
            .unwrap();
        assert_ne!(base, other);
    }

    #[test]
    fn a_key_is_admitted_from_its_second_batch_and_only_so_many_keys_are() {
        let key = |w: usize| {
            PixelGraphKey::for_sizes(&[(480, w)], &spec())
                .unwrap()
                .unwrap()
        };
        let a = PixelGraphAdmission::new(2, 2);
        assert!(!a.admit(&key(640)), "first batch of a size: separate step");
        assert!(!a.admit(&key(500)));
        assert!(a.admit(&key(640)), "second batch: its own graph");
        assert!(a.admit(&key(640)), "admitted keys stay admitted");
        assert!(a.admit(&key(500)));
        assert!(!a.admit(&key(333)) && !a.admit(&key(333)), "no room left");
        assert!(a.admit(&key(500)) && a.admit(&key(640)));
        let eager = PixelGraphAdmission::new(1, 1);
        assert!(eager.admit(&key(640)));
        assert!(!eager.admit(&key(500)));
        let none = PixelGraphAdmission::new(1, 0);
        assert!(!none.admit(&key(640)));
    }

    #[test]
    fn images_are_checked_against_the_key() {
        let k = PixelGraphKey::for_sizes(&[(2, 3); 2], &spec())
            .unwrap()
            .unwrap();
        let a = RgbImage::new(3, 2);
        let b = RgbImage::new(2, 3);
        assert!(k.check_images(&[&a, &a]).is_ok());
        let e = k.check_images(&[&a]).unwrap_err();
        assert!(e.to_string().contains("got 1 images"), "{e}");
        let e = k.check_images(&[&a, &b]).unwrap_err();
        assert!(e.to_string().contains("2x3"), "{e}");
        let from_images = PixelGraphKey::for_images(&[&a, &a], &spec()).unwrap();
        assert_eq!(from_images, Some(k));
        assert_eq!(PixelGraphKey::for_images(&[&a, &b], &spec()).unwrap(), None);
    }
}
