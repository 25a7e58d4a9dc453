//! Dynamic batcher with Triton's semantics.
//!
//! One task owns the queue and is driven by messages (enqueue, batch done), so the hot
//! path takes no lock. Batches run on blocking threads, one per idle worker (an
//! instance has as many workers as its runner takes concurrent calls, sharing the
//! runner); each request's answer goes straight back through its own oneshot channel.
//! Backpressure: a request beyond `max_queue_size` is refused at once ([`ServerError::QueueFull`]).

mod exec;
mod queue;
mod timer;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_engine::{NamedTensors, Runner};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ModelConfig, TimeoutAction};
use crate::error::{Result, ServerError};
use crate::stats::ModelStats;
use queue::{Queue, Reply, Work};

/// Scheduling settings of one model (from `[dynamic_batching]` in config.toml).
#[derive(Clone, Debug)]
pub struct BatcherConfig {
    pub max_batch_size: usize,
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_delay: Duration,
    pub preserve_ordering: bool,
    pub priority_levels: u64,
    pub default_priority: u64,
    pub max_queue_size: usize,
    pub default_timeout: Option<Duration>,
    pub timeout_action: TimeoutAction,
    pub allow_timeout_override: bool,
}

impl BatcherConfig {
    /// Settings from a model config; `runner_max` is the runner's own limit (0: none).
    pub fn from_model(cfg: &ModelConfig, runner_max: usize) -> Self {
        let db = &cfg.dynamic_batching;
        let qp = &db.default_queue_policy;
        let max_batch_size = match runner_max {
            0 => cfg.max_batch_size,
            r => cfg.max_batch_size.min(r),
        };
        let mut preferred: Vec<usize> = db
            .preferred_batch_size
            .iter()
            .copied()
            .filter(|&p| p <= max_batch_size)
            .collect();
        preferred.sort_unstable();
        Self {
            max_batch_size,
            preferred_batch_sizes: preferred,
            max_queue_delay: Duration::from_micros(db.max_queue_delay_microseconds),
            preserve_ordering: db.preserve_ordering,
            priority_levels: db.priority_levels,
            default_priority: db.default_priority_level,
            max_queue_size: match qp.max_queue_size {
                0 => crate::config::DEFAULT_MAX_QUEUE_SIZE as usize,
                n => n as usize,
            },
            default_timeout: match qp.default_timeout_microseconds {
                0 => None,
                us => Some(Duration::from_micros(us)),
            },
            timeout_action: qp.timeout_action,
            allow_timeout_override: qp.allow_timeout_override,
        }
    }
}

enum Msg {
    Enqueue(u64, Work),
    /// The wake-up time the task asked its timer for has come.
    Tick,
    Done {
        instance: usize,
        seq: u64,
        held: Vec<(Reply, Result<NamedTensors>)>,
    },
}

/// Handle to a model's batcher task; dropping it stops the task once idle.
pub struct Batcher {
    tx: mpsc::UnboundedSender<Msg>,
    cfg: BatcherConfig,
    stats: Arc<ModelStats>,
}

impl Batcher {
    /// Starts the batcher task on the current tokio runtime. One entry of `runners` per
    /// worker: a runner listed twice runs two batches at once.
    pub fn spawn(
        runners: Vec<Arc<dyn Runner>>,
        cfg: BatcherConfig,
        stats: Arc<ModelStats>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let timer = timer::spawn(tx.downgrade());
        let workers = (0..runners.len())
            .map(|i| exec::spawn_worker(i, tx.downgrade()))
            .collect();
        let task = BatcherTask {
            timer,
            armed: None,
            cfg: cfg.clone(),
            idle: (0..runners.len()).rev().collect(),
            runners,
            queue: Queue::default(),
            workers,
            rx,
            tx: tx.downgrade(),
            stats: stats.clone(),
            next_seq: 0,
            next_deliver: 0,
            held: BTreeMap::new(),
        };
        tokio::spawn(task.run());
        Self { tx, cfg, stats }
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.cfg
    }

    /// Queues one request of `rows` items and waits for its outputs. `priority` 0 means
    /// the default level; `timeout` applies only if the queue policy allows overrides.
    pub async fn submit(
        &self,
        inputs: NamedTensors,
        rows: usize,
        priority: u64,
        timeout: Option<Duration>,
    ) -> Result<NamedTensors> {
        self.submit_traced(inputs, rows, priority, timeout, None)
            .await
    }

    /// [`Batcher::submit`] for a traced request: its queue and compute timestamps are
    /// marked in `trace`.
    pub async fn submit_traced(
        &self,
        inputs: NamedTensors,
        rows: usize,
        priority: u64,
        timeout: Option<Duration>,
        trace: Option<Arc<crate::trace::Stamps>>,
    ) -> Result<NamedTensors> {
        let level = self.level(priority)?;
        if rows == 0 || rows > self.cfg.max_batch_size {
            return Err(ServerError::invalid(format!(
                "batch size {rows} is outside 1..={} for this model",
                self.cfg.max_batch_size
            )));
        }
        // Reserve a queue slot first: refusing here keeps memory bounded under bursts.
        let before = self.stats.pending.fetch_add(1, Ordering::AcqRel);
        if before >= self.cfg.max_queue_size as i64 {
            self.stats.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(ServerError::QueueFull(format!(
                "exceeds maximum queue size ({} requests queued); retry later",
                self.cfg.max_queue_size
            )));
        }
        let timeout = match timeout {
            Some(t) if self.cfg.allow_timeout_override => Some(t),
            _ => self.cfg.default_timeout,
        };
        let now = Instant::now();
        if let Some(t) = &trace {
            t.mark_at("QUEUE_START", now);
        }
        let (reply, rx) = oneshot::channel();
        let work = Work {
            inputs,
            rows,
            enqueued: now,
            deadline: timeout.map(|t| now + t),
            reply,
            trace,
        };
        if self.tx.send(Msg::Enqueue(level, work)).is_err() {
            self.stats.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(ServerError::Unavailable("model is shutting down".into()));
        }
        rx.await.map_err(|_| {
            ServerError::Internal("the model's batcher stopped before answering".into())
        })?
    }

    fn level(&self, priority: u64) -> Result<u64> {
        let levels = self.cfg.priority_levels;
        match priority {
            0 => Ok(self.cfg.default_priority),
            p if levels == 0 || p <= levels => Ok(if levels == 0 { 0 } else { p }),
            p => Err(ServerError::invalid(format!(
                "priority {p} is outside 1..={levels} for this model"
            ))),
        }
    }
}

struct BatcherTask {
    /// Precise wake-ups (tokio's timer has millisecond granularity, batch delays are
    /// often 100 us); `None` if the thread could not start: tokio's timer then.
    timer: Option<std::sync::mpsc::Sender<Option<Instant>>>,
    armed: Option<Instant>,
    cfg: BatcherConfig,
    runners: Vec<Arc<dyn Runner>>,
    idle: Vec<usize>,
    queue: Queue,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// Weak, so the task ends once the [`Batcher`] handle is dropped.
    tx: mpsc::WeakUnboundedSender<Msg>,
    /// One thread per worker (`None`: run on tokio's blocking pool instead).
    workers: Vec<Option<std::sync::mpsc::Sender<(exec::Job, u64)>>>,
    stats: Arc<ModelStats>,
    next_seq: u64,
    next_deliver: u64,
    held: BTreeMap<u64, Vec<(Reply, Result<NamedTensors>)>>,
}

impl BatcherTask {
    async fn run(mut self) {
        loop {
            let wake = self.next_wake();
            let msg = match (&self.timer, wake) {
                (Some(timer), _) => {
                    if wake != self.armed {
                        let _ = timer.send(wake);
                        self.armed = wake;
                    }
                    self.rx.recv().await.map(Some)
                }
                (None, Some(at)) => tokio::select! {
                    m = self.rx.recv() => m.map(Some),
                    _ = tokio::time::sleep_until(at.into()) => Some(None),
                },
                (None, None) => self.rx.recv().await.map(Some),
            };
            let Some(msg) = msg else { break };
            if let Some(m) = msg {
                self.handle(m);
            }
            // Take everything already waiting before deciding: bigger batches under load.
            while let Ok(m) = self.rx.try_recv() {
                self.handle(m);
            }
            self.expire();
            self.dispatch();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Enqueue(level, work) => self.queue.push(level, work),
            Msg::Tick => self.armed = None,
            Msg::Done {
                instance,
                seq,
                held,
            } => {
                self.idle.push(instance);
                if self.cfg.preserve_ordering {
                    self.held.insert(seq, held);
                    while let Some(ready) = self.held.remove(&self.next_deliver) {
                        for (reply, result) in ready {
                            let _ = reply.send(result);
                        }
                        self.next_deliver += 1;
                    }
                }
            }
        }
    }

    /// When the task must wake without a message: batch delay or a request timeout.
    fn next_wake(&self) -> Option<Instant> {
        let delay = match (self.idle.is_empty(), self.queue.head_enqueued()) {
            (false, Some(t)) => Some(t + self.cfg.max_queue_delay),
            _ => None,
        };
        match (delay, self.queue.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        // Cheap scan first: rebuilding the queue only when something did time out.
        match self.queue.next_deadline() {
            Some(d) if d <= now => {}
            _ => return,
        }
        let gone = self.queue.expire(now, self.cfg.timeout_action);
        self.stats
            .pending
            .fetch_sub(gone.len() as i64, Ordering::AcqRel);
        for w in gone {
            let _ = w.reply.send(Err(ServerError::Timeout(
                "request timeout expired while queued; raise the timeout or add instances".into(),
            )));
        }
    }

    /// Starts batches while instances are idle and the batching rules say go.
    fn dispatch(&mut self) {
        while !self.idle.is_empty() && !self.queue.is_empty() {
            let Some(limit) = self.batch_rows() else {
                return;
            };
            let works = self.queue.take(limit);
            self.stats
                .pending
                .fetch_sub(works.len() as i64, Ordering::AcqRel);
            // Clients that went away need no compute.
            let works: Vec<Work> = works.into_iter().filter(|w| !w.reply.is_closed()).collect();
            if works.is_empty() {
                continue;
            }
            let Some(instance) = self.idle.pop() else {
                return;
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            let Some(runner) = self.runners.get(instance).cloned() else {
                return;
            };
            let job = exec::Job {
                runner,
                works,
                stats: self.stats.clone(),
                hold_replies: self.cfg.preserve_ordering,
            };
            match self.workers.get(instance) {
                Some(Some(worker)) => {
                    let _ = worker.send((job, seq));
                }
                _ => {
                    let tx = self.tx.clone();
                    tokio::task::spawn_blocking(move || {
                        exec::run_and_report(job, instance, seq, &tx)
                    });
                }
            }
        }
    }

    /// Rows to take now, or `None` to keep waiting for more requests.
    fn batch_rows(&self) -> Option<usize> {
        let max = self.cfg.max_batch_size;
        let rows = self.queue.candidate_rows(max);
        if rows >= max {
            return Some(max);
        }
        let waited = self
            .queue
            .head_enqueued()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        if waited >= self.cfg.max_queue_delay {
            return Some(max);
        }
        // A preferred size that can be formed now goes at once.
        self.cfg
            .preferred_batch_sizes
            .iter()
            .rev()
            .find(|&&p| p <= rows)
            .copied()
    }
}

#[cfg(test)]
mod tests;
