//! [`CudaBackend`], the engine's backend on one NVIDIA GPU: types, construction, helpers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aperture_engine::backend::ConvSpec;
use aperture_engine::{EngineError, Precision, Result};
use cudarc::driver::result;

use crate::driver::{Context, Event};
use crate::error::{CudaError, CudaResult};
use crate::gemm::{Elem, Gemm};
use crate::kernels::{Arg, Kernels, Storage};
use crate::pool::{DeviceBuffer, MemStats, Pool};
use crate::profile::Profiler;

mod ops;

/// cuBLASLt workspace: large enough for split-K on the biggest products.
const WORKSPACE_BYTES: usize = 64 << 20;

/// An NHWC activation in device memory, in the backend's storage type.
#[derive(Debug)]
pub struct CudaTensor {
    pub(crate) buf: DeviceBuffer,
    pub(crate) dims: [usize; 4],
}

impl CudaTensor {
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
}

/// Prepared convolution weights.
#[derive(Debug)]
pub struct ConvWeights {
    pub(crate) spec: ConvSpec,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    /// Dense: `[c_out][kp]` in the storage type, k = (ky*kw + kx)*c_in + ci, zero padded
    /// to `kp`. Depthwise: `[kh][kw][c]` in fp32.
    pub(crate) weight: DeviceBuffer,
    pub(crate) kp: usize,
    /// Dense: storage type; depthwise: fp32.
    pub(crate) bias: Option<DeviceBuffer>,
    /// 1x1 only: `[c_out][c_in]` fp32, for folding into attention maps.
    pub(crate) weight_f32: Option<DeviceBuffer>,
    pub(crate) depthwise: bool,
    /// 16-bit storage only, where the weight above is not in cuDNN's layout (depthwise):
    /// the weight as KRSC `[c_out][kh][kw][c_in / groups]` and, where the bias above is
    /// fp32, the bias, both in the storage type (crate::cudnn_conv).
    pub(crate) cudnn: Option<(DeviceBuffer, Option<DeviceBuffer>)>,
}

impl ConvWeights {
    /// The weight and bias in the layout cuDNN reads (KRSC, storage type).
    pub(crate) fn cudnn_operands(&self) -> (u64, Option<u64>) {
        let bias = self.bias.as_ref().map(|b| b.ptr());
        match &self.cudnn {
            Some((w, b)) => (w.ptr(), b.as_ref().map(|b| b.ptr()).or(bias)),
            None => (self.weight.ptr(), bias),
        }
    }
}

/// A prepared parameter.
#[derive(Debug)]
pub enum CudaParam {
    Conv(ConvWeights),
    /// fp32 on the device.
    Vector {
        buf: DeviceBuffer,
        len: usize,
    },
}

impl CudaParam {
    pub(crate) fn conv(&self) -> Result<&ConvWeights> {
        match self {
            CudaParam::Conv(c) => Ok(c),
            CudaParam::Vector { .. } => Err(EngineError::Invalid(
                "expected convolution weights, got a vector".into(),
            )),
        }
    }
    pub(crate) fn vector(&self) -> Result<(&DeviceBuffer, usize)> {
        match self {
            CudaParam::Vector { buf, len } => Ok((buf, *len)),
            CudaParam::Conv(_) => Err(EngineError::Invalid(
                "expected a vector parameter, got convolution weights".into(),
            )),
        }
    }
}

/// The CUDA backend. All work goes to one stream; activations are NHWC in fp32, fp16 or
/// bf16 by precision, with fp32 accumulation everywhere.
pub struct CudaBackend {
    pub(crate) ctx: Arc<Context>,
    pub(crate) pool: Pool,
    pub(crate) kernels: Kernels,
    pub(crate) gemm: Gemm,
    _workspace: DeviceBuffer,
    pub(crate) precision: Precision,
    pub(crate) storage: Storage,
    pub(crate) profiler: Profiler,
    poison: AtomicBool,
    /// Whether Restormer's front halves run as one kernel (crate::front); off unless
    /// `APERTURE_FUSED_FRONT=1` (slower than the separate kernels so far).
    pub(crate) fused_front: AtomicBool,
    /// Whether LayerNorm runs in the prologue of the following 1x1 product
    /// (crate::front::norm_pointwise); off unless `APERTURE_NORM_PRODUCT=1` (level with
    /// LayerNorm and cuBLASLt so far, not faster).
    pub(crate) norm_product: AtomicBool,
    /// D-FINE's kernels and constants (crate::detection).
    pub(crate) detection: crate::detection::DetectionState,
    /// cuDNN's handle and the per-launch choice between it and our convolutions.
    pub(crate) cudnn: crate::cudnn_conv::CudnnConvs,
}

impl CudaBackend {
    /// Opens GPU `ordinal` and builds (or loads from the cache) the kernels for
    /// `precision`. Fails with [`CudaError::Unavailable`] where there is no usable GPU.
    pub fn new(ordinal: usize, precision: Precision) -> CudaResult<Self> {
        let ctx = Arc::new(Context::new(ordinal)?);
        let storage = match precision {
            Precision::Fp32 | Precision::Tf32 => Storage::F32,
            Precision::Fp16 => Storage::F16,
            Precision::Bf16 => Storage::BF16,
        };
        let kernels = Kernels::load(&ctx, storage)?;
        let pool = Pool::new(ctx.clone());
        let workspace = pool.alloc(WORKSPACE_BYTES)?;
        ctx.bind()?;
        let gemm = Gemm::new(workspace.ptr(), WORKSPACE_BYTES)?;
        Ok(Self {
            ctx,
            pool,
            kernels,
            gemm,
            _workspace: workspace,
            precision,
            storage,
            profiler: Profiler::default(),
            poison: AtomicBool::new(false),
            fused_front: AtomicBool::new(crate::front::fused_front_by_environment()),
            norm_product: AtomicBool::new(crate::front::norm_product_by_environment()),
            detection: Default::default(),
            cudnn: Default::default(),
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }
    pub fn device_name(&self) -> &str {
        &self.ctx.name
    }
    pub fn capability(&self) -> (i32, i32) {
        self.ctx.capability
    }
    pub fn multiprocessors(&self) -> i32 {
        self.ctx.multiprocessors
    }
    pub fn total_memory(&self) -> usize {
        self.ctx.total_memory
    }
    /// Whether the kernels came from the on-disk cache rather than NVRTC.
    pub fn kernels_from_cache(&self) -> bool {
        self.kernels.from_cache
    }
    /// The allocator's counters (bytes held from the driver, bytes in use, peaks).
    pub fn memory(&self) -> &MemStats {
        &self.pool.stats
    }
    /// Returns cached, unused blocks to the driver.
    pub fn trim_memory(&self) -> Result<()> {
        Ok(self.pool.trim()?)
    }
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.ctx.synchronize()?)
    }
    /// Records an event on the backend's stream (for timing).
    pub fn record_event(&self) -> Result<Event> {
        let e = Event::new(&self.ctx)?;
        e.record(&self.ctx)?;
        Ok(e)
    }
    /// Runs `f` inside a CUDA profiler range (`cuProfilerStart`/`Stop`): with
    /// `ncu --profile-from-start off`, only the kernels launched by `f` are profiled.
    /// Without a profiler attached both calls do nothing.
    pub fn in_profiler_range<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        self.synchronize()?;
        // SAFETY: plain driver calls on the current context; no pointers involved.
        unsafe { cudarc::driver::sys::cuProfilerStart() }
            .result()
            .map_err(CudaError::from)?;
        let out = f();
        let sync = self.synchronize();
        // SAFETY: as above.
        unsafe { cudarc::driver::sys::cuProfilerStop() }
            .result()
            .map_err(CudaError::from)?;
        sync?;
        Ok(out)
    }
    /// Per-operation timing: while enabled, every operation is bracketed by events.
    pub fn profiler(&self) -> &Profiler {
        &self.profiler
    }

    /// From now on, convolution shapes not timed yet run on our kernels instead of being
    /// timed against cuDNN at their first launch. Runners that serve several threads at
    /// once call it: the timing captures CUDA graphs on the stream that the other
    /// threads' copies and replays use.
    pub fn freeze_convolution_choices(&self) {
        self.cudnn.freeze();
    }

    /// Fills every new activation with NaN before the kernel that should write it.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Runs Restormer's front halves as one kernel where it applies (crate::front), or
    /// as separate operations; returns the previous setting.
    pub fn set_fused_front(&self, on: bool) -> bool {
        self.fused_front.swap(on, Ordering::Relaxed)
    }

    /// Runs LayerNorm in the prologue of the following 1x1 product where it applies
    /// (crate::front), or as two operations; returns the previous setting.
    pub fn set_norm_product(&self, on: bool) -> bool {
        self.norm_product.swap(on, Ordering::Relaxed)
    }

    pub(crate) fn elem(&self) -> Elem {
        match self.storage {
            Storage::F32 => Elem::F32,
            Storage::F16 => Elem::F16,
            Storage::BF16 => Elem::BF16,
        }
    }
    pub(crate) fn esize(&self) -> usize {
        self.elem().size()
    }
    pub(crate) fn tf32(&self) -> bool {
        self.precision == Precision::Tf32
    }

    pub(crate) fn alloc_tensor(&self, dims: [usize; 4]) -> CudaResult<CudaTensor> {
        let n: usize = dims.iter().product();
        let t = CudaTensor {
            buf: self.pool.alloc(n * self.esize())?,
            dims,
        };
        if self.poison.load(Ordering::Relaxed) {
            // All-ones bytes are NaN in fp32, fp16 and bf16: unwritten outputs show.
            self.memset(t.ptr(), 0xff, n * self.esize())
                .map_err(|e| CudaError::Driver(e.to_string()))?;
        }
        Ok(t)
    }

    /// A cuBLASLt product on the backend's stream (skipped in a dry run).
    pub(crate) fn run_gemm(&self, call: &crate::gemm::GemmCall) -> CudaResult<()> {
        if self.ctx.is_dry() {
            return Ok(());
        }
        self.gemm.run(call, self.ctx.stream as _)
    }

    pub(crate) fn launch_1d(&self, name: &str, n: usize, args: &[Arg]) -> CudaResult<()> {
        self.kernels.launch_1d(&self.ctx, name, n as i64, args)
    }

    /// Copies host values to a new device buffer (synchronously).
    pub(crate) fn upload_bytes<T: Copy>(&self, data: &[T]) -> CudaResult<DeviceBuffer> {
        let buf = self.pool.alloc(std::mem::size_of_val(data))?;
        self.ctx.bind()?;
        // SAFETY: `buf` holds at least as many bytes as `data`; the copy completes
        // before `data` can go away because the stream is synchronised right after.
        unsafe {
            result::memcpy_htod_async(buf.ptr(), data, self.ctx.stream)?;
            result::stream::synchronize(self.ctx.stream)?;
        }
        Ok(buf)
    }

    /// Converts host f32 values to the storage type on the device.
    pub(crate) fn upload_storage(&self, data: &[f32]) -> CudaResult<DeviceBuffer> {
        match self.storage {
            Storage::F32 => self.upload_bytes(data),
            Storage::F16 => self.upload_bytes(
                &data
                    .iter()
                    .map(|&v| half::f16::from_f32(v))
                    .collect::<Vec<_>>(),
            ),
            Storage::BF16 => self.upload_bytes(
                &data
                    .iter()
                    .map(|&v| half::bf16::from_f32(v))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Fills a buffer with a byte pattern on the stream (poisoning for tests, zeroing).
    pub fn fill_bytes(&self, t: &CudaTensor, byte: u8) -> Result<()> {
        self.memset(t.ptr(), byte, t.numel() * self.esize())
    }

    pub(crate) fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
        if self.ctx.is_dry() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: the caller passes a live allocation of at least `bytes` bytes.
        unsafe {
            result::memset_d8_async(ptr, byte, bytes, self.ctx.stream).map_err(CudaError::from)?
        };
        Ok(())
    }

    /// Copies `bytes` bytes between two device allocations on the stream.
    pub(crate) fn copy_bytes(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if self.ctx.is_dry() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: the caller passes two live allocations of at least `bytes` bytes.
        unsafe {
            result::memcpy_dtod_async(dst, src, bytes, self.ctx.stream).map_err(CudaError::from)?
        };
        Ok(())
    }

    /// NCHW f32 staging buffer -> NHWC tensor (a kernel; capturable).
    pub(crate) fn tensor_from_staging(
        &self,
        staging: u64,
        dims_nchw: [usize; 4],
    ) -> Result<CudaTensor> {
        let [n, c, h, w] = dims_nchw;
        let out = self.alloc_tensor([n, h, w, c])?;
        self.launch_1d(
            "nchw_to_nhwc",
            n * c * h * w,
            &[
                Arg::Ptr(staging),
                Arg::Ptr(out.ptr()),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I64((h * w) as i64),
            ],
        )?;
        Ok(out)
    }

    /// NHWC tensor -> NCHW f32 staging buffer (a kernel; capturable).
    pub(crate) fn to_staging(&self, x: &CudaTensor, staging: u64) -> Result<()> {
        let [n, h, w, c] = x.dims;
        self.launch_1d(
            "nhwc_to_nchw",
            x.numel(),
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(staging),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I64((h * w) as i64),
            ],
        )?;
        Ok(())
    }
}
