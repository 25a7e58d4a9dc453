//! `--preprocess WxH`: the source image size of the D-FINE rows timed from 8-bit pixels
//! to detection rows (preprocessing and post-processing inside the graph), and the
//! synthetic images those rows use.

use aperture_cuda::preprocess::check::test_image;
use aperture_vision::RgbImage;

/// Largest side accepted (a 32768 x 32768 RGB image is 3 GiB of bytes).
const MAX_SIDE: usize = 32_768;

/// Parses `WIDTHxHEIGHT` (e.g. `640x480`) into `(width, height)`, both positive.
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let usage = "expected WIDTHxHEIGHT in pixels, e.g. 640x480";
    let t = s.trim();
    let (w, h) = t
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}': {usage}"))?;
    let side = |v: &str, what: &str| -> Result<usize, String> {
        if v.is_empty() {
            return Err(format!("'{s}': the {what} is missing; {usage}"));
        }
        let n: usize = v
            .parse()
            .map_err(|_| format!("'{s}': the {what} '{v}' is not a whole number; {usage}"))?;
        if n == 0 {
            return Err(format!("'{s}': the {what} must be positive; {usage}"));
        }
        if n > MAX_SIDE {
            return Err(format!(
                "'{s}': the {what} {n} is larger than {MAX_SIDE} pixels"
            ));
        }
        Ok(n)
    };
    Ok((side(w, "width")?, side(h, "height")?))
}

/// `batch` distinct synthetic 8-bit images of `width x height` (gradients plus noise:
/// resizing them exercises every tap, unlike flat colours).
pub fn images(batch: usize, (width, height): (usize, usize), seed: u64) -> Vec<RgbImage> {
    (0..batch)
        .map(|i| test_image(width as u32, height as u32, seed as u32 ^ i as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_width_by_height() {
        assert_eq!(parse_size("640x480"), Ok((640, 480)));
        assert_eq!(parse_size(" 1280X720 "), Ok((1280, 720)));
        assert_eq!(parse_size("1x1"), Ok((1, 1)));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        let err = |s: &str| parse_size(s).unwrap_err();
        assert!(err("640x").contains("height is missing"), "{}", err("640x"));
        assert!(err("x480").contains("width is missing"), "{}", err("x480"));
        assert!(err("0x480").contains("width must be positive"));
        assert!(err("640x0").contains("height must be positive"));
        assert!(
            err("abc").contains("expected WIDTHxHEIGHT"),
            "{}",
            err("abc")
        );
        assert!(err("640").contains("expected WIDTHxHEIGHT"));
        assert!(
            err("axb").contains("'a' is not a whole number"),
            "{}",
            err("axb")
        );
        assert!(err("640x480x3").contains("'480x3'"), "{}", err("640x480x3"));
        assert!(err("-1x480").contains("not a whole number"));
        assert!(err("40000x480").contains("larger than"));
    }

    #[test]
    fn synthetic_images_have_the_size_and_differ() {
        let imgs = images(3, (7, 5), 1);
        assert_eq!(imgs.len(), 3);
        for i in &imgs {
            assert_eq!((i.width(), i.height()), (7, 5));
        }
        assert_ne!(imgs[0].as_raw(), imgs[1].as_raw());
        assert_eq!(images(1, (7, 5), 1)[0].as_raw(), imgs[0].as_raw());
    }
}
