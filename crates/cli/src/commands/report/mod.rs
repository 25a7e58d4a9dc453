//! `aperture report`: one command that measures every configuration worth choosing
//! between (precisions, batch sizes, CUDA graphs on/off, D-FINE query counts, the
//! PyTorch peers) with accuracy against fp32, and writes a markdown report with
//! plots. `--from` renders the same report from existing bench JSON files.

mod accuracy;
mod charts;
mod dfine;
mod doc;
mod environment;
mod markdown;
mod peers;
mod plot;
mod png;
mod roofline;
mod served;
mod svg;
mod sweep;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aperture_engine::Precision;
use clap::Args;

use doc::Report;
use markdown::Plot;
use roofline::Ceilings;

#[derive(Args)]
pub struct ReportArgs {
    /// Model folder or weights file (Restormer or D-FINE); not with --from.
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub model: Option<PathBuf>,
    /// Render from existing JSON files (`aperture bench --out`, tools/gpu-check.sh,
    /// or a report's report.json) without running anything.
    #[arg(long, num_args = 1..)]
    pub from: Vec<PathBuf>,
    /// With --from: profile tables printed by `aperture bench --profile`, for the
    /// roofline chart.
    #[arg(long, requires = "from")]
    pub profile_log: Vec<PathBuf>,
    /// Where to run: auto (the GPU when usable), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Precisions, comma separated (fp32 always runs: it is the accuracy reference).
    #[arg(long, default_value = "fp32,tf32,fp16,bf16")]
    pub precisions: String,
    /// Batch sizes, comma separated.
    #[arg(long, default_value = "1,2,4,8,16,32,64")]
    pub batches: String,
    /// Input height and width (default: 512 for Restormer, the processor's size for D-FINE).
    #[arg(long)]
    pub size: Option<usize>,
    /// Timed iterations per configuration, after --warmup untimed ones.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// D-FINE: query counts to compare (each at most the model's num_queries).
    #[arg(long, default_value = "300,150,100")]
    pub queries: String,
    /// D-FINE: COCO ground truth for true mAP (with --images).
    #[arg(long, requires = "images")]
    pub gt: Option<PathBuf>,
    /// D-FINE: folder with the ground truth's images (with --gt).
    #[arg(long, requires = "gt")]
    pub images: Option<PathBuf>,
    /// Skip the PyTorch peers even when torch is importable.
    #[arg(long)]
    pub no_peers: bool,
    /// Served rows: milliseconds of load per batch size against `aperture serve` started
    /// on loopback (0: no served rows).
    #[arg(long, default_value_t = 3000)]
    pub serve_ms: u64,
    /// Served rows: concurrent clients, each sending requests of the row's batch size
    /// (two keep the GPU busy while the other request crosses the network).
    #[arg(long, default_value_t = 2)]
    pub serve_clients: usize,
    /// Compute ceiling of the roofline chart, TFLOP/s (H100 SXM dense fp16/bf16).
    #[arg(long, default_value_t = 800.0)]
    pub peak_tflops: f64,
    /// Bandwidth ceiling of the roofline chart, GB/s (H100 SXM HBM3).
    #[arg(long, default_value_t = 3000.0)]
    pub bandwidth_gbs: f64,
    /// Output folder (created): README.md, report.json, *.svg, *.png.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
}

/// "1,2,4" -> [1, 2, 4]; an empty list or a zero is an error.
pub fn parse_batches(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<usize>() {
            Ok(b) if b > 0 => out.push(b),
            _ => bail!("--batches: '{part}' is not a positive batch size (e.g. 1,2,4,8)"),
        }
    }
    if out.is_empty() {
        bail!("--batches needs at least one positive batch size, e.g. 1,2,4,8");
    }
    out.dedup();
    Ok(out)
}

/// "fp16,bf16" -> precisions, fp32 first (the accuracy reference).
pub fn parse_precisions(text: &str) -> anyhow::Result<Vec<Precision>> {
    let mut out = vec![Precision::Fp32];
    let mut any = false;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: Precision = part
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--precisions: {e}"))?;
        any = true;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if !any {
        bail!("--precisions needs at least one of fp32, tf32, fp16, bf16");
    }
    Ok(out)
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let ceilings = Ceilings {
        tflops: args.peak_tflops,
        gbs: args.bandwidth_gbs,
    };
    if !(ceilings.tflops > 0.0 && ceilings.gbs > 0.0) {
        bail!("--peak-tflops and --bandwidth-gbs must be positive");
    }
    let report = if args.from.is_empty() {
        sweep::measure(&args)?
    } else {
        from_files(&args.from, &args.profile_log)?
    };
    write(&report, &args.out, ceilings)?;
    println!(
        "wrote {} ({} rows)",
        args.out.join("README.md").display(),
        report.rows.len()
    );
    Ok(())
}

fn from_files(files: &[PathBuf], logs: &[PathBuf]) -> anyhow::Result<Report> {
    let mut it = files.iter();
    let first = it.next().context("--from needs at least one JSON file")?;
    let mut report = Report::from_json_file(first)?;
    for f in it {
        report.merge(Report::from_json_file(f)?, &f.display().to_string())?;
    }
    if report.rows.is_empty() {
        bail!("{}: no rows to report", first.display());
    }
    for log in logs {
        let text = std::fs::read_to_string(log)
            .with_context(|| format!("cannot read {}", log.display()))?;
        let found = doc::parse_profile_log(&text);
        if found.is_empty() {
            bail!(
                "{}: no profile table (expected the output of `aperture bench --profile`)",
                log.display()
            );
        }
        report.profiles.extend(found);
    }
    let names: Vec<String> = files
        .iter()
        .chain(logs)
        .map(|p| p.display().to_string())
        .collect();
    report.header.push((
        "source".into(),
        format!(
            "rendered from {} without running anything",
            names.join(", ")
        ),
    ));
    report.header.push((
        "re-measure".into(),
        "on the GPU machine: the `command` above when the source is a report.json (`aperture report --model ...`), or `tools/gpu-check.sh` / `aperture bench --out` for bench JSON; then this command".into(),
    ));
    report.header.push((
        "rendered by".into(),
        format!("aperture {}", env!("CARGO_PKG_VERSION")),
    ));
    report.header.push((
        "command".into(),
        format!("`{}`", environment::command_line()),
    ));
    Ok(report)
}

/// Writes README.md, report.json and the plots into `dir`.
pub fn write(report: &Report, dir: &Path, ceilings: Ceilings) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut plots = Vec::new();
    let short = report.model.split(" (").next().unwrap_or(&report.model);
    let chart = charts::throughput(short, &report.rows);
    let (svg, png) = charts::write(&chart, dir, "throughput")?;
    plots.push(Plot::Written {
        caption: "images/s vs batch size, every variant".into(),
        png,
        svg,
    });
    let chart = charts::latency(short, &report.rows);
    let (svg, png) = charts::write(&chart, dir, "latency")?;
    plots.push(Plot::Written {
        caption: "latency percentiles (p50, p99) vs batch size".into(),
        png,
        svg,
    });
    if report.profiles.is_empty() {
        plots.push(Plot::Skipped {
            caption: "roofline".into(),
            why: "no per-operation profile: the GPU run profiles one eager pass per precision; \
the CPU backend has no profiler; with --from, pass --profile-log"
                .into(),
        });
    }
    for (i, p) in report.profiles.iter().enumerate() {
        let caption = format!(
            "roofline, {} (ceilings {} TFLOP/s, {} GB/s)",
            p.title, ceilings.tflops, ceilings.gbs
        );
        match roofline::chart(p, ceilings) {
            Some(chart) => {
                let (svg, png) = charts::write(&chart, dir, &format!("roofline-{}", i + 1))?;
                plots.push(Plot::Written { caption, png, svg });
            }
            None => plots.push(Plot::Skipped {
                caption,
                why: "no operation has both FLOPs and bytes".into(),
            }),
        }
    }
    let json = serde_json::to_string_pretty(&report.to_json())?;
    std::fs::write(dir.join("report.json"), json + "\n")
        .with_context(|| format!("writing {}", dir.join("report.json").display()))?;
    std::fs::write(dir.join("README.md"), markdown::render(report, &plots))
        .with_context(|| format!("writing {}", dir.join("README.md").display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lists_are_checked() {
        assert_eq!(parse_batches("1, 2,4").unwrap(), vec![1, 2, 4]);
        assert!(parse_batches("").is_err());
        assert!(parse_batches("1,0").is_err());
        assert!(parse_batches("x").is_err());
    }

    #[test]
    fn precisions_start_with_fp32() {
        let p = parse_precisions("fp16,bf16").unwrap();
        assert_eq!(p, vec![Precision::Fp32, Precision::Fp16, Precision::Bf16]);
        let err = parse_precisions("fp8").unwrap_err().to_string();
        assert!(err.contains("fp8"), "{err}");
        assert!(parse_precisions(",").is_err());
    }
}
