//! The report's data: rows of measurements, per-operation profiles and the header,
//! with the JSON layout of issue 3 (extended with optional columns) in and out.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

/// One measured configuration. Optional columns are `None` when a source did not
/// measure them (e.g. the bench JSON of issue 3 has only p50 and p99).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub engine: String,
    pub precision: String,
    pub batch: usize,
    /// What else distinguishes the row: "graph", "eager", "300 queries", "served", ...
    pub variant: String,
    pub images_per_s: f64,
    pub mean_ms: Option<f64>,
    pub std_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub peak_gib: Option<f64>,
    pub rel_l1: Option<f64>,
    pub rel_l2: Option<f64>,
    pub psnr_db: Option<f64>,
    /// D-FINE: the variant's detections scored against the fp32 detections.
    pub map50_vs_fp32: Option<f64>,
    pub map_vs_fp32: Option<f64>,
    /// D-FINE with --gt: against the ground truth.
    pub true_map50: Option<f64>,
    pub true_map: Option<f64>,
}

impl Row {
    /// The series a row belongs to in the plots (everything but the batch size).
    pub fn series(&self) -> String {
        let mut s = format!("{} {}", self.engine, self.precision);
        if !self.variant.is_empty() {
            s.push_str(&format!(" ({})", self.variant));
        }
        s
    }
}

/// Per-operation totals of one eager pass, for the roofline chart.
#[derive(Clone, Debug, PartialEq)]
pub struct OpPoint {
    pub name: String,
    pub calls: usize,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
}

impl OpPoint {
    /// Arithmetic intensity (FLOP per byte); `None` without bytes or FLOPs.
    pub fn intensity(&self) -> Option<f64> {
        (self.bytes > 0.0 && self.flops > 0.0).then(|| self.flops / self.bytes)
    }

    /// Achieved TFLOP/s; `None` without time or FLOPs.
    pub fn tflops(&self) -> Option<f64> {
        (self.ms > 0.0 && self.flops > 0.0).then(|| self.flops / (self.ms / 1e3) / 1e12)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// e.g. "fp16 batch 32, one eager pass".
    pub title: String,
    pub ops: Vec<OpPoint>,
}

/// Everything a report shows.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub device: String,
    pub date: String,
    pub model: String,
    /// Header lines after device, date and model: (name, value), in order.
    pub header: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub profiles: Vec<Profile>,
    /// Sentences for the end of the report: what was left out and why.
    pub notes: Vec<String>,
}

fn opt(v: Option<f64>) -> Value {
    v.map_or(Value::Null, Value::from)
}

impl Row {
    /// The issue-3 keys first (same names and meaning), then the extra columns.
    pub fn to_json(&self) -> Value {
        json!({
            "engine": self.engine,
            "precision": self.precision,
            "batch": self.batch,
            "variant": self.variant,
            "images_per_s": self.images_per_s,
            "mean_ms": opt(self.mean_ms),
            "std_ms": opt(self.std_ms),
            "p50_ms": opt(self.p50_ms),
            "p95_ms": opt(self.p95_ms),
            "p99_ms": opt(self.p99_ms),
            "peak_gib": opt(self.peak_gib),
            "rel_l2_vs_fp32": opt(self.rel_l2),
            "rel_l1_vs_fp32": opt(self.rel_l1),
            // JSON has no infinity: identical outputs write "inf".
            "psnr_db_vs_fp32": match self.psnr_db {
                Some(v) if v.is_infinite() => Value::from("inf"),
                v => opt(v),
            },
            "map50_vs_fp32": opt(self.map50_vs_fp32),
            "map_vs_fp32": opt(self.map_vs_fp32),
            "true_map50": opt(self.true_map50),
            "true_map": opt(self.true_map),
        })
    }

    fn from_json(v: &Value, at: &str) -> anyhow::Result<Row> {
        let o = v
            .as_object()
            .with_context(|| format!("{at}: a row must be an object"))?;
        let text = |k: &str| -> anyhow::Result<String> {
            o.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{at}: missing text field '{k}'"))
        };
        let num = |k: &str| o.get(k).and_then(Value::as_f64);
        let batch = o
            .get("batch")
            .and_then(Value::as_u64)
            .with_context(|| format!("{at}: missing positive integer 'batch'"))?;
        let images_per_s =
            num("images_per_s").with_context(|| format!("{at}: missing number 'images_per_s'"))?;
        let engine = text("engine")?;
        // Files written before peers named their mode held only reduce-overhead rows.
        let variant = match o.get("variant").and_then(Value::as_str) {
            Some(v) => v.to_string(),
            None if engine == "torch-compile" => "reduce-overhead".into(),
            None => String::new(),
        };
        Ok(Row {
            engine,
            precision: text("precision")?,
            batch: batch as usize,
            variant,
            images_per_s,
            mean_ms: num("mean_ms"),
            std_ms: num("std_ms"),
            p50_ms: num("p50_ms"),
            p95_ms: num("p95_ms"),
            p99_ms: num("p99_ms"),
            peak_gib: num("peak_gib"),
            rel_l2: num("rel_l2_vs_fp32"),
            rel_l1: num("rel_l1_vs_fp32"),
            psnr_db: match o.get("psnr_db_vs_fp32") {
                Some(Value::String(s)) if s == "inf" => Some(f64::INFINITY),
                _ => num("psnr_db_vs_fp32"),
            },
            map50_vs_fp32: num("map50_vs_fp32"),
            map_vs_fp32: num("map_vs_fp32"),
            true_map50: num("true_map50"),
            true_map: num("true_map"),
        })
    }
}

impl Report {
    pub fn to_json(&self) -> Value {
        let header: Map<String, Value> = self
            .header
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let profiles: Vec<Value> = self
            .profiles
            .iter()
            .map(|p| {
                let ops: Vec<Value> = p
                    .ops
                    .iter()
                    .map(|o| json!({"name": o.name, "calls": o.calls, "ms": o.ms, "flops": o.flops, "bytes": o.bytes}))
                    .collect();
                json!({"title": p.title, "ops": ops})
            })
            .collect();
        json!({
            "device": self.device,
            "date": self.date,
            "model": self.model,
            "header": header,
            "rows": self.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "profiles": profiles,
            "notes": self.notes,
        })
    }

    /// Reads a bench JSON (issue 3 layout) or a report's own `report.json`.
    pub fn from_json_file(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let at = path.display().to_string();
        let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let rows = v.get("rows").and_then(Value::as_array).with_context(|| {
            format!("{at}: no 'rows' array (expected the layout of `aperture bench --out`)")
        })?;
        // Rows without a throughput are not measurements of speed (e.g. the precision
        // study of tools/dfine_torch_peers.py): left out, and said so.
        let timed = |r: &&Value| r.get("images_per_s").is_some_and(Value::is_number);
        let untimed = rows.iter().filter(|r| !timed(r)).count();
        let rows = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| timed(r))
            .map(|(i, r)| Row::from_json(r, &format!("{at}: rows[{i}]")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let header = v
            .get("header")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let profiles = v
            .get("profiles")
            .and_then(Value::as_array)
            .map(|ps| ps.iter().filter_map(profile_from_json).collect())
            .unwrap_or_default();
        let notes = v
            .get("notes")
            .and_then(Value::as_array)
            .map(|ns| {
                ns.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut notes: Vec<String> = notes;
        if untimed > 0 {
            notes.push(format!(
                "{at}: {untimed} rows without images_per_s (not timings) left out."
            ));
        }
        Ok(Report {
            device: field("device"),
            date: field("date"),
            model: field("model"),
            header,
            rows,
            profiles,
            notes,
        })
    }

    /// Appends another document's rows and profiles; the device must agree (a note
    /// records a different model description).
    pub fn merge(&mut self, other: Report, at: &str) -> anyhow::Result<()> {
        if other.device != self.device {
            bail!(
                "{at} was measured on '{}', the first file on '{}': one report is one device",
                other.device,
                self.device
            );
        }
        if other.model != self.model {
            self.notes.push(format!(
                "{at} describes its model as '{}' (the first file: '{}').",
                other.model, self.model
            ));
        }
        self.rows.extend(other.rows);
        self.profiles.extend(other.profiles);
        self.notes.extend(other.notes);
        Ok(())
    }
}

fn profile_from_json(v: &Value) -> Option<Profile> {
    let ops = v
        .get("ops")?
        .as_array()?
        .iter()
        .filter_map(|o| {
            Some(OpPoint {
                name: o.get("name")?.as_str()?.to_string(),
                calls: o.get("calls")?.as_u64()? as usize,
                ms: o.get("ms")?.as_f64()?,
                flops: o.get("flops")?.as_f64()?,
                bytes: o.get("bytes")?.as_f64()?,
            })
        })
        .collect();
    Some(Profile {
        title: v.get("title")?.as_str()?.to_string(),
        ops,
    })
}

/// Parses the tables `aperture bench --profile` prints ("profile: TITLE (ceilings
/// ...)", a header line, one line per operation, "sum of operations"). Rates are
/// printed rounded, so FLOPs and bytes are recovered from TFLOP/s and GB/s x time.
pub fn parse_profile_log(text: &str) -> Vec<Profile> {
    let mut out: Vec<Profile> = Vec::new();
    let mut current: Option<Profile> = None;
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("profile: ") {
            if let Some(p) = current.take() {
                out.push(p);
            }
            let title = rest.split(" (ceilings").next().unwrap_or(rest);
            current = Some(Profile {
                title: title.trim().to_string(),
                ops: Vec::new(),
            });
            continue;
        }
        let Some(p) = current.as_mut() else { continue };
        if line.starts_with("sum of operations") {
            out.extend(current.take());
            continue;
        }
        // name calls ms share% TFLOP/s %peak GB/s %peak
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 8 {
            continue;
        }
        let num = |s: &str| s.trim_end_matches('%').parse::<f64>().ok();
        if let (Ok(calls), Some(ms), Some(tf), Some(gbs)) =
            (f[1].parse::<usize>(), num(f[2]), num(f[4]), num(f[6]))
        {
            p.ops.push(OpPoint {
                name: f[0].to_string(),
                calls,
                ms,
                flops: tf * 1e12 * ms / 1e3,
                bytes: gbs * 1e9 * ms / 1e3,
            });
        }
    }
    out.extend(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_tables_parse() {
        let log =
            "\nprofile: fp16 batch 1, one eager pass: 41.64 ms (ceilings 798 TFLOP/s, 3000 GB/s)\n\
operation               calls        ms   share   TFLOP/s   %peak      GB/s   %peak\n\
conv1x1_gemm              134     9.799   24.0%      92.4   11.6%      1163   38.8%\n\
concat                      3     0.294    0.7%       0.0    0.0%       600   20.0%\n\
sum of operations         547    40.850\n";
        let p = parse_profile_log(log);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].title, "fp16 batch 1, one eager pass: 41.64 ms");
        assert_eq!(p[0].ops.len(), 2);
        let tf = p[0].ops[0].tflops().unwrap();
        assert!((tf - 92.4).abs() < 1e-9, "{tf}");
        let ai = p[0].ops[0].intensity().unwrap();
        assert!((ai - 92.4e12 / 1163e9).abs() < 1e-9);
        assert_eq!(p[0].ops[1].intensity(), None);
    }

    #[test]
    fn rows_round_trip() {
        let r = Row {
            engine: "aperture".into(),
            precision: "fp16".into(),
            batch: 4,
            images_per_s: 33.765_774_848_112_04,
            p50_ms: Some(118.45),
            psnr_db: Some(f64::INFINITY),
            ..Row::default()
        };
        let back = Row::from_json(&r.to_json(), "t").unwrap();
        assert_eq!(back, r);
    }
}
