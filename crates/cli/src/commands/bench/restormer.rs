//! Restormer in the bench: loading (a file, a folder or random weights of a named
//! configuration), the model as the sweep runs it, and the parity checks of `--check`.

use anyhow::{bail, Context};
use aperture_cuda::{selftest, CudaBackend, CudaTensor, GraphCache};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, Backend, EngineError, HostTensor, Precision};
use aperture_models::restormer::{load_restormer, random_state_dict, Restormer, RestormerConfig};
use aperture_weights::StateDict;

use super::sweep::{self, first_output_error, Accuracy, BenchModel, Staged};
use super::{measure, BenchArgs, Outcome};

fn load_model(args: &BenchArgs) -> anyhow::Result<(String, RestormerConfig, StateDict)> {
    if let Some(path) = &args.model {
        let (cfg, sd) =
            load_restormer(path).with_context(|| format!("loading {}", path.display()))?;
        return Ok((format!("restormer ({})", super::label(path)), cfg, sd));
    }
    match args.demo_config.as_deref().unwrap_or("base") {
        "base" => {
            let cfg = RestormerConfig::default();
            let sd = random_state_dict(&cfg, args.seed)?;
            Ok(("restormer-base (random weights)".into(), cfg, sd))
        }
        other => bail!("unknown --demo-config '{other}' (known: base)"),
    }
}

/// Restormer prepared on a backend.
struct RestormerBench<B: Backend> {
    be: B,
    model: Restormer<B>,
    dry_plan: bool,
}

impl<B: Backend> RestormerBench<B>
where
    B::Tensor: 'static,
{
    fn new(be: B, cfg: &RestormerConfig, sd: &StateDict, dry_plan: bool) -> anyhow::Result<Self> {
        let model = Restormer::prepare(&be, cfg.clone(), sd)?;
        Ok(Self {
            be,
            model,
            dry_plan,
        })
    }

    fn eager(&self, x: &HostTensor) -> anyhow::Result<Staged<'_>> {
        let t = self.be.upload_nchw(x)?;
        let y = self.model.forward(&self.be, &t)?;
        Ok(Staged {
            outputs: vec![self.be.download_nchw(&y)?],
            run: Box::new(move || {
                self.model.forward(&self.be, &t)?;
                Ok(())
            }),
            memory: None,
        })
    }
}

impl BenchModel for RestormerBench<CpuBackend> {
    fn gpu(&self) -> Option<&CudaBackend> {
        None
    }

    fn stage(&self, x: &HostTensor, _graph: bool) -> anyhow::Result<Staged<'_>> {
        self.eager(x)
    }

    fn compare(&self, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
        first_output_error(got, want)
    }
}

impl BenchModel for RestormerBench<CudaBackend> {
    fn gpu(&self) -> Option<&CudaBackend> {
        Some(&self.be)
    }

    fn stage(&self, x: &HostTensor, graph: bool) -> anyhow::Result<Staged<'_>> {
        if !graph {
            return self.eager(x);
        }
        let cache = if self.dry_plan {
            GraphCache::dry_planned()
        } else {
            GraphCache::new()
        };
        let fwd =
            |b: &CudaBackend, t: &CudaTensor| self.model.forward(b, t).map_err(EngineError::from);
        // The first infer captures the graph and leaves real data in its input.
        let y = cache.infer(&self.be, x, fwd)?;
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let memory = cache.arena_size(x.shape()).map(|a| {
            format!(
                "activation block {:.2} GiB (live-set bound {:.2} GiB)",
                gib(a.planned),
                gib(a.live_peak)
            )
        });
        let shape = x.shape().to_vec();
        Ok(Staged {
            outputs: vec![y],
            run: Box::new(move || Ok(cache.replay(&self.be, &shape)?)),
            memory,
        })
    }

    fn compare(&self, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
        first_output_error(got, want)
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<Outcome> {
    let (name, cfg, sd) = load_model(args)?;
    let (h, w) = args.dims(512, 512);
    let mut failures = 0usize;
    if args.check {
        failures += check(args, &cfg, &sd, (h, w))?;
    }
    let rows = measure(
        args,
        (cfg.inp_channels, h, w),
        || RestormerBench::new(CpuBackend::new(), &cfg, &sd, false),
        |p| {
            let be = CudaBackend::new(args.gpu, p).context("opening the GPU")?;
            RestormerBench::new(be, &cfg, &sd, args.dry_plan)
        },
    )?;
    Ok(Outcome {
        model: format!("{name} {h}x{w}"),
        rows,
        failures,
    })
}

fn cpu_forward(
    cfg: &RestormerConfig,
    sd: &StateDict,
    x: &HostTensor,
) -> anyhow::Result<HostTensor> {
    let cpu = CpuBackend::new();
    let model = Restormer::prepare(&cpu, cfg.clone(), sd)?;
    let t = cpu.upload_nchw(x)?;
    Ok(cpu.download_nchw(&model.forward(&cpu, &t)?)?)
}

/// Parity: ops against the CPU backend, then the model against the CPU backend and the
/// given references. Returns the number of failures.
fn check(
    args: &BenchArgs,
    cfg: &RestormerConfig,
    sd: &StateDict,
    (h, w): (usize, usize),
) -> anyhow::Result<usize> {
    let mut failures = 0;
    let mut inputs: Vec<(String, HostTensor, Option<HostTensor>)> = Vec::new();
    for path in &args.reference {
        let io =
            aperture_weights::load(path).with_context(|| format!("loading {}", path.display()))?;
        let x = io
            .get("x")
            .context("reference file has no tensor 'x'")?
            .to_f32();
        let y = io
            .get("y")
            .context("reference file has no tensor 'y'")?
            .to_f32();
        inputs.push((format!("{}", path.display()), x, Some(y)));
    }
    if inputs.is_empty() {
        inputs.push((
            format!("random {h}x{w}"),
            sweep::input(1, (cfg.inp_channels, h, w), args.seed + 1)?,
            None,
        ));
    }
    println!(
        "{:<52} {:>6} {:>12} {:>10}  result",
        "parity case", "prec", "rel L2", "tolerance"
    );
    let mut cpu_out = Vec::new();
    for (name, x, _) in &inputs {
        eprintln!("CPU backend on {name}...");
        cpu_out.push(cpu_forward(cfg, sd, x)?);
    }
    for &p in &args.precision {
        let be = CudaBackend::new(args.gpu, p).context("opening the GPU")?;
        for row in selftest::op_parity(&be, args.seed + 17)? {
            failures += print_check(&row.case, p, row.rel_l2, row.tolerance);
        }
        let model = Restormer::prepare(&be, cfg.clone(), sd)?;
        let tol = selftest::model_tolerance(p);
        let fwd = |b: &CudaBackend, x: &CudaTensor| model.forward(b, x).map_err(EngineError::from);
        for ((name, x, y), cpu) in inputs.iter().zip(&cpu_out) {
            // Eager with poisoned outputs, then through a captured graph.
            be.set_poison(true);
            let t = be.upload_nchw(x)?;
            let eager = be.download_nchw(&model.forward(&be, &t)?)?;
            be.set_poison(false);
            let cache = GraphCache::new();
            let graph = cache.infer(&be, x, fwd)?;
            let replay = cache.infer(&be, x, fwd)?;
            let short = name
                .rsplit('/')
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("/");
            let cpu = cpu.to_f32_vec();
            let graph = graph.to_f32_vec();
            let cases = [
                (
                    format!("model eager vs CPU ({short})"),
                    relative_l2(&eager.to_f32_vec(), &cpu),
                ),
                (
                    format!("model graph vs CPU ({short})"),
                    relative_l2(&graph, &cpu),
                ),
                // Replays differ only by the order of atomic additions (norms),
                // amplified by the network; a race would show far above that.
                (
                    format!("graph replay vs replay ({short})"),
                    relative_l2(&replay.to_f32_vec(), &graph),
                ),
            ];
            for (case, rel) in cases {
                failures += print_check(&case, p, rel, tol);
            }
            if let Some(y) = y {
                failures += print_check(
                    &format!("model vs PyTorch ({short})"),
                    p,
                    relative_l2(&graph, &y.to_f32_vec()),
                    tol,
                );
            }
        }
    }
    Ok(failures)
}

fn print_check(case: &str, p: Precision, rel: f64, tol: f64) -> usize {
    let ok = rel <= tol;
    println!(
        "{case:<52} {:>6} {rel:>12.3e} {tol:>10.1e}  {}",
        p.as_str(),
        if ok { "ok" } else { "FAIL" }
    );
    usize::from(!ok)
}
