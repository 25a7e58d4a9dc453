//! Served vs in-process: `aperture serve` started as a child process on free loopback
//! ports, driven over HTTP by the loadgen library (binary tensors, a few concurrent clients), one
//! row per request batch size.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aperture_engine::Precision;
use aperture_server::loadgen::{self, Encoding, LoadgenOptions, Protocol};

use super::doc::{Report, Row};
use super::sweep::Plan;

/// The child server and its log file, both gone when dropped.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start(
    model: &Path,
    arch: &str,
    plan: &Plan,
    precision: Precision,
    max_batch: usize,
    body_mb: usize,
) -> anyhow::Result<(Server, u16)> {
    let exe = std::env::current_exe()?;
    let log_path =
        std::env::temp_dir().join(format!("aperture-report-serve-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    };
    let (http, metrics) = (free_port()?, free_port()?);
    let device = if plan.gpu.is_some() { "cuda" } else { "cpu" };
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--architecture", arch, "--name", "m", "--host", "127.0.0.1"])
        .args(["--http-port", &http.to_string(), "--grpc-port", "0"])
        .args(["--metrics-port", &metrics.to_string()])
        .args([
            "--max-batch-size",
            &max_batch.to_string(),
            "--device",
            device,
        ])
        .args(["--max-body-mb", &body_mb.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.try_clone()?));
    if plan.gpu.is_some() {
        cmd.args(["--precision", precision.as_str()]);
    }
    let mut server = Server(cmd.spawn()?, log_path.clone());
    // The port opens first, then the model loads (a first GPU start compiles kernels):
    // wait for readiness.
    let deadline = Instant::now() + Duration::from_secs(240);
    while !is_ready(http) {
        if let Ok(Some(status)) = server.0.try_wait() {
            anyhow::bail!("`aperture serve` exited ({status}): {}", log_tail());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the server on port {http} was not ready within 240 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((server, http))
}

/// Whether `GET /v2/health/ready` on the loopback `port` answers 200.
fn is_ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = "GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.split_whitespace().nth(1) == Some("200")
}

/// Adds one "served (HTTP)" row per batch size, or a note saying why not.
pub fn measure(
    model: &Path,
    arch: &str,
    plan: &Plan,
    precision: Precision,
    shape: Vec<i64>,
    (window_ms, clients): (u64, usize),
    report: &mut Report,
) {
    if window_ms == 0 {
        report
            .notes
            .push("Served rows: skipped (--serve-ms 0).".into());
        return;
    }
    plan.bar.inc_length(plan.batches.len() as u64);
    for &b in &plan.batches {
        // One server per batch size with max_batch_size = b: requests of b images are
        // never merged, so each row runs the same batch as the in-process row it is
        // compared with; the second client keeps the GPU busy during transfers.
        plan.bar
            .set_message(format!("served {precision} batch {b}: starting the server"));
        // A request of b fp32 images (binary tensors) must fit the body limit.
        let per_image: i64 = shape.iter().product();
        let body_mb = (b * per_image.max(0) as usize * 4).div_ceil(1 << 20) + 1;
        let (server, port) = match start(model, arch, plan, precision, b, body_mb.max(64)) {
            Ok(s) => s,
            Err(e) => {
                report.notes.push(format!(
                    "Served batch {b}: could not start `aperture serve`: {e:#}"
                ));
                plan.bar.inc(1);
                continue;
            }
        };
        plan.bar
            .set_message(format!("served {precision} batch {b}"));
        let opts = LoadgenOptions {
            addr: format!("127.0.0.1:{port}"),
            protocol: Protocol::Http,
            model: "m".into(),
            concurrency: vec![clients],
            // Long enough for the first request to capture the batch's graph.
            warmup: Duration::from_millis(window_ms.max(50)),
            // Large batches take about a second per request: measure at least a few.
            measure: Duration::from_millis(window_ms * b.div_ceil(8).max(1) as u64),
            encoding: Encoding::Binary,
            batch_size: b,
            shape: Some(shape.clone()),
            api_key: None,
            request_rates: Vec::new(),
            image: None,
        };
        match loadgen::run(&opts) {
            Ok(levels) => {
                for l in levels.iter().filter(|l| l.requests > 0 && l.errors == 0) {
                    report.rows.push(Row {
                        engine: "aperture".into(),
                        precision: precision.as_str().into(),
                        batch: b,
                        variant: format!("served, HTTP, {clients} clients"),
                        images_per_s: l.infer_per_sec,
                        mean_ms: Some(l.avg_us / 1e3),
                        p50_ms: Some(l.p50_us as f64 / 1e3),
                        p95_ms: Some(l.p95_us as f64 / 1e3),
                        p99_ms: Some(l.p99_us as f64 / 1e3),
                        ..Row::default()
                    });
                }
                if let Some(l) = levels.iter().find(|l| l.errors > 0 || l.requests == 0) {
                    report.notes.push(format!(
                        "Served batch {b}: {} errors in {} requests ({})",
                        l.errors,
                        l.requests,
                        l.first_error
                            .as_deref()
                            .unwrap_or("no request completed in the window")
                    ));
                }
            }
            Err(e) => report
                .notes
                .push(format!("Served batch {b}: loadgen failed: {e}")),
        }
        plan.bar.inc(1);
        drop(server);
    }
    report.notes.push(format!(
        "Served rows: `aperture serve` as a child process on loopback, one per batch size with max_batch_size equal to it, KServe v2 HTTP with binary tensors, {clients} concurrent clients each sending requests of that batch ({window_ms} ms warm-up, then {window_ms} ms measured, times batch/8 above batch 8); latency is the client's round trip (encode, HTTP, batcher, inference, response)."
    ));
}
