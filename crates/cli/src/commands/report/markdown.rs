//! The report's README.md: header, the full table (columns nobody measured are left
//! out), best configuration per variant, the plots and the notes.

use std::fmt::Write;

use super::doc::{Report, Row};

/// A plot that was written, or the reason it was not.
pub enum Plot {
    Written {
        caption: String,
        png: String,
        svg: String,
    },
    Skipped {
        caption: String,
        why: String,
    },
}

type Cell = fn(&Row, &Ctx) -> Option<String>;

/// What cells need beyond their row.
pub struct Ctx {
    /// Best images/s of PyTorch eager fp32, the speed-up baseline.
    pub torch_fp32: Option<f64>,
}

fn f(v: Option<f64>, digits: usize) -> Option<String> {
    v.map(|v| format!("{v:.digits$}"))
}

fn e(v: Option<f64>) -> Option<String> {
    v.map(|v| format!("{v:.2e}"))
}

/// Column title, alignment (true: right) and cell.
fn columns() -> Vec<(&'static str, bool, Cell)> {
    vec![
        ("engine", false, |r, _| Some(r.engine.clone())),
        ("precision", false, |r, _| Some(r.precision.clone())),
        ("variant", false, |r, _| {
            (!r.variant.is_empty()).then(|| r.variant.clone())
        }),
        ("batch", true, |r, _| Some(r.batch.to_string())),
        ("images/s", true, |r, _| f(Some(r.images_per_s), 1)),
        ("mean ms", true, |r, _| f(r.mean_ms, 2)),
        ("std ms", true, |r, _| f(r.std_ms, 2)),
        ("p50 ms", true, |r, _| f(r.p50_ms, 2)),
        ("p95 ms", true, |r, _| f(r.p95_ms, 2)),
        ("p99 ms", true, |r, _| f(r.p99_ms, 2)),
        ("peak GiB", true, |r, _| f(r.peak_gib, 2)),
        ("x torch fp32 eager", true, |r, c| {
            c.torch_fp32
                .filter(|b| *b > 0.0)
                .map(|b| format!("{:.2}", r.images_per_s / b))
        }),
        ("rel L1 vs fp32", true, |r, _| e(r.rel_l1)),
        ("rel L2 vs fp32", true, |r, _| e(r.rel_l2)),
        ("PSNR dB vs fp32", true, |r, _| {
            r.psnr_db.map(|v| {
                if v.is_infinite() {
                    "inf".into()
                } else {
                    format!("{v:.1}")
                }
            })
        }),
        ("mAP50 vs fp32", true, |r, _| f(r.map50_vs_fp32, 3)),
        ("mAP vs fp32", true, |r, _| f(r.map_vs_fp32, 3)),
        ("mAP50 (gt)", true, |r, _| f(r.true_map50, 3)),
        ("mAP (gt)", true, |r, _| f(r.true_map, 3)),
    ]
}

pub fn torch_fp32_best(rows: &[Row]) -> Option<f64> {
    rows.iter()
        .filter(|r| r.engine == "torch-eager" && r.precision == "fp32")
        .map(|r| r.images_per_s)
        .fold(None, |a, v| Some(a.map_or(v, |a: f64| a.max(v))))
}

/// The results table; a column appears when at least one row has a value in it.
pub fn table(rows: &[Row]) -> String {
    let ctx = Ctx {
        torch_fp32: torch_fp32_best(rows),
    };
    let cols: Vec<_> = columns()
        .into_iter()
        .filter(|(_, _, cell)| rows.iter().any(|r| cell(r, &ctx).is_some()))
        .collect();
    let mut out = String::new();
    let head: Vec<&str> = cols.iter().map(|c| c.0).collect();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let align: Vec<&str> = cols
        .iter()
        .map(|c| if c.1 { "---:" } else { "---" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for r in rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|(_, _, cell)| cell(r, &ctx).unwrap_or_else(|| "-".into()))
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn best_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| variant | best images/s | at batch | batch-1 p50 ms |\n|---|---:|---:|---:|\n",
    );
    for (name, rs) in super::charts::group(rows) {
        let Some(best) = rs
            .iter()
            .max_by(|a, b| a.images_per_s.total_cmp(&b.images_per_s))
        else {
            continue;
        };
        let b1 = rs
            .iter()
            .find(|r| r.batch == 1)
            .and_then(|r| r.p50_ms.or(r.mean_ms))
            .map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {} | {b1} |",
            best.images_per_s, best.batch
        );
    }
    out
}

pub fn render(report: &Report, plots: &[Plot]) -> String {
    let mut out = format!("# Aperture report: {}\n\n", report.model);
    out.push_str("| | |\n|---|---|\n");
    let mut header = vec![
        ("device".to_string(), report.device.clone()),
        ("date".to_string(), report.date.clone()),
        ("model".to_string(), report.model.clone()),
    ];
    header.extend(report.header.iter().cloned());
    for (k, v) in header {
        let _ = writeln!(out, "| {k} | {} |", v.replace('|', "\\|"));
    }
    out.push_str("\n## Results\n\n");
    out.push_str(
        "Latencies are per batch; images/s = batch / mean latency. Accuracy columns compare \
each row's output with an fp32 reference on the same input: in a measuring run the fp32 \
output of the same engine; rendered with --from, the reference the source used \
(tools/gpu-check.sh: the CPU backend for aperture rows, PyTorch fp32 for the peers).",
    );
    if torch_fp32_best(&report.rows).is_some() {
        out.push_str(
            " `x torch fp32 eager` divides images/s by PyTorch eager fp32's best images/s.",
        );
    }
    out.push_str("\n\n");
    out.push_str(&table(&report.rows));
    out.push_str("\n## Best configuration per variant\n\n");
    out.push_str(&best_table(&report.rows));
    out.push_str("\n## Plots\n\n");
    for p in plots {
        match p {
            Plot::Written { caption, png, svg } => {
                let _ = writeln!(out, "![{caption}]({png})\n\n{caption} ([SVG]({svg}))\n");
            }
            Plot::Skipped { caption, why } => {
                let _ = writeln!(out, "- {caption}: not drawn ({why})\n");
            }
        }
    }
    if !report.notes.is_empty() {
        out.push_str("## Notes\n\n");
        for n in &report.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_columns_are_left_out() {
        let rows = vec![Row {
            engine: "aperture".into(),
            precision: "fp16".into(),
            batch: 2,
            images_per_s: 10.0,
            p50_ms: Some(200.0),
            ..Row::default()
        }];
        let t = table(&rows);
        let head = t.lines().next().unwrap_or_default();
        assert_eq!(head, "| engine | precision | batch | images/s | p50 ms |");
        assert!(t.contains("| aperture | fp16 | 2 | 10.0 | 200.00 |"));
    }
}
