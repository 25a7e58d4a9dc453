//! Runs one batch on a blocking thread: concatenate, infer, split, answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_engine::{NamedTensors, Runner};

use super::queue::{Reply, Work};
use crate::error::{Result, ServerError};
use crate::stats::{BatchTimings, ModelStats};
use crate::tensor_io::{concat_batch, split_rows};

pub(super) struct Job {
    pub runner: Arc<dyn Runner>,
    pub works: Vec<Work>,
    pub stats: Arc<ModelStats>,
    /// Hand replies back to the batcher (preserve_ordering) instead of answering here.
    pub hold_replies: bool,
}

impl Job {
    pub fn run(self) -> Vec<(Reply, Result<NamedTensors>)> {
        let started = Instant::now();
        let queued: Vec<Duration> = self
            .works
            .iter()
            .map(|w| started.duration_since(w.enqueued))
            .collect();
        let rows: Vec<usize> = self.works.iter().map(|w| w.rows).collect();
        let mut timings = BatchTimings::default();
        let results = match run_batch(self.runner.as_ref(), &self.works, &rows, &mut timings) {
            Ok(per_request) => per_request.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(error = %e, batch = rows.len(), "batch failed");
                let msg = e.to_string();
                rows.iter()
                    .map(|_| Err(ServerError::Internal(msg.clone())))
                    .collect()
            }
        };
        self.stats.record_batch(rows.iter().sum(), &queued, timings);
        let mut held = Vec::new();
        for (work, result) in self.works.into_iter().zip(results) {
            if self.hold_replies {
                held.push((work.reply, result));
            } else {
                let _ = work.reply.send(result);
            }
        }
        held
    }
}

fn run_batch(
    runner: &dyn Runner,
    works: &[Work],
    rows: &[usize],
    t: &mut BatchTimings,
) -> Result<Vec<NamedTensors>> {
    let start = Instant::now();
    let first = works
        .first()
        .ok_or_else(|| ServerError::Internal("empty batch".into()))?;
    let mut batch: NamedTensors = Vec::with_capacity(first.inputs.len());
    for (i, (name, _)) in first.inputs.iter().enumerate() {
        let parts: Vec<_> = works
            .iter()
            .filter_map(|w| w.inputs.get(i).map(|(_, t)| t))
            .collect();
        let tensor = if parts.len() == 1 {
            parts[0].clone()
        } else {
            concat_batch(&parts)?
        };
        batch.push((name.clone(), tensor));
    }
    let infer_start = Instant::now();
    t.compute_input = infer_start - start;
    let outputs = runner.infer(&batch)?;
    let out_start = Instant::now();
    t.compute_infer = out_start - infer_start;
    let mut per_request: Vec<NamedTensors> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for (name, tensor) in &outputs {
        let pieces = if rows.len() == 1 {
            vec![tensor.clone()]
        } else {
            split_rows(tensor, rows)?
        };
        for (dst, piece) in per_request.iter_mut().zip(pieces) {
            dst.push((name.clone(), piece));
        }
    }
    t.compute_output = out_start.elapsed();
    Ok(per_request)
}
