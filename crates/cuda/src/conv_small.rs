//! Dense convolutions with few taps per output (`K = kh * kw * c_in <= 32`: the
//! 3-channel stems of image models) on `conv_small_taps{32,64}` (kernels/ops.cu, by the
//! output width). im2col would
//! write a K-wide copy of the whole output grid for a product whose K is tiny (D-FINE's
//! 3x3 stride-2 stem at batch 32: a 210 MB copy); here each thread reads its pixel's taps
//! and writes every output channel once. In 16-bit storage the product runs on tensor
//! cores (`small_taps_mma*`, kernels/small_taps_mma.cu: each lane gathers its A fragment
//! from the input); `APERTURE_SMALL_TAPS=staged` stages each block's input rows in shared
//! memory first, `=fma` keeps the FMA kernels, `=0` im2col (A/B runs).

use std::sync::OnceLock;

use aperture_engine::backend::Activation;
use aperture_engine::Result;

use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::conv::{act_code, geometry_args};
use crate::conv_igemm::IgemmSlot;
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
    let narrow = w.c_out <= NARROW_OUT;
    if let Some((kernels, smem)) = tensor_core_kernels(be, pixels, w) {
        // 16 pixels per warp step, eight warps per block, a few blocks per multiprocessor.
        let blocks = pixels
            .div_ceil(16 * 8)
            .clamp(1, be.ctx.multiprocessors.max(1) as usize * 8) as u32;
        let func = if narrow { kernels[0] } else { kernels[1] };
        crate::kernels::launch_function(&be.ctx, func, (blocks, 1, 1), THREADS, smem, &args)?;
        return Ok(out);
    }
    let name = if narrow {
        "conv_small_taps32"
    } else {
        "conv_small_taps64"
    };
    be.kernels
        .launch(&be.ctx, name, (blocks, 1, 1), THREADS, 0, &args)?;
    Ok(out)
}

/// Which small-taps kernels run, from `APERTURE_SMALL_TAPS` (im2col for `0` is decided in
/// [`fits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SmallTaps {
    /// Default: tensor cores, each lane gathering its A fragment from the input.
    Gather,
    /// `staged`: tensor cores, the block's input rows staged in shared memory first (to
    /// be measured against `Gather`).
    Staged,
    /// `fma`: the CUDA-core kernels (`conv_small_taps*`).
    Fma,
}

fn small_taps_mode() -> SmallTaps {
    static MODE: OnceLock<SmallTaps> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("APERTURE_SMALL_TAPS").as_deref() {
        Ok("fma") => SmallTaps::Fma,
        Ok("staged") => SmallTaps::Staged,
        _ => SmallTaps::Gather,
    })
}

/// Whether `APERTURE_SMALL_TAPS=staged` asks for the staged kernels (only then are they
/// compiled into the convolution module).
pub(crate) fn staged_requested() -> bool {
    small_taps_mode() == SmallTaps::Staged
}

/// Output columns per block of the staged kernels (SMALL_WARPS * 16 in
/// kernels/small_taps_mma.cu).
const STAGED_COLUMNS: usize = 8 * 16;
/// Dynamic shared memory the staged kernels are loaded with (their staged rows).
pub(crate) const STAGED_MAX_SMEM: usize = 48 * 1024;

/// The staged kernels' shared memory for `w`: its kh input rows under a block's columns.
fn staged_smem(w: &ConvWeights) -> usize {
    w.kh * ((STAGED_COLUMNS - 1) * w.spec.stride + w.kw) * w.c_in * 2
}

/// The tensor-core kernels (`small_taps_mma*` in kernels/small_taps_mma.cu, 16-bit
/// storage) and their dynamic shared memory, where loaded, asked for and the output's
/// pixel count fits their 32-bit indices.
fn tensor_core_kernels(
    be: &CudaBackend,
    pixels: usize,
    w: &ConvWeights,
) -> Option<([cudarc::driver::sys::CUfunction; 2], u32)> {
    let IgemmSlot::Ready(k) = &be.kernels.igemm else {
        return None;
    };
    if pixels > i32::MAX as usize {
        return None;
    }
    match small_taps_mode() {
        SmallTaps::Fma => None,
        SmallTaps::Staged if staged_smem(w) <= STAGED_MAX_SMEM => {
            Some((k.small_taps_staged?, staged_smem(w) as u32))
        }
        SmallTaps::Staged | SmallTaps::Gather => Some((k.small_taps?, 0)),
    }
}

#[cfg(test)]
mod tests {
    /// Parameters of a kernel's `#define NAME_PARAMS` list in `src`.
    fn param_count(src: &str, define: &str) -> usize {
        let start = src.find(&format!("#define {define}")).expect("defined");
        let mut body = String::new();
        for line in src[start..].lines() {
            body.push_str(line);
            if !line.trim_end().ends_with('\\') {
                break;
            }
        }
        body.matches(',').count() + 1
    }

    /// K position `i` of the lanes with `lane % 4 == q` (small_k in small_taps_mma.cu).
    fn small_k(i: usize, q: usize) -> usize {
        16 * (i >> 2) + 8 * ((i >> 1) & 1) + 2 * q + (i & 1)
    }

    #[test]
    fn the_lanes_k_positions_cover_two_steps_once() {
        let mut seen = [0; 32];
        for q in 0..4 {
            for i in 0..8 {
                seen[small_k(i, q)] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    /// The staged kernel's index arithmetic replayed on the host: rows staged as the block
    /// copies them, each (pixel, K position) read at `p * stride * C + koff`, against the
    /// input element the convolution wants there (zero outside the image).
    #[test]
    fn staged_gathers_read_each_pixels_taps() {
        let cols = super::STAGED_COLUMNS;
        // (h, w, c, kh, kw, stride, pad): the stem, a 5x5 over one channel, a 2x2 with
        // four channels and a map wider than two blocks.
        for (h, w, c, kh, kw, stride, pad) in [
            (23, 30, 3, 3, 3, 2, 1),
            (9, 10, 1, 5, 5, 2, 2),
            (7, 6, 4, 2, 2, 1, 0),
            (17, 300, 3, 3, 3, 1, 1),
        ] {
            let (oh, ow) = (
                (h + 2 * pad - kh) / stride + 1,
                (w + 2 * pad - kw) / stride + 1,
            );
            let x = |iy: i64, ix: i64, ch: usize| -> i64 {
                if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                    0
                } else {
                    1 + (iy * w as i64 + ix) * c as i64 + ch as i64
                }
            };
            let span = ((cols - 1) * stride + kw) * c;
            let k_total = kh * kw * c;
            for oy in 0..oh {
                for bx0 in (0..ow).step_by(cols) {
                    let iy0 = (oy * stride) as i64 - pad as i64;
                    let first = ((bx0 * stride) as i64 - pad as i64) * c as i64;
                    // The block's copy: element e of row r is input element first + e.
                    let staged: Vec<i64> = (0..kh)
                        .flat_map(|r| {
                            (0..span as i64).map(move |e| {
                                let at = first + e;
                                let (ix, ch) = (at.div_euclid(c as i64), at.rem_euclid(c as i64));
                                if at < 0 || at >= (w * c) as i64 {
                                    0
                                } else {
                                    x(iy0 + r as i64, ix, ch as usize)
                                }
                            })
                        })
                        .collect();
                    for p in 0..cols.min(ow - bx0) {
                        for k in 0..k_total {
                            let tap = k / c;
                            let (dy, dx, ch) = (tap / kw, tap % kw, k % c);
                            let koff = dy * span + dx * c + ch;
                            let got = staged[p * stride * c + koff];
                            let ix = ((bx0 + p) * stride + dx) as i64 - pad as i64;
                            assert_eq!(got, x(iy0 + dy as i64, ix, ch), "oy {oy} p {p} k {k}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn staged_blocks_match_the_kernel() {
        let mma = crate::conv_igemm::SMALL_TAPS_MMA_SOURCE;
        let warps = crate::kernels::source_define(mma, "small_taps_mma.cu", "SMALL_WARPS");
        assert_eq!(super::STAGED_COLUMNS, warps * 16);
        assert_eq!(super::THREADS as usize, warps * 32);
    }

    #[test]
    fn tensor_core_kernels_take_the_fma_kernels_arguments() {
        // launch() builds one argument list for both: 5 pointers, 10 geometry values,
        // Kp, c_out, act, OHp, OWp.
        let mma = crate::conv_igemm::SMALL_TAPS_MMA_SOURCE;
        assert_eq!(param_count(mma, "SMALL_MMA_PARAMS"), 20);
        let ops = crate::kernels::OPS_SOURCE;
        let fma = ops
            .find("#define CONV_SMALL_KERNEL")
            .map(|i| &ops[i..])
            .expect("defined");
        let signature = &fma[fma.find("NAME(").expect("entry")..fma.find(") {").expect("body")];
        assert_eq!(signature.matches(',').count() + 1, 20);
    }
}
