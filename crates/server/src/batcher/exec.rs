//! Runs one batch on a blocking thread: concatenate, infer, split, answer.

use std::sync::Arc;
use std::time::Instant;

use aperture_engine::{NamedTensors, Runner};

use tokio::sync::mpsc::WeakUnboundedSender;

use super::queue::{Reply, Work};
use super::Msg;
use crate::error::{Result, ServerError};
use crate::stats::{BatchTimings, ModelStats};
use crate::tensor_io::{concat_batch, split_rows};

/// Runs a job and tells the batcher the worker is free again.
pub(super) fn run_and_report(
    job: Job,
    instance: usize,
    seq: u64,
    batcher: &WeakUnboundedSender<Msg>,
) {
    let held = job.run();
    if let Some(tx) = batcher.upgrade() {
        let _ = tx.send(Msg::Done {
            instance,
            seq,
            held,
        });
    }
}

/// A dedicated thread for one worker of a model instance: batches arrive over a
/// channel (cheaper than a blocking-pool task per batch). Exits when the batcher drops
/// its sender.
pub(super) fn spawn_worker(
    instance: usize,
    batcher: WeakUnboundedSender<Msg>,
) -> Option<std::sync::mpsc::Sender<(Job, u64)>> {
    let (tx, rx) = std::sync::mpsc::channel::<(Job, u64)>();
    let spawned = std::thread::Builder::new()
        .name(format!("aperture-worker-{instance}"))
        .spawn(move || {
            while let Ok((job, seq)) = rx.recv() {
                run_and_report(job, instance, seq, &batcher);
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "no instance thread; batches run on the blocking pool");
            None
        }
    }
}

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
        let mut inputs = Vec::with_capacity(self.works.len());
        let mut replies = Vec::with_capacity(self.works.len());
        let mut queued = Vec::with_capacity(self.works.len());
        let mut rows = Vec::with_capacity(self.works.len());
        let mut traces = Vec::new();
        for w in self.works {
            queued.push(started.duration_since(w.enqueued));
            rows.push(w.rows);
            inputs.push(w.inputs);
            replies.push(w.reply);
            traces.extend(w.trace);
        }
        let mut timings = BatchTimings::default();
        let mut spent = Vec::new();
        let results = match run_batch(
            self.runner.as_ref(),
            inputs,
            &rows,
            &mut timings,
            &mut spent,
        ) {
            Ok(per_request) => per_request.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(error = %e, batch = rows.len(), "batch failed");
                rows.iter().map(|_| Err(e.clone())).collect()
            }
        };
        mark_compute(&traces, started, &timings);
        self.stats.record_batch(rows.iter().sum(), &queued, timings);
        let mut held = Vec::new();
        for (reply, result) in replies.into_iter().zip(results) {
            if self.hold_replies {
                held.push((reply, result));
            } else {
                let _ = reply.send(result);
            }
        }
        // After answering: the batch's storage goes back to the pool for the next requests.
        for (_, t) in spent.into_iter().flatten() {
            crate::pool::give(t.into_data());
        }
        held
    }
}

/// The batch's compute timestamps on each traced request in it (the batch's phases follow
/// one another from `started`).
fn mark_compute(traces: &[Arc<crate::trace::Stamps>], started: Instant, t: &BatchTimings) {
    let input_end = started + t.compute_input;
    let output_start = input_end + t.compute_infer;
    let end = output_start + t.compute_output;
    for s in traces {
        s.mark_at("COMPUTE_START", started);
        s.mark_at("COMPUTE_INPUT_END", input_end);
        s.mark_at("COMPUTE_OUTPUT_START", output_start);
        s.mark_at("COMPUTE_END", end);
    }
}

/// Concatenates the requests' inputs, runs the model, splits the outputs by rows.
/// A batch of one request (one that fills the batch, say) moves its tensors instead of
/// copying them, and so do its outputs. Tensors done with (the batch's inputs, split
/// outputs) end up in `spent`, for the caller to recycle after answering.
fn run_batch(
    runner: &dyn Runner,
    mut inputs: Vec<NamedTensors>,
    rows: &[usize],
    t: &mut BatchTimings,
    spent: &mut Vec<NamedTensors>,
) -> Result<Vec<NamedTensors>> {
    let start = Instant::now();
    let batch: NamedTensors = if inputs.len() == 1 {
        inputs.pop().unwrap_or_default()
    } else {
        let first = inputs
            .first()
            .ok_or_else(|| ServerError::Internal("empty batch".into()))?;
        let mut batch = Vec::with_capacity(first.len());
        for (i, (name, _)) in first.iter().enumerate() {
            let parts: Vec<_> = inputs
                .iter()
                .filter_map(|r| r.get(i).map(|(_, t)| t))
                .collect();
            batch.push((name.clone(), concat_batch(&parts)?));
        }
        spent.append(&mut inputs);
        batch
    };
    let infer_start = Instant::now();
    t.compute_input = infer_start - start;
    // A panicking runner must not take the instance (and so the model) down with it.
    let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.infer(&batch)))
        .map_err(|_| {
            ServerError::Internal("the model panicked while running this batch".into())
        })??;
    spent.push(batch);
    let out_start = Instant::now();
    t.compute_infer = out_start - infer_start;
    let per_request = if rows.len() == 1 {
        vec![outputs]
    } else {
        let mut per_request: Vec<NamedTensors> = rows
            .iter()
            .map(|_| Vec::with_capacity(outputs.len()))
            .collect();
        for (name, tensor) in &outputs {
            for (dst, piece) in per_request.iter_mut().zip(split_rows(tensor, rows)?) {
                dst.push((name.clone(), piece));
            }
        }
        spent.push(outputs);
        per_request
    };
    t.compute_output = out_start.elapsed();
    Ok(per_request)
}
