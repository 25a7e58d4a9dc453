//! The batcher's queue: priority levels, timeouts, and which requests may share a batch.
//! Pure data structure (no async), owned by the batcher task alone.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use aperture_engine::NamedTensors;
use tokio::sync::oneshot;

use crate::config::TimeoutAction;
use crate::error::Result;

/// Where a request's answer goes.
pub type Reply = oneshot::Sender<Result<NamedTensors>>;

/// One queued request.
pub struct Work {
    /// Inputs in the runner's input order, each with `rows` along axis 0.
    pub inputs: NamedTensors,
    pub rows: usize,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub reply: Reply,
    /// Timestamps of a traced request.
    pub trace: Option<std::sync::Arc<crate::trace::Stamps>>,
}

impl Work {
    /// Requests batch together only if every input agrees on the non-batch dims.
    fn compatible(&self, other: &Work) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|((_, a), (_, b))| {
                    a.shape().get(1..) == b.shape().get(1..) && a.dtype() == b.dtype()
                })
    }
}

/// Priority level for requests delayed past their timeout (served after all others).
const DELAYED_LEVEL: u64 = u64::MAX;

/// Requests by priority level (lower number first), FIFO within a level.
#[derive(Default)]
pub struct Queue {
    levels: BTreeMap<u64, VecDeque<Work>>,
    len: usize,
}

impl Queue {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, level: u64, work: Work) {
        self.levels.entry(level).or_default().push_back(work);
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = &Work> {
        self.levels.values().flat_map(|q| q.iter())
    }

    fn head(&self) -> Option<&Work> {
        self.iter().next()
    }

    /// Enqueue time of the request that would lead the next batch.
    pub fn head_enqueued(&self) -> Option<Instant> {
        self.head().map(|w| w.enqueued)
    }

    /// Earliest timeout among queued requests.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.iter().filter_map(|w| w.deadline).min()
    }

    /// Removes requests whose deadline passed: returned for rejection (REJECT), or moved
    /// behind everything else without a deadline (DELAY).
    pub fn expire(&mut self, now: Instant, action: TimeoutAction) -> Vec<Work> {
        let mut expired = Vec::new();
        for q in self.levels.values_mut() {
            let mut keep = VecDeque::with_capacity(q.len());
            for w in q.drain(..) {
                if w.deadline.is_some_and(|d| d <= now) {
                    expired.push(w);
                } else {
                    keep.push_back(w);
                }
            }
            *q = keep;
        }
        self.len -= expired.len();
        if action == TimeoutAction::Delay {
            for mut w in expired.drain(..) {
                w.deadline = None;
                self.push(DELAYED_LEVEL, w);
            }
        }
        self.levels.retain(|_, q| !q.is_empty());
        expired
    }

    /// Rows the next batch could hold now: the head and the compatible requests that
    /// follow it in order, stopping at `max_rows`.
    pub fn candidate_rows(&self, max_rows: usize) -> usize {
        let Some(head) = self.head() else { return 0 };
        let mut rows = 0;
        for w in self.iter() {
            if !head.compatible(w) || rows + w.rows > max_rows {
                break;
            }
            rows += w.rows;
        }
        rows
    }

    /// Takes the requests of the next batch, up to `max_rows` rows (the head always).
    pub fn take(&mut self, max_rows: usize) -> Vec<Work> {
        let mut out: Vec<Work> = Vec::new();
        let mut rows = 0;
        'levels: for q in self.levels.values_mut() {
            while let Some(w) = q.front() {
                let fits = match out.first() {
                    None => true,
                    Some(h) => h.compatible(w) && rows + w.rows <= max_rows,
                };
                if !fits {
                    break 'levels;
                }
                if let Some(w) = q.pop_front() {
                    rows += w.rows;
                    out.push(w);
                }
            }
        }
        self.len -= out.len();
        self.levels.retain(|_, q| !q.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_engine::HostTensor;
    use std::time::Duration;

    fn work(rows: usize, width: usize, deadline: Option<Instant>) -> Work {
        let (tx, _rx) = oneshot::channel();
        let t = HostTensor::from_f32(vec![rows, width], vec![0.0; rows * width]).unwrap();
        Work {
            inputs: vec![("x".into(), t)],
            rows,
            enqueued: Instant::now(),
            deadline,
            reply: tx,
            trace: None,
        }
    }

    #[test]
    fn priority_levels_come_first_and_shapes_split_batches() {
        let mut q = Queue::default();
        q.push(2, work(1, 4, None));
        q.push(1, work(2, 4, None));
        q.push(2, work(1, 5, None));
        assert_eq!(q.candidate_rows(8), 3);
        let b = q.take(8);
        assert_eq!(b.iter().map(|w| w.rows).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.take(8).len(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn take_respects_max_rows() {
        let mut q = Queue::default();
        for _ in 0..5 {
            q.push(0, work(2, 3, None));
        }
        assert_eq!(q.candidate_rows(5), 4);
        assert_eq!(q.take(5).len(), 2);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn expire_rejects_or_delays() {
        let past = Instant::now() - Duration::from_millis(1);
        let mut q = Queue::default();
        q.push(0, work(1, 1, Some(past)));
        q.push(0, work(1, 1, None));
        let gone = q.expire(Instant::now(), TimeoutAction::Reject);
        assert_eq!(gone.len(), 1);
        assert_eq!(q.len(), 1);

        q.push(0, work(1, 1, Some(past)));
        assert!(q.expire(Instant::now(), TimeoutAction::Delay).is_empty());
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_deadline(), None);
    }
}
