//! `aperture loadgen`: drive a running server (HTTP or gRPC) and report throughput and
//! latency percentiles, optionally as perf_analyzer-style CSV.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use aperture_server::loadgen::{self, Encoding, ImageLoad, LoadgenOptions, Protocol};
use clap::Args;

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// Model to load.
    #[arg(short = 'm', long)]
    pub model: String,
    /// Server address host:port (default: localhost:8000 for HTTP, localhost:8001 for gRPC).
    #[arg(short = 'u', long)]
    pub url: Option<String>,
    /// http or grpc.
    #[arg(short = 'i', long, default_value = "http")]
    pub protocol: String,
    /// Concurrency levels: "1:16:2" (start:end:step, doubling if step is "x2") or "1,4,16".
    #[arg(long, default_value = "1")]
    pub concurrency_range: String,
    /// Request-rate mode instead of a concurrency sweep: requests per second per level,
    /// e.g. "100,200,400"; the connection pool has max(--concurrency-range) connections.
    #[arg(long, value_delimiter = ',')]
    pub request_rate_range: Vec<f64>,
    /// Measurement window per level, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub measurement_interval: u64,
    /// Warm-up before each window, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
    /// Batch size of each request.
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch_size: usize,
    /// Non-batch dims for variable-size inputs, e.g. 3,512,512.
    #[arg(long, value_delimiter = ',')]
    pub shape: Option<Vec<i64>>,
    /// Send HTTP tensors as JSON instead of binary.
    #[arg(long)]
    pub json: bool,
    /// Where HTTP input tensors travel: `none` (in the request body) or `system`
    /// (registered POSIX shared memory, Triton's extension; the server must run on this
    /// host), as perf_analyzer's --shared-memory.
    #[arg(long, default_value = "none", value_parser = ["none", "system"])]
    pub shared_memory: String,
    /// Send this image file to /v1/models/{model}/{--task} instead of tensors (HTTP).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Image endpoint for --image: detect or enhance.
    #[arg(long, default_value = "detect")]
    pub task: String,
    /// Write perf_analyzer-style CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    #[arg(long, env = "APERTURE_API_KEY")]
    pub api_key: Option<String>,
}

fn parse_range(s: &str) -> anyhow::Result<Vec<usize>> {
    if s.contains(',') {
        return s
            .split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|e| anyhow!("{x}: {e}")))
            .collect();
    }
    let parts: Vec<&str> = s.split(':').collect();
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| anyhow!("concurrency '{x}': {e}"))
    };
    let (start, end, step) = match parts.as_slice() {
        [a] => (num(a)?, num(a)?, "1"),
        [a, b] => (num(a)?, num(b)?, "1"),
        [a, b, c] => (num(a)?, num(b)?, *c),
        _ => bail!("--concurrency-range: expected start:end:step or a list"),
    };
    if start == 0 || end < start {
        bail!("--concurrency-range: need 1 <= start <= end");
    }
    let mut out = Vec::new();
    let mut c = start;
    while c <= end && out.len() < 64 {
        out.push(c);
        c = if step == "x2" {
            c * 2
        } else {
            c + num(step)?.max(1)
        };
    }
    Ok(out)
}

pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let protocol = match args.protocol.as_str() {
        "http" => Protocol::Http,
        "grpc" => Protocol::Grpc,
        other => bail!("--protocol {other}: expected http or grpc"),
    };
    let addr = args.url.clone().unwrap_or_else(|| match protocol {
        Protocol::Http => "localhost:8000".into(),
        Protocol::Grpc => "localhost:8001".into(),
    });
    let addr = addr
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let opts = LoadgenOptions {
        addr,
        protocol,
        model: args.model.clone(),
        concurrency: parse_range(&args.concurrency_range)?,
        warmup: Duration::from_millis(args.warmup_ms),
        measure: Duration::from_millis(args.measurement_interval.max(1)),
        encoding: match (args.json, args.shared_memory.as_str()) {
            (true, "system") => {
                anyhow::bail!("--json and --shared-memory system exclude each other")
            }
            (true, _) => Encoding::Json,
            (false, "system") => Encoding::SharedMemory,
            (false, _) => Encoding::Binary,
        },
        batch_size: args.batch_size.max(1),
        shape: args.shape.clone(),
        api_key: args.api_key.clone(),
        request_rates: {
            if args
                .request_rate_range
                .iter()
                .any(|&r| !(r > 0.0 && r <= 1e6))
            {
                bail!("--request-rate-range: each rate must lie in (0, 1000000]");
            }
            args.request_rate_range.clone()
        },
        image: match &args.image {
            None => None,
            Some(p) => {
                if args.task != "detect" && args.task != "enhance" {
                    bail!("--task {}: expected detect or enhance", args.task);
                }
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                Some(ImageLoad {
                    task: args.task.clone(),
                    bytes: bytes.into(),
                })
            }
        },
    };
    let reports = loadgen::run(&opts).map_err(|e| anyhow!(e))?;
    print!("{}", loadgen::table(&reports));
    if let Some(path) = &args.csv {
        std::fs::write(path, loadgen::csv(&reports))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("1:4").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(parse_range("1:16:x2").unwrap(), vec![1, 2, 4, 8, 16]);
        assert_eq!(parse_range("2,8").unwrap(), vec![2, 8]);
        assert!(parse_range("0:3").is_err());
    }
}
