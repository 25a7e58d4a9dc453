//! One loaded model version: its runners behind a batcher, its specs and statistics,
//! and the protocol-independent request validation.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_engine::{NamedTensors, Runner, TensorSpec};

use crate::batcher::{Batcher, BatcherConfig};
use crate::config::ModelConfig;
use crate::error::{Result, ServerError};
use crate::factory::{ModelContext, RunnerFactory};
use crate::image::ImageAdapter;
use crate::stats::ModelStats;
use crate::tensor_io::kserve_datatype;

/// A protocol-independent inference request.
#[derive(Debug, Default)]
pub struct InferRequest {
    pub id: String,
    pub inputs: NamedTensors,
    /// Outputs to return, in this order (None: all, in the model's order).
    pub outputs: Option<Vec<String>>,
    /// 0: the model's default priority level.
    pub priority: u64,
    pub timeout: Option<Duration>,
    /// Encoded images from a KServe BYTES input, decoded and preprocessed by the model's
    /// image adapter into `inputs` before the request is queued.
    pub encoded_images: Vec<bytes::Bytes>,
    /// Timestamps of a traced request (Triton's trace extension), marked by the batcher.
    pub trace: Option<Arc<crate::trace::Stamps>>,
}

/// A model version ready to serve.
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub config: ModelConfig,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub device: String,
    /// Instances as configured (`instance_group`): one runner each.
    pub instances: usize,
    /// Batcher workers: each instance's runner [`Runner::concurrency`] times.
    pub workers: usize,
    pub stats: Arc<ModelStats>,
    /// Pre/post-processing for the image endpoints, if the architecture has it.
    pub images: Option<Arc<dyn ImageAdapter>>,
    batcher: Batcher,
}

/// Runners built (blocking work) but not yet attached to a batcher.
pub struct BuiltRunners {
    runners: Vec<Arc<dyn Runner>>,
    images: Option<Arc<dyn ImageAdapter>>,
}

impl LoadedModel {
    /// Builds one runner per instance (per listed GPU). Blocking: weights load here.
    pub fn build_runners(
        name: &str,
        version: u64,
        dir: &Path,
        config: &ModelConfig,
        factory: &dyn RunnerFactory,
    ) -> Result<BuiltRunners> {
        let gpus: Vec<Option<i32>> = match config.instance_group.gpus.as_slice() {
            [] => vec![None],
            g => g.iter().map(|&x| Some(x)).collect(),
        };
        let mut runners = Vec::new();
        for gpu in gpus {
            for _ in 0..config.instance_group.count {
                let ctx = ModelContext {
                    name,
                    version,
                    version_dir: dir,
                    config,
                    instance: runners.len(),
                    gpu,
                };
                let r = factory.create(&ctx).map_err(|e| {
                    ServerError::invalid(format!("failed to load '{name}' version {version}: {e}"))
                })?;
                runners.push(r);
            }
        }
        Ok(BuiltRunners {
            runners,
            images: factory.image_adapter(&config.architecture),
        })
    }

    /// Attaches built runners to a new batcher: each instance gets as many workers as
    /// its runner takes concurrent calls (a GPU runner overlaps one batch's upload with
    /// another's replay), all sharing that one runner. Must run inside the tokio runtime.
    pub fn start(
        name: &str,
        version: u64,
        config: ModelConfig,
        built: BuiltRunners,
    ) -> Result<Self> {
        let first = built
            .runners
            .first()
            .ok_or_else(|| ServerError::invalid(format!("model '{name}' has no instances")))?;
        let inputs = first.inputs();
        let outputs = first.outputs();
        let device = first.device();
        let cfg = BatcherConfig::from_model(&config, first.max_batch_size());
        let stats = Arc::new(ModelStats::default());
        let instances = built.runners.len();
        let images = built.images;
        let runners = workers(&built.runners);
        let workers = runners.len();
        tracing::info!(model = %name, version, instances, workers, device = %device, "batcher started");
        let batcher = Batcher::spawn(runners, cfg, stats.clone());
        Ok(Self {
            name: name.to_string(),
            version,
            config,
            inputs,
            outputs,
            device,
            instances,
            workers,
            stats,
            images,
            batcher,
        })
    }

    pub fn max_batch_size(&self) -> usize {
        self.batcher.config().max_batch_size
    }

    pub fn batcher_config(&self) -> &BatcherConfig {
        self.batcher.config()
    }

    /// Checks names, datatypes and shapes against the model; returns the inputs in the
    /// model's order and the batch size.
    pub fn validate(&self, mut given: NamedTensors) -> Result<(NamedTensors, usize)> {
        if given.len() != self.inputs.len() {
            return Err(ServerError::invalid(format!(
                "expected {} inputs but got {} inputs for model '{}' (inputs: {})",
                self.inputs.len(),
                given.len(),
                self.name,
                self.inputs
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        let mut rows = None;
        for spec in &self.inputs {
            let pos = given
                .iter()
                .position(|(n, _)| n == &spec.name)
                .ok_or_else(|| {
                    ServerError::invalid(format!(
                        "input '{}' is missing for model '{}'",
                        spec.name, self.name
                    ))
                })?;
            let (name, t) = given.swap_remove(pos);
            if t.dtype() != spec.dtype {
                return Err(ServerError::invalid(format!(
                    "inference input '{name}' data-type is '{}', but model '{}' expects '{}'",
                    kserve_datatype(t.dtype()),
                    self.name,
                    kserve_datatype(spec.dtype)
                )));
            }
            let shape = t.shape();
            let ok = shape.len() == spec.shape.len() + 1
                && spec
                    .shape
                    .iter()
                    .zip(&shape[1..])
                    .all(|(&want, &got)| want < 0 || want as usize == got);
            if !ok {
                let mut expected = vec![-1i64];
                expected.extend(&spec.shape);
                return Err(ServerError::invalid(format!(
                    "unexpected shape for input '{name}' for model '{}'. Expected {expected:?}, got {shape:?}",
                    self.name
                )));
            }
            let n = shape[0];
            if *rows.get_or_insert(n) != n {
                return Err(ServerError::invalid(format!(
                    "input '{name}' has batch size {n} but other inputs have {}",
                    rows.unwrap_or(0)
                )));
            }
            ordered.push((name, t));
        }
        let rows = rows.unwrap_or(0);
        if rows == 0 || rows > self.max_batch_size() {
            return Err(ServerError::invalid(format!(
                "inference request batch-size must be <= {} for '{}', got {rows}",
                self.max_batch_size(),
                self.name
            )));
        }
        Ok((ordered, rows))
    }

    /// Checks requested output names before any work is done.
    pub fn check_outputs(&self, wanted: Option<&[String]>) -> Result<()> {
        let wanted = wanted.unwrap_or(&[]);
        for (i, w) in wanted.iter().enumerate() {
            if wanted[..i].contains(w) {
                return Err(ServerError::invalid(format!(
                    "output '{w}' is requested twice"
                )));
            }
            if !self.outputs.iter().any(|o| &o.name == w) {
                return Err(ServerError::invalid(format!(
                    "unexpected inference output '{w}' for model '{}'",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// Validates, queues, waits; records success/failure statistics.
    pub async fn infer(&self, req: InferRequest) -> Result<NamedTensors> {
        let start = Instant::now();
        let result = self.infer_inner(req).await;
        match &result {
            Ok(_) => self.stats.record_success(start.elapsed()),
            Err(_) => self.stats.record_failure(start.elapsed()),
        }
        result
    }

    async fn infer_inner(&self, req: InferRequest) -> Result<NamedTensors> {
        self.check_outputs(req.outputs.as_deref())?;
        let (inputs, rows) = self.validate(req.inputs)?;
        let mut outputs = self
            .batcher
            .submit_traced(inputs, rows, req.priority, req.timeout, req.trace)
            .await?;
        match req.outputs {
            None => Ok(outputs),
            Some(wanted) => wanted
                .iter()
                .map(|w| {
                    let pos = outputs.iter().position(|(n, _)| n == w).ok_or_else(|| {
                        ServerError::Internal(format!(
                            "model '{}' did not produce output '{w}'",
                            self.name
                        ))
                    })?;
                    Ok(outputs.swap_remove(pos))
                })
                .collect(),
        }
    }
}

/// Most workers one instance gets, whatever its runner claims.
const MAX_WORKERS_PER_INSTANCE: usize = 8;

/// The batcher's workers: each instance's runner, shared, [`Runner::concurrency`] times.
fn workers(runners: &[Arc<dyn Runner>]) -> Vec<Arc<dyn Runner>> {
    runners
        .iter()
        .flat_map(|r| {
            let n = r.concurrency().clamp(1, MAX_WORKERS_PER_INSTANCE);
            std::iter::repeat_n(r.clone(), n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::factory::ArchitectureRegistry;
    use aperture_engine::{DType, HostTensor};

    fn t(shape: &[usize]) -> HostTensor {
        HostTensor::from_f32(shape.to_vec(), vec![1.0; shape.iter().product()]).unwrap()
    }

    fn add_sub() -> LoadedModel {
        let mut cfg = ModelConfig::with_architecture("add_sub");
        cfg.max_batch_size = 4;
        cfg.input_size = Some(vec![3]);
        let reg = ArchitectureRegistry::with_builtins();
        let built = LoadedModel::build_runners("m", 1, Path::new("."), &cfg, &reg).unwrap();
        LoadedModel::start("m", 1, cfg, built).unwrap()
    }

    fn err(m: &LoadedModel, inputs: NamedTensors) -> String {
        let e = m.validate(inputs).unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        e.to_string()
    }

    #[tokio::test]
    async fn validation_names_the_problem() {
        let m = add_sub();
        let ok = m.validate(vec![
            ("INPUT1".into(), t(&[2, 3])),
            ("INPUT0".into(), t(&[2, 3])),
        ]);
        let (ordered, rows) = ok.unwrap();
        assert_eq!(rows, 2);
        assert_eq!(ordered[0].0, "INPUT0");
        assert!(err(&m, vec![("INPUT0".into(), t(&[1, 3]))]).contains("expected 2 inputs"));
        assert!(err(
            &m,
            vec![("INPUT0".into(), t(&[1, 3])), ("X".into(), t(&[1, 3]))]
        )
        .contains("'INPUT1' is missing"));
        assert!(err(
            &m,
            vec![("INPUT0".into(), t(&[1, 4])), ("INPUT1".into(), t(&[1, 4]))]
        )
        .contains("Expected [-1, 3]"));
        assert!(err(
            &m,
            vec![("INPUT0".into(), t(&[1, 3])), ("INPUT1".into(), t(&[2, 3]))]
        )
        .contains("batch size"));
        assert!(err(
            &m,
            vec![("INPUT0".into(), t(&[5, 3])), ("INPUT1".into(), t(&[5, 3]))]
        )
        .contains("<= 4"));
        let half = t(&[1, 3]).to_dtype(DType::F16);
        assert!(err(
            &m,
            vec![("INPUT0".into(), half), ("INPUT1".into(), t(&[1, 3]))]
        )
        .contains("'FP16'"));
        assert!(m
            .check_outputs(Some(&["OUTPUT1".into(), "OUTPUT1".into()]))
            .is_err());
        assert!(m.check_outputs(Some(&["NOPE".into()])).is_err());
        assert!(m
            .check_outputs(Some(&["OUTPUT1".into(), "OUTPUT0".into()]))
            .is_ok());
    }

    #[tokio::test]
    async fn requested_outputs_come_back_in_request_order() {
        let m = add_sub();
        let req = InferRequest {
            inputs: vec![("INPUT0".into(), t(&[1, 3])), ("INPUT1".into(), t(&[1, 3]))],
            outputs: Some(vec!["OUTPUT1".into(), "OUTPUT0".into()]),
            ..Default::default()
        };
        let out = m.infer(req).await.unwrap();
        assert_eq!(out[0].0, "OUTPUT1");
        assert_eq!(out[0].1.to_f32_vec(), vec![0.0; 3]);
        assert_eq!(out[1].1.to_f32_vec(), vec![2.0; 3]);
        assert_eq!(m.stats.snapshot().success.count, 1);
    }

    /// Counts `infer` calls in flight; each call waits (at most `hold`) until `want`
    /// calls are in flight at once, so a missing worker shows as a lower peak, never
    /// as a hang.
    struct Gate {
        /// (in flight now, most in flight at once)
        state: std::sync::Mutex<(usize, usize)>,
        changed: std::sync::Condvar,
        want: usize,
        hold: Duration,
    }

    impl Gate {
        fn new(want: usize, hold: Duration) -> Arc<Self> {
            Arc::new(Self {
                state: std::sync::Mutex::new((0, 0)),
                changed: std::sync::Condvar::new(),
                want,
                hold,
            })
        }

        fn pass(&self) {
            let mut s = self.state.lock().unwrap();
            s.0 += 1;
            s.1 = s.1.max(s.0);
            self.changed.notify_all();
            let (mut s, _) = self
                .changed
                .wait_timeout_while(s, self.hold, |s| s.1 < self.want)
                .unwrap();
            s.0 -= 1;
        }

        fn peak(&self) -> usize {
            self.state.lock().unwrap().1
        }
    }

    /// An identity model of one F32 value per item, one item per batch, that passes
    /// every call through a [`Gate`] and says it takes `concurrency` calls at once.
    struct GatedRunner {
        concurrency: usize,
        gate: Arc<Gate>,
    }

    impl Runner for GatedRunner {
        fn architecture(&self) -> &str {
            "gated"
        }
        fn device(&self) -> String {
            "test".into()
        }
        fn inputs(&self) -> Vec<TensorSpec> {
            vec![TensorSpec::new("INPUT0", DType::F32, &[1])]
        }
        fn outputs(&self) -> Vec<TensorSpec> {
            vec![TensorSpec::new("OUTPUT0", DType::F32, &[1])]
        }
        fn max_batch_size(&self) -> usize {
            1
        }
        fn concurrency(&self) -> usize {
            self.concurrency
        }
        fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
            self.gate.pass();
            Ok(vec![("OUTPUT0".into(), inputs[0].1.clone())])
        }
    }

    /// A model of `count` instances of [`GatedRunner`]s; also the instance indices the
    /// factory was asked for.
    fn gated(
        concurrency: usize,
        count: usize,
        gate: &Arc<Gate>,
    ) -> (LoadedModel, Arc<std::sync::Mutex<Vec<usize>>>) {
        let built_for = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reg = ArchitectureRegistry::empty();
        let (g, seen) = (gate.clone(), built_for.clone());
        reg.register("gated", move |ctx: &ModelContext| {
            seen.lock().unwrap().push(ctx.instance);
            let r: Arc<dyn Runner> = Arc::new(GatedRunner {
                concurrency,
                gate: g.clone(),
            });
            Ok(r)
        });
        let mut cfg = ModelConfig::with_architecture("gated");
        cfg.max_batch_size = 1;
        cfg.instance_group.count = count;
        let built = LoadedModel::build_runners("g", 1, Path::new("."), &cfg, &reg).unwrap();
        (LoadedModel::start("g", 1, cfg, built).unwrap(), built_for)
    }

    /// Sends `n` one-item requests at once; checks each answer is its own input.
    async fn burst(m: &Arc<LoadedModel>, n: usize) {
        let calls = (0..n).map(|i| {
            let m = m.clone();
            tokio::spawn(async move {
                let req = InferRequest {
                    inputs: vec![(
                        "INPUT0".into(),
                        HostTensor::from_f32(vec![1, 1], vec![i as f32]).unwrap(),
                    )],
                    ..Default::default()
                };
                (i, m.infer(req).await)
            })
        });
        let all = join_all(calls.collect()).await;
        for (i, out) in all {
            let out = out.unwrap();
            assert_eq!(out[0].1.to_f32_vec(), vec![i as f32], "request {i}");
        }
    }

    /// Every task's result, none waited for longer than 30 s.
    async fn join_all(
        tasks: Vec<tokio::task::JoinHandle<(usize, Result<NamedTensors>)>>,
    ) -> Vec<(usize, Result<NamedTensors>)> {
        let mut out = Vec::new();
        for task in tasks {
            let done = tokio::time::timeout(Duration::from_secs(30), task).await;
            out.push(done.expect("a request did not finish").unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_of_concurrency_two_gets_two_calls_at_once_on_one_instance() {
        let gate = Gate::new(2, Duration::from_secs(10));
        let (m, built_for) = gated(2, 1, &gate);
        assert_eq!((m.instances, m.workers), (1, 2));
        assert_eq!(*built_for.lock().unwrap(), vec![0], "one runner built");
        let m = Arc::new(m);
        let started = Instant::now();
        burst(&m, 2).await;
        assert_eq!(gate.peak(), 2, "the second call did not overlap the first");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the calls met only after the gate's timeout"
        );
        assert_eq!(m.stats.snapshot().execution_count, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_of_concurrency_one_never_gets_two_calls_at_once() {
        let gate = Gate::new(2, Duration::from_millis(150));
        let (m, _) = gated(1, 1, &gate);
        assert_eq!((m.instances, m.workers), (1, 1));
        burst(&Arc::new(m), 3).await;
        assert_eq!(gate.peak(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_count_as_configured_whatever_the_workers() {
        let gate = Gate::new(1, Duration::ZERO);
        let (m, built_for) = gated(2, 3, &gate);
        assert_eq!((m.instances, m.workers), (3, 6));
        assert_eq!(*built_for.lock().unwrap(), vec![0, 1, 2]);
        let (m, _) = gated(1000, 1, &gate);
        assert_eq!(m.workers, MAX_WORKERS_PER_INSTANCE, "workers are capped");
        let (m, _) = gated(0, 1, &gate);
        assert_eq!(m.workers, 1, "a runner always gets a worker");
    }
}
