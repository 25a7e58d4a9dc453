//! The cuDNN calls: the handle, descriptors of one launch, and the launch itself
//! (packing a strided input, the convolution, then the epilogue kernel).

use std::ffi::{c_void, CStr};
use std::panic::catch_unwind;

use cudarc::cudnn::sys as dnn;

use super::{DenseLaunch, DensePtrs, Staging};
use crate::backend::CudaBackend;
use crate::copy_rows::RowCopy;
use crate::error::{CudaError, CudaResult};
use crate::kernels::{Arg, Storage};

pub(super) struct Handle(pub(super) dnn::cudnnHandle_t);
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

pub(super) fn check(status: dnn::cudnnStatus_t, what: &str) -> CudaResult<()> {
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

/// A cuDNN descriptor destroyed when dropped.
pub(super) struct Owned<T> {
    raw: *mut T,
    destroy: unsafe fn(*mut T) -> dnn::cudnnStatus_t,
}

impl<T> Owned<T> {
    /// Creates one descriptor with `create`; `destroy` releases it on drop.
    fn new(
        create: unsafe fn(*mut *mut T) -> dnn::cudnnStatus_t,
        destroy: unsafe fn(*mut T) -> dnn::cudnnStatus_t,
    ) -> CudaResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: the create call writes one descriptor handle.
        check(unsafe { create(&mut raw) }, "descriptor")?;
        Ok(Self { raw, destroy })
    }

    pub(super) fn get(&self) -> *mut T {
        self.raw
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: created by the matching create call and destroyed once.
        unsafe {
            let _ = (self.destroy)(self.raw);
        }
    }
}

fn tensor_descriptor() -> CudaResult<Owned<dnn::cudnnTensorStruct>> {
    Owned::new(
        dnn::cudnnCreateTensorDescriptor,
        dnn::cudnnDestroyTensorDescriptor,
    )
}

/// Loads the library (if present) and makes a handle on the backend's stream.
pub(super) fn open(be: &CudaBackend) -> CudaResult<Handle> {
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

/// Device memory a staged launch uses besides its operands.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Temps {
    /// The packed input (when staged).
    pub x: u64,
    /// The packed convolution output (when staged).
    pub y: u64,
    pub workspace: (u64, usize),
}

/// One launch through cuDNN: the input packed if staged, then either
/// `cudnnConvolutionForward` followed by bias, activation and residual in one pass that
/// also moves a staged output into its channel slice, or (`fused`) cuDNN's own
/// convolution + bias + activation call.
pub(super) fn launch(
    be: &CudaBackend,
    handle: dnn::cudnnHandle_t,
    (l, d, staging): (&DenseLaunch, &Descriptors, Staging),
    p: &DensePtrs,
    (algo, fused): (dnn::cudnnConvolutionFwdAlgo_t, Option<&FusedEpilogue>),
    t: &Temps,
) -> CudaResult<()> {
    if be.ctx.is_dry() {
        return Ok(());
    }
    let x = if staging.input {
        pack_input(be, p.x, t.x, l.pixels_in(), l.input[3], l.ldx)?;
        t.x
    } else {
        p.x
    };
    let y = if staging.output { t.y } else { p.y };
    let (alpha, beta) = (1f32, 0f32);
    let (ws, ws_bytes) = t.workspace;
    if let Some(f) = fused {
        let bias = p
            .bias
            .ok_or_else(|| CudaError::Driver("cuDNN's fused epilogue needs the bias".into()))?;
        // SAFETY: as below; z is y with alpha2 = 0 (not read for its values); the bias
        // holds c_out values of the storage type.
        unsafe {
            check(
                dnn::cudnnConvolutionBiasActivationForward(
                    handle,
                    &alpha as *const f32 as *const c_void,
                    d.x.get(),
                    x as *const c_void,
                    d.w.get(),
                    p.w as *const c_void,
                    d.conv.get(),
                    algo,
                    ws as *mut c_void,
                    ws_bytes,
                    &beta as *const f32 as *const c_void,
                    d.y.get(),
                    y as *const c_void,
                    f.bias.get(),
                    bias as *const c_void,
                    f.act.get(),
                    d.y.get(),
                    y as *mut c_void,
                ),
                "convolution with bias and activation",
            )?;
        }
        return Ok(());
    }
    // SAFETY: descriptors describe the live buffers; the workspace holds `ws_bytes`;
    // everything is enqueued on the backend's stream.
    unsafe {
        check(
            dnn::cudnnConvolutionForward(
                handle,
                &alpha as *const f32 as *const c_void,
                d.x.get(),
                x as *const c_void,
                d.w.get(),
                p.w as *const c_void,
                d.conv.get(),
                algo,
                ws as *mut c_void,
                ws_bytes,
                &beta as *const f32 as *const c_void,
                d.y.get(),
                y as *mut c_void,
            ),
            "convolution",
        )?;
    }
    if !staging.output && !l.bias && !l.residual && l.act == 0 {
        return Ok(());
    }
    let lds = if staging.output { l.c_out } else { l.ldy };
    be.launch_1d(
        "conv_epilogue_vec",
        l.pixels_out() * l.c_out / 8,
        &[
            Arg::Ptr(y),
            Arg::I64(lds as i64),
            Arg::Ptr(p.y),
            Arg::I64(l.ldy as i64),
            Arg::Ptr(p.bias.unwrap_or(0)),
            Arg::Ptr(p.residual.unwrap_or(0)),
            Arg::I64(l.pixels_out() as i64),
            Arg::I32(l.c_out as i32),
            Arg::I32(l.act),
        ],
    )
}

/// cuDNN's ranking of up to `count` algorithms for `d`, each run on the given buffers
/// (input, filter, output) with up to `workspace.1` bytes of workspace.
pub(super) fn find(
    handle: dnn::cudnnHandle_t,
    d: &Descriptors,
    (x, w, y): (u64, u64, u64),
    workspace: (u64, usize),
    count: i32,
) -> CudaResult<Vec<dnn::cudnnConvolutionFwdAlgoPerf_t>> {
    let mut perf: Vec<dnn::cudnnConvolutionFwdAlgoPerf_t> = Vec::with_capacity(count as usize);
    let mut returned = 0i32;
    // SAFETY: descriptors describe the live buffers; `perf` has room for `count` results,
    // of which `returned` are written.
    unsafe {
        check(
            dnn::cudnnFindConvolutionForwardAlgorithmEx(
                handle,
                d.x.get(),
                x as *const c_void,
                d.w.get(),
                w as *const c_void,
                d.conv.get(),
                d.y.get(),
                y as *mut c_void,
                count,
                &mut returned,
                perf.as_mut_ptr(),
                workspace.0 as *mut c_void,
                workspace.1,
            ),
            "algorithm search",
        )?;
        perf.set_len(returned.clamp(0, count) as usize);
    }
    Ok(perf)
}

/// A channel slice (rows `ld` apart) into a packed buffer.
pub(super) fn pack_input(
    be: &CudaBackend,
    src: u64,
    dst: u64,
    rows: usize,
    c: usize,
    ld: usize,
) -> CudaResult<()> {
    let copy = RowCopy {
        src,
        dst,
        rows,
        len: c,
        src_ld: ld,
        dst_ld: c,
    };
    match be.copy_vectorised(&copy) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CudaError::Driver(
            "a strided convolution input cannot be packed in 16-byte vectors".into(),
        )),
        Err(e) => Err(CudaError::Driver(e.to_string())),
    }
}

/// Turns off the offer of SiLU in cuDNN's fused call (for A/B runs).
const FUSED_SILU_SWITCH: &str = "APERTURE_CUDNN_SILU";

/// Whether cuDNN's convolution + bias + activation call can finish `l` with `algo`:
/// bias, ReLU, SiLU (swish) or no activation, no residual, the output written in place
/// (its identity activation runs with the precomputed implicit GEMM only). SiLU is an
/// offer: where cuDNN does not support it the call fails while timed and our epilogue
/// stays; where it runs, its output is checked against ours like every cuDNN choice.
pub(super) fn can_fuse(
    l: &DenseLaunch,
    staging: Staging,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
) -> bool {
    let relu = l.act == 2;
    let silu = l.act == 3 && !std::env::var(FUSED_SILU_SWITCH).is_ok_and(|v| v.trim() == "0");
    let identity = l.act == 0
        && algo == dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
    l.bias && !l.residual && !staging.output && (relu || silu || identity)
}

/// The bias and activation descriptors of cuDNN's fused call.
pub(super) struct FusedEpilogue {
    bias: Owned<dnn::cudnnTensorStruct>,
    act: Owned<dnn::cudnnActivationStruct>,
}

// SAFETY: host-side parameter blocks, only read after construction.
unsafe impl Send for FusedEpilogue {}
unsafe impl Sync for FusedEpilogue {}

impl FusedEpilogue {
    /// For `l`: a 1 x c_out x 1 x 1 bias in the storage type, ReLU (NaN not propagated,
    /// as `fmaxf` in ours), SiLU (swish with beta 1) or identity.
    pub(super) fn new(be: &CudaBackend, l: &DenseLaunch) -> CudaResult<Self> {
        let f = FusedEpilogue {
            bias: tensor_descriptor()?,
            act: Owned::new(
                dnn::cudnnCreateActivationDescriptor,
                dnn::cudnnDestroyActivationDescriptor,
            )?,
        };
        let mode = match l.act {
            2 => dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU,
            3 => dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_SWISH,
            _ => dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY,
        };
        // SAFETY: the setters write plain values into descriptors created above.
        unsafe {
            check(
                dnn::cudnnSetTensor4dDescriptor(
                    f.bias.get(),
                    dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    data_type(be.storage),
                    1,
                    l.c_out as i32,
                    1,
                    1,
                ),
                "bias descriptor",
            )?;
            check(
                dnn::cudnnSetActivationDescriptor(
                    f.act.get(),
                    mode,
                    dnn::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                    0.0,
                ),
                "activation descriptor",
            )?;
            if l.act == 3 {
                check(
                    dnn::cudnnSetActivationDescriptorSwishBeta(f.act.get(), 1.0),
                    "swish beta",
                )?;
            }
        }
        Ok(f)
    }
}

fn data_type(storage: Storage) -> dnn::cudnnDataType_t {
    match storage {
        Storage::F16 => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
        Storage::BF16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        Storage::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
    }
}

/// The tensor, filter and convolution descriptors of one launch (NHWC, KRSC filters,
/// fp32 accumulation, tensor cores).
pub(super) struct Descriptors {
    x: Owned<dnn::cudnnTensorStruct>,
    y: Owned<dnn::cudnnTensorStruct>,
    w: Owned<dnn::cudnnFilterStruct>,
    conv: Owned<dnn::cudnnConvolutionStruct>,
}

// SAFETY: descriptors are host-side parameter blocks, only read after construction.
unsafe impl Send for Descriptors {}
unsafe impl Sync for Descriptors {}

impl Descriptors {
    /// For `l`, with the packed layout on the staged sides.
    pub(super) fn new(be: &CudaBackend, l: &DenseLaunch, staging: Staging) -> CudaResult<Self> {
        let ldx = if staging.input { l.input[3] } else { l.ldx };
        let ldy = if staging.output { l.c_out } else { l.ldy };
        let dtype = data_type(be.storage);
        let i = |v: usize| v as i32;
        let [n, h, w, c] = l.input;
        let (oh, ow) = l.out_hw;
        let d = Descriptors {
            x: tensor_descriptor()?,
            y: tensor_descriptor()?,
            w: Owned::new(
                dnn::cudnnCreateFilterDescriptor,
                dnn::cudnnDestroyFilterDescriptor,
            )?,
            conv: Owned::new(
                dnn::cudnnCreateConvolutionDescriptor,
                dnn::cudnnDestroyConvolutionDescriptor,
            )?,
        };
        // SAFETY: the setters write plain values into descriptors created above.
        unsafe {
            check(
                dnn::cudnnSetTensor4dDescriptorEx(
                    d.x.get(),
                    dtype,
                    i(n),
                    i(c),
                    i(h),
                    i(w),
                    i(h * w * ldx),
                    1,
                    i(w * ldx),
                    i(ldx),
                ),
                "input descriptor",
            )?;
            check(
                dnn::cudnnSetTensor4dDescriptorEx(
                    d.y.get(),
                    dtype,
                    i(n),
                    i(l.c_out),
                    i(oh),
                    i(ow),
                    i(oh * ow * ldy),
                    1,
                    i(ow * ldy),
                    i(ldy),
                ),
                "output descriptor",
            )?;
            check(
                dnn::cudnnSetFilter4dDescriptor(
                    d.w.get(),
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
                    d.conv.get(),
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
                    d.conv.get(),
                    dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
                ),
                "math type",
            )?;
            check(
                dnn::cudnnSetConvolutionGroupCount(d.conv.get(), i(l.groups.max(1))),
                "group count",
            )?;
        }
        Ok(d)
    }
}
