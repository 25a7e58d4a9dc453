//! Image decoding and encoding, PIL-exact resizing, padding and drawing.
//!
//! ```no_run
//! use aperture_vision::{open_rgb8, pil_bilinear, to_nchw_f32, HF_RESCALE_FACTOR};
//! # fn main() -> Result<(), aperture_vision::VisionError> {
//! let img = open_rgb8(std::path::Path::new("cat.jpg"))?;
//! let resized = pil_bilinear(&img, 640, 640)?;
//! let pixel_values = to_nchw_f32(&resized, HF_RESCALE_FACTOR); // 3 * 640 * 640 values
//! # let _ = pixel_values; Ok(()) }
//! ```

pub mod decode;
pub mod draw;
pub mod encode;
pub mod error;
mod font;
mod jpeg;
pub mod pad;
pub mod resize;
pub mod walk;

pub use decode::{
    decode_bytes, decode_file, open_rgb8, BitDepth, DecodeLimits, DecodedImage, Rgb16Image,
};
pub use draw::{class_color, draw_detections, DrawStyle, LabeledBox};
pub use encode::{
    encode_rgb8, encode_rgb_f32, output_format, save_rgb8, save_rgb_f32, EncodeOptions, Layout,
    OutputFormat, PngDepth,
};
pub use error::VisionError;
pub use image::RgbImage;
pub use pad::{crop, pad_to_multiple, reflect_pad, Nchw, ReflectPolicy};
pub use resize::{
    bilinear_taps, normalize_chw, pil_bilinear, resize_plan, to_nchw_f32, AxisTaps, ResizePlan,
    HF_RESCALE_FACTOR, RESIZE_PRECISION_BITS,
};
pub use walk::{list_images, list_images_recursive};
