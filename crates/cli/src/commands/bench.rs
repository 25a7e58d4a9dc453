//! `aperture bench`: latency and throughput of a Restormer per (precision, batch) on the
//! CPU or a GPU, with optional parity checks (`--check`) and a per-operation profile.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use aperture_cuda::{selftest, CudaBackend, CudaTensor, GraphCache};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, Backend, EngineError, HostTensor, Precision};
use aperture_models::restormer::{load_restormer, random_state_dict, Restormer, RestormerConfig};
use aperture_weights::StateDict;
use clap::Args;

#[path = "bench_report.rs"]
mod report;
pub use report::utc_now;
use report::{print_profile, print_table, Row, Stats};

#[derive(Args)]
pub struct BenchArgs {
    /// Restormer weights (a file, or a folder with config.json).
    #[arg(long, conflicts_with = "demo_config")]
    model: Option<PathBuf>,
    /// Random weights of a named configuration instead of --model (base).
    #[arg(long)]
    demo_config: Option<String>,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Precisions to sweep (comma separated): fp32, tf32, fp16, bf16.
    #[arg(long, default_value = "fp16", value_delimiter = ',')]
    precision: Vec<Precision>,
    /// Batch sizes to sweep (comma separated).
    #[arg(long, default_value = "1,2,4,8,16,32,64", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Image height (and width unless --width is given).
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long)]
    width: Option<usize>,
    /// Timed iterations per (precision, batch), after --warmup untimed ones.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Per-operation time share and achieved rates (one eager pass per row).
    #[arg(long)]
    profile: bool,
    /// Parity first: every GPU operation against the CPU backend, then the whole model
    /// against the CPU backend and against each --reference.
    #[arg(long)]
    check: bool,
    /// safetensors files holding an input "x" (NCHW) and a reference output "y".
    #[arg(long)]
    reference: Vec<PathBuf>,
    /// Plan each graph's memory from a dry run of the forward pass instead of an eager
    /// one (lower peak memory).
    #[arg(long)]
    dry_plan: bool,
    /// Skip the accuracy column (it runs the CPU backend once).
    #[arg(long)]
    no_accuracy: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn load_model(args: &BenchArgs) -> anyhow::Result<(String, RestormerConfig, StateDict)> {
    if let Some(path) = &args.model {
        let (cfg, sd) =
            load_restormer(path).with_context(|| format!("loading {}", path.display()))?;
        let label = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok((format!("restormer ({label})"), cfg, sd));
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

/// A deterministic input in [0, 1) (never zeros: they can hide bugs and time faster).
fn input(batch: usize, c: usize, h: usize, w: usize, seed: u64) -> anyhow::Result<HostTensor> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..batch * c * h * w)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    Ok(HostTensor::from_f32(vec![batch, c, h, w], data)?)
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

fn first_image(t: &HostTensor) -> anyhow::Result<HostTensor> {
    t.split_batch().into_iter().next().context("empty batch")
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs positive sizes, e.g. 1,2,4");
    }
    let (model_name, cfg, sd) = load_model(&args)?;
    let (h, w) = (args.size, args.width.unwrap_or(args.size));
    let mut failures = 0usize;
    if args.check {
        failures += check(&args, &cfg, &sd)?;
    }
    let rows = match args.device.as_str() {
        "cpu" => bench_cpu(&args, &cfg, &sd, h, w)?,
        "cuda" => bench_cuda(&args, &cfg, &sd, h, w)?,
        other => bail!("unknown --device '{other}' (cpu or cuda)"),
    };
    let device = match args.device.as_str() {
        "cuda" => CudaBackend::new(args.gpu, Precision::Fp32)
            .map(|b| b.device_name().to_string())
            .unwrap_or_else(|_| "cuda".into()),
        _ => CpuBackend::new().name(),
    };
    let doc = report::to_json(&device, &utc_now(), &format!("{model_name} {h}x{w}"), &rows);
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("\n{model_name}, {h}x{w}, {device}");
        print_table(&rows);
    }
    if failures > 0 {
        bail!("{failures} parity check(s) failed (see above)");
    }
    Ok(())
}

fn bench_cpu(
    args: &BenchArgs,
    cfg: &RestormerConfig,
    sd: &StateDict,
    h: usize,
    w: usize,
) -> anyhow::Result<Vec<Row>> {
    let cpu = CpuBackend::new();
    let model = Restormer::prepare(&cpu, cfg.clone(), sd)?;
    let mut rows = Vec::new();
    for &b in &args.batch {
        let x = input(b, cfg.inp_channels, h, w, args.seed)?;
        let t = cpu.upload_nchw(&x)?;
        for _ in 0..args.warmup.min(1) {
            model.forward(&cpu, &t)?;
        }
        let mut ms = Vec::new();
        for _ in 0..args.iters.max(1) {
            let start = Instant::now();
            model.forward(&cpu, &t)?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        rows.push(Row::new("aperture", "fp32", b, Stats::of(&ms), 0.0, None));
    }
    Ok(rows)
}

fn bench_cuda(
    args: &BenchArgs,
    cfg: &RestormerConfig,
    sd: &StateDict,
    h: usize,
    w: usize,
) -> anyhow::Result<Vec<Row>> {
    if let Some(reason) = aperture_cuda::unavailable_reason() {
        bail!("--device cuda: {reason}");
    }
    let reference = if args.no_accuracy {
        None
    } else {
        let x1 = input(1, cfg.inp_channels, h, w, args.seed)?;
        eprintln!("computing the CPU reference output for the accuracy column...");
        Some(cpu_forward(cfg, sd, &x1)?)
    };
    let mut rows = Vec::new();
    for &p in &args.precision {
        let be = CudaBackend::new(args.gpu, p).context("opening the GPU")?;
        let model = Restormer::prepare(&be, cfg.clone(), sd)?;
        let fwd = |b: &CudaBackend, x: &CudaTensor| model.forward(b, x).map_err(EngineError::from);
        let mut rel: Option<f64> = None;
        for &batch in &args.batch {
            let cache = if args.dry_plan {
                GraphCache::dry_planned()
            } else {
                GraphCache::new()
            };
            be.memory().reset_peak();
            let x = input(batch, cfg.inp_channels, h, w, args.seed)?;
            let result = (|| -> aperture_engine::Result<(Stats, Option<f64>)> {
                // The first infer captures the graph and leaves real data in its input.
                let y = cache.infer(&be, &x, fwd)?;
                let r = match (&reference, rel) {
                    (Some(r), None) => Some(relative_l2(
                        &first_image(&y)
                            .map_err(|e| EngineError::Invalid(e.to_string()))?
                            .to_f32_vec(),
                        &r.to_f32_vec(),
                    )),
                    _ => rel,
                };
                for _ in 0..args.warmup {
                    cache.replay(&be, x.shape())?;
                }
                be.synchronize()?;
                let mut ms = Vec::with_capacity(args.iters);
                for _ in 0..args.iters.max(1) {
                    let start = be.record_event()?;
                    cache.replay(&be, x.shape())?;
                    let end = be.record_event()?;
                    ms.push(end.elapsed_ms(&start)? as f64);
                }
                Ok((Stats::of(&ms), r))
            })();
            let peak = be.memory().peak_reserved() as f64 / (1u64 << 30) as f64;
            if let Some(a) = cache.arena_size(x.shape()) {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                eprintln!(
                    "{p} batch {batch}: activation block {:.2} GiB (live-set bound {:.2} GiB), peak held {peak:.2} GiB",
                    gib(a.planned),
                    gib(a.live_peak)
                );
            }
            match result {
                Ok((stats, r)) => {
                    rel = r;
                    rows.push(Row::new("aperture", p.as_str(), batch, stats, peak, rel));
                }
                Err(e) => {
                    eprintln!("{p} batch {batch}: {e}");
                    rows.push(Row::failed("aperture", p.as_str(), batch, e.to_string()));
                }
            }
            drop(cache);
            be.trim_memory()?;
            if args.profile {
                profile(&be, &model, &x, p, batch)?;
            }
        }
    }
    Ok(rows)
}

fn profile(
    be: &CudaBackend,
    model: &Restormer<CudaBackend>,
    x: &HostTensor,
    p: Precision,
    batch: usize,
) -> anyhow::Result<()> {
    let t = be.upload_nchw(x)?;
    model.forward(be, &t)?; // warm
    be.synchronize()?;
    be.profiler().set_enabled(true);
    let start = be.record_event()?;
    let y = model.forward(be, &t);
    let end = be.record_event()?;
    be.profiler().set_enabled(false);
    let stats = be.profiler().take()?;
    y?;
    let total = end.elapsed_ms(&start)? as f64;
    print_profile(
        &format!("{p} batch {batch}, one eager pass: {total:.2} ms"),
        &stats,
        p,
    );
    be.trim_memory()?;
    Ok(())
}

/// Parity: ops against the CPU backend, then the model against the CPU backend and the
/// given references. Returns the number of failures.
fn check(args: &BenchArgs, cfg: &RestormerConfig, sd: &StateDict) -> anyhow::Result<usize> {
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
        let (h, w) = (args.size, args.width.unwrap_or(args.size));
        inputs.push((
            format!("random {h}x{w}"),
            input(1, cfg.inp_channels, h, w, args.seed + 1)?,
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
        for ((name, x, y), cpu) in inputs.iter().zip(&cpu_out) {
            // Eager with poisoned outputs, then through a captured graph.
            be.set_poison(true);
            let t = be.upload_nchw(x)?;
            let eager = be.download_nchw(&model.forward(&be, &t)?)?;
            be.set_poison(false);
            let cache = GraphCache::new();
            let graph = cache.infer(&be, x, |b: &CudaBackend, x: &CudaTensor| {
                model.forward(b, x).map_err(EngineError::from)
            })?;
            let replay = cache.infer(&be, x, |b: &CudaBackend, x: &CudaTensor| {
                model.forward(b, x).map_err(EngineError::from)
            })?;
            let short = name
                .rsplit('/')
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("/");
            failures += print_check(
                &format!("model eager vs CPU ({short})"),
                p,
                relative_l2(&eager.to_f32_vec(), &cpu.to_f32_vec()),
                tol,
            );
            failures += print_check(
                &format!("model graph vs CPU ({short})"),
                p,
                relative_l2(&graph.to_f32_vec(), &cpu.to_f32_vec()),
                tol,
            );
            // Replays differ only by the order of atomic additions (norms), amplified by
            // the network; a race would show as a difference far above that.
            failures += print_check(
                &format!("graph replay vs replay ({short})"),
                p,
                relative_l2(&replay.to_f32_vec(), &graph.to_f32_vec()),
                tol,
            );
            if let Some(y) = y {
                failures += print_check(
                    &format!("model vs PyTorch ({short})"),
                    p,
                    relative_l2(&graph.to_f32_vec(), &y.to_f32_vec()),
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
