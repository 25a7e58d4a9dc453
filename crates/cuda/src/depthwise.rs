//! Depthwise convolutions (groups == channels): the shared-memory staged 5x5 (`dws5`,
//! vector.cu), strip-streaming kernels for k x k at stride 1 and 2 (`dwk*`), the gated
//! 3x3 fused with the GELU gate, and the per-row / generic kernels where those do not
//! apply (`APERTURE_DEPTHWISE` selects older kernels for A/B runs).

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
    /// `tiled`: the `dwk*` kernels (k = 3, 5, 7; stride 1 or 2; fused gate).
    Tiled,
    /// Default: `dws5` for 5x5 stride 1 where it fits, the `dwk*` kernels for the rest
    /// (with `APERTURE_DEPTHWISE_MMA=1`, first the tensor-core kernels of
    /// crate::depthwise_mma for 3x3 and 5x5 at stride 1 in 16-bit storage).
    Staged,
}

fn depthwise_kernels() -> DepthwiseKernels {
    static ON: std::sync::OnceLock<DepthwiseKernels> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("APERTURE_DEPTHWISE").as_deref() {
        Ok("scalar") => DepthwiseKernels::Scalar,
        Ok("strip") => DepthwiseKernels::Strip,
        Ok("tiled") => DepthwiseKernels::Tiled,
        _ => DepthwiseKernels::Staged,
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
                DepthwiseKernels::Tiled | DepthwiseKernels::Staged
                    if aligned && fits_u32(h * wd * c) =>
                {
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

/// Input rows `dws5` keeps in shared memory (DWS_NR in vector.cu).
const DWS_NR: usize = 7;
/// Output columns per thread of `dws5` (its X).
const DWS_COLUMNS: usize = 5;
/// Dynamic shared memory `dws5` may take without opting in to more.
const DWS_MAX_SMEM: usize = 48 * 1024;

/// A launch of the staged 5x5 kernel: channels per block, output rows per strip, grid and
/// shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StagedPlan {
    cb: usize,
    rows: usize,
    grid: (u32, u32, u32),
    smem: u32,
}

impl StagedPlan {
    /// The entry point for the plan's channels per block.
    fn kernel(&self) -> &'static str {
        if self.cb == 128 {
            "dws5_128"
        } else {
            "dws5"
        }
    }

    /// The plan for a 5x5 stride-1 depthwise convolution of `x`, output rows `ldo`
    /// elements apart at `y`; `None` where the kernel does not apply.
    fn new(
        be: &CudaBackend,
        x: &CudaTensor,
        (y, ldo): (u64, usize),
        residual: Option<&CudaTensor>,
    ) -> Option<Self> {
        let [_, h, w, c] = x.dims;
        let esize = be.esize();
        let pair = (2 * esize) as u64;
        // cp.async moves 16 bytes: the image and every pixel row start on 16 bytes.
        let aligned = x.ptr().is_multiple_of(16)
            && (c * esize).is_multiple_of(16)
            && y.is_multiple_of(pair)
            && residual.is_none_or(|r| r.ptr().is_multiple_of(pair));
        let fits = aligned
            && be.capability().0 >= 8
            && ldo >= c
            && ldo.is_multiple_of(2)
            && h * w * ldo <= i32::MAX as usize
            && fits_u32(h * w * c);
        let slots = 2 * be.multiprocessors().max(1) as usize;
        fits.then(|| Self::shape(x.dims, esize, slots)).flatten()
    }

    /// Channels per block (128 where a row has at most four column groups, so all eight
    /// warps have work; else 64), and the strip height minimising the busiest
    /// multiprocessor's rows (waves of `slots` blocks times rows plus the 4-row halo).
    fn shape([n, h, w, c]: [usize; 4], esize: usize, slots: usize) -> Option<Self> {
        let groups = w.div_ceil(DWS_COLUMNS);
        let cb = if groups <= 4 && c.is_multiple_of(128) {
            128
        } else {
            64
        };
        // Each ring slot holds whole column groups (the kernel never clamps a load).
        let smem = DWS_NR * (w.div_ceil(DWS_COLUMNS) * DWS_COLUMNS + 4) * cb * esize;
        if !c.is_multiple_of(cb) || smem > DWS_MAX_SMEM || n == 0 || h == 0 {
            return None;
        }
        let base = (c / cb) * n;
        // Strips of at least two rows; ties go to fewer strips (less halo).
        let cost = |strips: usize| (base * strips).div_ceil(slots) * (h.div_ceil(strips) + 4);
        let strips = (1..=h.div_ceil(2)).min_by_key(|&s| (cost(s), s))?;
        let rows = h.div_ceil(strips);
        let strips = h.div_ceil(rows);
        let grid_y = n * strips;
        if grid_y > MAX_GRID_Y {
            return None;
        }
        Some(Self {
            cb,
            rows,
            grid: ((c / cb) as u32, grid_y as u32, 1),
            smem: smem as u32,
        })
    }
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
    let mode = depthwise_kernels();
    if mode == DepthwiseKernels::Staged
        && crate::depthwise_mma::try_run(be, x, w, act, residual, (y, ldo))?
    {
        return Ok(true);
    }
    if mode == DepthwiseKernels::Staged && square && w.kh == 5 && w.spec.stride == 1 {
        if let Some(plan) = StagedPlan::new(be, x, (y, ldo), residual) {
            run_staged(be, x, w, act, residual, (y, ldo), &plan)?;
            return Ok(true);
        }
    }
    let tiled = tiled_kernel(w.kh, w.spec.stride).filter(|_| square);
    let (DepthwiseKernels::Tiled | DepthwiseKernels::Staged, Some(tk)) = (mode, tiled) else {
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
    let mut args = pointer_args(x, y, w, residual);
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

/// `dws5` as planned (timed against cuDNN like every dense launch).
fn run_staged(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    (y, ldo): (u64, usize),
    plan: &StagedPlan,
) -> Result<()> {
    let [_, h, wd, c] = x.dims;
    let mut args = pointer_args(x, y, w, residual);
    args.extend([h, wd, c, plan.rows].map(|v| Arg::I32(v as i32)));
    args.push(Arg::I32(act_code(act)));
    args.push(Arg::I32(ldo as i32));
    let launch = DenseLaunch::new(x.dims, c, w, (h, wd), ldo, act, residual.is_some());
    let ptrs = DensePtrs::of(x.ptr(), w, residual.map(|r| r.ptr()), y);
    crate::cudnn_conv::run_dense(be, &launch, &ptrs, || {
        Ok(be
            .kernels
            .launch(&be.ctx, plan.kernel(), plan.grid, 256, plan.smem, &args)?)
    })
}

/// The leading arguments of every depthwise kernel: input, output, taps, bias, residual.
pub(crate) fn pointer_args(
    x: &CudaTensor,
    y: u64,
    w: &ConvWeights,
    residual: Option<&CudaTensor>,
) -> Vec<Arg> {
    vec![
        Arg::Ptr(x.ptr()),
        Arg::Ptr(y),
        Arg::Ptr(w.weight.ptr()),
        Arg::Ptr(w.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
        Arg::Ptr(residual.map(|r| r.ptr()).unwrap_or(0)),
    ]
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
    let mut args = pointer_args(x, out.ptr(), w, residual);
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
    fn staged_plan_fits_dfine_maps_and_refuses_the_rest() {
        let slots = 2 * 132;
        // 40x40x256 at batch 32: 64 channels per block, two strips of 20 rows (one wave
        // of 256 blocks beats two waves of shorter strips with their halos).
        let p = StagedPlan::shape([32, 40, 40, 256], 2, slots).expect("fits");
        assert_eq!((p.cb, p.rows, p.grid), (64, 20, (4, 64, 1)));
        assert_eq!(p.smem as usize, DWS_NR * 44 * 64 * 2);
        // 20x20x512: four column groups, so 128 channels per block keep eight warps busy.
        let p = StagedPlan::shape([32, 20, 20, 512], 2, slots).expect("fits");
        assert_eq!((p.cb, p.rows, p.grid), (128, 10, (4, 64, 1)));
        assert_eq!(p.kernel(), "dws5_128");
        // Batch 1 takes short strips (at least two rows) to fill the GPU.
        let p = StagedPlan::shape([1, 40, 40, 256], 2, slots).expect("fits");
        assert_eq!(p.rows, 2);
        assert_eq!(p.grid, (4, 20, 1));
        assert_eq!(p.kernel(), "dws5");
        // A width off the column groups: slots sized for whole groups (7 groups of 5).
        let p = StagedPlan::shape([2, 33, 33, 64], 2, slots).expect("fits");
        assert_eq!(p.smem as usize, DWS_NR * (35 + 4) * 64 * 2);
        // Every strip is non-empty and they cover the map.
        for h in 1..50 {
            let p = StagedPlan::shape([3, h, 24, 64], 2, slots).expect("fits");
            let strips = p.grid.1 as usize / 3;
            assert!(p.rows * strips >= h && p.rows * (strips - 1) < h, "h {h}");
        }
        // fp32 rows overflow 48 KB; channels off the block width; wide maps; nothing.
        assert!(StagedPlan::shape([32, 40, 40, 256], 4, slots).is_none());
        assert!(StagedPlan::shape([32, 40, 40, 96], 2, slots).is_none());
        assert!(StagedPlan::shape([2, 64, 64, 512], 2, slots).is_none());
        assert!(StagedPlan::shape([0, 40, 40, 256], 2, slots).is_none());
        assert!(StagedPlan::shape([1, 0, 40, 256], 2, slots).is_none());
    }

    #[test]
    fn staged_constants_match_the_kernel() {
        let src = crate::kernels::VECTOR_SOURCE;
        assert_eq!(
            crate::kernels::source_define(src, "vector.cu", "DWS_NR"),
            DWS_NR
        );
        for (cb, name) in [(64, "dws5"), (128, "dws5_128")] {
            assert!(
                src.contains(&format!("dws_conv<5, {DWS_COLUMNS}, {cb}>")),
                "{name} takes X = {DWS_COLUMNS} and {cb} channels per block"
            );
        }
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
