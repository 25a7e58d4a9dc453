//! A perf_analyzer-like load generator: closed-loop workers per concurrency level,
//! throughput and latency percentiles, and the server-side queue/compute split from
//! the model's statistics.

mod client;
mod shm;

use std::time::{Duration, Instant};

use half::{bf16, f16};
use serde_json::Value;

pub use client::{http_infer_body, Encoding, GrpcClient, HttpClient, WireInput};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

#[derive(Clone, Debug)]
pub struct LoadgenOptions {
    /// host:port of the HTTP or gRPC endpoint.
    pub addr: String,
    pub protocol: Protocol,
    pub model: String,
    pub concurrency: Vec<usize>,
    pub warmup: Duration,
    /// Measurement window per concurrency level.
    pub measure: Duration,
    pub encoding: Encoding,
    pub batch_size: usize,
    /// Non-batch dims for inputs with variable dims (-1).
    pub shape: Option<Vec<i64>>,
    pub api_key: Option<String>,
    /// Request-rate mode: requests per second per level (empty: concurrency sweep). The
    /// connection pool then has `max(concurrency)` connections.
    pub request_rates: Vec<f64>,
    /// Send this encoded image to `/v1/models/{model}/{task}` instead of tensors.
    pub image: Option<ImageLoad>,
}

/// An image-body workload for the `/v1` image endpoints (HTTP only).
#[derive(Clone, Debug)]
pub struct ImageLoad {
    /// "detect" or "enhance".
    pub task: String,
    pub bytes: bytes::Bytes,
}

/// Server-side averages per request, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerSplit {
    pub queue_us: f64,
    pub compute_input_us: f64,
    pub compute_infer_us: f64,
    pub compute_output_us: f64,
}

#[derive(Clone, Debug)]
pub struct LevelReport {
    pub concurrency: usize,
    /// Set in request-rate mode.
    pub request_rate: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub infer_per_sec: f64,
    pub avg_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub server: ServerSplit,
}

enum Conn {
    Http(HttpClient, String, bytes::Bytes, Option<usize>),
    Grpc(GrpcClient, String, Vec<WireInput>),
}

impl Conn {
    async fn infer(&mut self) -> Result<(), String> {
        match self {
            Conn::Http(c, path, body, hl) => {
                let (status, resp) = c.send("POST", path, body.clone(), *hl, false).await?;
                if status == 200 {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&resp)))
                }
            }
            Conn::Grpc(c, model, inputs) => c.infer(model, inputs).await,
        }
    }
}

/// Runs the sweep on its own runtime.
pub fn run(opts: &LoadgenOptions) -> Result<Vec<LevelReport>, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(sweep(opts))
}

pub async fn sweep(opts: &LoadgenOptions) -> Result<Vec<LevelReport>, String> {
    let inputs = match (&opts.image, opts.protocol) {
        (None, _) => discover_inputs(opts).await?,
        (Some(_), Protocol::Http) => Vec::new(),
        (Some(_), Protocol::Grpc) => {
            return Err("image bodies go over HTTP; use --protocol http".into())
        }
    };
    if opts.encoding != Encoding::SharedMemory {
        return levels(opts, &inputs).await;
    }
    if opts.protocol != Protocol::Http || opts.image.is_some() {
        return Err("--shared-memory system takes tensors over HTTP".into());
    }
    let mut control = HttpClient::connect(&opts.addr, opts.api_key.clone()).await?;
    let regions = shm::InputRegions::create(&mut control, &inputs).await?;
    let reports = levels(opts, &inputs).await;
    regions.release(&mut control).await;
    reports
}

/// Every concurrency or request-rate level of the sweep.
async fn levels(opts: &LoadgenOptions, inputs: &[WireInput]) -> Result<Vec<LevelReport>, String> {
    let mut reports = Vec::new();
    if opts.request_rates.is_empty() {
        for &c in &opts.concurrency {
            reports.push(level(opts, inputs, Load::Concurrency(c.max(1))).await?);
        }
    } else {
        for &r in &opts.request_rates {
            reports.push(level(opts, inputs, Load::Rate(r)).await?);
        }
    }
    Ok(reports)
}

async fn connect(opts: &LoadgenOptions, inputs: &[WireInput]) -> Result<Conn, String> {
    Ok(match opts.protocol {
        Protocol::Http => {
            let (body, hl, path) = match &opts.image {
                Some(img) => (
                    img.bytes.clone(),
                    None,
                    format!("/v1/models/{}/{}", opts.model, img.task),
                ),
                None => {
                    let (body, hl) = http_infer_body(inputs, opts.encoding);
                    (body, hl, format!("/v2/models/{}/infer", opts.model))
                }
            };
            Conn::Http(
                HttpClient::connect(&opts.addr, opts.api_key.clone()).await?,
                path,
                body,
                hl,
            )
        }
        Protocol::Grpc => Conn::Grpc(
            GrpcClient::connect(&opts.addr, opts.api_key.clone()).await?,
            opts.model.clone(),
            inputs.to_vec(),
        ),
    })
}

/// What one level's requests measured.
#[derive(Default)]
struct Samples {
    /// Latencies (us) of the successful requests sent inside the window.
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    /// Successful requests counted by the share of their time inside the window: a
    /// request crossing either edge counts in part, so a few long requests (a batch of
    /// 64 taking seconds) do not quantise the throughput.
    in_window: f64,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.in_window += other.in_window;
    }
}

/// The share of `[start, done]` that lies inside `[from, to]`.
fn share_inside(start: Instant, done: Instant, from: Instant, to: Instant) -> f64 {
    let span = done.saturating_duration_since(start).as_secs_f64();
    let inside = done
        .min(to)
        .saturating_duration_since(start.max(from))
        .as_secs_f64();
    if span > 0.0 {
        inside / span
    } else if start >= from && start < to {
        1.0
    } else {
        0.0
    }
}

async fn level(
    opts: &LoadgenOptions,
    inputs: &[WireInput],
    load: Load,
) -> Result<LevelReport, String> {
    let pool = match load {
        Load::Concurrency(c) => c,
        Load::Rate(_) => opts.concurrency.iter().copied().max().unwrap_or(1).max(1),
    };
    let mut conns = Vec::with_capacity(pool);
    for _ in 0..pool {
        conns.push(connect(opts, inputs).await?);
    }
    let warm_end = Instant::now() + opts.warmup;
    let end = warm_end + opts.measure;
    let run = tokio::spawn(match load {
        Load::Concurrency(_) => Box::pin(closed_loop(conns, warm_end, end)) as BoxedRun,
        Load::Rate(r) => Box::pin(open_loop(conns, r, warm_end, end)),
    });
    tokio::time::sleep_until(warm_end.into()).await;
    let before = server_stats(opts).await.ok();
    let samples = run.await.map_err(|e| e.to_string())?;
    let (mut lat, errors, first_error) =
        (samples.latencies_us, samples.errors, samples.first_error);
    let after = server_stats(opts).await.ok();
    let server = match (before, after) {
        (Some(b), Some(a)) => split(&b, &a),
        _ => ServerSplit::default(),
    };
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        let idx = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat.get(idx.saturating_sub(1).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let n = lat.len() as u64;
    Ok(LevelReport {
        concurrency: pool,
        request_rate: match load {
            Load::Rate(r) => Some(r),
            Load::Concurrency(_) => None,
        },
        requests: n,
        errors,
        first_error,
        infer_per_sec: samples.in_window * opts.batch_size as f64 / opts.measure.as_secs_f64(),
        avg_us: if n == 0 {
            0.0
        } else {
            lat.iter().sum::<u64>() as f64 / n as f64
        },
        p50_us: pct(50.0),
        p90_us: pct(90.0),
        p95_us: pct(95.0),
        p99_us: pct(99.0),
        server,
    })
}

type BoxedRun = std::pin::Pin<Box<dyn std::future::Future<Output = Samples> + Send>>;

/// What one level holds constant.
#[derive(Clone, Copy, Debug)]
enum Load {
    Concurrency(usize),
    /// Requests per second, sent on schedule over a pool of connections.
    Rate(f64),
}

/// Pause after a failed request before the connection tries again.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Each connection sends its next request as soon as the previous one is answered.
async fn closed_loop(conns: Vec<Conn>, warm_end: Instant, end: Instant) -> Samples {
    let mut workers = Vec::new();
    for mut conn in conns {
        workers.push(tokio::spawn(async move {
            let mut own = Samples::default();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = conn.infer().await;
                let done = Instant::now();
                if r.is_err() {
                    // A refused or dropped connection fails at once: back off instead of
                    // spinning (and counting millions of errors).
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
                if r.is_ok() {
                    own.in_window += share_inside(t0, done, warm_end, end);
                }
                if t0 < warm_end {
                    continue;
                }
                match r {
                    Ok(()) => own.latencies_us.push((done - t0).as_micros() as u64),
                    Err(e) => {
                        own.errors += 1;
                        own.first_error.get_or_insert(e);
                    }
                }
            }
            own
        }));
    }
    let mut all = Samples::default();
    for w in workers {
        if let Ok(own) = w.await {
            all.merge(own);
        }
    }
    all
}

/// Requests leave on a fixed schedule; latency counts from the scheduled time, so a
/// server (or pool) that falls behind shows up in the percentiles.
async fn open_loop(conns: Vec<Conn>, rate: f64, warm_end: Instant, end: Instant) -> Samples {
    let (tx, mut rx) = tokio::sync::mpsc::channel(conns.len().max(1));
    for c in conns {
        let _ = tx.send(c).await;
    }
    let interval = Duration::from_secs_f64(1.0 / rate.clamp(0.001, 1e6));
    let mut next = Instant::now();
    let mut inflight = Vec::new();
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let scheduled = next;
        next += interval;
        let Some(mut conn) = rx.recv().await else {
            break;
        };
        let tx = tx.clone();
        inflight.push(tokio::spawn(async move {
            let sent = Instant::now();
            let r = conn.infer().await;
            let done = Instant::now();
            let _ = tx.send(conn).await;
            let share = share_inside(sent, done, warm_end, end);
            let lat = done.saturating_duration_since(scheduled).as_micros() as u64;
            (scheduled >= warm_end, share, r.map(|_| lat))
        }));
    }
    let mut all = Samples::default();
    for h in inflight {
        let Ok((in_window, share, r)) = h.await else {
            continue;
        };
        if r.is_ok() {
            all.in_window += share;
        }
        match (in_window, r) {
            (true, Ok(l)) => all.latencies_us.push(l),
            (true, Err(e)) => {
                all.errors += 1;
                all.first_error.get_or_insert(e);
            }
            _ => {}
        }
    }
    all
}

/// Cumulative (count, ns) of queue, compute input/infer/output over the model's versions.
type Cumulative = [(u64, u64); 4];

async fn server_stats(opts: &LoadgenOptions) -> Result<Cumulative, String> {
    let mut out = [(0, 0); 4];
    match opts.protocol {
        Protocol::Http => {
            let mut c = HttpClient::connect(&opts.addr, opts.api_key.clone()).await?;
            let v = c
                .get_json(&format!("/v2/models/{}/stats", opts.model))
                .await?;
            for m in v["model_stats"].as_array().cloned().unwrap_or_default() {
                for (k, key) in ["queue", "compute_input", "compute_infer", "compute_output"]
                    .iter()
                    .enumerate()
                {
                    let s = &m["inference_stats"][key];
                    out[k].0 += s["count"].as_u64().unwrap_or(0);
                    out[k].1 += s["ns"].as_u64().unwrap_or(0);
                }
            }
        }
        Protocol::Grpc => {
            let mut c = GrpcClient::connect(&opts.addr, opts.api_key.clone()).await?;
            for m in c.stats(&opts.model).await? {
                let Some(s) = m.inference_stats else { continue };
                for (k, d) in [s.queue, s.compute_input, s.compute_infer, s.compute_output]
                    .iter()
                    .enumerate()
                {
                    if let Some(d) = d {
                        out[k].0 += d.count;
                        out[k].1 += d.ns;
                    }
                }
            }
        }
    }
    Ok(out)
}

fn split(before: &Cumulative, after: &Cumulative) -> ServerSplit {
    let avg = |k: usize| {
        let (c, ns) = (
            after[k].0.saturating_sub(before[k].0),
            after[k].1.saturating_sub(before[k].1),
        );
        if c == 0 {
            0.0
        } else {
            ns as f64 / c as f64 / 1000.0
        }
    };
    ServerSplit {
        queue_us: avg(0),
        compute_input_us: avg(1),
        compute_infer_us: avg(2),
        compute_output_us: avg(3),
    }
}

/// Reads the model's inputs from its metadata and makes deterministic data for them.
async fn discover_inputs(opts: &LoadgenOptions) -> Result<Vec<WireInput>, String> {
    let specs: Vec<(String, String, Vec<i64>)> = match opts.protocol {
        Protocol::Http => {
            let mut c = HttpClient::connect(&opts.addr, opts.api_key.clone()).await?;
            let v = c.get_json(&format!("/v2/models/{}", opts.model)).await?;
            v["inputs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    let shape = i["shape"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_i64).collect())
                        .unwrap_or_default();
                    (
                        i["name"].as_str().unwrap_or("").to_string(),
                        i["datatype"].as_str().unwrap_or("").to_string(),
                        shape,
                    )
                })
                .collect()
        }
        Protocol::Grpc => {
            let mut c = GrpcClient::connect(&opts.addr, opts.api_key.clone()).await?;
            let m = c.metadata(&opts.model).await?;
            m.inputs
                .into_iter()
                .map(|t| (t.name, t.datatype, t.shape))
                .collect()
        }
    };
    if specs.is_empty() {
        return Err(format!("model '{}' reports no inputs", opts.model));
    }
    let mut seed = 0x2545_f491_u32;
    specs
        .into_iter()
        .map(|(name, datatype, meta_shape)| {
            let mut shape = vec![opts.batch_size as i64];
            let dims = meta_shape.get(1..).unwrap_or(&[]);
            match &opts.shape {
                Some(s) if dims.iter().any(|&d| d < 0) || s.len() == dims.len() => shape.extend(s),
                _ => shape.extend(dims.iter().map(|&d| d.max(1))),
            }
            let n: usize = shape.iter().map(|&d| d.max(0) as usize).product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32
                })
                .collect();
            let raw = match datatype.as_str() {
                "FP32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                "FP16" => values
                    .iter()
                    .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                    .collect(),
                "BF16" => values
                    .iter()
                    .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                    .collect(),
                other => {
                    return Err(format!(
                        "input '{name}': datatype {other} is not supported by loadgen"
                    ))
                }
            };
            Ok(WireInput {
                name,
                datatype,
                shape,
                raw,
                values,
            })
        })
        .collect()
}

/// perf_analyzer's CSV layout (latencies and splits in microseconds).
pub fn csv(reports: &[LevelReport]) -> String {
    let rate_mode = reports.iter().any(|r| r.request_rate.is_some());
    let mut out = String::from(if rate_mode {
        "Request Rate"
    } else {
        "Concurrency"
    });
    out.push_str(
        ",Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
         Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n",
    );
    for r in reports {
        let s = &r.server;
        let server_total =
            s.queue_us + s.compute_input_us + s.compute_infer_us + s.compute_output_us;
        let network = (r.avg_us - server_total).max(0.0);
        out.push_str(&format!(
            "{},{:.2},0,{:.0},{:.0},{:.0},{:.0},{:.0},0,{},{},{},{}\n",
            r.request_rate
                .map(|x| format!("{x}"))
                .unwrap_or_else(|| r.concurrency.to_string()),
            r.infer_per_sec,
            network,
            s.queue_us,
            s.compute_input_us,
            s.compute_infer_us,
            s.compute_output_us,
            r.p50_us,
            r.p90_us,
            r.p95_us,
            r.p99_us
        ));
    }
    out
}

/// A human-readable table.
pub fn table(reports: &[LevelReport]) -> String {
    let mut out = format!(
        "{:>7} {:>10} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        if reports.iter().any(|r| r.request_rate.is_some()) {
            "rate/s"
        } else {
            "conc"
        },
        "infer/s",
        "reqs",
        "errors",
        "p50 us",
        "p90 us",
        "p95 us",
        "p99 us",
        "queue us",
        "infer us"
    );
    for r in reports {
        out.push_str(&format!(
            "{:>7} {:>10.1} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9.0} {:>9.0}\n",
            r.request_rate
                .map(|x| format!("{x}"))
                .unwrap_or_else(|| r.concurrency.to_string()),
            r.infer_per_sec,
            r.requests,
            r.errors,
            r.p50_us,
            r.p90_us,
            r.p95_us,
            r.p99_us,
            r.server.queue_us,
            r.server.compute_infer_us
        ));
        if let Some(e) = &r.first_error {
            out.push_str(&format!("      first error: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::share_inside;
    use std::time::{Duration, Instant};

    #[test]
    fn requests_count_by_their_share_of_the_window() {
        let t = Instant::now();
        let s = |a: u64, b: u64| Duration::from_millis(a * 100 + b);
        let (from, to) = (t + s(10, 0), t + s(20, 0));
        // Inside, before, after, straddling either edge, spanning the whole window.
        assert_eq!(share_inside(t + s(12, 0), t + s(14, 0), from, to), 1.0);
        assert_eq!(share_inside(t, t + s(5, 0), from, to), 0.0);
        assert_eq!(share_inside(t + s(21, 0), t + s(25, 0), from, to), 0.0);
        assert!((share_inside(t + s(8, 0), t + s(12, 0), from, to) - 0.5).abs() < 1e-9);
        assert!((share_inside(t + s(19, 0), t + s(23, 0), from, to) - 0.25).abs() < 1e-9);
        assert!((share_inside(t + s(5, 0), t + s(25, 0), from, to) - 0.5).abs() < 1e-9);
        // Back-to-back requests of one client add up to the window exactly.
        let total: f64 = (0..30)
            .map(|i| share_inside(t + s(i, 0), t + s(i + 1, 0), from, to))
            .sum();
        assert!((total - 10.0).abs() < 1e-9);
    }
}
