//! Per-operation timing: when enabled, each backend operation is bracketed by CUDA
//! events and tagged with the FLOPs and the fewest bytes it must move, so that a
//! profile can report achieved TFLOP/s and GB/s per operation kind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use aperture_engine::Result;

use crate::backend::CudaBackend;
use crate::driver::Event;

struct Record {
    name: &'static str,
    flops: f64,
    bytes: f64,
    start: Event,
    end: Event,
}

/// Totals for one operation kind.
#[derive(Clone, Debug, PartialEq)]
pub struct OpStat {
    pub name: String,
    pub calls: usize,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
}

#[derive(Default)]
pub struct Profiler {
    enabled: AtomicBool,
    records: Mutex<Vec<Record>>,
}

impl Profiler {
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub(crate) fn op<R>(
        &self,
        backend: &CudaBackend,
        name: &'static str,
        flops: f64,
        bytes: f64,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        backend.ctx.bind()?;
        if !self.enabled.load(Ordering::Relaxed) {
            return f();
        }
        let start = backend.record_event()?;
        let r = f()?;
        let end = backend.record_event()?;
        if let Ok(mut recs) = self.records.lock() {
            recs.push(Record {
                name,
                flops,
                bytes,
                start,
                end,
            });
        }
        Ok(r)
    }

    /// Waits for the recorded operations and returns totals per kind, slowest first.
    pub fn take(&self) -> Result<Vec<OpStat>> {
        let recs = match self.records.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => Vec::new(),
        };
        let mut stats: Vec<OpStat> = Vec::new();
        for r in recs {
            let ms = r.end.elapsed_ms(&r.start)? as f64;
            match stats.iter_mut().find(|s| s.name == r.name) {
                Some(s) => {
                    s.calls += 1;
                    s.ms += ms;
                    s.flops += r.flops;
                    s.bytes += r.bytes;
                }
                None => stats.push(OpStat {
                    name: r.name.to_string(),
                    calls: 1,
                    ms,
                    flops: r.flops,
                    bytes: r.bytes,
                }),
            }
        }
        stats.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(stats)
    }
}
