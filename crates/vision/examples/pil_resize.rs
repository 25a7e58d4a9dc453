//! Resize an image as `PIL.Image.resize((W, H), Image.BILINEAR)` does and write a PNG.
//! Used by `tests/python/test_vision.py` to compare against Pillow.
//!
//! `cargo run -p aperture-vision --example pil_resize -- in.png out.png W H`
//! (W = H = 0 writes the decoded RGB image unchanged.)

use std::path::Path;
use std::process::ExitCode;

use aperture_vision::{open_rgb8, pil_bilinear, save_rgb8, EncodeOptions, VisionError};

fn run(args: &[String]) -> Result<(), String> {
    let [input, output, w, h] = args else {
        return Err("usage: pil_resize IN OUT WIDTH HEIGHT".into());
    };
    let w: u32 = w.parse().map_err(|e| format!("bad width '{w}': {e}"))?;
    let h: u32 = h.parse().map_err(|e| format!("bad height '{h}': {e}"))?;
    let img = open_rgb8(Path::new(input)).map_err(|e| e.to_string())?;
    let out = if w == 0 && h == 0 {
        img
    } else {
        pil_bilinear(&img, w, h).map_err(|e: VisionError| e.to_string())?
    };
    save_rgb8(Path::new(output), &out, &EncodeOptions::default()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
