//! Batcher behaviour: answers reach their own requests, batches form, the queue bound
//! and timeouts hold, preferred sizes dispatch early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_engine::{DType, HostTensor, Runner};

use super::{Batcher, BatcherConfig};
use crate::builtin::IdentityRunner;
use crate::config::TimeoutAction;
use crate::error::ServerError;
use crate::stats::ModelStats;

fn cfg(max_batch: usize) -> BatcherConfig {
    BatcherConfig {
        max_batch_size: max_batch,
        preferred_batch_sizes: vec![],
        max_queue_delay: Duration::ZERO,
        preserve_ordering: false,
        priority_levels: 0,
        default_priority: 0,
        max_queue_size: 1024,
        default_timeout: None,
        timeout_action: TimeoutAction::Reject,
        allow_timeout_override: true,
    }
}

fn identity(delay_ms: u64) -> Vec<Arc<dyn Runner>> {
    vec![Arc::new(IdentityRunner::new(
        vec![4],
        DType::F32,
        Duration::from_millis(delay_ms),
    ))]
}

fn row(v: f32) -> Vec<(String, HostTensor)> {
    vec![(
        "INPUT0".into(),
        HostTensor::from_f32(vec![1, 4], vec![v, v + 0.25, v + 0.5, v + 0.75]).unwrap(),
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_their_own_answers_in_shared_batches() {
    let stats = Arc::new(ModelStats::default());
    let b = Arc::new(Batcher::spawn(identity(5), cfg(16), stats.clone()));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            (i, b.submit(row(i as f32), 1, 0, None).await)
        }));
    }
    for t in tasks {
        let (i, out) = t.await.unwrap();
        let out = out.unwrap();
        let v = i as f32;
        assert_eq!(out[0].0, "OUTPUT0");
        assert_eq!(
            out[0].1.to_f32_vec(),
            vec![v, v + 0.25, v + 0.5, v + 0.75],
            "request {i}"
        );
        assert_eq!(out[0].1.shape(), &[1, 4]);
    }
    let s = stats.snapshot();
    assert_eq!(s.inference_count, 64);
    assert!(
        s.execution_count < 64,
        "no batch larger than 1 formed: {} executions",
        s.execution_count
    );
    assert!(s.batches.keys().any(|&k| k > 1));
    assert!(s.batches.keys().all(|&k| k <= 16));
    assert_eq!(stats.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_requests_split_back_correctly() {
    let stats = Arc::new(ModelStats::default());
    let b = Arc::new(Batcher::spawn(identity(20), cfg(8), stats.clone()));
    let mut tasks = Vec::new();
    for i in 0..6usize {
        let b = b.clone();
        let rows = i % 3 + 1;
        let data: Vec<f32> = (0..rows * 4).map(|k| (i * 100 + k) as f32).collect();
        let t = HostTensor::from_f32(vec![rows, 4], data.clone()).unwrap();
        tasks.push(tokio::spawn(async move {
            (
                data,
                rows,
                b.submit(vec![("INPUT0".into(), t)], rows, 0, None).await,
            )
        }));
    }
    for t in tasks {
        let (data, rows, out) = t.await.unwrap();
        let out = out.unwrap();
        assert_eq!(out[0].1.shape(), &[rows, 4]);
        assert_eq!(out[0].1.to_f32_vec(), data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_and_recovers() {
    let stats = Arc::new(ModelStats::default());
    let mut c = cfg(1);
    c.max_queue_size = 2;
    let b = Arc::new(Batcher::spawn(identity(30), c, stats.clone()));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.submit(row(i as f32), 1, 0, None).await
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ServerError::QueueFull(m)) => {
                assert!(m.contains("maximum queue size"), "{m}");
                full += 1
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(full >= 10, "only {full} rejections");
    assert!(ok >= 2, "only {ok} served");
    assert_eq!(stats.pending(), 0);
    let out = b.submit(row(7.0), 1, 0, None).await.unwrap();
    assert_eq!(out[0].1.to_f32_vec()[0], 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_time_out() {
    let stats = Arc::new(ModelStats::default());
    let mut c = cfg(1);
    c.default_timeout = Some(Duration::from_millis(10));
    let b = Arc::new(Batcher::spawn(identity(60), c, stats.clone()));
    let first = {
        let b = b.clone();
        tokio::spawn(async move { b.submit(row(1.0), 1, 0, None).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = b.submit(row(2.0), 1, 0, None).await;
    assert!(matches!(second, Err(ServerError::Timeout(_))), "{second:?}");
    assert!(first.await.unwrap().is_ok());
    // A per-request override (allowed by the policy) lets a request wait longer.
    let third = {
        let b = b.clone();
        tokio::spawn(async move { b.submit(row(3.0), 1, 0, None).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fourth = b.submit(row(4.0), 1, 0, Some(Duration::from_secs(5))).await;
    assert!(fourth.is_ok(), "{fourth:?}");
    assert!(third.await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_size_dispatches_before_the_delay() {
    let stats = Arc::new(ModelStats::default());
    let mut c = cfg(8);
    c.preferred_batch_sizes = vec![4];
    c.max_queue_delay = Duration::from_secs(3);
    let b = Arc::new(Batcher::spawn(identity(0), c, stats.clone()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.submit(row(i as f32), 1, 0, None).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited for the delay: {:?}",
        start.elapsed()
    );
    assert_eq!(
        stats.snapshot().batches.keys().copied().collect::<Vec<_>>(),
        vec![4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_collects_a_batch_and_priorities_are_checked() {
    let stats = Arc::new(ModelStats::default());
    let mut c = cfg(8);
    c.max_queue_delay = Duration::from_millis(50);
    c.priority_levels = 2;
    c.default_priority = 2;
    c.preserve_ordering = true;
    let b = Arc::new(Batcher::spawn(identity(0), c, stats.clone()));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.submit(row(i as f32), 1, (i % 2) as u64 + 1, None).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        stats.snapshot().execution_count,
        1,
        "the delay should gather all three"
    );
    let err = b.submit(row(0.0), 1, 3, None).await.unwrap_err();
    assert!(err.to_string().contains("priority 3"), "{err}");
}

struct Panicky;

impl Runner for Panicky {
    fn architecture(&self) -> &str {
        "panicky"
    }
    fn device(&self) -> String {
        "cpu".into()
    }
    fn inputs(&self) -> Vec<aperture_engine::TensorSpec> {
        vec![aperture_engine::TensorSpec::new("INPUT0", DType::F32, &[4])]
    }
    fn outputs(&self) -> Vec<aperture_engine::TensorSpec> {
        self.inputs()
    }
    fn max_batch_size(&self) -> usize {
        0
    }
    fn infer(
        &self,
        inputs: &aperture_engine::NamedTensors,
    ) -> aperture_engine::Result<aperture_engine::NamedTensors> {
        if inputs[0].1.to_f32_vec()[0] < 0.0 {
            panic!("negative input");
        }
        Ok(inputs.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_runner_fails_the_batch_but_keeps_serving() {
    let stats = Arc::new(ModelStats::default());
    let b = Batcher::spawn(vec![Arc::new(Panicky)], cfg(4), stats);
    for _ in 0..3 {
        let err = b.submit(row(-1.0), 1, 0, None).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
    }
    let out = b.submit(row(2.0), 1, 0, None).await.unwrap();
    assert_eq!(out[0].1.to_f32_vec()[0], 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_batcher_releases_the_model() {
    let runner: Arc<dyn Runner> =
        Arc::new(IdentityRunner::new(vec![4], DType::F32, Duration::ZERO));
    let weak = Arc::downgrade(&runner);
    let b = Batcher::spawn(vec![runner], cfg(4), Arc::new(ModelStats::default()));
    b.submit(row(1.0), 1, 0, None).await.unwrap();
    drop(b);
    for _ in 0..100 {
        if weak.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the batcher task still holds the runner after its handle was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traced_requests_get_queue_and_compute_timestamps_in_order() {
    let stats = Arc::new(ModelStats::default());
    let b = Batcher::spawn(identity(2), cfg(4), stats);
    let stamps = Arc::new(crate::trace::Stamps::default());
    let out = b
        .submit_traced(row(3.0), 1, 0, None, Some(stamps.clone()))
        .await
        .unwrap();
    assert_eq!(out[0].1.to_f32_vec()[0], 3.0);
    let marks = stamps.in_order();
    let names: Vec<&str> = marks.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "QUEUE_START",
            "COMPUTE_START",
            "COMPUTE_INPUT_END",
            "COMPUTE_OUTPUT_START",
            "COMPUTE_END"
        ]
    );
    // The runner sleeps 2 ms: the model's phase holds it.
    let span = |a: usize, b: usize| marks[b].1.duration_since(marks[a].1);
    assert!(span(2, 3) >= Duration::from_millis(2), "{:?}", span(2, 3));
}
