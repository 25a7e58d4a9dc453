//! Charts as SVG text, written by hand: lines, circles and monospace text.

use std::fmt::Write;

use super::plot::{Anchor, Chart, Color, Surface, TextSize};

struct SvgSurface {
    body: String,
}

fn rgb(c: Color) -> String {
    format!("rgb({},{},{})", c.0, c.1, c.2)
}

fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

impl Surface for SvgSurface {
    fn line(&mut self, a: (f64, f64), b: (f64, f64), color: Color, width: f64, dashed: bool) {
        let dash = if dashed {
            " stroke-dasharray=\"8,5\""
        } else {
            ""
        };
        let _ = writeln!(
            self.body,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"{width}\"{dash}/>",
            a.0,
            a.1,
            b.0,
            b.1,
            rgb(color)
        );
    }

    fn marker(&mut self, at: (f64, f64), radius: f64, color: Color) {
        let _ = writeln!(
            self.body,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{radius}\" fill=\"{}\"/>",
            at.0,
            at.1,
            rgb(color)
        );
    }

    fn text(&mut self, at: (f64, f64), text: &str, size: TextSize, anchor: Anchor, color: Color) {
        let anchor = match anchor {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        };
        // A monospace font advances 0.6 em: the same width per character as the PNG.
        let px = size.metrics().0 / 0.6;
        let _ = writeln!(
            self.body,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-family=\"monospace\" font-size=\"{px:.0}\" text-anchor=\"{anchor}\" dominant-baseline=\"middle\" fill=\"{}\">{}</text>",
            at.0,
            at.1,
            rgb(color),
            escape(text)
        );
    }
}

/// The chart as a standalone SVG document.
pub fn render(chart: &Chart) -> String {
    let (w, h) = chart.size();
    let mut s = SvgSurface {
        body: String::new(),
    };
    chart.draw(&mut s);
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n<title>{}</title>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
        escape(&chart.title),
        s.body
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
