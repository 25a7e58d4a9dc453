//! Charts as data, laid out once and drawn onto any [`Surface`] (SVG text or PNG
//! pixels), so both files show the same thing. Text metrics follow the vision
//! crate's 5x7 font at scale 2 (title: 3); the SVG uses a monospace font of the
//! same advance.

/// An RGB colour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Color(pub u8, pub u8, pub u8);

pub const BLACK: Color = Color(0, 0, 0);
pub const GREY: Color = Color(110, 110, 110);
pub const GRID: Color = Color(225, 225, 225);

/// Ten colours that stay apart for the usual kinds of colour blindness (Tableau 10).
const PALETTE: [Color; 10] = [
    Color(31, 119, 180),
    Color(255, 127, 14),
    Color(44, 160, 44),
    Color(214, 39, 40),
    Color(148, 103, 189),
    Color(140, 86, 75),
    Color(227, 119, 194),
    Color(127, 127, 127),
    Color(188, 189, 34),
    Color(23, 190, 207),
];

pub fn palette(i: usize) -> Color {
    PALETTE[i % PALETTE.len()]
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TextSize {
    Normal,
    Title,
}

impl TextSize {
    /// Pixels per character (monospace) and text height.
    pub fn metrics(self) -> (f64, f64) {
        match self {
            TextSize::Normal => (12.0, 14.0),
            TextSize::Title => (18.0, 21.0),
        }
    }

    pub fn width(self, text: &str) -> f64 {
        let n = text.chars().count() as f64;
        (n * self.metrics().0 - self.metrics().0 / 6.0).max(0.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

/// What a chart draws with; coordinates in pixels, y down. Text is vertically
/// centred on `at`.
pub trait Surface {
    fn line(&mut self, a: (f64, f64), b: (f64, f64), color: Color, width: f64, dashed: bool);
    fn marker(&mut self, at: (f64, f64), radius: f64, color: Color);
    fn text(&mut self, at: (f64, f64), text: &str, size: TextSize, anchor: Anchor, color: Color);
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    Linear,
    Log,
}

#[derive(Clone, Debug)]
pub struct Axis {
    pub label: String,
    pub scale: Scale,
    pub min: f64,
    pub max: f64,
    pub ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A log axis over batch sizes, one tick per size.
    pub fn batches(label: &str, batches: &[usize]) -> Axis {
        let lo = batches.iter().copied().min().unwrap_or(1).max(1) as f64;
        let hi = batches.iter().copied().max().unwrap_or(1).max(1) as f64;
        let mut ticks: Vec<usize> = batches.to_vec();
        ticks.sort_unstable();
        ticks.dedup();
        Axis {
            label: label.into(),
            scale: Scale::Log,
            min: lo / 1.25,
            max: hi * 1.25,
            ticks: ticks
                .into_iter()
                .map(|b| (b as f64, b.to_string()))
                .collect(),
        }
    }

    /// A linear axis from 0 to a round number above `max`.
    pub fn linear_from_zero(label: &str, max: f64) -> Axis {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let raw = max / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let top = (max / step).ceil() * step;
        let n = (top / step).round() as usize;
        Axis {
            label: label.into(),
            scale: Scale::Linear,
            min: 0.0,
            max: top,
            ticks: (0..=n)
                .map(|i| (i as f64 * step, fmt_num(i as f64 * step)))
                .collect(),
        }
    }

    /// A log axis spanning whole decades around the positive `values`.
    pub fn log_decades(label: &str, values: impl IntoIterator<Item = f64>) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, 0f64);
        for v in values.into_iter().filter(|v| v.is_finite() && *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (1.0, 10.0);
        }
        let (a, mut b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        if b <= a {
            b = a + 1;
        }
        let mut ticks = Vec::new();
        for e in a..=b {
            let base = 10f64.powi(e);
            ticks.push((base, fmt_num(base)));
            if b - a <= 2 && e < b {
                ticks.push((2.0 * base, fmt_num(2.0 * base)));
                ticks.push((5.0 * base, fmt_num(5.0 * base)));
            }
        }
        Axis {
            label: label.into(),
            scale: Scale::Log,
            min: 10f64.powi(a),
            max: 10f64.powi(b),
            ticks,
        }
    }

    /// Position of `v` along the axis in [0, 1]; `None` outside or not plottable.
    pub fn frac(&self, v: f64) -> Option<f64> {
        let f = match self.scale {
            Scale::Linear => (v - self.min) / (self.max - self.min),
            Scale::Log if v > 0.0 => (v.ln() - self.min.ln()) / (self.max.ln() - self.min.ln()),
            Scale::Log => return None,
        };
        (f.is_finite() && (-1e-9..=1.0 + 1e-9).contains(&f)).then_some(f)
    }
}

/// 0.5 -> "0.5", 2000 -> "2000", 1e-5 -> "1e-5".
pub fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e6 || v.abs() < 1e-3 {
        format!("{v:.0e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub color: Color,
    pub points: Vec<(f64, f64)>,
    /// Text next to each point (same length as `points`, or empty).
    pub labels: Vec<String>,
    pub line: bool,
    pub dashed: bool,
    pub markers: bool,
}

impl Series {
    pub fn line(name: &str, color: Color, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color,
            points,
            labels: Vec::new(),
            line: true,
            dashed: false,
            markers: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    /// One line of small print under the chart.
    pub note: Option<String>,
}

const LEFT: f64 = 100.0;
const TOP: f64 = 85.0;
const PLOT_W: f64 = 720.0;
const PLOT_H: f64 = 425.0;
const BOTTOM: f64 = 90.0;
const LEGEND_GAP: f64 = 30.0;

impl Chart {
    /// Canvas size in pixels: the plot plus a legend as wide as its longest name.
    pub fn size(&self) -> (u32, u32) {
        let legend = self
            .series
            .iter()
            .map(|s| TextSize::Normal.width(&s.name))
            .fold(0.0, f64::max);
        let note = self
            .note
            .as_deref()
            .map_or(0.0, |n| TextSize::Normal.width(n) + 40.0);
        let title = TextSize::Title.width(&self.title) + 40.0;
        let w = (LEFT + PLOT_W + LEGEND_GAP + 40.0 + legend + 20.0)
            .max(note)
            .max(title);
        (w.ceil() as u32, (TOP + PLOT_H + BOTTOM) as u32)
    }

    fn to_px(&self, (x, y): (f64, f64)) -> Option<(f64, f64)> {
        let fx = self.x.frac(x)?;
        let fy = self.y.frac(y)?;
        Some((LEFT + fx * PLOT_W, TOP + (1.0 - fy) * PLOT_H))
    }

    pub fn draw(&self, s: &mut dyn Surface) {
        let (x0, x1, y0, y1) = (LEFT, LEFT + PLOT_W, TOP, TOP + PLOT_H);
        s.text(
            (LEFT, 28.0),
            &self.title,
            TextSize::Title,
            Anchor::Start,
            BLACK,
        );
        // Grid and tick labels.
        for (v, label) in &self.x.ticks {
            if let Some(f) = self.x.frac(*v) {
                let px = x0 + f * PLOT_W;
                s.line((px, y0), (px, y1), GRID, 1.0, false);
                s.text(
                    (px, y1 + 16.0),
                    label,
                    TextSize::Normal,
                    Anchor::Middle,
                    BLACK,
                );
            }
        }
        for (v, label) in &self.y.ticks {
            if let Some(f) = self.y.frac(*v) {
                let py = y1 - f * PLOT_H;
                s.line((x0, py), (x1, py), GRID, 1.0, false);
                s.text((x0 - 8.0, py), label, TextSize::Normal, Anchor::End, BLACK);
            }
        }
        // Frame.
        for (a, b) in [
            ((x0, y0), (x1, y0)),
            ((x0, y1), (x1, y1)),
            ((x0, y0), (x0, y1)),
            ((x1, y0), (x1, y1)),
        ] {
            s.line(a, b, BLACK, 1.0, false);
        }
        s.text(
            ((x0 + x1) / 2.0, y1 + 42.0),
            &self.x.label,
            TextSize::Normal,
            Anchor::Middle,
            BLACK,
        );
        s.text(
            (x0 - 8.0, y0 - 20.0),
            &self.y.label,
            TextSize::Normal,
            Anchor::Start,
            BLACK,
        );
        if let Some(note) = &self.note {
            s.text(
                (20.0, y1 + 72.0),
                note,
                TextSize::Normal,
                Anchor::Start,
                GREY,
            );
        }
        let mut placed: Vec<[f64; 4]> = Vec::new();
        for series in &self.series {
            let pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .filter_map(|p| self.to_px(*p))
                .collect();
            if series.line {
                for w in pts.windows(2) {
                    s.line(w[0], w[1], series.color, 2.5, series.dashed);
                }
            }
            if series.markers {
                for p in &pts {
                    s.marker(*p, 4.5, series.color);
                }
            }
            for (p, label) in series.points.iter().zip(&series.labels) {
                if let Some((px, py)) = self.to_px(*p) {
                    let y = free_label_y(&mut placed, px + 8.0, py, TextSize::Normal.width(label));
                    s.text(
                        (px + 8.0, y),
                        label,
                        TextSize::Normal,
                        Anchor::Start,
                        series.color,
                    );
                }
            }
        }
        // Legend.
        let lx = x1 + LEGEND_GAP;
        for (i, series) in self.series.iter().enumerate() {
            let ly = y0 + 10.0 + 24.0 * i as f64;
            if series.line {
                s.line((lx, ly), (lx + 28.0, ly), series.color, 2.5, series.dashed);
            }
            if series.markers {
                s.marker((lx + 14.0, ly), 4.5, series.color);
            }
            s.text(
                (lx + 36.0, ly),
                &series.name,
                TextSize::Normal,
                Anchor::Start,
                BLACK,
            );
        }
    }
}

/// The first vertical position near a point (above, below, then further out) where a
/// label of width `w` does not overlap labels already placed; remembers its box.
fn free_label_y(placed: &mut Vec<[f64; 4]>, x: f64, py: f64, w: f64) -> f64 {
    let h = TextSize::Normal.metrics().1;
    let boxed = |y: f64| [x, y - h / 2.0 - 1.0, x + w, y + h / 2.0 + 1.0];
    let overlaps = |b: &[f64; 4]| {
        placed
            .iter()
            .any(|o| b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3])
    };
    let y = [-10.0, 11.0, -26.0, 27.0, -42.0, 43.0, -58.0, 59.0]
        .iter()
        .map(|dy| py + dy)
        .find(|y| !overlaps(&boxed(*y)))
        .unwrap_or(py - 10.0);
    placed.push(boxed(y));
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_axis_covers_the_maximum_with_round_ticks() {
        let a = Axis::linear_from_zero("y", 34.8);
        assert!(a.max >= 34.8 && a.max <= 50.0, "{}", a.max);
        assert_eq!(a.ticks.first().map(|t| t.0), Some(0.0));
        assert_eq!(a.frac(a.max), Some(1.0));
    }

    #[test]
    fn log_axis_spans_decades() {
        let a = Axis::log_decades("x", [0.3, 250.0]);
        assert_eq!((a.min, a.max), (0.1, 1000.0));
        assert!(a.frac(0.05).is_none());
        assert!((a.frac(10.0).unwrap() - 2.0 / 4.0).abs() < 1e-12);
    }

    #[test]
    fn numbers_format_short() {
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(2000.0), "2000");
        assert_eq!(fmt_num(0.25), "0.25");
    }
}
