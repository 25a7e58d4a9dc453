//! The report's charts from its rows: images/s and latency percentiles against the
//! batch size, one series per variant; each written as SVG and PNG.

use std::path::Path;

use anyhow::Context;

use super::doc::Row;
use super::plot::{palette, Axis, Chart, Series};
use super::{png, svg};

/// Series names in first-seen order, each with its rows sorted by batch.
pub fn group(rows: &[Row]) -> Vec<(String, Vec<&Row>)> {
    let mut out: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in rows {
        let name = r.series();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(r),
            None => out.push((name, vec![r])),
        }
    }
    for (_, v) in &mut out {
        v.sort_by_key(|r| r.batch);
    }
    out
}

fn batches(rows: &[Row]) -> Vec<usize> {
    rows.iter().map(|r| r.batch).collect()
}

pub fn throughput(title: &str, rows: &[Row]) -> Chart {
    let max = rows.iter().map(|r| r.images_per_s).fold(0.0, f64::max) * 1.05;
    let series = group(rows)
        .into_iter()
        .enumerate()
        .map(|(i, (name, rs))| {
            let pts = rs
                .iter()
                .map(|r| (r.batch as f64, r.images_per_s))
                .collect();
            Series::line(&name, palette(i), pts)
        })
        .collect();
    Chart {
        title: format!("{title}: images/s vs batch"),
        x: Axis::batches("batch size (log scale)", &batches(rows)),
        y: Axis::linear_from_zero("images/s", max),
        series,
        note: None,
    }
}

/// p50 (solid) and p99 (dashed) per variant; mean where a source has no p50.
pub fn latency(title: &str, rows: &[Row]) -> Chart {
    let mut series = Vec::new();
    let mut values = Vec::new();
    for (i, (name, rs)) in group(rows).into_iter().enumerate() {
        let pick = |f: fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
            rs.iter()
                .filter_map(|r| f(r).map(|v| (r.batch as f64, v)))
                .collect()
        };
        let p50 = pick(|r| r.p50_ms.or(r.mean_ms));
        let p99 = pick(|r| r.p99_ms);
        values.extend(p50.iter().chain(&p99).map(|p| p.1));
        series.push(Series::line(&format!("{name} p50"), palette(i), p50));
        if !p99.is_empty() {
            let mut s = Series::line(&format!("{name} p99"), palette(i), p99);
            s.dashed = true;
            s.markers = false;
            series.push(s);
        }
    }
    Chart {
        title: format!("{title}: latency per batch (p50 solid, p99 dashed)"),
        x: Axis::batches("batch size (log scale)", &batches(rows)),
        y: Axis::log_decades("ms per batch (log scale)", values),
        series,
        note: None,
    }
}

/// Writes `<stem>.svg` and `<stem>.png` into `dir`; returns the two file names.
pub fn write(chart: &Chart, dir: &Path, stem: &str) -> anyhow::Result<(String, String)> {
    let (svg_name, png_name) = (format!("{stem}.svg"), format!("{stem}.png"));
    std::fs::write(dir.join(&svg_name), svg::render(chart))
        .with_context(|| format!("writing {}", dir.join(&svg_name).display()))?;
    png::save(chart, &dir.join(&png_name))?;
    Ok((svg_name, png_name))
}
