//! Reading PNG, JPEG and WebP files into RGB.
//!
//! Conventions (chosen to match what users get from `PIL.Image.open(p).convert('RGB')`,
//! which is what Hugging Face image processors and most training code do):
//! - Grayscale is replicated to R, G and B.
//! - Alpha is dropped, not composited (PIL's `convert('RGB')` drops it too), so the
//!   colour under a fully transparent pixel shows through unchanged.
//! - CMYK JPEGs are converted to RGB as PIL does (`R = (255 - C) * (255 - K) / 255`
//!   on Adobe-inverted samples), to within 1/255 (checked against Pillow by
//!   `tests/python/test_vision.py`).
//! - JPEG: decoded by this crate's own decoder, which reproduces libjpeg-turbo (what
//!   PIL uses: islow IDCT, fancy upsampling, its YCbCr tables) bit for bit, for
//!   8-bit Huffman baseline/progressive files with 1, 3 or 4 components. Other
//!   JPEGs (arithmetic coding, 12-bit, lossless) go through zune-jpeg, which can
//!   differ from PIL by a few levels.
//! - A JPEG whose data ends before its end-of-image marker is refused as truncated,
//!   as PIL does (the decoder alone would fill the missing part with gray).
//! - EXIF orientation is NOT applied: PIL does not apply it on open and neither do
//!   HF image processors, so boxes stay in the stored pixel frame.
//! - 16-bit PNGs keep their 16 bits: [`DecodedImage::to_f32_planar`] and
//!   [`DecodedImage::to_f32_interleaved`] return full precision; [`DecodedImage::to_rgb8`]
//!   keeps the high byte as PIL does for 16-bit RGB. (For 16-bit *grayscale* PIL's
//!   `convert('RGB')` clips values above 255 to white, which destroys the image;
//!   we keep the high byte there too, deliberately differing from PIL.)
//!
//! Size limits are checked against the header before any pixel buffer is allocated.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat, Rgb, RgbImage};

use crate::error::{memory_path, VisionError};

/// A 16-bit-per-channel RGB image.
pub type Rgb16Image = ImageBuffer<Rgb<u16>, Vec<u16>>;

/// Refuse inputs above these sizes before decoding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted `width * height` declared by the header.
    pub max_pixels: u64,
    /// Largest accepted file (or buffer) size in bytes.
    pub max_file_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 50_000_000,
            max_file_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Bits per channel of the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitDepth {
    Eight,
    Sixteen,
}

#[derive(Debug, Clone)]
enum Pixels {
    U8(RgbImage),
    U16(Rgb16Image),
}

/// A decoded image, always RGB, at the bit depth of the source (8 or 16 bits).
#[derive(Debug, Clone)]
pub struct DecodedImage {
    pixels: Pixels,
    had_alpha: bool,
}

impl DecodedImage {
    pub fn width(&self) -> u32 {
        match &self.pixels {
            Pixels::U8(i) => i.width(),
            Pixels::U16(i) => i.width(),
        }
    }

    pub fn height(&self) -> u32 {
        match &self.pixels {
            Pixels::U8(i) => i.height(),
            Pixels::U16(i) => i.height(),
        }
    }

    /// Bit depth of the source file (16 only for 16-bit PNGs).
    pub fn source_bit_depth(&self) -> BitDepth {
        match &self.pixels {
            Pixels::U8(_) => BitDepth::Eight,
            Pixels::U16(_) => BitDepth::Sixteen,
        }
    }

    /// Whether the source had an alpha channel (which was dropped).
    pub fn had_alpha(&self) -> bool {
        self.had_alpha
    }

    /// 8-bit RGB. For 16-bit sources this keeps the high byte (`v >> 8`), as PIL
    /// does when it opens a 16-bit RGB PNG.
    pub fn to_rgb8(&self) -> RgbImage {
        match &self.pixels {
            Pixels::U8(i) => i.clone(),
            Pixels::U16(i) => high_bytes(i),
        }
    }

    /// Like [`DecodedImage::to_rgb8`], without copying 8-bit images.
    pub fn into_rgb8(self) -> RgbImage {
        match self.pixels {
            Pixels::U8(i) => i,
            Pixels::U16(i) => high_bytes(&i),
        }
    }

    /// The 16-bit pixels, when the source was 16-bit.
    pub fn as_rgb16(&self) -> Option<&Rgb16Image> {
        match &self.pixels {
            Pixels::U8(_) => None,
            Pixels::U16(i) => Some(i),
        }
    }

    /// Interleaved HWC values in [0, 1]: `v / 255` or `v / 65535`, computed in f32.
    pub fn to_f32_interleaved(&self) -> Vec<f32> {
        match &self.pixels {
            Pixels::U8(i) => i.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
            Pixels::U16(i) => i.as_raw().iter().map(|&v| f32::from(v) / 65535.0).collect(),
        }
    }

    /// Planar CHW values in [0, 1] (one image of an NCHW batch), full source precision.
    pub fn to_f32_planar(&self) -> Vec<f32> {
        let hwc = self.to_f32_interleaved();
        let plane = hwc.len() / 3;
        let mut out = vec![0.0f32; hwc.len()];
        for (i, px) in hwc.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                out[c * plane + i] = v;
            }
        }
        out
    }
}

fn high_bytes(img: &Rgb16Image) -> RgbImage {
    let data = img.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
    // The buffer length is exactly width * height * 3, so this cannot fail.
    RgbImage::from_raw(img.width(), img.height(), data)
        .unwrap_or_else(|| RgbImage::new(img.width(), img.height()))
}

/// Decode a file with the given limits.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<DecodedImage, VisionError> {
    let meta = std::fs::metadata(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        return Err(VisionError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("is a directory"),
        });
    }
    check_byte_size(path, meta.len(), limits)?;
    let bytes = std::fs::read(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_named(&bytes, path, limits)
}

/// Decode an in-memory encoded image (errors name it `<memory>`).
pub fn decode_bytes(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedImage, VisionError> {
    decode_named(bytes, &memory_path(), limits)
}

/// Decode a file with default limits into 8-bit RGB (the common case).
pub fn open_rgb8(path: &Path) -> Result<RgbImage, VisionError> {
    Ok(decode_file(path, &DecodeLimits::default())?.into_rgb8())
}

fn check_byte_size(path: &Path, size: u64, limits: &DecodeLimits) -> Result<(), VisionError> {
    if size == 0 {
        return Err(VisionError::Empty {
            path: path.to_path_buf(),
        });
    }
    if size > limits.max_file_bytes {
        return Err(VisionError::FileTooLarge {
            path: path.to_path_buf(),
            size,
            limit: limits.max_file_bytes,
        });
    }
    Ok(())
}

fn check_dimensions(
    path: &Path,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
) -> Result<(), VisionError> {
    if width == 0 || height == 0 {
        return Err(VisionError::ZeroSize {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(VisionError::TooManyPixels {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// PNG declares its size in the first chunk (IHDR); read it directly so a huge
/// declared size is refused even when the rest of the file is missing.
fn png_ihdr_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if bytes.get(..8)? != SIG || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
    let h = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some((w, h))
}

fn decode_named(
    bytes: &[u8],
    path: &Path,
    limits: &DecodeLimits,
) -> Result<DecodedImage, VisionError> {
    check_byte_size(path, bytes.len() as u64, limits)?;
    if let Some((w, h)) = png_ihdr_dimensions(bytes) {
        check_dimensions(path, w, h, limits)?;
    }
    let format = image::guess_format(bytes).map_err(|_| VisionError::UnknownFormat {
        path: path.to_path_buf(),
    })?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(VisionError::Unsupported {
            path: path.to_path_buf(),
            detail: format!("{format:?} files are not supported (use PNG, JPEG or WebP)"),
        });
    }
    if format == ImageFormat::Jpeg {
        crate::jpeg::check_complete(bytes).map_err(|detail| VisionError::Corrupt {
            path: path.to_path_buf(),
            detail,
        })?;
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut img_limits = image::Limits::default();
    // Decoded RGBA16 is the largest intermediate the decoders produce (8 bytes per
    // pixel), plus headroom for metadata.
    img_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(img_limits);
    let decoder = reader.into_decoder().map_err(|e| classify(path, e))?;
    let (w, h) = decoder.dimensions();
    check_dimensions(path, w, h, limits)?;
    if format == ImageFormat::Jpeg {
        // Exact libjpeg-turbo (PIL) output for the JPEG variants photos use; the
        // general decoder handles the rest (and files this one finds corrupt).
        if let Ok(Some((w, h, rgb))) = crate::jpeg::decode_pil_exact(bytes) {
            if let Some(img) = RgbImage::from_raw(w as u32, h as u32, rgb) {
                return Ok(DecodedImage {
                    pixels: Pixels::U8(img),
                    had_alpha: false,
                });
            }
        }
    }
    let img = DynamicImage::from_decoder(decoder).map_err(|e| classify(path, e))?;
    to_rgb(img, path)
}

fn classify(path: &Path, e: ImageError) -> VisionError {
    let path = path.to_path_buf();
    match e {
        ImageError::Unsupported(u) => VisionError::Unsupported {
            path,
            detail: u.to_string(),
        },
        ImageError::Limits(l) => VisionError::Unsupported {
            path,
            detail: format!("decoding needs more memory than allowed ({l})"),
        },
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            VisionError::Corrupt {
                path,
                detail: "file ends early (truncated)".into(),
            }
        }
        other => VisionError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

/// Drop alpha and replicate gray, keeping the bit depth (PIL `convert('RGB')`).
fn to_rgb(img: DynamicImage, path: &Path) -> Result<DecodedImage, VisionError> {
    let (w, h) = (img.width(), img.height());
    let (pixels, had_alpha) = match img {
        DynamicImage::ImageRgb8(i) => (Pixels::U8(i), false),
        DynamicImage::ImageRgba8(i) => (
            Pixels::U8(map8(w, h, i.pixels().map(|p| [p[0], p[1], p[2]]))),
            true,
        ),
        DynamicImage::ImageLuma8(i) => {
            (Pixels::U8(map8(w, h, i.pixels().map(|p| [p[0]; 3]))), false)
        }
        DynamicImage::ImageLumaA8(i) => {
            (Pixels::U8(map8(w, h, i.pixels().map(|p| [p[0]; 3]))), true)
        }
        DynamicImage::ImageRgb16(i) => (Pixels::U16(i), false),
        DynamicImage::ImageRgba16(i) => (
            Pixels::U16(map16(w, h, i.pixels().map(|p| [p[0], p[1], p[2]]))),
            true,
        ),
        DynamicImage::ImageLuma16(i) => (
            Pixels::U16(map16(w, h, i.pixels().map(|p| [p[0]; 3]))),
            false,
        ),
        DynamicImage::ImageLumaA16(i) => (
            Pixels::U16(map16(w, h, i.pixels().map(|p| [p[0]; 3]))),
            true,
        ),
        other => {
            return Err(VisionError::Unsupported {
                path: PathBuf::from(path),
                detail: format!("pixel format {:?}", other.color()),
            })
        }
    };
    Ok(DecodedImage { pixels, had_alpha })
}

fn map8(w: u32, h: u32, px: impl Iterator<Item = [u8; 3]>) -> RgbImage {
    let data: Vec<u8> = px.flatten().collect();
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h))
}

fn map16(w: u32, h: u32, px: impl Iterator<Item = [u16; 3]>) -> Rgb16Image {
    let data: Vec<u16> = px.flatten().collect();
    Rgb16Image::from_raw(w, h, data).unwrap_or_else(|| Rgb16Image::new(w, h))
}
