//! Planning and launching one implicit-GEMM convolution on the backend's stream.

use aperture_engine::backend::Activation;
use aperture_engine::{EngineError, Result};
use cudarc::driver::sys;

use super::{DenseConv, Geometry, IgemmSlot, Tile};
use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::cudnn_conv::{DenseLaunch, DensePtrs};
use crate::driver::Context;
use crate::error::CudaResult;
use crate::kernels::Arg;

/// The launch for `x` through `w`, when the kernel is loaded and takes the shapes and
/// pointers.
pub(crate) fn plan(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    out_hw: (usize, usize),
    residual: Option<&CudaTensor>,
) -> Option<Geometry> {
    let tile = choose_tile(be, x, w, out_hw, residual)?;
    Geometry::new(x.dims, out_hw, DenseConv::of(w), tile)
}

/// A 1x1 product with an activation cuBLASLt's epilogue cannot finish, on a `wgmma` tile
/// with the activation and residual in its epilogue (one pass instead of product +
/// `act_residual`). Opt-in (`APERTURE_WGMMA_1X1=1`) until timed on a GPU.
pub(crate) fn plan_pointwise(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    residual: Option<&CudaTensor>,
) -> Option<Geometry> {
    if !pointwise_wanted() {
        return None;
    }
    let out_hw = (x.dims[1], x.dims[2]);
    let tile = choose_tile(be, x, w, out_hw, residual)?;
    Geometry::pointwise(x.dims, out_hw, DenseConv::of(w), tile)
}

/// The tile for an output of `out_hw` per image, when the kernels are loaded and every
/// pointer is 16-byte aligned.
fn choose_tile(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    out_hw: (usize, usize),
    residual: Option<&CudaTensor>,
) -> Option<Tile> {
    let IgemmSlot::Ready(kernel) = &be.kernels.igemm else {
        return None;
    };
    let aligned = |p: u64| p.is_multiple_of(16);
    if !aligned(x.ptr()) || !aligned(w.weight.ptr()) || !residual.is_none_or(|r| aligned(r.ptr())) {
        return None;
    }
    let m = x.dims[0].saturating_mul(out_hw.0).saturating_mul(out_hw.1);
    let sms = be.multiprocessors().max(1) as usize;
    Some(Tile::choose(w.c_out, m, sms, kernel.tiles()))
}

/// Whether `APERTURE_WGMMA_1X1=1` asks for [`plan_pointwise`].
pub(crate) fn pointwise_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("APERTURE_WGMMA_1X1").is_ok_and(|v| v.trim() == "1"))
}

/// Runs the planned convolution: `act(conv(x) + bias) + residual` into a new tensor.
pub(crate) fn run(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    g: &Geometry,
    act: Activation,
    residual: Option<&CudaTensor>,
) -> Result<CudaTensor> {
    let n = x.dims[0];
    let out = be.alloc_tensor([n, g.oh, g.ow, g.c_out])?;
    if !out.ptr().is_multiple_of(16) {
        // The pool hands out 512-byte aligned blocks; anything else is a bug there.
        return Err(EngineError::Device(format!(
            "convolution output at {:#x} is not 16-byte aligned",
            out.ptr()
        )));
    }
    run_strided(
        be,
        (x.ptr(), g.c),
        w,
        g,
        act,
        residual.map(|r| r.ptr()),
        (out.ptr(), g.c_out),
    )?;
    Ok(out)
}

/// Runs a planned convolution on raw pointers: `act(conv(x) + bias) + residual` into rows
/// `ldy` apart at `y`, reading input rows `ldx` apart (a channel slice of a wider tensor
/// when `ldx > C`; then `ldx % 8 == 0` and `x`, `y` 16-byte aligned, see conv.cu).
pub(crate) fn run_strided(
    be: &CudaBackend,
    (x, ldx): (u64, usize),
    w: &ConvWeights,
    g: &Geometry,
    act: Activation,
    residual: Option<u64>,
    (y, ldy): (u64, usize),
) -> Result<()> {
    let (l, ptrs) = dense_launch(x, ldx, w, g, act, residual, (y, ldy));
    crate::cudnn_conv::run_dense(be, &l, &ptrs, || {
        run_ours(be, (x, ldx), w, g, act, residual, (y, ldy))
    })
}

/// Whether [`run_strided`] with these operands would go through cuDNN into a packed
/// output moved into `y` afterwards (the choice is made here if it is not made yet).
pub(crate) fn strided_output_staged(
    be: &CudaBackend,
    (x, ldx): (u64, usize),
    w: &ConvWeights,
    g: &Geometry,
    act: Activation,
    residual: Option<u64>,
    (y, ldy): (u64, usize),
) -> bool {
    let (l, ptrs) = dense_launch(x, ldx, w, g, act, residual, (y, ldy));
    crate::cudnn_conv::stages_output(be, &l, &ptrs, || {
        run_ours(be, (x, ldx), w, g, act, residual, (y, ldy))
    })
}

/// The launch key and pointers of one strided convolution.
fn dense_launch(
    x: u64,
    ldx: usize,
    w: &ConvWeights,
    g: &Geometry,
    act: Activation,
    residual: Option<u64>,
    (y, ldy): (u64, usize),
) -> (DenseLaunch, DensePtrs) {
    let n = g.m / (g.oh * g.ow).max(1);
    let l = DenseLaunch::new(
        [n, g.h, g.w, g.c],
        ldx,
        w,
        (g.oh, g.ow),
        ldy,
        act,
        residual.is_some(),
    );
    (l, DensePtrs::of(x, w, residual, y))
}

/// [`run_strided`] with the implicit-GEMM kernel.
fn run_ours(
    be: &CudaBackend,
    (x, ldx): (u64, usize),
    w: &ConvWeights,
    g: &Geometry,
    act: Activation,
    residual: Option<u64>,
    (y, ldy): (u64, usize),
) -> Result<()> {
    let IgemmSlot::Ready(kernel) = &be.kernels.igemm else {
        return Err(EngineError::Device(
            "implicit-GEMM convolution planned without its kernel".into(),
        ));
    };
    let mut args = vec![
        Arg::Ptr(x),
        Arg::Ptr(w.weight.ptr()),
        Arg::Ptr(w.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
        Arg::Ptr(residual.unwrap_or(0)),
        Arg::Ptr(y),
    ];
    args.extend(g.int_args(act, ldx, ldy));
    let func = match g.tile {
        Tile::N64 => Some(kernel.small),
        Tile::N128 => kernel.wide,
        Tile::M64 => Some(kernel.m64),
        Tile::Wg192 => kernel.wgmma.map(|f| f[0]),
        Tile::Wg128 => kernel.wgmma.map(|f| f[1]),
        Tile::Wg64 => kernel.wgmma.map(|f| f[2]),
    }
    .ok_or_else(|| {
        EngineError::Device(format!("the convolution tile {:?} is not loaded", g.tile))
    })?;
    let (threads, smem) = g.tile.launch_shape(kernel.warp_specialised);
    launch(&be.ctx, func, (threads, smem), g.blocks as u32, &args)?;
    Ok(())
}

fn launch(
    ctx: &Context,
    func: sys::CUfunction,
    (threads, smem): (u32, u32),
    blocks: u32,
    args: &[Arg],
) -> CudaResult<()> {
    // The arguments mirror the entry points' shared parameter list (a test counts
    // them); the dynamic shared memory is the kernel's, allowed at load.
    crate::kernels::launch_function(ctx, func, (blocks.max(1), 1, 1), threads, smem, args)
}
