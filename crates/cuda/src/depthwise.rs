//! Depthwise convolutions (groups == channels): strip-streaming kernels for k x k at
//! stride 1 and 2 (`dwk*`, vector.cu), the gated 3x3 fused with the GELU gate, and the
//! per-row / generic kernels where those do not apply (`APERTURE_DEPTHWISE` selects
//! older kernels for A/B runs).

use aperture_engine::backend::Activation;
use aperture_engine::Result;

use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::conv::{act_code, geometry_args};
use crate::cudnn_conv::{DenseLaunch, DensePtrs};
use crate::kernels::Arg;

/// Output rows per thread of the vectorised depthwise kernels (DW_ROWS in vector.cu;
/// the most rows per strip of the `dwk*` kernels, which take it as an argument).
const DW_ROWS: usize = 16;

/// Grid of the strip kernels: x over `threads_per_row` threads in blocks of 256, y over
/// the images' strips of `rows` rows.
fn strip_grid(threads_per_row: usize, n: usize, h: usize, rows: usize) -> (u32, u32, u32) {
    (
        threads_per_row.div_ceil(256) as u32,
        (n * h.div_ceil(rows)) as u32,
        1,
    )
}

/// Rows per strip for the `dwk*` kernels: DW_ROWS, halved (down to 4) while the grid
/// would not fill the GPU twice at two blocks per multiprocessor. Short strips re-read
/// more halo rows, so they are only taken when blocks are scarce (small maps, batch 1).
fn strip_rows(threads_per_row: usize, n: usize, h: usize, multiprocessors: usize) -> usize {
    let blocks_x = threads_per_row.div_ceil(256);
    let mut rows = DW_ROWS;
    while rows > 4 && blocks_x * n * h.div_ceil(rows) < 4 * multiprocessors {
        rows /= 2;
    }
    rows
}

/// Whether one image's element count fits the `dwk*` kernels' 32-bit offsets.
fn fits_u32(elements: usize) -> bool {
    elements <= u32::MAX as usize
}

/// The strip kernels' limit on grid.y (images x strips).
const MAX_GRID_Y: usize = 65_535;

/// Which depthwise kernels run, from `APERTURE_DEPTHWISE` (for A/B timing or as an
/// escape hatch).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DepthwiseKernels {
    /// `scalar`: the per-row kernels of ops.cu (3x3) and the generic one.
    Scalar,
    /// `strip`: the first strip kernels, `dwconv3x3_vec` / `dwconv3x3_gate_vec` (3x3,
    /// stride 1 only).
    Strip,
    /// Default: the `dwk*` kernels (k = 3, 5, 7; stride 1 or 2; fused gate).
    Tiled,
}

fn depthwise_kernels() -> DepthwiseKernels {
    static ON: std::sync::OnceLock<DepthwiseKernels> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("APERTURE_DEPTHWISE").as_deref() {
        Ok("scalar") => DepthwiseKernels::Scalar,
        Ok("strip") => DepthwiseKernels::Strip,
        _ => DepthwiseKernels::Tiled,
    })
}

/// A `dwk*` kernel and its thread shape (V channels x X output columns per thread, as
/// in vector.cu's entry points).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TiledKernel {
    name: &'static str,
    channels: usize,
    columns: usize,
}

/// The `dwk*` kernel for a square k x k depthwise convolution with stride s and padding
/// k/2.
fn tiled_kernel(k: usize, stride: usize) -> Option<TiledKernel> {
    let (name, channels, columns) = match (k, stride) {
        (3, 1) => ("dwk3s1", 4, 1),
        (3, 2) => ("dwk3s2", 4, 2),
        (5, 1) => ("dwk5s1", 2, 2),
        (5, 2) => ("dwk5s2", 2, 2),
        (7, 1) => ("dwk7s1", 1, 1),
        (7, 2) => ("dwk7s2", 1, 1),
        _ => return None,
    };
    Some(TiledKernel {
        name,
        channels,
        columns,
    })
}

/// `gelu_gate(depthwise 3x3(x))` as one kernel that never writes the convolution's
/// 2x wider output; `None` when the convolution is not a 3x3, stride-1, pad-1
/// depthwise one over a multiple of 4 channels (two channel pairs per thread).
pub(crate) fn depthwise_gelu_gate(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
) -> Result<Option<CudaTensor>> {
    let [n, h, wd, c] = x.dims;
    let fits = w.depthwise
        && w.c_in == c
        && w.kh == 3
        && w.kw == 3
        && w.spec.stride == 1
        && w.spec.padding == 1
        && c % 4 == 0
        && n * h <= MAX_GRID_Y;
    if !fits {
        return Ok(None);
    }
    let half = c / 2;
    let pixels = n * h * wd;
    let flops = (18 * pixels * c + 10 * pixels * half) as f64;
    let bytes = ((x.numel() + pixels * half) * be.esize()) as f64;
    be.profiler
        .op(be, "dwconv_gelu_gate", flops, bytes, || {
            let out = be.alloc_tensor([n, h, wd, half])?;
            let mut args = vec![
                Arg::Ptr(x.ptr()),
                Arg::Ptr(out.ptr()),
                Arg::Ptr(w.weight.ptr()),
                Arg::Ptr(w.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
                Arg::I32(h as i32),
                Arg::I32(wd as i32),
                Arg::I32(c as i32),
            ];
            let aligned = x.ptr().is_multiple_of(4);
            match depthwise_kernels() {
                DepthwiseKernels::Tiled if aligned && fits_u32(h * wd * c) => {
                    // A thread per (two columns, channel pair of each half), strips of
                    // `rows` rows (dwk3_gate in vector.cu).
                    let per_row = wd.div_ceil(2) * half / 2;
                    let sms = be.multiprocessors().max(1) as usize;
                    let rows = strip_rows(per_row, n, h, sms);
                    args.push(Arg::I32(rows as i32));
                    let grid = strip_grid(per_row, n, h, rows);
                    be.kernels
                        .launch(&be.ctx, "dwk3_gate", grid, 256, 0, &args)?;
                    return Ok(out);
                }
                DepthwiseKernels::Strip if aligned => {
                    // A thread per (column, channel pair of each half), strips of
                    // DW_ROWS rows.
                    let grid = strip_grid(wd * half / 2, n, h, DW_ROWS);
                    be.kernels
                        .launch(&be.ctx, "dwconv3x3_gate_vec", grid, 256, 0, &args)?;
                    return Ok(out);
                }
                _ => {}
            }
            // Four columns and two channel pairs per thread (DW_XT in ops.cu).
            let per_row = (wd.div_ceil(4) * half / 2).div_ceil(256) as u32;
            be.kernels.launch(
                &be.ctx,
                "dwconv3x3_gate",
                (per_row, (n * h) as u32, 1),
                256,
                0,
                &args,
            )?;
            Ok(out)
        })
        .map(Some)
}

/// The `dwk*` strip kernel for a depthwise convolution writing output pixels `ldo`
/// elements apart at `y` (a channel slice of a wider tensor when `ldo > C`): `false`,
/// with nothing launched, where the kernels are switched off or shape, strides or
/// alignment do not fit them.
pub(crate) fn depthwise_tiled(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    (y, ldo): (u64, usize),
    (oh, ow): (usize, usize),
) -> Result<bool> {
    let [n, h, wd, c] = x.dims;
    let square = w.kh == w.kw && w.spec.padding == w.kh / 2;
    let tiled = tiled_kernel(w.kh, w.spec.stride).filter(|_| square);
    let (DepthwiseKernels::Tiled, Some(tk)) = (depthwise_kernels(), tiled) else {
        return Ok(false);
    };
    let v = tk.channels;
    let align = (v * be.esize()) as u64;
    let aligned = [x.ptr(), y]
        .into_iter()
        .chain(residual.map(|r| r.ptr()))
        .all(|p| p.is_multiple_of(align));
    let per_row = ow.div_ceil(tk.columns) * (c / v.max(1));
    let sms = be.multiprocessors().max(1) as usize;
    let rows = strip_rows(per_row, n, oh, sms);
    let fits = c % v == 0
        && ldo >= c
        && ldo % v == 0
        && ldo <= i32::MAX as usize
        && aligned
        && fits_u32(h * wd * c)
        && fits_u32(oh * ow * ldo)
        && n * oh.div_ceil(rows) <= MAX_GRID_Y;
    if !fits {
        return Ok(false);
    }
    let mut args = vec![
        Arg::Ptr(x.ptr()),
        Arg::Ptr(y),
        Arg::Ptr(w.weight.ptr()),
        Arg::Ptr(w.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
        Arg::Ptr(residual.map(|r| r.ptr()).unwrap_or(0)),
    ];
    args.extend([h, wd, c, oh, ow, rows].map(|v| Arg::I32(v as i32)));
    args.push(Arg::I32(act_code(act)));
    args.push(Arg::I32(ldo as i32));
    // A thread per (X output columns, V channels), strips of `rows` output rows.
    let grid = strip_grid(per_row, n, oh, rows);
    let launch = DenseLaunch::new(x.dims, c, w, (oh, ow), ldo, act, residual.is_some());
    let ptrs = DensePtrs::of(x.ptr(), w, residual.map(|r| r.ptr()), y);
    crate::cudnn_conv::run_dense(be, &launch, &ptrs, || {
        Ok(be.kernels.launch(&be.ctx, tk.name, grid, 256, 0, &args)?)
    })?;
    Ok(true)
}

/// Depthwise convolution with bias, activation and residual fused: the `dwk*` strip
/// kernels where shape and alignment allow, else the earlier kernels (see
/// [`DepthwiseKernels`]) and the generic one.
pub(crate) fn depthwise(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    dims: [usize; 4],
) -> Result<CudaTensor> {
    let [n, h, wd, c] = x.dims;
    let [_, oh, ow, _] = dims;
    let out = be.alloc_tensor(dims)?;
    if depthwise_tiled(be, x, w, act, residual, (out.ptr(), c), (oh, ow))? {
        return Ok(out);
    }
    let mut args = vec![
        Arg::Ptr(x.ptr()),
        Arg::Ptr(out.ptr()),
        Arg::Ptr(w.weight.ptr()),
        Arg::Ptr(w.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
        Arg::Ptr(residual.map(|r| r.ptr()).unwrap_or(0)),
    ];
    let mode = depthwise_kernels();
    let fast = w.kh == 3
        && w.kw == 3
        && w.spec.stride == 1
        && w.spec.padding == 1
        && c % 2 == 0
        && n * oh <= MAX_GRID_Y;
    let aligned = x.ptr().is_multiple_of(8) && residual.is_none_or(|r| r.ptr().is_multiple_of(8));
    if fast && c % 4 == 0 && aligned && mode == DepthwiseKernels::Strip {
        args.extend([h, wd, c].map(|v| Arg::I32(v as i32)));
        args.push(Arg::I32(act_code(act)));
        // A thread per (column, four channels), strips of DW_ROWS rows.
        let grid = strip_grid(wd * c / 4, n, h, DW_ROWS);
        be.kernels
            .launch(&be.ctx, "dwconv3x3_vec", grid, 256, 0, &args)?;
        return Ok(out);
    }
    if fast {
        args.extend([h, wd, c].map(|v| Arg::I32(v as i32)));
        args.push(Arg::I32(act_code(act)));
        // Four columns and two channels per thread (DW_XT in ops.cu).
        let per_row = (wd.div_ceil(4) * c / 2).div_ceil(256) as u32;
        be.kernels.launch(
            &be.ctx,
            "dwconv3x3",
            (per_row, (n * oh) as u32, 1),
            256,
            0,
            &args,
        )?;
        return Ok(out);
    }
    args.extend(geometry_args(x.dims, (oh, ow), w));
    args.push(Arg::I32(act_code(act)));
    be.launch_1d("dwconv", out.numel(), &args)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_shorten_only_when_blocks_are_scarce() {
        // Restormer's gated 3x3 at 512x512, batch 32: plenty of blocks.
        assert_eq!(strip_rows(256 * 64, 32, 512, 132), DW_ROWS);
        // D-FINE's 5x5 at 20x20x512 (two columns, two channels per thread), batch 32:
        // 10 x 32 x 2 = 640 blocks.
        assert_eq!(strip_rows(10 * 256, 32, 20, 132), DW_ROWS);
        // The same at batch 1: 20 blocks, so strips shrink to the floor of 4 rows.
        assert_eq!(strip_rows(10 * 256, 1, 20, 132), 4);
        // Never below 4, whatever the grid.
        assert_eq!(strip_rows(1, 1, 1, 132), 4);
    }

    #[test]
    fn tiled_kernels_cover_odd_kernels_at_stride_one_and_two() {
        for k in [3, 5, 7] {
            for s in [1, 2] {
                let tk = tiled_kernel(k, s).expect("covered");
                assert_eq!(tk.name, format!("dwk{k}s{s}"));
                assert!(crate::kernels::KERNEL_NAMES.contains(&tk.name));
                assert!([1, 2, 4].contains(&tk.channels));
                assert!([1, 2].contains(&tk.columns));
            }
        }
        assert!(tiled_kernel(2, 1).is_none());
        assert!(tiled_kernel(3, 3).is_none());
        assert!(crate::kernels::KERNEL_NAMES.contains(&"dwk3_gate"));
    }

    #[test]
    fn image_offsets_must_fit_32_bits() {
        assert!(fits_u32(512 * 512 * 2048));
        assert!(!fits_u32(1 << 32));
    }
}
