//! Convolutions: 1x1 as one cuBLASLt product over all pixels; dense k x k as an
//! implicit GEMM on tensor cores (`conv_igemm`) where storage and channel counts allow,
//! else im2col plus a product (in image chunks to bound the patch buffer); depthwise by
//! a kernel with bias, activation and residual fused.

use aperture_engine::backend::{Activation, ConvShape, ConvSpec};
use aperture_engine::{EngineError, HostTensor, Result};

use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::gemm::{GemmCall, Operand};
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

/// Largest patch buffer for one im2col chunk.
const IM2COL_BUDGET: usize = 1 << 30;

pub(crate) fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Identity => 0,
        Activation::Gelu => 1,
        Activation::Relu => 2,
        Activation::Silu => 3,
    }
}

/// Whether a convolution is a plain product over pixels: every output pixel reads
/// exactly its own input pixel (1x1, stride 1, no padding).
pub(crate) fn plain_product(kh: usize, kw: usize, spec: ConvSpec) -> bool {
    kh == 1 && kw == 1 && spec.stride == 1 && spec.padding == 0
}

pub(crate) fn prepare(
    be: &CudaBackend,
    weight: &HostTensor,
    bias: Option<&HostTensor>,
    spec: ConvSpec,
) -> Result<ConvWeights> {
    let ConvShape {
        c_out,
        c_in,
        kh,
        kw,
    } = ConvShape::of(weight, bias, spec)?;
    let cig = c_in / spec.groups;
    let w = weight.to_f32_vec();
    let bias_f32 = bias.map(|b| b.to_f32_vec());
    if spec.groups == 1 {
        let pointwise = plain_product(kh, kw, spec);
        let k = kh * kw * c_in;
        // Patch rows are padded to 8 elements so the products stay 16-byte aligned.
        let kp = if pointwise { k } else { k.div_ceil(8) * 8 };
        let mut dense = vec![0f32; c_out * kp];
        for o in 0..c_out {
            for ci in 0..c_in {
                for y in 0..kh {
                    for x in 0..kw {
                        dense[o * kp + (y * kw + x) * c_in + ci] =
                            w[((o * c_in + ci) * kh + y) * kw + x];
                    }
                }
            }
        }
        let weight_f32 = if pointwise {
            Some(be.upload_bytes(&w)?)
        } else {
            None
        };
        let bias = bias_f32.map(|b| be.upload_storage(&b)).transpose()?;
        Ok(ConvWeights {
            spec,
            c_in,
            c_out,
            kh,
            kw,
            weight: be.upload_storage(&dense)?,
            kp,
            bias,
            weight_f32,
            depthwise: false,
        })
    } else if cig == 1 && spec.groups == c_out {
        let c = c_out;
        let mut dw = vec![0f32; kh * kw * c];
        for ch in 0..c {
            for y in 0..kh {
                for x in 0..kw {
                    dw[(y * kw + x) * c + ch] = w[(ch * kh + y) * kw + x];
                }
            }
        }
        let bias = bias_f32.map(|b| be.upload_bytes(&b)).transpose()?;
        Ok(ConvWeights {
            spec,
            c_in,
            c_out,
            kh,
            kw,
            weight: be.upload_bytes(&dw)?,
            kp: 0,
            bias,
            weight_f32: None,
            depthwise: true,
        })
    } else {
        Err(EngineError::Unsupported(format!(
            "the CUDA backend runs dense and depthwise convolutions; groups={} with {c_in} inputs and {c_out} outputs is neither",
            spec.groups
        )))
    }
}

/// `out[p, :] = w x[p, :] (+ bias) (+ res[p, :])` for `p` pixels with `k` inputs each
/// (row stride `k`), all row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    be: &CudaBackend,
    x: u64,
    p: usize,
    k: usize,
    w: &ConvWeights,
    out: u64,
    res: Option<u64>,
    with_bias: bool,
) -> Result<()> {
    let elem = be.elem();
    let call = GemmCall {
        a: Operand {
            ptr: w.weight.ptr(),
            rows: k as u64,
            cols: w.c_out as u64,
            ld: k as i64,
            stride: 0,
            elem,
        },
        trans_a: true,
        b: Operand {
            ptr: x,
            rows: k as u64,
            cols: p as u64,
            ld: k as i64,
            stride: 0,
            elem,
        },
        trans_b: false,
        c: res,
        d: Operand {
            ptr: out,
            rows: w.c_out as u64,
            cols: p as u64,
            ld: w.c_out as i64,
            stride: 0,
            elem,
        },
        batch: 1,
        bias: if with_bias {
            w.bias.as_ref().map(|b| b.ptr())
        } else {
            None
        },
        tf32: be.tf32(),
    };
    be.run_gemm(&call)?;
    Ok(())
}

pub(crate) fn out_size(w: &ConvWeights, h: usize, wd: usize) -> Result<(usize, usize)> {
    let p = w.spec.padding;
    if h + 2 * p < w.kh || wd + 2 * p < w.kw {
        return Err(EngineError::Shape(format!(
            "input {h}x{wd} is smaller than the {}x{} kernel",
            w.kh, w.kw
        )));
    }
    Ok((
        (h + 2 * p - w.kh) / w.spec.stride + 1,
        (wd + 2 * p - w.kw) / w.spec.stride + 1,
    ))
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
    be.kernels.launch(&be.ctx, tk.name, grid, 256, 0, &args)?;
    Ok(true)
}

/// Depthwise convolution with bias, activation and residual fused: the `dwk*` strip
/// kernels where shape and alignment allow, else the earlier kernels (see
/// [`DepthwiseKernels`]) and the generic one.
fn depthwise(
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
    args.extend(
        [
            n,
            h,
            wd,
            c,
            oh,
            ow,
            w.kh,
            w.kw,
            w.spec.stride,
            w.spec.padding,
        ]
        .map(|v| Arg::I32(v as i32)),
    );
    args.push(Arg::I32(act_code(act)));
    be.launch_1d("dwconv", out.numel(), &args)?;
    Ok(out)
}

pub(crate) fn conv2d(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
) -> Result<CudaTensor> {
    let [n, h, wd, c] = x.dims;
    if c != w.c_in {
        return Err(EngineError::Shape(format!(
            "convolution expects {} input channels, got {c}",
            w.c_in
        )));
    }
    let (oh, ow) = out_size(w, h, wd)?;
    let dims = [n, oh, ow, w.c_out];
    if let Some(r) = residual {
        if r.dims != dims {
            return Err(EngineError::Shape(format!(
                "residual {:?} does not match convolution output {dims:?}",
                r.dims
            )));
        }
    }
    let es = be.esize() as f64;
    let p_out = n * oh * ow;
    let res_bytes = residual.map(|r| r.numel()).unwrap_or(0) as f64 * es;
    if w.depthwise {
        let flops = 2.0 * (w.kh * w.kw * p_out * w.c_out) as f64;
        let bytes = (x.numel() + p_out * w.c_out) as f64 * es + res_bytes;
        return be.profiler.op(be, "conv_depthwise", flops, bytes, || {
            depthwise(be, x, w, act, residual, dims)
        });
    }
    if let Some(g) = crate::conv_igemm::plan(be, x, w, (oh, ow), residual) {
        let flops = 2.0 * (g.m * g.k * g.c_out) as f64;
        let bytes = (x.numel() + g.m * g.c_out + g.c_out * g.kp) as f64 * es + res_bytes;
        let name = match g.tile {
            crate::conv_igemm::Tile::N64 => "conv_igemm",
            crate::conv_igemm::Tile::N128 => "conv_igemm_wide",
        };
        return be.profiler.op(be, name, flops, bytes, || {
            crate::conv_igemm::run(be, x, w, &g, act, residual)
        });
    }
    let fused_res = if act == Activation::Identity {
        residual.map(|r| r.ptr())
    } else {
        None
    };
    let k_real = w.kh * w.kw * w.c_in;
    let flops = 2.0 * (p_out * k_real * w.c_out) as f64;
    let pointwise = w.kp == w.c_in && plain_product(w.kh, w.kw, w.spec);
    let name = if pointwise {
        "conv1x1_gemm"
    } else {
        "conv3x3_im2col_gemm"
    };
    let bytes = (x.numel() + p_out * w.c_out + w.c_out * w.kp) as f64 * es + res_bytes;
    let out = be.profiler.op(be, name, flops, bytes, || {
        let out = be.alloc_tensor(dims)?;
        if pointwise {
            gemm_rows(be, x.ptr(), p_out, w.c_in, w, out.ptr(), fused_res, true)?;
            return Ok(out);
        }
        let per_image = oh * ow * w.kp * be.esize();
        let chunk = (IM2COL_BUDGET / per_image.max(1)).clamp(1, n);
        let col = be.pool.alloc(chunk * per_image)?;
        let esz = be.esize() as u64;
        let mut n0 = 0;
        while n0 < n {
            let nc = chunk.min(n - n0);
            let x_off = x.ptr() + (n0 * h * wd * c) as u64 * esz;
            let mut args = vec![Arg::Ptr(x_off), Arg::Ptr(col.ptr())];
            if nc * oh <= 65_535 {
                args.extend(
                    [
                        h,
                        wd,
                        c,
                        oh,
                        ow,
                        w.kh,
                        w.kw,
                        w.spec.stride,
                        w.spec.padding,
                        w.kp,
                    ]
                    .map(|v| Arg::I32(v as i32)),
                );
                let per_row = (ow * w.kp).div_ceil(256).min(64) as u32;
                be.kernels.launch(
                    &be.ctx,
                    "im2col_rows",
                    (per_row, (nc * oh) as u32, 1),
                    256,
                    0,
                    &args,
                )?;
            } else {
                args.extend(
                    [
                        nc,
                        h,
                        wd,
                        c,
                        oh,
                        ow,
                        w.kh,
                        w.kw,
                        w.spec.stride,
                        w.spec.padding,
                        w.kp,
                    ]
                    .map(|v| Arg::I32(v as i32)),
                );
                be.launch_1d("im2col", nc * oh * ow * w.kp, &args)?;
            }
            let o_off = (n0 * oh * ow * w.c_out) as u64 * esz;
            let res = fused_res.map(|r| r + o_off);
            gemm_rows(
                be,
                col.ptr(),
                nc * oh * ow,
                w.kp,
                w,
                out.ptr() + o_off,
                res,
                true,
            )?;
            n0 += nc;
        }
        Ok(out)
    })?;
    if act != Activation::Identity {
        be.launch_1d(
            "act_residual",
            out.numel(),
            &[
                Arg::Ptr(out.ptr()),
                Arg::Ptr(residual.map(|r| r.ptr()).unwrap_or(0)),
                Arg::I64(out.numel() as i64),
                Arg::I32(act_code(act)),
            ],
        )?;
    }
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
