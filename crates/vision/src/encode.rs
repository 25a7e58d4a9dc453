//! Writing RGB images as PNG (8 or 16 bits) or JPEG.
//!
//! Float to integer conversion follows torchvision's `save_image`: clamp to the
//! integer range after `x * max + 0.5`, then truncate, all in f32. For x in [0, 1]
//! this is round-half-up (e.g. 0.5/255 -> 1); values outside [0, 1] clamp; NaN
//! becomes 0.

use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::RgbImage;

use crate::decode::Rgb16Image;
use crate::error::{memory_path, VisionError};

/// Container chosen from the output file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
}

/// Bits per channel of a PNG output (JPEG is always 8-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PngDepth {
    #[default]
    Eight,
    Sixteen,
}

/// Memory order of an RGB f32 buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// CHW: all R, then all G, then all B (one image of an NCHW tensor).
    Planar,
    /// HWC: RGBRGB...
    Interleaved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub png_depth: PngDepth,
    /// JPEG quality, 1..=100.
    pub jpeg_quality: u8,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            png_depth: PngDepth::Eight,
            jpeg_quality: 95,
        }
    }
}

/// The format for `path` from its extension (`png`, `jpg`, `jpeg`; any case).
pub fn output_format(path: &Path) -> Result<OutputFormat, VisionError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "png" => Ok(OutputFormat::Png),
        "jpg" | "jpeg" => Ok(OutputFormat::Jpeg),
        _ => Err(VisionError::UnknownOutputFormat {
            path: path.to_path_buf(),
            extension: ext,
        }),
    }
}

/// `[0, 1]` float to 8-bit: `clamp(x * 255 + 0.5, 0, 255)` truncated.
#[inline]
pub fn f32_to_u8(x: f32) -> u8 {
    // `as` saturates and maps NaN to 0.
    (x * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// `[0, 1]` float to 16-bit: `clamp(x * 65535 + 0.5, 0, 65535)` truncated.
#[inline]
pub fn f32_to_u16(x: f32) -> u16 {
    (x * 65535.0 + 0.5).clamp(0.0, 65535.0) as u16
}

/// Interleaved RGB samples of a float buffer in either layout, converted by `f`.
fn interleave<T: Copy + Default>(
    data: &[f32],
    width: u32,
    height: u32,
    layout: Layout,
    f: impl Fn(f32) -> T,
) -> Result<Vec<T>, VisionError> {
    let plane = width as usize * height as usize;
    if width == 0 || height == 0 || data.len() != plane * 3 {
        return Err(VisionError::InvalidArgument(format!(
            "an RGB image of {width}x{height} needs {} values, got {}",
            plane * 3,
            data.len()
        )));
    }
    Ok(match layout {
        Layout::Interleaved => data.iter().map(|&v| f(v)).collect(),
        Layout::Planar => {
            let mut out = vec![T::default(); plane * 3];
            for (c, chan) in data.chunks_exact(plane).enumerate() {
                for (i, &v) in chan.iter().enumerate() {
                    out[i * 3 + c] = f(v);
                }
            }
            out
        }
    })
}

/// Convert a float RGB buffer to an 8-bit image (see the module doc for rounding).
pub fn rgb8_from_f32(
    data: &[f32],
    width: u32,
    height: u32,
    layout: Layout,
) -> Result<RgbImage, VisionError> {
    let px = interleave(data, width, height, layout, f32_to_u8)?;
    RgbImage::from_raw(width, height, px)
        .ok_or_else(|| VisionError::InvalidArgument("buffer size mismatch".into()))
}

/// Convert a float RGB buffer to a 16-bit image.
pub fn rgb16_from_f32(
    data: &[f32],
    width: u32,
    height: u32,
    layout: Layout,
) -> Result<Rgb16Image, VisionError> {
    let px = interleave(data, width, height, layout, f32_to_u16)?;
    Rgb16Image::from_raw(width, height, px)
        .ok_or_else(|| VisionError::InvalidArgument("buffer size mismatch".into()))
}

/// Encode a float RGB buffer in memory.
pub fn encode_rgb_f32(
    data: &[f32],
    width: u32,
    height: u32,
    layout: Layout,
    format: OutputFormat,
    opts: &EncodeOptions,
) -> Result<Vec<u8>, VisionError> {
    if format == OutputFormat::Png && opts.png_depth == PngDepth::Sixteen {
        let img = rgb16_from_f32(data, width, height, layout)?;
        let mut out = Vec::new();
        img.write_with_encoder(PngEncoder::new(&mut out))
            .map_err(|e| encode_err(&memory_path(), e))?;
        return Ok(out);
    }
    let img = rgb8_from_f32(data, width, height, layout)?;
    encode_rgb8_named(&img, format, opts, &memory_path())
}

/// Encode an 8-bit RGB image in memory (a 16-bit PNG request still writes 8 bits).
pub fn encode_rgb8(
    img: &RgbImage,
    format: OutputFormat,
    opts: &EncodeOptions,
) -> Result<Vec<u8>, VisionError> {
    encode_rgb8_named(img, format, opts, &memory_path())
}

fn encode_rgb8_named(
    img: &RgbImage,
    format: OutputFormat,
    opts: &EncodeOptions,
    path: &Path,
) -> Result<Vec<u8>, VisionError> {
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => img.write_with_encoder(PngEncoder::new(&mut out)),
        OutputFormat::Jpeg => {
            if !(1..=100).contains(&opts.jpeg_quality) {
                return Err(VisionError::InvalidArgument(format!(
                    "JPEG quality {} is outside 1..=100",
                    opts.jpeg_quality
                )));
            }
            img.write_with_encoder(JpegEncoder::new_with_quality(&mut out, opts.jpeg_quality))
        }
    }
    .map_err(|e| encode_err(path, e))?;
    Ok(out)
}

fn encode_err(path: &Path, e: image::ImageError) -> VisionError {
    VisionError::Encode {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), VisionError> {
    std::fs::write(path, bytes).map_err(|source| VisionError::Io {
        path: PathBuf::from(path),
        source,
    })
}

/// Write a float RGB buffer to `path`, format from the extension.
pub fn save_rgb_f32(
    path: &Path,
    data: &[f32],
    width: u32,
    height: u32,
    layout: Layout,
    opts: &EncodeOptions,
) -> Result<(), VisionError> {
    let format = output_format(path)?;
    let bytes = encode_rgb_f32(data, width, height, layout, format, opts).map_err(|e| match e {
        VisionError::Encode { detail, .. } => VisionError::Encode {
            path: path.to_path_buf(),
            detail,
        },
        other => other,
    })?;
    write_file(path, &bytes)
}

/// Write an 8-bit RGB image to `path`, format from the extension.
pub fn save_rgb8(path: &Path, img: &RgbImage, opts: &EncodeOptions) -> Result<(), VisionError> {
    let format = output_format(path)?;
    let bytes = encode_rgb8_named(img, format, opts, path)?;
    write_file(path, &bytes)
}
