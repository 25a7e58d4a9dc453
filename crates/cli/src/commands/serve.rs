//! `aperture serve`: the Triton-compatible inference server.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use aperture_cuda::preprocess::{PreprocessSpec, Preprocessor};
use aperture_engine::{NamedTensors, Precision, TensorSpec};
use aperture_models::dfine::{coco_category_id, post_process};
use aperture_server::{
    ArchitectureRegistry, BuildError, GpuMetrics, ImageAdapter, ModelConfig, ModelContext,
    ModelSource, PlanarImageAdapter, Repository, ServeOptions,
};
use aperture_vision::{DecodedImage, HF_RESCALE_FACTOR};
use clap::Args;

use crate::device::DeviceArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Folder with one subfolder per model (config.toml + numeric version folders).
    #[arg(long)]
    pub model_repository: Option<PathBuf>,
    /// Serve one model: a model folder, a weights file (with --architecture), or the
    /// name of a built-in architecture (identity, add_sub). Repeatable.
    #[arg(long)]
    pub model: Vec<PathBuf>,
    /// Architecture of the weights given with --model.
    #[arg(long)]
    pub architecture: Option<String>,
    /// Name to serve a --model under (default: its file or folder name).
    #[arg(long)]
    pub name: Option<String>,
    /// Max batch size for --model without a config.toml.
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    /// Non-batch input dims for --model without a config.toml, e.g. 3,512,512 (-1: any
    /// size); like config.toml's input_size (a fixed size lets a Restormer on the GPU
    /// time its convolutions at load).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub input_size: Option<Vec<i64>>,
    /// Model instances (runners running batches in parallel) for --model without a
    /// config.toml.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,
    /// gRPC port (0 picks a free port).
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 8002)]
    pub metrics_port: u16,
    /// Largest request body (HTTP) or message (gRPC) in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_body_mb: usize,
    /// Largest image (width x height, in megapixels) the image endpoints decode.
    #[arg(long, default_value_t = 50)]
    pub max_image_megapixels: u64,
    /// Longest a request may take end to end, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub request_timeout_ms: u64,
    /// Key required for inference and metadata (Authorization: Bearer KEY or X-Api-Key).
    #[arg(long, env = "APERTURE_API_KEY")]
    pub api_key: Option<String>,
    /// Key required for repository control (load / unload / index) and the log settings.
    #[arg(long, env = "APERTURE_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// On SIGTERM / ctrl-c, how long to let open requests and streams finish (seconds).
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Refuse Triton's system shared-memory registrations (clients on this host could
    /// otherwise have the server read and write any /dev/shm object it can open).
    #[arg(long)]
    pub no_shared_memory: bool,
    /// Compress gRPC answers (gzip or deflate) for clients that accept the encoding;
    /// off by default, as in Triton (requests may always come compressed).
    #[arg(long, value_name = "gzip|deflate")]
    pub grpc_response_compression: Option<aperture_server::GrpcCompression>,
    /// Most HTTP and gRPC connections open at once (0: unbounded); past it new clients
    /// wait in the accept queue until a connection closes.
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// Trace file (Triton's trace extension): sampled requests' timestamps go there as
    /// a JSON array (at shutdown, or to FILE.0, FILE.1, ... every --trace-log-frequency
    /// traces). Without it tracing cannot be turned on; the API never changes the path.
    #[arg(long, value_name = "FILE")]
    pub trace_file: Option<std::path::PathBuf>,
    /// Trace level at start: off or timestamps (the trace API changes it later).
    #[arg(long, default_value = "off", value_parser = ["off", "timestamps"])]
    pub trace_level: String,
    /// Trace one request in N.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub trace_rate: u64,
    /// Traces to take, then stop; -1: no limit.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true, value_parser = clap::value_parser!(i64).range(-1..))]
    pub trace_count: i64,
    /// Write the trace file every N traces (FILE.0, FILE.1, ...); 0: at shutdown.
    #[arg(long, default_value_t = 0)]
    pub trace_log_frequency: u64,
    /// Run a bare echo peer (same routes, no parsing or model) instead of the server,
    /// to measure the server's own overhead with `aperture loadgen`.
    #[arg(long)]
    pub echo: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Architectures the server can load. Real models register here next to the built-ins.
fn registry(device: &DeviceArgs) -> ArchitectureRegistry {
    let mut r = ArchitectureRegistry::with_builtins();
    let detr = Arc::new(DetrImages::default());
    for arch in ["restormer", "dfine"] {
        let device = device.clone();
        let detr = detr.clone();
        r.register(arch, move |ctx: &ModelContext| {
            // config.toml's precision and instance GPU override the command line.
            let mut device = device.clone();
            if let Some(p) = &ctx.config.precision {
                device.precision = Some(p.parse::<Precision>()?);
            }
            if let Some(gpu) = ctx.gpu {
                device.gpu =
                    usize::try_from(gpu).map_err(|_| format!("invalid GPU index {gpu}"))?;
            }
            // `weights` names a file in the version folder; without it the folder itself
            // is the model (an HF snapshot: config.json, model.safetensors, ...).
            let path = ctx
                .weights_path()
                .unwrap_or_else(|| ctx.version_dir.to_path_buf());
            // A fixed image size in the config lets a Restormer time its convolutions
            // at load (D-FINE takes its processor's size).
            let image_size = match ctx.config.input_size.as_deref() {
                Some(&[_, h, w]) if h > 0 && w > 0 => Some((h as usize, w as usize)),
                _ => None,
            };
            let runner = device
                .load_runner(&path, ctx.config.max_batch_size, image_size)
                .map_err(|e| -> BuildError { format!("{e:#}").into() })?;
            if runner.architecture() != arch {
                return Err(format!(
                    "{} holds a {} model but config.toml says architecture = \"{arch}\"",
                    path.display(),
                    runner.architecture()
                )
                .into());
            }
            if arch == "dfine" {
                // Preprocess where the model runs, set up now rather than under a capture.
                let on_gpu = runner.device().starts_with("cuda");
                detr.choose(on_gpu.then_some(device.gpu));
            }
            Ok(Arc::from(runner))
        });
    }
    // Restormer downsamples three times: pad to a multiple of 8, crop back.
    r.register_image_adapter("restormer", Arc::new(PlanarImageAdapter::padded(8)));
    r.register_image_adapter("dfine", detr);
    r
}

/// D-FINE / RT-DETR images: PIL-bilinear resize to the model's input size, rescale
/// 1/255 (no mean/std), and HF's focal-loss post-processing in original pixels. The
/// resize and rescale run on the GPU the models run on (the same bytes as on the CPU).
#[derive(Default)]
struct DetrImages {
    /// Chosen when the first D-FINE model loads: the GPU it runs on, or the CPU.
    pre: OnceLock<Preprocessor>,
}

impl DetrImages {
    fn choose(&self, gpu: Option<usize>) {
        self.pre.get_or_init(|| {
            Preprocessor::new(gpu).unwrap_or_else(|e| {
                tracing::warn!("image preprocessing on the CPU: {e}");
                Preprocessor::Cpu
            })
        });
    }

    fn preprocessor(&self) -> &Preprocessor {
        static CPU: Preprocessor = Preprocessor::Cpu;
        self.pre.get().unwrap_or(&CPU)
    }
}

impl ImageAdapter for DetrImages {
    fn preprocess(
        &self,
        image: &DecodedImage,
        inputs: &[TensorSpec],
    ) -> Result<NamedTensors, BuildError> {
        let spec = inputs.first().ok_or("model has no inputs")?;
        let rgb = image.to_rgb8();
        let size = match spec.shape.as_slice() {
            [3, h, w] if *h > 0 && *w > 0 => Some((*h as usize, *w as usize)),
            _ => None,
        };
        let steps = PreprocessSpec {
            size,
            ..PreprocessSpec::keep_size().rescale(HF_RESCALE_FACTOR)
        };
        let t = self.preprocessor().run(&[&rgb], &steps)?;
        Ok(vec![(spec.name.clone(), t)])
    }

    fn detections(
        &self,
        outputs: &NamedTensors,
        width: u32,
        height: u32,
        threshold: f32,
    ) -> Option<Result<serde_json::Value, BuildError>> {
        Some((|| {
            let get = |n: &str| outputs.iter().find(|(k, _)| k == n).map(|(_, t)| t);
            let logits = get("logits").ok_or("model returned no 'logits'")?;
            let boxes = get("pred_boxes").ok_or("model returned no 'pred_boxes'")?;
            let classes = *logits.shape().last().ok_or("empty logits")?;
            let dets = post_process(
                &logits.to_f32_vec(),
                &boxes.to_f32_vec(),
                classes,
                threshold,
                (height, width),
            )?;
            let rows: Vec<serde_json::Value> = dets
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "label": d.label,
                        "category_id": coco_category_id(d.label),
                        "score": d.score,
                        "bbox": d.bbox,
                    })
                })
                .collect();
            Ok(serde_json::Value::Array(rows))
        })())
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.trace_level != "off" && args.trace_file.is_none() {
        bail!(
            "--trace-level {} needs --trace-file FILE (where the traces go)",
            args.trace_level
        );
    }
    let registry = registry(&args.device);
    let known = registry.architectures();
    let repo = Repository::new(args.model_repository.clone(), Arc::new(registry));
    if let Some(dir) = &args.model_repository {
        if !dir.is_dir() {
            bail!("--model-repository {} is not a folder", dir.display());
        }
    }
    if args.model_repository.is_none() && args.model.is_empty() {
        bail!("give --model-repository DIR or --model PATH");
    }
    if args.name.is_some() && args.model.len() > 1 {
        bail!("--name applies to a single --model");
    }
    for path in &args.model {
        let (name, source) = model_source(path, &args, &known)?;
        repo.add_source(&name, source);
    }
    let addr = |port| SocketAddr::new(args.host, port);
    if args.echo {
        return run_echo(&args, &repo, addr(args.http_port), addr(args.grpc_port));
    }
    let options = ServeOptions {
        http_addr: addr(args.http_port),
        grpc_addr: Some(addr(args.grpc_port)),
        metrics_addr: Some(addr(args.metrics_port)),
        max_body_bytes: args.max_body_mb.saturating_mul(1 << 20),
        max_image_pixels: args.max_image_megapixels.saturating_mul(1_000_000),
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        api_key: args.api_key.clone(),
        admin_key: args.admin_key.clone(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        shared_memory: !args.no_shared_memory,
        grpc_response_compression: args.grpc_response_compression,
        max_connections: Some(args.max_connections).filter(|&m| m > 0),
        log_control: crate::logging::control(),
        trace: aperture_server::trace::TraceSettings {
            timestamps: args.trace_level == "timestamps",
            rate: args.trace_rate,
            count: args.trace_count,
            log_frequency: args.trace_log_frequency,
            file: args.trace_file.clone(),
        },
    };
    eprintln!(
        "aperture serve: HTTP {} gRPC {} metrics {}",
        options.http_addr,
        addr(args.grpc_port),
        addr(args.metrics_port)
    );
    let gpu_metrics = crate::nvml::Nvml::open().map(|n| Arc::new(n) as Arc<dyn GpuMetrics>);
    aperture_server::run_until_signal(options, repo, gpu_metrics).context("server failed")
}

/// `--model PATH`: a model folder, a weights file, or a built-in architecture name.
fn model_source(
    path: &std::path::Path,
    args: &ServeArgs,
    known: &[String],
) -> anyhow::Result<(String, ModelSource)> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let name = args.name.clone().unwrap_or(stem);
    if path.join("config.toml").is_file() {
        return Ok((name, ModelSource::Folder(path.to_path_buf())));
    }
    let (arch, weights, dir) = if path.is_dir() {
        // A model folder without config.toml (e.g. an HF snapshot): the folder is the model.
        let arch = args.architecture.clone().with_context(|| {
            format!("{} has no config.toml: give --architecture", path.display())
        })?;
        (arch, None, path.to_path_buf())
    } else if path.is_file() {
        let arch = args.architecture.clone().with_context(|| {
            format!(
                "--architecture is needed to serve the weights file {}",
                path.display()
            )
        })?;
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .map(str::to_string);
        let dir = path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from("."));
        (arch, file, dir)
    } else if known.iter().any(|k| k.as_str() == path.to_string_lossy()) {
        (
            path.to_string_lossy().into_owned(),
            None,
            PathBuf::from("."),
        )
    } else {
        bail!(
            "--model {}: no such file or folder, and not a built-in architecture ({})",
            path.display(),
            known.join(", ")
        );
    };
    let mut config = ModelConfig::with_architecture(&arch);
    config.weights = weights;
    config.max_batch_size = args.max_batch_size.max(1);
    config.instance_group.count = args.instances.max(1);
    config.input_size = args.input_size.clone();
    Ok((
        name,
        ModelSource::Inline {
            config: Box::new(config),
            dir,
        },
    ))
}

/// `--echo`: advertise the first --model's inputs, answer every infer with its own data.
fn run_echo(
    args: &ServeArgs,
    repo: &Repository,
    http: SocketAddr,
    grpc: SocketAddr,
) -> anyhow::Result<()> {
    let (name, source) = repo
        .discover()
        .into_iter()
        .next()
        .context("--echo needs a --model")?;
    let ModelSource::Inline { config, dir } = source else {
        bail!("--echo needs --model with a built-in architecture or a weights file");
    };
    let ctx = aperture_server::ModelContext {
        name: &name,
        version: 1,
        version_dir: &dir,
        config: &config,
        instance: 0,
        gpu: None,
    };
    let runner = registry(&args.device)
        .build(&config.architecture, &ctx)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let spec = aperture_server::echo::EchoSpec {
        model: name,
        inputs: runner.inputs(),
    };
    eprintln!(
        "aperture serve --echo: HTTP {http} gRPC {grpc} (max body {} MiB ignored)",
        args.max_body_mb
    );
    aperture_server::echo::run_until_signal(http, grpc, spec).context("echo peer failed")
}
