//! The roofline chart: each operation kind of a profile placed at its arithmetic
//! intensity (FLOP/byte) and achieved TFLOP/s, under the compute and bandwidth
//! ceilings.

use super::doc::Profile;
use super::plot::{palette, Axis, Chart, Series, GREY};

/// Ceilings of the device the profile ran on.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    pub tflops: f64,
    pub gbs: f64,
}

impl Ceilings {
    /// Attainable TFLOP/s at `ai` FLOP/byte.
    pub fn attainable(&self, ai: f64) -> f64 {
        (self.gbs * ai / 1e3).min(self.tflops)
    }

    /// Intensity where the bandwidth roof meets the compute roof.
    pub fn ridge(&self) -> f64 {
        self.tflops * 1e3 / self.gbs
    }
}

/// `None` when no operation has both FLOPs and bytes (nothing to place).
pub fn chart(profile: &Profile, c: Ceilings) -> Option<Chart> {
    let placed: Vec<(&str, f64, f64)> = profile
        .ops
        .iter()
        .filter_map(|o| Some((o.name.as_str(), o.intensity()?, o.tflops()?)))
        .collect();
    if placed.is_empty() {
        return None;
    }
    let skipped = profile.ops.len() - placed.len();
    let x = Axis::log_decades(
        "arithmetic intensity, FLOP/byte (log scale)",
        placed.iter().map(|p| p.1).chain([
            c.ridge() * 2.0,
            placed.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 2.0,
        ]),
    );
    let y = Axis::log_decades(
        "achieved TFLOP/s (log scale)",
        placed.iter().map(|p| p.2).chain([c.tflops]),
    );
    let mut roof_pts = vec![(x.min, c.attainable(x.min))];
    if c.ridge() > x.min && c.ridge() < x.max {
        roof_pts.push((c.ridge(), c.tflops));
    }
    roof_pts.push((x.max, c.attainable(x.max)));
    // Where the roof leaves the plot at the bottom, start it at the axis.
    if let Some(first) = roof_pts.first_mut() {
        if first.1 < y.min {
            first.0 = y.min * 1e3 / c.gbs;
            first.1 = y.min;
        }
    }
    let mut roof = Series::line(
        &format!("roof: {} TFLOP/s, {} GB/s", c.tflops, c.gbs),
        GREY,
        roof_pts,
    );
    roof.markers = false;
    let mut ops = Series::line("operations", palette(0), Vec::new());
    ops.line = false;
    for (name, ai, tf) in &placed {
        ops.points.push((*ai, *tf));
        ops.labels.push((*name).to_string());
    }
    let note = (skipped > 0).then(|| {
        format!("{skipped} operation kind(s) without FLOPs (copies, reshuffles) are not placed")
    });
    Some(Chart {
        title: format!("roofline: {}", profile.title),
        x,
        y,
        series: vec![roof, ops],
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_meet_at_the_ridge() {
        let c = Ceilings {
            tflops: 800.0,
            gbs: 3000.0,
        };
        let r = c.ridge();
        assert!((r - 266.666).abs() < 0.01);
        assert!((c.attainable(r) - 800.0).abs() < 1e-9);
        assert!((c.attainable(1.0) - 3.0).abs() < 1e-12);
    }
}
