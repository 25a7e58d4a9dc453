//! Dense convolutions with few taps per output (`K = kh * kw * c_in <= 32`: the
//! 3-channel stems of image models) on `conv_small_taps{32,64}` (kernels/ops.cu, by the
//! output width). im2col would
//! write a K-wide copy of the whole output grid for a product whose K is tiny (D-FINE's
//! 3x3 stride-2 stem at batch 32: a 210 MB copy); here each thread reads its pixel's taps
//! and writes every output channel once. `APERTURE_SMALL_TAPS=0` keeps im2col (A/B runs).

use std::sync::OnceLock;

use aperture_engine::backend::Activation;
use aperture_engine::Result;

use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::conv::{act_code, geometry_args};
use crate::kernels::Arg;

/// Most taps per output (`SMALL_MAX_TAPS` in ops.cu: registers per thread).
const MAX_TAPS: usize = 32;
/// Most output channels (`SMALL_MAX_OUT`: the weights sit in shared memory).
const MAX_OUT: usize = 64;
/// Outputs of the narrow kernel (fewer accumulators, more blocks per multiprocessor).
const NARROW_OUT: usize = 32;
const THREADS: u32 = 256;

/// Whether the small-taps kernel is on (`APERTURE_SMALL_TAPS=0` turns it off).
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("APERTURE_SMALL_TAPS").as_deref() != Ok("0"))
}

/// Whether `w` runs on the small-taps kernel: dense, few taps, whole 8-channel groups.
pub(crate) fn fits(w: &ConvWeights) -> bool {
    enabled()
        && !w.depthwise
        && w.kh * w.kw * w.c_in <= MAX_TAPS
        && w.c_out <= MAX_OUT
        && w.c_out.is_multiple_of(8)
}

/// `act(conv(x) + bias) + residual` into a new `dims` tensor.
pub(crate) fn run(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    dims: [usize; 4],
) -> Result<CudaTensor> {
    launch(be, x, w, act, residual, dims, (0, 0))
}

/// `act(conv(x) + bias)` with `bottom` rows and `right` columns of zeros after it, in one
/// pass (`dims` the unpadded output).
pub(crate) fn run_padded(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    dims: [usize; 4],
    (bottom, right): (usize, usize),
) -> Result<CudaTensor> {
    launch(be, x, w, act, None, dims, (bottom, right))
}

fn launch(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    dims: [usize; 4],
    (bottom, right): (usize, usize),
) -> Result<CudaTensor> {
    let [n, oh, ow, c] = dims;
    let (ohp, owp) = (oh + bottom, ow + right);
    let out = be.alloc_tensor([n, ohp, owp, c])?;
    let pixels = n * ohp * owp;
    let blocks = pixels
        .div_ceil(THREADS as usize)
        .clamp(1, be.ctx.multiprocessors.max(1) as usize * 16) as u32;
    let mut args = vec![
        Arg::Ptr(x.ptr()),
        Arg::Ptr(w.weight.ptr()),
        Arg::Ptr(w.bias.as_ref().map_or(0, |b| b.ptr())),
        Arg::Ptr(residual.map_or(0, |r| r.ptr())),
        Arg::Ptr(out.ptr()),
    ];
    args.extend(geometry_args(x.dims, (oh, ow), w));
    args.extend([w.kp, w.c_out].map(|v| Arg::I32(v as i32)));
    args.push(Arg::I32(act_code(act)));
    args.extend([ohp, owp].map(|v| Arg::I32(v as i32)));
    let name = if w.c_out <= NARROW_OUT {
        "conv_small_taps32"
    } else {
        "conv_small_taps64"
    };
    be.kernels
        .launch(&be.ctx, name, (blocks, 1, 1), THREADS, 0, &args)?;
    Ok(out)
}
