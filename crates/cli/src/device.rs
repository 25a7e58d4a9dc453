//! `--device` and `--precision`: choosing the backend a model runs on.

use std::path::Path;

use aperture_engine::{cpu::CpuBackend, Precision, Runner};
use aperture_models::dfine::DFineRunner;
use aperture_models::restormer::load_restormer;
use aperture_models::Architecture;
use clap::{Args, ValueEnum};

use crate::gpu_runner::{GraphDFine, GraphRestormer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to run: auto (GPU if present), cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Arithmetic precision: fp32, tf32, fp16, bf16 (the CPU backend computes in fp32).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Which GPU (CUDA device ordinal) to use.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

impl DeviceArgs {
    /// Loads the model at `path` on the chosen backend: the GPU for `cuda` (an error
    /// when none is usable) and for `auto` when one is, else the CPU. A GPU runner is
    /// ready to be called from several threads: its convolution choices are made here
    /// or not at all (see `crate::gpu_runner`): D-FINE's at its processor's image size,
    /// Restormer's at `image_size` (height, width) when given.
    pub fn load_runner(
        &self,
        path: &Path,
        max_batch_size: usize,
        image_size: Option<(usize, usize)>,
    ) -> anyhow::Result<Box<dyn Runner>> {
        if let Some(gpu) = self.cuda_backend(Precision::Fp16)? {
            return Ok(match aperture_models::detect_architecture(path)? {
                Architecture::Restormer => {
                    let (config, sd) = load_restormer(path)?;
                    let runner = GraphRestormer::new(gpu, config, &sd, max_batch_size)?;
                    runner.prepare_for_serving(image_size);
                    Box::new(runner)
                }
                Architecture::DFine => {
                    let snapshot = aperture_models::dfine::load_dfine(path)?;
                    let runner = DFineRunner::new(gpu, &snapshot, max_batch_size)?;
                    Box::new(GraphDFine::warmed(runner))
                }
            });
        }
        if let Some(p) = self.precision {
            if p != Precision::Fp32 {
                tracing::warn!("the CPU backend computes in fp32; --precision {p} is ignored");
            }
        }
        Ok(aperture_models::load_runner(
            path,
            CpuBackend::new(),
            max_batch_size,
        )?)
    }

    /// The CUDA backend this choice asks for: `Some` for `cuda` (an error when no GPU is
    /// usable) and for `auto` when a GPU is usable, `None` for the CPU. `default` is the
    /// precision used when `--precision` is not given.
    pub fn cuda_backend(
        &self,
        default: Precision,
    ) -> anyhow::Result<Option<aperture_cuda::CudaBackend>> {
        let precision = self.precision.unwrap_or(default);
        match self.device {
            Device::Cpu => Ok(None),
            Device::Cuda => aperture_cuda::CudaBackend::new(self.gpu, precision)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("--device cuda: {e}")),
            Device::Auto => match aperture_cuda::CudaBackend::new(self.gpu, precision) {
                Ok(b) => Ok(Some(b)),
                Err(e) => {
                    tracing::info!("running on the CPU: {e}");
                    Ok(None)
                }
            },
        }
    }
}
