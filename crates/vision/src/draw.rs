//! Drawing labelled detection boxes onto RGB images.
//!
//! Each class gets a fixed colour from a 24-entry palette (see [`class_color`]);
//! the box outline is drawn inside the
//! box, clipped to the image; the label ("name 0.87") sits on a filled band of
//! the class colour above the box, or just inside its top edge when there is no
//! room above, in black or white, whichever contrasts more.

use image::{Rgb, RgbImage};

use crate::font::{glyph, ADVANCE, GLYPH_H, GLYPH_W};

/// One box to draw, in pixel coordinates of the image (x0, y0, x1, y1).
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledBox {
    pub bbox: [f32; 4],
    /// Selects the colour.
    pub class_id: usize,
    /// Class name shown in the label.
    pub label: String,
    pub score: f32,
}

/// Line width and text size; `0` picks a size from the image dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrawStyle {
    pub line_width: u32,
    /// Font pixel size multiplier (the font is 5x7).
    pub font_scale: u32,
}

impl DrawStyle {
    /// Line width and font scale actually used for an image of this size.
    pub fn resolve(&self, width: u32, height: u32) -> (u32, u32) {
        let short = width.min(height);
        let line = if self.line_width > 0 {
            self.line_width
        } else if short < 400 {
            2
        } else {
            3
        };
        let scale = if self.font_scale > 0 {
            self.font_scale
        } else {
            (short / 300).clamp(1, 4) + 1
        };
        (line, scale)
    }
}

/// Number of distinct colours before the palette repeats.
pub const PALETTE_SIZE: usize = 24;

/// The colour for a class id (deterministic). Hues step by 7/24 of the circle so
/// that nearby ids land far apart, and saturation/brightness vary with the id so
/// that ids sharing a hue family still differ; ids `PALETTE_SIZE` apart share a
/// colour.
pub fn class_color(class_id: usize) -> Rgb<u8> {
    let i = class_id % PALETTE_SIZE;
    let hue = ((i * 7) % PALETTE_SIZE) as f64 / PALETTE_SIZE as f64;
    let (sat, value) = match i % 3 {
        0 => (0.85, 1.0),
        1 => (0.95, 0.75),
        _ => (0.6, 0.95),
    };
    hsv_to_rgb(hue, sat, value)
}

fn hsv_to_rgb(h: f64, s: f64, v: f64) -> Rgb<u8> {
    let h6 = h * 6.0;
    let sector = h6.floor();
    let f = h6 - sector;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match sector as i64 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    let to8 = |x: f64| (x * 255.0).round().clamp(0.0, 255.0) as u8;
    Rgb([to8(r), to8(g), to8(b)])
}

/// Black or white, whichever reads better on `bg`.
pub fn text_color_on(bg: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = bg.0.map(f32::from);
    if 0.299 * r + 0.587 * g + 0.114 * b > 140.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    }
}

/// Size in pixels of `text` drawn at `scale`.
pub fn text_size(text: &str, scale: u32) -> (u32, u32) {
    let n = text.chars().count() as u32;
    let w = if n == 0 { 0 } else { (n * ADVANCE - 1) * scale };
    (w, GLYPH_H * scale)
}

/// Fill the rectangle `[x0, x1) x [y0, y1)`, clipped to the image.
pub fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, color: Rgb<u8>) {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let (x0, x1) = (x0.clamp(0, w), x1.clamp(0, w));
    let (y0, y1) = (y0.clamp(0, h), y1.clamp(0, h));
    for y in y0..y1 {
        for x in x0..x1 {
            img.put_pixel(x as u32, y as u32, color);
        }
    }
}

/// Draw `text` with its top-left corner at (x, y), clipped to the image.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let s = i64::from(scale.max(1));
    for (i, c) in text.chars().enumerate() {
        let gx = x + i as i64 * i64::from(ADVANCE) * s;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (0x10 >> col) != 0 {
                    let px = gx + i64::from(col) * s;
                    let py = y + row as i64 * s;
                    fill_rect(img, px, py, px + s, py + s, color);
                }
            }
        }
    }
}

/// Outline `[x0, x1] x [y0, y1]` (inclusive) with lines `line` pixels thick,
/// drawn inward.
fn draw_outline(img: &mut RgbImage, b: [i64; 4], line: i64, color: Rgb<u8>) {
    let [x0, y0, x1, y1] = b;
    let t = line
        .min((x1 - x0 + 1 + 1) / 2)
        .min((y1 - y0 + 1 + 1) / 2)
        .max(1);
    fill_rect(img, x0, y0, x1 + 1, y0 + t, color); // top
    fill_rect(img, x0, y1 + 1 - t, x1 + 1, y1 + 1, color); // bottom
    fill_rect(img, x0, y0, x0 + t, y1 + 1, color); // left
    fill_rect(img, x1 + 1 - t, y0, x1 + 1, y1 + 1, color); // right
}

/// Integer pixel box clipped to the image, or None when it is empty, outside
/// the image or not finite.
fn pixel_box(b: [f32; 4], w: u32, h: u32) -> Option<[i64; 4]> {
    if b.iter().any(|v| !v.is_finite()) || w == 0 || h == 0 {
        return None;
    }
    let (x0, x1) = (b[0].min(b[2]), b[0].max(b[2]));
    let (y0, y1) = (b[1].min(b[3]), b[1].max(b[3]));
    let (wf, hf) = (w as f32, h as f32);
    if x1 < 0.0 || y1 < 0.0 || x0 >= wf || y0 >= hf {
        return None;
    }
    let clip = |v: f32, max: u32| (v.round() as i64).clamp(0, i64::from(max) - 1);
    Some([clip(x0, w), clip(y0, h), clip(x1, w), clip(y1, h)])
}

/// Draw every box and its label. Boxes are drawn first, labels last so no box
/// line crosses a label.
pub fn draw_detections(img: &mut RgbImage, boxes: &[LabeledBox], style: &DrawStyle) {
    let (line, scale) = style.resolve(img.width(), img.height());
    let line = i64::from(line);
    let placed: Vec<([i64; 4], &LabeledBox)> = boxes
        .iter()
        .filter_map(|b| pixel_box(b.bbox, img.width(), img.height()).map(|p| (p, b)))
        .collect();
    for (p, b) in &placed {
        draw_outline(img, *p, line, class_color(b.class_id));
    }
    for (p, b) in &placed {
        draw_label(img, *p, b, scale);
    }
}

fn draw_label(img: &mut RgbImage, p: [i64; 4], b: &LabeledBox, scale: u32) {
    let text = format!("{} {:.2}", b.label, b.score);
    let (tw, th) = text_size(&text, scale);
    let pad = i64::from(scale);
    let (band_w, band_h) = (i64::from(tw) + 2 * pad, i64::from(th) + 2 * pad);
    let img_w = i64::from(img.width());
    // Keep the label inside the image horizontally when it fits.
    let x = p[0].min(img_w - band_w).max(0);
    let y = if p[1] - band_h >= 0 {
        p[1] - band_h
    } else {
        p[1]
    };
    let bg = class_color(b.class_id);
    fill_rect(img, x, y, x + band_w, y + band_h, bg);
    draw_text(img, x + pad, y + pad, &text, scale, text_color_on(bg));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_deterministic_and_distinct() {
        assert_eq!(class_color(3), class_color(3));
        let colors: Vec<_> = (0..PALETTE_SIZE).map(class_color).collect();
        assert_eq!(class_color(PALETTE_SIZE + 5), class_color(5));
        for i in 0..colors.len() {
            for j in i + 1..colors.len() {
                let d: i32 = (0..3)
                    .map(|c| (i32::from(colors[i][c]) - i32::from(colors[j][c])).abs())
                    .sum();
                assert!(d > 0, "classes {i} and {j} share a colour");
            }
            // Adjacent ids differ clearly.
            if i + 1 < colors.len() {
                let d: i32 = (0..3)
                    .map(|c| (i32::from(colors[i][c]) - i32::from(colors[i + 1][c])).abs())
                    .sum();
                assert!(d > 100, "classes {i} and {} look alike", i + 1);
            }
        }
    }

    #[test]
    fn box_lines_are_drawn_and_clipped() {
        let mut img = RgbImage::new(50, 40);
        let b = LabeledBox {
            bbox: [10.0, 20.0, 30.0, 35.0],
            class_id: 0,
            label: "cat".into(),
            score: 0.9,
        };
        let style = DrawStyle {
            line_width: 2,
            font_scale: 1,
        };
        draw_detections(&mut img, std::slice::from_ref(&b), &style);
        let c = class_color(0);
        // Left edge, 2 px thick, inside the box.
        assert_eq!(*img.get_pixel(10, 28), c);
        assert_eq!(*img.get_pixel(11, 28), c);
        assert_eq!(*img.get_pixel(12, 28), Rgb([0, 0, 0]));
        assert_eq!(*img.get_pixel(30, 35), c);
        // Interior untouched.
        assert_eq!(*img.get_pixel(20, 30), Rgb([0, 0, 0]));
        // Label band above the box (text "cat 0.90": 8 chars, 47 px + 2 padding,
        // shifted left to stay in the 50 px image).
        assert_eq!(*img.get_pixel(3, 19), c);

        // Boxes partly or wholly outside, reversed, or NaN: no panic.
        let mut img2 = RgbImage::new(8, 8);
        let odd = [
            [-100.0, -100.0, 200.0, 200.0],
            [500.0, 500.0, 600.0, 600.0],
            [6.0, 6.0, 1.0, 1.0],
            [f32::NAN, 0.0, 1.0, 1.0],
        ];
        let boxes: Vec<_> = odd
            .iter()
            .map(|&bbox| LabeledBox { bbox, ..b.clone() })
            .collect();
        draw_detections(&mut img2, &boxes, &DrawStyle::default());
        assert_eq!(*img2.get_pixel(0, 7), c);
    }

    #[test]
    fn text_renders_glyph_pixels() {
        let mut img = RgbImage::new(20, 10);
        draw_text(&mut img, 0, 0, "I", 1, Rgb([255, 255, 255]));
        // 'I' is 0x0E on its top row: columns 1..=3 lit.
        let top: Vec<u8> = (0..5).map(|x| img.get_pixel(x, 0)[0]).collect();
        assert_eq!(top, [0, 255, 255, 255, 0]);
        assert_eq!(text_size("ab", 2), (22, 14));
        assert_eq!(text_size("", 3), (0, 21));
    }
}
