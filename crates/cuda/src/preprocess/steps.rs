//! The kernel launches of one [`BatchPlan`], on any stream: `GpuPreprocessor` enqueues
//! them on its own streams, the D-FINE pixel graphs (`crate::detection::PixelGraphCache`)
//! on the model backend's stream under graph capture. One function for both, so the
//! two paths run the same kernels with the same arguments in the same order.

use aperture_engine::Result;

use super::plan::{BatchPlan, Region, Step};
use super::{PreprocessSpec, TensorLayout};
use crate::driver::Context;
use crate::kernels::{Arg, Kernels};

/// Device addresses of a plan's regions: the uploaded input (tap tables, then the
/// images at the plan's offsets) and the two scratch buffers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Regions {
    pub input: u64,
    pub tmp: u64,
    pub resized: u64,
}

impl Regions {
    pub fn at(&self, r: Region) -> u64 {
        match r {
            Region::Input(at) => self.input + at as u64,
            Region::Tmp => self.tmp,
            Region::Resized => self.resized,
        }
    }
}

/// Where a plan's `ToFloat` steps put each resized image.
#[derive(Clone, Copy)]
pub(crate) enum FloatOut<'a> {
    /// Nowhere (the resize passes only).
    Skip,
    /// `pre_to_float` into the f32 buffer at this address.
    F32(u64),
    /// Another kernel, enqueued in the step's place (the resize scratch is reused by the
    /// next image): `(resized bytes' address, pixels, element offset of the image)`.
    Convert(&'a dyn Fn(u64, usize, usize) -> Result<()>),
}

/// Enqueues every step of `plan` on `ctx`'s stream (the context current); `ToFloat`
/// steps as `out` says. The input must already be on the device at `regions.input`.
pub(crate) fn enqueue_steps(
    kernels: &Kernels,
    ctx: &Context,
    plan: &BatchPlan,
    spec: &PreprocessSpec,
    regions: Regions,
    out: FloatOut<'_>,
) -> Result<()> {
    let (norm, mean, std) = match spec.normalize {
        Some((m, d)) => (1, m, d),
        None => (0, [0.0; 3], [1.0; 3]),
    };
    let tap = |at: usize| Arg::Ptr(regions.input + at as u64);
    for step in &plan.steps {
        match *step {
            Step::Horizontal {
                src,
                dst,
                rows,
                in_w,
                out_w,
                taps,
                ksize,
            } => kernels.launch_1d(
                ctx,
                "pre_resize_h",
                (rows * out_w) as i64,
                &[
                    Arg::Ptr(regions.at(src)),
                    Arg::Ptr(regions.at(dst)),
                    Arg::I32(rows as i32),
                    Arg::I32(in_w as i32),
                    Arg::I32(out_w as i32),
                    tap(taps),
                    Arg::I32(ksize as i32),
                ],
            )?,
            Step::Vertical {
                src,
                dst,
                w,
                first_row,
                out_h,
                taps,
                ksize,
            } => kernels.launch_1d(
                ctx,
                "pre_resize_v",
                (out_h * (w * 3).div_ceil(4)) as i64,
                &[
                    Arg::Ptr(regions.at(src)),
                    Arg::Ptr(regions.at(dst)),
                    Arg::I32(w as i32),
                    Arg::I32(first_row as i32),
                    Arg::I32(out_h as i32),
                    tap(taps),
                    Arg::I32(ksize as i32),
                ],
            )?,
            Step::ToFloat {
                src,
                pixels,
                out: at,
            } => {
                let out = match out {
                    FloatOut::Skip => continue,
                    FloatOut::Convert(convert) => {
                        convert(regions.at(src), pixels, at)?;
                        continue;
                    }
                    FloatOut::F32(out) => out,
                };
                kernels.launch_1d(
                    ctx,
                    "pre_to_float",
                    (pixels * 3) as i64,
                    &[
                        Arg::Ptr(regions.at(src)),
                        Arg::Ptr(out + 4 * at as u64),
                        Arg::I64(pixels as i64),
                        Arg::I32((spec.layout == TensorLayout::Nhwc) as i32),
                        Arg::F32(spec.scale),
                        Arg::I32(norm),
                        Arg::F32(mean[0]),
                        Arg::F32(mean[1]),
                        Arg::F32(mean[2]),
                        Arg::F32(std[0]),
                        Arg::F32(std[1]),
                        Arg::F32(std[2]),
                    ],
                )?
            }
        }
    }
    Ok(())
}
