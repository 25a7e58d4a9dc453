//! Statistics, tables and the JSON document of `aperture bench`.

use aperture_cuda::OpStat;
use aperture_engine::Precision;
use serde_json::{json, Value};

/// Latency statistics in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Stats {
    pub fn of(ms: &[f64]) -> Stats {
        if ms.is_empty() {
            return Stats::default();
        }
        let n = ms.len() as f64;
        let mean = ms.iter().sum::<f64>() / n;
        let std = (ms.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let mut s = ms.to_vec();
        s.sort_by(f64::total_cmp);
        // Nearest-rank percentiles.
        let pct = |p: f64| s[((p / 100.0 * n).ceil() as usize).clamp(1, s.len()) - 1];
        Stats {
            mean,
            std,
            p50: pct(50.0),
            p95: pct(95.0),
            p99: pct(99.0),
        }
    }
}

pub struct Row {
    pub engine: String,
    pub precision: String,
    pub batch: usize,
    pub stats: Stats,
    pub peak_gib: f64,
    pub rel_l2: Option<f64>,
    /// Architecture-specific figures (e.g. D-FINE's logits and boxes errors), added to
    /// the JSON row after the common fields.
    pub extra: Vec<(&'static str, Value)>,
    pub error: Option<String>,
}

impl Row {
    pub fn new(
        engine: &str,
        precision: &str,
        batch: usize,
        stats: Stats,
        peak_gib: f64,
        rel_l2: Option<f64>,
    ) -> Row {
        Row {
            engine: engine.into(),
            precision: precision.into(),
            batch,
            stats,
            peak_gib,
            rel_l2,
            extra: Vec::new(),
            error: None,
        }
    }

    pub fn failed(engine: &str, precision: &str, batch: usize, error: String) -> Row {
        Row {
            engine: engine.into(),
            precision: precision.into(),
            batch,
            stats: Stats::default(),
            peak_gib: 0.0,
            rel_l2: None,
            extra: Vec::new(),
            error: Some(error),
        }
    }

    pub fn images_per_s(&self) -> f64 {
        if self.stats.mean > 0.0 {
            self.batch as f64 / (self.stats.mean / 1e3)
        } else {
            0.0
        }
    }
}

pub fn print_table(rows: &[Row]) {
    println!(
        "{:<9} {:>5} {:>5} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10}",
        "engine",
        "prec",
        "batch",
        "mean ms",
        "std",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "images/s",
        "peak GiB",
        "relL2/fp32"
    );
    for r in rows {
        if let Some(e) = &r.error {
            println!(
                "{:<9} {:>5} {:>5}  failed: {e}",
                r.engine, r.precision, r.batch
            );
            continue;
        }
        let s = &r.stats;
        let rel = r
            .rel_l2
            .map(|v| format!("{v:.2e}"))
            .unwrap_or_else(|| "-".into());
        let extra: String = r
            .extra
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(f) if v.is_f64() => format!("  {k} {f:.2e}"),
                _ => format!("  {k} {v}"),
            })
            .collect();
        println!(
            "{:<9} {:>5} {:>5} {:>9.3} {:>7.3} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>8.2} {:>10}{extra}",
            r.engine,
            r.precision,
            r.batch,
            s.mean,
            s.std,
            s.p50,
            s.p95,
            s.p99,
            r.images_per_s(),
            r.peak_gib,
            rel
        );
    }
}

/// The layout of issue 3, read by tools/gpu-check.sh and anything else.
pub fn to_json(device: &str, date: &str, model: &str, rows: &[Row]) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| {
            let mut row = json!({
                "engine": r.engine,
                "precision": r.precision,
                "batch": r.batch,
                "images_per_s": r.images_per_s(),
                "p50_ms": r.stats.p50,
                "p99_ms": r.stats.p99,
                "peak_gib": r.peak_gib,
                "rel_l2_vs_fp32": r.rel_l2,
            });
            if let Some(obj) = row.as_object_mut() {
                for (k, v) in &r.extra {
                    obj.insert((*k).to_string(), v.clone());
                }
            }
            row
        })
        .collect();
    json!({ "device": device, "date": date, "model": model, "rows": rows })
}

/// Ceilings measured on the lent H100 (KINDS.md: 798 TFLOP/s bf16 product, 3.0 TB/s
/// copy); fp32 without tensor cores is the datasheet's 67 TFLOP/s.
fn ceilings(p: Precision) -> (f64, f64) {
    let tflops = match p {
        Precision::Fp16 | Precision::Bf16 => 798.0,
        Precision::Tf32 => 399.0,
        Precision::Fp32 => 67.0,
    };
    (tflops, 3000.0)
}

pub fn print_profile(title: &str, stats: &[OpStat], p: Precision) {
    let total: f64 = stats.iter().map(|s| s.ms).sum();
    let (peak_tf, peak_gbs) = ceilings(p);
    println!("\nprofile: {title} (ceilings {peak_tf} TFLOP/s, {peak_gbs} GB/s)");
    println!(
        "{:<22} {:>6} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7}",
        "operation", "calls", "ms", "share", "TFLOP/s", "%peak", "GB/s", "%peak"
    );
    for s in stats {
        let secs = s.ms / 1e3;
        let tf = if secs > 0.0 {
            s.flops / secs / 1e12
        } else {
            0.0
        };
        let gbs = if secs > 0.0 {
            s.bytes / secs / 1e9
        } else {
            0.0
        };
        println!(
            "{:<22} {:>6} {:>9.3} {:>6.1}% {:>9.1} {:>6.1}% {:>9.0} {:>6.1}%",
            s.name,
            s.calls,
            s.ms,
            100.0 * s.ms / total.max(1e-9),
            tf,
            100.0 * tf / peak_tf,
            gbs,
            100.0 * gbs / peak_gbs
        );
    }
    println!(
        "{:<22} {:>6} {:>9.3}",
        "sum of operations",
        stats.iter().map(|s| s.calls).sum::<usize>(),
        total
    );
}

/// "YYYY-MM-DD HH:MM UTC" from the system clock.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let ms: Vec<f64> = (1..=100).map(|v| v as f64).collect();
        let s = Stats::of(&ms);
        assert_eq!((s.p50, s.p95, s.p99), (50.0, 95.0, 99.0));
        assert!((s.mean - 50.5).abs() < 1e-12);
    }

    #[test]
    fn json_has_the_issue_layout() {
        let rows = vec![Row::new(
            "aperture",
            "fp16",
            4,
            Stats::of(&[2.0, 2.0]),
            1.5,
            Some(1e-4),
        )];
        let v = to_json("GPU", "2026-01-01 00:00 UTC", "m", &rows);
        let r = &v["rows"][0];
        assert_eq!(r["images_per_s"].as_f64(), Some(2000.0));
        for key in [
            "engine",
            "precision",
            "batch",
            "images_per_s",
            "p50_ms",
            "p99_ms",
            "peak_gib",
            "rel_l2_vs_fp32",
        ] {
            assert!(r.get(key).is_some(), "{key}");
        }
        for key in ["device", "date", "model", "rows"] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn extra_fields_follow_the_common_ones_and_failed_rows_are_left_out() {
        let mut row = Row::new("aperture", "fp16", 1, Stats::of(&[1.0]), 0.5, Some(0.2));
        row.extra = vec![("rel_l2_logits", json!(0.1)), ("rows_moved", json!(3))];
        let rows = vec![
            row,
            Row::failed("aperture", "fp16", 64, "out of memory".into()),
        ];
        let v = to_json("GPU", "2026-01-01 00:00 UTC", "m", &rows);
        let out = v["rows"].as_array().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["rel_l2_logits"].as_f64(), Some(0.1));
        assert_eq!(out[0]["rows_moved"].as_u64(), Some(3));
        assert_eq!(out[0]["rel_l2_vs_fp32"].as_f64(), Some(0.2));
    }

    #[test]
    fn date_is_well_formed() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-11-24 06:00 UTC".len(), "{d}");
        assert!(d.starts_with("20"));
    }
}
