//! Restormer's block front halves on fewer kernels (`kernels/front.cu`):
//!
//! * `norm_pointwise`: channel LayerNorm in the prologue of a 1x1 product, so the
//!   normalised tensor never reaches memory;
//! * `norm_pointwise_depthwise`: LayerNorm, the 1x1 product to P channels and a depthwise
//!   3x3 over them (and the GELU gate), where the P-wide product never reaches memory
//!   either.
//!
//! Both are opt-in: on the H100 neither is faster than the separate kernels yet
//! (Restormer fp16 at batch 32: 70.1 and 66.7 against 71.3 images/s; docs/cuda.md,
//! version 8). `APERTURE_NORM_PRODUCT=1` and `APERTURE_FUSED_FRONT=1` turn them on for a
//! run; the self-test turns them on for their parity cases.
//!
//! Per pixel and block in fp16 the unfused path moves 2C (LayerNorm in) + 2C (out) + 2C
//! (product in) + 2P (out) + 2P (depthwise in) + the output; fused, x is read once (1.4x
//! with an 8 x 16 tile's halo) and the output written once. Taken for 16-bit storage with the conv
//! module loaded, C a multiple of 16 up to 192, P even; else the caller runs the
//! operations one by one. `product` launches the first kernel, `fused` the second.

use aperture_engine::{EngineError, Result};
use cudarc::driver::sys;

use crate::backend::{ConvWeights, CudaBackend, CudaParam, CudaTensor};
use crate::conv_igemm::DenseConv;
use crate::kernels::Arg;

mod fused;
mod product;
#[cfg(test)]
mod tests;

pub(crate) use fused::{norm_pointwise_depthwise, smem_bytes, FrontLaunch};
pub(crate) use product::{norm_pointwise, product_smem_bytes, ProductLaunch, PRODUCT_SPECIALISED};

/// `front.cu`'s sizes shared by both kernels: threads per block, products per slice, the
/// product rows' stride in shared memory, and the most input channels (shared memory;
/// tests check the defines).
pub(crate) const THREADS: u32 = 256;
pub(crate) const SLICE: usize = 64;
pub(crate) const PRODUCT_LD: usize = 72;
pub(crate) const MAX_CHANNELS: usize = 192;
const FRONT_SWITCH: &str = "APERTURE_FUSED_FRONT";

/// `APERTURE_FUSED_FRONT=1`.
pub(crate) fn fused_front_by_environment() -> bool {
    std::env::var(FRONT_SWITCH).is_ok_and(|v| v.trim() == "1")
}

/// `APERTURE_NORM_PRODUCT=1`.
pub(crate) fn norm_product_by_environment() -> bool {
    std::env::var(PRODUCT_SWITCH).is_ok_and(|v| v.trim() == "1")
}

const PRODUCT_SWITCH: &str = "APERTURE_NORM_PRODUCT";

/// The LayerNorm's weight and bias pointers (0 for no bias), checked against `c`.
pub(super) fn norm_vectors(
    weight: &CudaParam,
    bias: Option<&CudaParam>,
    c: usize,
) -> Result<(u64, u64)> {
    let (nw, nw_len) = weight.vector()?;
    let nb = bias.map(|b| b.vector()).transpose()?;
    if nw_len != c || nb.is_some_and(|(_, len)| len != c) {
        return Err(EngineError::Shape(format!(
            "layer norm over {c} channels got parameters of another size"
        )));
    }
    Ok((nw.ptr(), nb.map(|(b, _)| b.ptr()).unwrap_or(0)))
}

/// Whether `pointwise` is a plain 1x1 product over the `c` input channels that both
/// kernels take (C a multiple of 16 up to [`MAX_CHANNELS`], weight rows in whole 16-byte
/// segments).
fn takes_pointwise(pointwise: &DenseConv, c: usize) -> bool {
    !pointwise.depthwise
        && (pointwise.kh, pointwise.kw) == (1, 1)
        && pointwise.stride == 1
        && pointwise.pad == 0
        && pointwise.c_in == c
        && pointwise.kp >= c
        && pointwise.kp.is_multiple_of(8)
        && c > 0
        && c.is_multiple_of(16)
        && c <= MAX_CHANNELS
}

/// The arguments both kernels start with: input, LayerNorm weight and bias, pointwise
/// weight and bias.
fn leading_args(x: &CudaTensor, (nw, nb): (u64, u64), pw: &ConvWeights) -> [Arg; 5] {
    [
        Arg::Ptr(x.ptr()),
        Arg::Ptr(nw),
        Arg::Ptr(nb),
        Arg::Ptr(pw.weight.ptr()),
        Arg::Ptr(pw.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
    ]
}

/// One launch into a new tensor of `out_dims`, timed by the profiler under `name` with
/// its (FLOPs, bytes): `blocks` blocks of [`THREADS`] with `smem` bytes of shared
/// memory; `args` lists the kernel's arguments given the output's address.
fn launch_into(
    be: &CudaBackend,
    (name, flops, bytes): (&'static str, usize, usize),
    (func, blocks, smem): (sys::CUfunction, usize, usize),
    out_dims: [usize; 4],
    args: impl Fn(u64) -> Vec<Arg>,
) -> Result<Option<CudaTensor>> {
    be.profiler
        .op(be, name, flops as f64, bytes as f64, || {
            let out = be.alloc_tensor(out_dims)?;
            crate::kernels::launch_function(
                &be.ctx,
                func,
                (blocks as u32, 1, 1),
                THREADS,
                smem as u32,
                &args(out.ptr()),
            )?;
            Ok(out)
        })
        .map(Some)
}
