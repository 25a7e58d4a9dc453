//! Per-model-version statistics in Triton's shape (`/stats`, ModelStatistics, metrics).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Count and cumulative nanoseconds of one kind of event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub ns: u64,
}

impl Tally {
    fn add(&mut self, n: u64, d: Duration) {
        self.count += n;
        self.ns += d.as_nanos() as u64 * n;
    }

    fn json(&self) -> Value {
        json!({ "count": self.count, "ns": self.ns })
    }
}

/// Timings of one executed batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchTimings {
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
}

/// Snapshot of every counter Triton reports for a model version.
#[derive(Clone, Debug, Default)]
pub struct StatsSnapshot {
    pub success: Tally,
    pub fail: Tally,
    pub queue: Tally,
    pub compute_input: Tally,
    pub compute_infer: Tally,
    pub compute_output: Tally,
    pub cache_hit: Tally,
    pub cache_miss: Tally,
    /// Items inferred (sum of request batch sizes).
    pub inference_count: u64,
    /// Model executions (batches).
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last inference (0: never).
    pub last_inference_ms: u64,
    /// Per executed batch size: (executions, timings summed).
    pub batches: BTreeMap<usize, (u64, [Tally; 3])>,
}

/// Live statistics of one model version; one short lock per request / batch.
#[derive(Debug, Default)]
pub struct ModelStats {
    inner: Mutex<StatsSnapshot>,
    /// Requests waiting in the queue (Prometheus pending gauge).
    pub pending: AtomicI64,
}

impl ModelStats {
    fn with<R>(&self, f: impl FnOnce(&mut StatsSnapshot) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update: counters stay usable.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.with(|s| s.clone())
    }

    pub fn pending(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// A request finished successfully after `total` end to end.
    pub fn record_success(&self, total: Duration) {
        self.with(|s| s.success.add(1, total));
    }

    pub fn record_failure(&self, total: Duration) {
        self.with(|s| s.fail.add(1, total));
    }

    /// One batch of `requests` requests holding `items` items ran with `t`; `queued` are
    /// the waits of each request in the queue.
    pub fn record_batch(&self, items: usize, queued: &[Duration], t: BatchTimings) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.with(|s| {
            let n = queued.len() as u64;
            for q in queued {
                s.queue.add(1, *q);
            }
            s.compute_input.add(n, t.compute_input);
            s.compute_infer.add(n, t.compute_infer);
            s.compute_output.add(n, t.compute_output);
            s.inference_count += items as u64;
            s.execution_count += 1;
            s.last_inference_ms = now_ms;
            let e = s.batches.entry(items).or_default();
            e.0 += 1;
            e.1[0].add(1, t.compute_input);
            e.1[1].add(1, t.compute_infer);
            e.1[2].add(1, t.compute_output);
        });
    }
}

impl StatsSnapshot {
    /// Triton's JSON statistics object for one model version.
    pub fn to_json(&self, name: &str, version: &str) -> Value {
        let batch_stats: Vec<Value> = self
            .batches
            .iter()
            .map(|(size, (_, t))| {
                json!({
                    "batch_size": size,
                    "compute_input": t[0].json(),
                    "compute_infer": t[1].json(),
                    "compute_output": t[2].json(),
                })
            })
            .collect();
        json!({
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
                "cache_hit": self.cache_hit.json(),
                "cache_miss": self.cache_miss.json(),
            },
            "batch_stats": batch_stats,
            "memory_usage": [],
            "response_stats": {},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_requests_are_counted_separately() {
        let s = ModelStats::default();
        let t = BatchTimings {
            compute_infer: Duration::from_micros(10),
            ..Default::default()
        };
        s.record_batch(3, &[Duration::from_micros(1), Duration::from_micros(2)], t);
        s.record_success(Duration::from_micros(20));
        let snap = s.snapshot();
        assert_eq!(snap.execution_count, 1);
        assert_eq!(snap.inference_count, 3);
        assert_eq!(snap.queue, Tally { count: 2, ns: 3000 });
        assert_eq!(
            snap.compute_infer,
            Tally {
                count: 2,
                ns: 20_000
            }
        );
        let j = snap.to_json("m", "1");
        assert_eq!(j["batch_stats"][0]["batch_size"], 3);
        assert_eq!(j["inference_stats"]["success"]["count"], 1);
        assert_eq!(j["inference_stats"]["cache_miss"]["count"], 0);
    }
}
