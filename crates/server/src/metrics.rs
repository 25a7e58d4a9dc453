//! Prometheus metrics on their own port, with Triton's metric names and labels.

use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::server::Shared;

/// Hook for device metrics (nv_gpu_utilization, nv_gpu_memory_used_bytes, ...): an
/// NVML-backed implementation appends its families in Prometheus text format.
pub trait GpuMetrics: Send + Sync {
    fn render(&self, out: &mut String);
}

const BATCH_BUCKETS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Renders every metric family in the Prometheus text exposition format.
pub fn render(shared: &Shared) -> String {
    let models = shared.repository.loaded();
    let snaps: Vec<_> = models
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.version,
                m.stats.snapshot(),
                m.stats.pending(),
            )
        })
        .collect();
    let mut out = String::new();
    let mut family =
        |name: &str,
         kind: &str,
         help: &str,
         value: &dyn Fn(&crate::stats::StatsSnapshot, i64) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (m, v, s, pending) in &snaps {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\",version=\"{v}\"}} {}",
                    escape(m),
                    value(s, *pending)
                );
            }
        };
    family(
        "nv_inference_request_success",
        "counter",
        "Number of successful inference requests, all batch sizes",
        &|s, _| s.success.count,
    );
    family(
        "nv_inference_request_failure",
        "counter",
        "Number of failed inference requests, all batch sizes",
        &|s, _| s.fail.count,
    );
    family(
        "nv_inference_count",
        "counter",
        "Number of inferences performed (does not include cached requests)",
        &|s, _| s.inference_count,
    );
    family(
        "nv_inference_exec_count",
        "counter",
        "Number of model executions performed (does not include cached requests)",
        &|s, _| s.execution_count,
    );
    family(
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        &|s, _| (s.success.ns + s.fail.ns) / 1000,
    );
    family(
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        &|s, _| s.queue.ns / 1000,
    );
    family(
        "nv_inference_compute_input_duration_us",
        "counter",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        &|s, _| s.compute_input.ns / 1000,
    );
    family(
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        &|s, _| s.compute_infer.ns / 1000,
    );
    family("nv_inference_compute_output_duration_us", "counter", "Cumulative inference compute output duration in microseconds (does not include cached requests)", &|s, _| s.compute_output.ns / 1000);
    family(
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model.",
        &|_, p| p.max(0) as u64,
    );

    let name = "aperture_batch_size";
    let _ = writeln!(
        out,
        "# HELP {name} Sizes of the batches the dynamic batcher executed\n# TYPE {name} histogram"
    );
    for (m, v, s, _) in &snaps {
        let labels = format!("model=\"{}\",version=\"{v}\"", escape(m));
        for le in BATCH_BUCKETS {
            let n: u64 = s
                .batches
                .iter()
                .filter(|(&size, _)| size <= le)
                .map(|(_, (c, _))| *c)
                .sum();
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {n}");
        }
        let count: u64 = s.batches.values().map(|(c, _)| *c).sum();
        let sum: u64 = s
            .batches
            .iter()
            .map(|(&size, (c, _))| size as u64 * c)
            .sum();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}"
        );
    }
    if let (Some(open), Some(max)) = (shared.connections.open(), shared.connections.max()) {
        let _ = writeln!(
            out,
            "# HELP aperture_open_connections HTTP and gRPC connections open now\n\
             # TYPE aperture_open_connections gauge\naperture_open_connections {open}\n\
             # HELP aperture_max_connections Bound on open connections (--max-connections)\n\
             # TYPE aperture_max_connections gauge\naperture_max_connections {max}"
        );
    }
    if let Some(gpu) = &shared.gpu_metrics {
        gpu.render(&mut out);
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&s),
    )
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
