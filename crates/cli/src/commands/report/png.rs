//! Charts as PNG pixels with the vision crate's drawing helpers: thick Bresenham
//! lines, filled discs and the 5x7 bitmap font.

use std::path::Path;

use anyhow::Context;
use aperture_vision::draw::{draw_text, fill_rect, text_size};
use aperture_vision::{save_rgb8, EncodeOptions, RgbImage};
use image::Rgb;

use super::plot::{Anchor, Chart, Color, Surface, TextSize};

struct PngSurface {
    img: RgbImage,
}

fn px(c: Color) -> Rgb<u8> {
    Rgb([c.0, c.1, c.2])
}

impl Surface for PngSurface {
    fn line(&mut self, a: (f64, f64), b: (f64, f64), color: Color, width: f64, dashed: bool) {
        thick_line(&mut self.img, a, b, width, px(color), dashed);
    }

    fn marker(&mut self, at: (f64, f64), radius: f64, color: Color) {
        disc(&mut self.img, at, radius, px(color));
    }

    fn text(&mut self, at: (f64, f64), text: &str, size: TextSize, anchor: Anchor, color: Color) {
        let scale = match size {
            TextSize::Normal => 2,
            TextSize::Title => 3,
        };
        let (w, h) = text_size(text, scale);
        let x = match anchor {
            Anchor::Start => at.0,
            Anchor::Middle => at.0 - f64::from(w) / 2.0,
            Anchor::End => at.0 - f64::from(w),
        };
        let y = at.1 - f64::from(h) / 2.0;
        draw_text(
            &mut self.img,
            x.round() as i64,
            y.round() as i64,
            text,
            scale,
            px(color),
        );
    }
}

/// Bresenham from `a` to `b`, stamping a square of `width` pixels at each step;
/// `dashed` leaves gaps (8 on, 5 off).
pub fn thick_line(
    img: &mut RgbImage,
    a: (f64, f64),
    b: (f64, f64),
    width: f64,
    color: Rgb<u8>,
    dashed: bool,
) {
    let (mut x, mut y) = (a.0.round() as i64, a.1.round() as i64);
    let (x1, y1) = (b.0.round() as i64, b.1.round() as i64);
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    let w = width.round().max(1.0) as i64;
    let (lo, hi) = (-(w - 1) / 2, w / 2 + 1);
    // Bounded: a line never needs more steps than its longer side.
    for step in 0..=(dx.max(-dy) + 1) {
        if !dashed || step % 13 < 8 {
            fill_rect(img, x + lo, y + lo, x + hi, y + hi, color);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn disc(img: &mut RgbImage, (cx, cy): (f64, f64), r: f64, color: Rgb<u8>) {
    let ri = r.ceil() as i64;
    let (x0, y0) = (cx.round() as i64, cy.round() as i64);
    for dy in -ri..=ri {
        for dx in -ri..=ri {
            if ((dx * dx + dy * dy) as f64) <= r * r {
                fill_rect(img, x0 + dx, y0 + dy, x0 + dx + 1, y0 + dy + 1, color);
            }
        }
    }
}

/// Draws the chart and writes it as a PNG file.
pub fn save(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    let (w, h) = chart.size();
    let mut s = PngSurface {
        img: RgbImage::from_pixel(w, h, Rgb([255, 255, 255])),
    };
    chart.draw(&mut s);
    save_rgb8(path, &s.img, &EncodeOptions::default())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_both_ends_and_stay_inside() {
        let mut img = RgbImage::from_pixel(20, 10, Rgb([255, 255, 255]));
        let red = Rgb([255, 0, 0]);
        thick_line(&mut img, (1.0, 1.0), (18.0, 8.0), 1.0, red, false);
        assert_eq!(*img.get_pixel(1, 1), red);
        assert_eq!(*img.get_pixel(18, 8), red);
        // Far outside the image: clipped, no panic.
        thick_line(&mut img, (-50.0, -5.0), (80.0, 40.0), 3.0, red, true);
    }
}
