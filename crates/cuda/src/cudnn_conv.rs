//! Dense k x k convolutions through cuDNN where it is faster than the implicit GEMM.
//!
//! On Hopper, cuDNN's convolution engines use the warpgroup matrix instructions that
//! `conv_igemm` (mma.sync) does not; on D-FINE's shapes PyTorch's cuDNN convolutions run
//! at about twice our rate. Each distinct launch (shapes, strides, activation, residual)
//! is timed once, eagerly, both ways: ours, and cuDNN's fastest algorithm
//! (`cudnnFindConvolutionForwardAlgorithmEx`) followed by a vectorised epilogue kernel
//! for bias, activation and residual. The faster one is remembered and used from then on,
//! including under graph capture (a launch first seen while capturing keeps ours: nothing
//! can be timed there).
//!
//! 16-bit storage only (fp32/tf32 keep their checked path); the library is loaded on the
//! first eligible convolution, and a machine without it keeps ours. `APERTURE_CUDNN=0`
//! turns the path off (for A/B runs), `APERTURE_CUDNN=force` skips the timing and takes
//! cuDNN wherever it runs (for parity checks of its numerics).

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex, OnceLock};

use aperture_engine::backend::Activation;
use aperture_engine::Result;
use cudarc::cudnn::sys as dnn;

use crate::backend::{ConvWeights, CudaBackend};
use crate::conv::act_code;
use crate::error::{CudaError, CudaResult};
use crate::kernels::{Arg, Storage};

const ENV_SWITCH: &str = "APERTURE_CUDNN";
/// Largest cuDNN workspace taken for one convolution.
const MAX_WORKSPACE: usize = 256 << 20;
/// Algorithms asked of cuDNN's search.
const ALGOS: i32 = 8;
/// Timed replays per candidate (after one untimed replay).
const TIMED_RUNS: usize = 3;
/// Launches per timing graph: small convolutions take microseconds, so each candidate is
/// timed as a captured graph of several launches, as it will run (no host in between).
const GRAPH_REPS: usize = 10;

/// One dense convolution launch: input rows `ldx` apart, output rows `ldy` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DenseLaunch {
    /// Input NHWC dims.
    pub input: [usize; 4],
    pub ldx: usize,
    pub out_hw: (usize, usize),
    pub c_out: usize,
    pub ldy: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub act: i32,
    pub residual: bool,
    pub bias: bool,
    /// 1 (dense) or the channel count (depthwise).
    pub groups: usize,
}

impl DenseLaunch {
    pub(crate) fn new(
        input: [usize; 4],
        ldx: usize,
        w: &ConvWeights,
        out_hw: (usize, usize),
        ldy: usize,
        act: Activation,
        residual: bool,
    ) -> Self {
        Self {
            input,
            ldx,
            out_hw,
            c_out: w.c_out,
            ldy,
            kh: w.kh,
            kw: w.kw,
            stride: w.spec.stride,
            pad: w.spec.padding,
            act: act_code(act),
            residual,
            bias: w.bias.is_some(),
            groups: if w.depthwise { w.c_out } else { 1 },
        }
    }

    fn pixels_out(&self) -> usize {
        self.input[0] * self.out_hw.0 * self.out_hw.1
    }
}

/// Device pointers of one launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DensePtrs {
    pub x: u64,
    pub w: u64,
    pub bias: Option<u64>,
    pub residual: Option<u64>,
    pub y: u64,
}

impl DensePtrs {
    /// `w`'s weight and bias with the given input, residual and output.
    pub(crate) fn of(x: u64, w: &ConvWeights, residual: Option<u64>, y: u64) -> Self {
        let (weight, bias) = w.cudnn_operands();
        Self {
            x,
            w: weight,
            bias,
            residual,
            y,
        }
    }
}

#[derive(Clone)]
enum Choice {
    Ours,
    Cudnn {
        algo: dnn::cudnnConvolutionFwdAlgo_t,
        workspace: usize,
        desc: Arc<Descriptors>,
    },
}

/// The backend's cuDNN state: the handle (made on first use) and the choice per launch.
#[derive(Default)]
pub(crate) struct CudnnConvs {
    handle: OnceLock<Option<Handle>>,
    choices: Mutex<HashMap<DenseLaunch, Choice>>,
}

struct Handle(dnn::cudnnHandle_t);
// SAFETY: the handle is bound to the backend's one stream; calls are serialised by the
// backend's use of that stream (one caller at a time per backend).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once.
        unsafe {
            let _ = dnn::cudnnDestroy(self.0);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Timed,
    Forced,
}

fn mode() -> Mode {
    match std::env::var(ENV_SWITCH).as_deref() {
        Ok("0") | Ok("off") => Mode::Off,
        Ok("force") => Mode::Forced,
        _ => Mode::Timed,
    }
}

fn check(status: dnn::cudnnStatus_t, what: &str) -> CudaResult<()> {
    if status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: cudnnGetErrorString returns a static NUL-terminated string.
    let text = unsafe { CStr::from_ptr(dnn::cudnnGetErrorString(status)) };
    Err(CudaError::Driver(format!(
        "cuDNN {what}: {}",
        text.to_string_lossy()
    )))
}

impl CudnnConvs {
    fn handle(&self, be: &CudaBackend) -> Option<dnn::cudnnHandle_t> {
        self.handle
            .get_or_init(|| match open(be) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::info!("cuDNN not used for convolutions: {e}");
                    None
                }
            })
            .as_ref()
            .map(|h| h.0)
    }
}

fn open(be: &CudaBackend) -> CudaResult<Handle> {
    // SAFETY: the probe only tries to dlopen candidate library names.
    let present = catch_unwind(|| unsafe { dnn::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(CudaError::Unavailable("libcudnn.so not found".into()));
    }
    be.ctx.bind()?;
    let mut h: dnn::cudnnHandle_t = std::ptr::null_mut();
    // SAFETY: writes one handle; the stream outlives the handle (both the backend's).
    unsafe {
        check(dnn::cudnnCreate(&mut h), "create")?;
        let handle = Handle(h);
        check(
            dnn::cudnnSetStream(handle.0, be.ctx.stream as _),
            "set stream",
        )?;
        tracing::debug!("cuDNN {} loaded for convolutions", dnn::cudnnGetVersion());
        Ok(handle)
    }
}

/// Runs the convolution `l` either with `ours` or through cuDNN, whichever was faster
/// when `l` was first seen.
pub(crate) fn run_dense(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    ours: impl Fn() -> Result<()>,
) -> Result<()> {
    let m = mode();
    if m == Mode::Off || !eligible(be, l, p) {
        return ours();
    }
    let known = be.cudnn.choices.lock().ok().and_then(|c| c.get(l).cloned());
    let choice = match known {
        Some(c) => c,
        None if be.ctx.is_dry() || crate::gemm::capturing(be.ctx.stream as _) => return ours(),
        None => {
            let c = choose(be, l, p, &ours, m == Mode::Forced).unwrap_or_else(|e| {
                tracing::debug!("cuDNN convolution {l:?} not taken: {e}");
                Choice::Ours
            });
            if let Ok(mut map) = be.cudnn.choices.lock() {
                map.insert(*l, c.clone());
            }
            c
        }
    };
    match choice {
        Choice::Ours => ours(),
        Choice::Cudnn {
            algo,
            workspace,
            desc,
        } => {
            let ws = if workspace > 0 {
                Some(be.pool.alloc(workspace)?)
            } else {
                None
            };
            let handle = be
                .cudnn
                .handle(be)
                .ok_or_else(|| CudaError::Driver("cuDNN handle vanished".into()))?;
            launch(
                be,
                handle,
                (l, &desc),
                p,
                algo,
                ws.as_ref().map(|b| (b.ptr(), workspace)),
            )?;
            Ok(())
        }
    }
}

/// 16-bit storage, whole 16-byte vectors in the epilogue, sizes within cuDNN's int.
fn eligible(be: &CudaBackend, l: &DenseLaunch, p: &DensePtrs) -> bool {
    let vec = 8;
    let fits_int = |v: usize| v < i32::MAX as usize;
    let [n, h, w, c] = l.input;
    be.storage != Storage::F32
        && l.c_out.is_multiple_of(vec)
        && l.ldy.is_multiple_of(vec)
        && p.y.is_multiple_of(16)
        && p.bias.is_none_or(|b| b.is_multiple_of(16))
        && p.residual.is_none_or(|r| r.is_multiple_of(16))
        && fits_int(n * h * w * l.ldx)
        && fits_int(l.pixels_out() * l.ldy)
        && fits_int(c * l.kh * l.kw * l.c_out)
}

/// Times ours and cuDNN's fastest algorithm on the real inputs. cuDNN's search and timing
/// write a scratch output of the same extent: some of the algorithms it tries write
/// outside a strided output's channel slice, which here is the middle of a concatenation
/// whose other slices already hold results. Ours writes the real output (only its slice;
/// the real launch writes it again).
fn choose(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    ours: &dyn Fn() -> Result<()>,
    forced: bool,
) -> Result<Choice> {
    let handle = be
        .cudnn
        .handle(be)
        .ok_or_else(|| CudaError::Unavailable("cuDNN not loaded".into()))?;
    let d = Arc::new(Descriptors::new(be, l)?);
    let scratch = Scratch::new(MAX_WORKSPACE)?;
    let out = Scratch::new(l.pixels_out() * l.ldy * be.esize())?;
    let p_scratch = DensePtrs { y: out.0, ..*p };
    let mut perf: Vec<dnn::cudnnConvolutionFwdAlgoPerf_t> = Vec::with_capacity(ALGOS as usize);
    let mut returned = 0i32;
    // SAFETY: descriptors describe the live buffers; `perf` has room for ALGOS results,
    // of which `returned` are written.
    unsafe {
        check(
            dnn::cudnnFindConvolutionForwardAlgorithmEx(
                handle,
                d.x,
                p.x as *const c_void,
                d.w,
                p.w as *const c_void,
                d.conv,
                d.y,
                out.0 as *mut c_void,
                ALGOS,
                &mut returned,
                perf.as_mut_ptr(),
                scratch.0 as *mut c_void,
                MAX_WORKSPACE,
            ),
            "algorithm search",
        )?;
        perf.set_len(returned.clamp(0, ALGOS) as usize);
    }
    drop(scratch);
    let best = perf
        .iter()
        .find(|r| r.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS && r.memory <= MAX_WORKSPACE)
        .ok_or_else(|| CudaError::Driver("cuDNN has no algorithm for this convolution".into()))?;
    let candidate = Choice::Cudnn {
        algo: best.algo,
        workspace: best.memory,
        desc: d.clone(),
    };
    if forced {
        return Ok(candidate);
    }
    let ws = Scratch::new(best.memory)?;
    let theirs = graph_ms(be, &|| {
        let ws = Some((ws.0, best.memory));
        launch(be, handle, (l, &d), &p_scratch, best.algo, ws).map_err(Into::into)
    })?;
    let mine = graph_ms(be, ours)?;
    tracing::debug!(
        "convolution {:?} {}x{} s{} -> {} channels: ours {mine:.3} ms, cuDNN {theirs:.3} ms",
        l.input,
        l.kh,
        l.kw,
        l.stride,
        l.c_out
    );
    Ok(if theirs < mine {
        candidate
    } else {
        Choice::Ours
    })
}

/// Device memory for the search and the timing runs, outside the pool (whose blocks
/// would otherwise stay in a graph's arena).
struct Scratch(u64);

impl Scratch {
    fn new(bytes: usize) -> CudaResult<Self> {
        // SAFETY: a plain allocation, freed in Drop after the stream is idle.
        Ok(Self(unsafe {
            cudarc::driver::result::malloc_sync(bytes.max(256))?
        }))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: allocated above; timing runs end with a synchronised event and the
        // search is synchronous, so no kernel still uses it.
        unsafe {
            let _ = cudarc::driver::result::free_sync(self.0);
        }
    }
}

/// Time per launch of `f`, from replays of a graph of [`GRAPH_REPS`] launches (after one
/// eager launch, which also loads what the launch needs).
fn graph_ms(be: &CudaBackend, f: &dyn Fn() -> Result<()>) -> Result<f32> {
    use cudarc::driver::{result, sys};
    f()?;
    be.synchronize()?;
    be.ctx.bind()?;
    let stream = be.ctx.stream;
    // SAFETY: the stream is alive; the capture is ended below on every path.
    unsafe {
        result::stream::begin_capture(
            stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        )
        .map_err(CudaError::from)?;
    }
    let captured = (0..GRAPH_REPS).try_for_each(|_| f());
    // SAFETY: ends the capture begun above.
    let graph = unsafe { result::stream::end_capture(stream) }.map_err(CudaError::from)?;
    let timed = captured.and_then(|()| {
        // SAFETY: `graph` is a complete captured graph.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(CudaError::from)?;
        let replay = || -> Result<()> {
            // SAFETY: the executable graph and the stream are alive.
            unsafe { result::graph::launch(exec, stream) }.map_err(CudaError::from)?;
            Ok(())
        };
        let mut times = Vec::with_capacity(TIMED_RUNS);
        let run = (|| -> Result<()> {
            replay()?;
            for _ in 0..TIMED_RUNS {
                let start = be.record_event()?;
                replay()?;
                let end = be.record_event()?;
                times.push(end.elapsed_ms(&start)?);
            }
            Ok(())
        })();
        // SAFETY: the stream is synchronised before the executable graph goes.
        unsafe {
            let _ = result::stream::synchronize(stream);
            let _ = result::graph::exec_destroy(exec);
        }
        run?;
        times.sort_by(f32::total_cmp);
        Ok(times[times.len() / 2] / GRAPH_REPS as f32)
    });
    // SAFETY: destroyed once; its executable copy is gone.
    unsafe {
        let _ = result::graph::destroy(graph);
    }
    timed
}

/// `cudnnConvolutionForward` into `y`, then bias, activation and residual in one pass.
fn launch(
    be: &CudaBackend,
    handle: dnn::cudnnHandle_t,
    (l, d): (&DenseLaunch, &Descriptors),
    p: &DensePtrs,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    workspace: Option<(u64, usize)>,
) -> CudaResult<()> {
    if be.ctx.is_dry() {
        return Ok(());
    }
    let (alpha, beta) = (1f32, 0f32);
    let (ws, ws_bytes) = workspace.unwrap_or((0, 0));
    // SAFETY: descriptors describe the live buffers of `p`; the workspace holds
    // `ws_bytes`; everything is enqueued on the backend's stream.
    unsafe {
        check(
            dnn::cudnnConvolutionForward(
                handle,
                &alpha as *const f32 as *const c_void,
                d.x,
                p.x as *const c_void,
                d.w,
                p.w as *const c_void,
                d.conv,
                algo,
                ws as *mut c_void,
                ws_bytes,
                &beta as *const f32 as *const c_void,
                d.y,
                p.y as *mut c_void,
            ),
            "convolution",
        )?;
    }
    if !l.bias && !l.residual && l.act == 0 {
        return Ok(());
    }
    let vecs = l.pixels_out() * l.c_out / 8;
    be.launch_1d(
        "conv_epilogue_vec",
        vecs,
        &[
            Arg::Ptr(p.y),
            Arg::Ptr(p.bias.unwrap_or(0)),
            Arg::Ptr(p.residual.unwrap_or(0)),
            Arg::I64(l.pixels_out() as i64),
            Arg::I32(l.c_out as i32),
            Arg::I64(l.ldy as i64),
            Arg::I32(l.act),
        ],
    )
}

/// The tensor, filter and convolution descriptors of one launch (NHWC, KRSC filters,
/// fp32 accumulation, tensor cores).
struct Descriptors {
    x: dnn::cudnnTensorDescriptor_t,
    y: dnn::cudnnTensorDescriptor_t,
    w: dnn::cudnnFilterDescriptor_t,
    conv: dnn::cudnnConvolutionDescriptor_t,
}

// SAFETY: descriptors are host-side parameter blocks, only read after construction.
unsafe impl Send for Descriptors {}
unsafe impl Sync for Descriptors {}

impl Descriptors {
    fn new(be: &CudaBackend, l: &DenseLaunch) -> CudaResult<Self> {
        let dtype = match be.storage {
            Storage::F16 => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
            Storage::BF16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            Storage::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
        };
        let i = |v: usize| v as i32;
        let [n, h, w, c] = l.input;
        let (oh, ow) = l.out_hw;
        let mut d = Descriptors {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        // SAFETY: each create writes one descriptor, destroyed in Drop (null ones are
        // skipped); the setters take plain values.
        unsafe {
            check(dnn::cudnnCreateTensorDescriptor(&mut d.x), "descriptor")?;
            check(dnn::cudnnCreateTensorDescriptor(&mut d.y), "descriptor")?;
            check(dnn::cudnnCreateFilterDescriptor(&mut d.w), "descriptor")?;
            check(
                dnn::cudnnCreateConvolutionDescriptor(&mut d.conv),
                "descriptor",
            )?;
            check(
                dnn::cudnnSetTensor4dDescriptorEx(
                    d.x,
                    dtype,
                    i(n),
                    i(c),
                    i(h),
                    i(w),
                    i(h * w * l.ldx),
                    1,
                    i(w * l.ldx),
                    i(l.ldx),
                ),
                "input descriptor",
            )?;
            check(
                dnn::cudnnSetTensor4dDescriptorEx(
                    d.y,
                    dtype,
                    i(n),
                    i(l.c_out),
                    i(oh),
                    i(ow),
                    i(oh * ow * l.ldy),
                    1,
                    i(ow * l.ldy),
                    i(l.ldy),
                ),
                "output descriptor",
            )?;
            check(
                dnn::cudnnSetFilter4dDescriptor(
                    d.w,
                    dtype,
                    dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                    i(l.c_out),
                    i(c / l.groups.max(1)),
                    i(l.kh),
                    i(l.kw),
                ),
                "filter descriptor",
            )?;
            check(
                dnn::cudnnSetConvolution2dDescriptor(
                    d.conv,
                    i(l.pad),
                    i(l.pad),
                    i(l.stride),
                    i(l.stride),
                    1,
                    1,
                    dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "convolution descriptor",
            )?;
            check(
                dnn::cudnnSetConvolutionMathType(
                    d.conv,
                    dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
                ),
                "math type",
            )?;
            check(
                dnn::cudnnSetConvolutionGroupCount(d.conv, i(l.groups.max(1))),
                "group count",
            )?;
        }
        Ok(d)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created above and is destroyed once.
        unsafe {
            if !self.x.is_null() {
                let _ = dnn::cudnnDestroyTensorDescriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = dnn::cudnnDestroyTensorDescriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = dnn::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = dnn::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}
