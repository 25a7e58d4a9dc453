//! Dense k x k convolutions as an implicit GEMM on tensor cores (`kernels/conv.cu`): the
//! input patches are gathered into shared memory chunk by chunk instead of being written
//! out by im2col, and bias, activation and residual ride in the epilogue.
//!
//! Taken for 16-bit storage on sm_80+ when the input channel count is a multiple of 8 (an
//! 8-channel segment is one 16-byte copy); everything else (fp32/tf32, the 3-channel
//! image input, 1x1 products, depthwise) keeps its previous path. Two block shapes (see
//! [`Tile`]). `APERTURE_CONV_IGEMM=0` turns the kernel off, `=64` keeps only the 64-wide
//! tile (for A/B timing or as an escape hatch).

use std::ffi::{c_void, CString};

use aperture_engine::backend::Activation;
use aperture_engine::{EngineError, Result};
use cudarc::driver::{result, sys};

use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::driver::Context;
use crate::error::{CudaError, CudaResult};
use crate::kernels::{preamble, Arg, Storage};
use crate::nvrtc;

#[cfg(test)]
#[path = "conv_igemm_sim.rs"]
mod sim;

pub const CONV_SOURCE: &str = include_str!("../kernels/conv.cu");

/// Pixels per block (`conv.cu`'s IG_BM; a test checks).
const TILE_M: usize = 128;
/// Environment switch: `0` keeps every convolution on the im2col path, `64` uses only
/// the 64-channel tile (for A/B timing of the two shapes).
const ENV_SWITCH: &str = "APERTURE_CONV_IGEMM";

/// The block shapes of `conv.cu`: 128 pixels x 64 or 128 output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    /// `conv_igemm`: 4 warps.
    N64,
    /// `conv_igemm_n128`: 8 warps, half the input traffic per product.
    N128,
}

impl Tile {
    const ALL: [Tile; 2] = [Tile::N64, Tile::N128];

    fn entry(self) -> &'static str {
        match self {
            Tile::N64 => "conv_igemm",
            Tile::N128 => "conv_igemm_n128",
        }
    }
    /// Warps along the channels (two along the pixels).
    pub(crate) fn warps_n(self) -> usize {
        match self {
            Tile::N64 => 2,
            Tile::N128 => 4,
        }
    }
    pub(crate) fn channels(self) -> usize {
        32 * self.warps_n()
    }
    fn threads(self) -> u32 {
        64 * self.warps_n() as u32
    }
    /// Dynamic shared memory: 3 stages of A [128][40] and B [channels][40], 2 bytes each
    /// (`IG_SMEM_BYTES` in conv.cu).
    fn smem_bytes(self) -> u32 {
        (3 * (TILE_M + self.channels()) * 40 * 2) as u32
    }

    /// The wide tile where the outputs fill it and it still gives every multiprocessor
    /// a block; else the 64-channel one (more blocks for small batches).
    pub(crate) fn choose(c_out: usize, m: usize, multiprocessors: usize, wide_ok: bool) -> Tile {
        let wide_blocks = m.div_ceil(TILE_M) * c_out.div_ceil(Tile::N128.channels());
        if wide_ok && c_out > Tile::N64.channels() && wide_blocks >= multiprocessors {
            Tile::N128
        } else {
            Tile::N64
        }
    }
}

/// The translation unit for a storage type, or `None` for fp32 (no 16-bit tensor-core
/// product to run).
pub fn conv_source(s: Storage) -> Option<String> {
    let select = match s {
        Storage::F32 => return None,
        Storage::F16 => "",
        Storage::BF16 => "#define IGEMM_BF16 1\n",
    };
    Some(format!("{}\n{select}{CONV_SOURCE}\n", preamble(s)))
}

/// The loaded kernels: the 64-channel tile always, the 128-channel one unless switched
/// off or refused its shared memory.
pub(crate) struct IgemmKernel {
    module: sys::CUmodule,
    small: sys::CUfunction,
    wide: Option<sys::CUfunction>,
    /// `copy_rows16`: vectorised row copies (used by crate::detection's slices and
    /// concatenations where aligned).
    copy: Option<sys::CUfunction>,
}

// SAFETY: module and function handles are immutable driver objects, usable from any
// thread with the context current.
unsafe impl Send for IgemmKernel {}
unsafe impl Sync for IgemmKernel {}

impl Drop for IgemmKernel {
    fn drop(&mut self) {
        // SAFETY: unloaded once; the function is not used afterwards.
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

/// Whether the implicit-GEMM kernel is there for a backend.
pub(crate) enum IgemmSlot {
    Ready(IgemmKernel),
    /// Not applicable (fp32 storage, an older GPU) or switched off: im2col, silently.
    Disabled(String),
    /// Should have loaded but did not (a compile error): im2col, and the self-test fails.
    Failed(String),
}

impl IgemmSlot {
    /// Compiles (or reads from the cache) and loads the kernel where it applies. Never
    /// fails: a backend without it runs im2col as before.
    pub(crate) fn load(ctx: &Context, storage: Storage) -> Self {
        let Some(source) = conv_source(storage) else {
            return Self::Disabled("fp32 storage uses im2col and cuBLASLt".into());
        };
        if std::env::var(ENV_SWITCH).is_ok_and(|v| v.trim() == "0") {
            return Self::Disabled(format!("switched off by {ENV_SWITCH}=0"));
        }
        if ctx.capability.0 < 8 {
            return Self::Disabled(format!(
                "needs compute capability 8.0 (mma.sync m16n8k16, cp.async), the GPU has {}.{}",
                ctx.capability.0, ctx.capability.1
            ));
        }
        let wide = !std::env::var(ENV_SWITCH).is_ok_and(|v| v.trim() == "64");
        match load_kernel(ctx, &source, wide) {
            Ok(k) => Self::Ready(k),
            Err(e) => {
                eprintln!("warning: implicit-GEMM convolution unavailable, using im2col: {e}");
                Self::Failed(e.to_string())
            }
        }
    }

    /// `None` when ready, else why not.
    pub(crate) fn reason(&self) -> Option<&str> {
        match self {
            Self::Ready(_) => None,
            Self::Disabled(r) | Self::Failed(r) => Some(r),
        }
    }

    pub(crate) fn failed(&self) -> bool {
        matches!(self, Self::Failed(_))
    }

    /// The vectorised row copy of the module, when loaded.
    pub(crate) fn copy_rows(&self) -> Option<sys::CUfunction> {
        match self {
            Self::Ready(k) => k.copy,
            _ => None,
        }
    }

    /// Whether the 128-channel tile is loaded.
    pub(crate) fn wide(&self) -> bool {
        matches!(self, Self::Ready(k) if k.wide.is_some())
    }
}

fn load_kernel(ctx: &Context, source: &str, wide: bool) -> CudaResult<IgemmKernel> {
    let (cubin, _) = nvrtc::compile_cached(source, ctx.capability)?;
    ctx.bind()?;
    // SAFETY: `cubin` is a complete CUBIN image for this device.
    let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void)? };
    let mut funcs = Vec::new();
    for tile in Tile::ALL {
        let name =
            CString::new(tile.entry()).map_err(|_| CudaError::Driver("bad kernel name".into()))?;
        // SAFETY: the module is loaded; the name is NUL-terminated.
        match unsafe { result::module::get_function(module, name) } {
            Ok(f) => funcs.push(f),
            Err(e) => {
                // SAFETY: nothing of the module is in use yet.
                unsafe {
                    let _ = result::module::unload(module);
                }
                return Err(e.into());
            }
        }
    }
    use sys::CUfunction_attribute::*;
    for (&f, tile) in funcs.iter().zip(Tile::ALL) {
        // Best effort: load now rather than at a first launch that may fall inside a
        // graph capture; prefer shared memory over L1 (46-60 KB per block).
        // SAFETY: `f` is a function of the loaded module.
        unsafe {
            let _ = sys::cuFuncLoad(f);
            let _ =
                sys::cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100);
            let _ = sys::cuFuncSetAttribute(
                f,
                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                tile.smem_bytes() as i32,
            );
        }
    }
    // Above 48 KB the dynamic shared memory needs the opt-in just made; a GPU that did
    // not take it runs the 64-channel tile only.
    let wide_fn = funcs[1];
    let mut granted = 0i32;
    // SAFETY: plain out-parameter; `wide_fn` is a function of the loaded module.
    let wide_ok = wide
        && unsafe {
            sys::cuFuncGetAttribute(
                &mut granted,
                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                wide_fn,
            )
        } == sys::CUresult::CUDA_SUCCESS
        && granted >= Tile::N128.smem_bytes() as i32;
    // SAFETY: the module is loaded; the name is NUL-terminated. Optional: a missing
    // entry only keeps the copies on the element-wise kernel.
    let copy = CString::new("copy_rows16")
        .ok()
        .and_then(|name| unsafe { result::module::get_function(module, name) }.ok());
    if let Some(f) = copy {
        // SAFETY: a function of the loaded module (loaded now, not inside a capture).
        unsafe {
            let _ = sys::cuFuncLoad(f);
        }
    }
    Ok(IgemmKernel {
        module,
        small: funcs[0],
        wide: wide_ok.then_some(wide_fn),
        copy,
    })
}

/// The sizes of one launch, checked against what the kernel assumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
    pub c_out: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    /// Output pixels (rows of the product).
    pub m: usize,
    /// `kh * kw * c` (the reduction).
    pub k: usize,
    pub kp: usize,
    pub tile: Tile,
    /// Channel tiles (the grid is pixel tiles x channel tiles, channel tile fastest).
    pub n_tiles: usize,
    pub blocks: usize,
}

/// A dense convolution's sizes, as `ConvWeights` holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DenseConv {
    pub c_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub kp: usize,
    pub depthwise: bool,
}

impl DenseConv {
    pub(crate) fn of(w: &ConvWeights) -> Self {
        Self {
            c_in: w.c_in,
            c_out: w.c_out,
            kh: w.kh,
            kw: w.kw,
            stride: w.spec.stride,
            pad: w.spec.padding,
            kp: w.kp,
            depthwise: w.depthwise,
        }
    }
}

impl Geometry {
    /// `None` when the kernel does not take this convolution (the caller keeps its
    /// previous path): depthwise, 1x1 stride-1 products (cuBLASLt does those well),
    /// input channel counts that are not multiples of 8, or sizes past 32-bit indices.
    /// Any output channel count is taken (odd ones store element by element).
    pub(crate) fn new(
        input: [usize; 4],
        out_hw: (usize, usize),
        cv: DenseConv,
        tile: Tile,
    ) -> Option<Self> {
        let [n, h, w, c] = input;
        let (oh, ow) = out_hw;
        let pointwise = cv.kh == 1 && cv.kw == 1 && cv.stride == 1 && cv.pad == 0;
        if cv.depthwise || pointwise || c != cv.c_in || cv.stride == 0 {
            return None;
        }
        if c == 0 || !c.is_multiple_of(8) || cv.c_out == 0 {
            return None;
        }
        let k = cv.kh.checked_mul(cv.kw)?.checked_mul(c)?;
        let m = n.checked_mul(oh)?.checked_mul(ow)?;
        let pixels_in = n.checked_mul(h)?.checked_mul(w)?;
        let limit = i32::MAX as usize - 2 * TILE_M;
        // The sentinel row offset in conv.cu is -2^30: taps and sizes stay far below it.
        let small = |v: usize| v < (1 << 28);
        if cv.kp != k || m == 0 || m > limit || k > limit || pixels_in > limit {
            return None;
        }
        if ![h, w, oh, ow, cv.kh, cv.kw, cv.pad, cv.c_out]
            .into_iter()
            .all(small)
            || !small(oh * cv.stride + cv.kh)
            || !small(ow * cv.stride + cv.kw)
        {
            return None;
        }
        let n_tiles = cv.c_out.div_ceil(tile.channels());
        let blocks = m.div_ceil(TILE_M).checked_mul(n_tiles)?;
        if blocks > i32::MAX as usize {
            return None;
        }
        Some(Self {
            h,
            w,
            c,
            oh,
            ow,
            c_out: cv.c_out,
            kw: cv.kw,
            stride: cv.stride,
            pad: cv.pad,
            m,
            k,
            kp: cv.kp,
            tile,
            n_tiles,
            blocks,
        })
    }

    /// The kernel's arguments after its five pointers, in declaration order, for input
    /// rows `ldx` and output rows `ldy` elements apart.
    fn int_args(&self, act: Activation, ldx: usize, ldy: usize) -> [Arg; 16] {
        let i = |v: usize| Arg::I32(v as i32);
        [
            i(self.h),
            i(self.w),
            i(self.c),
            i(self.oh),
            i(self.ow),
            i(self.c_out),
            i(self.kw),
            i(self.stride),
            i(self.pad),
            i(self.m),
            i(self.k),
            i(self.kp),
            i(self.n_tiles),
            Arg::I32(crate::conv::act_code(act)),
            i(ldx),
            i(ldy),
        ]
    }
}

/// The launch for `x` through `w`, when the kernel is loaded and takes the shapes and
/// pointers.
pub(crate) fn plan(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    out_hw: (usize, usize),
    residual: Option<&CudaTensor>,
) -> Option<Geometry> {
    let IgemmSlot::Ready(kernel) = &be.kernels.igemm else {
        return None;
    };
    let aligned = |p: u64| p.is_multiple_of(16);
    if !aligned(x.ptr()) || !aligned(w.weight.ptr()) || !residual.is_none_or(|r| aligned(r.ptr())) {
        return None;
    }
    let [n, ..] = x.dims;
    let m = n.saturating_mul(out_hw.0).saturating_mul(out_hw.1);
    let sms = be.multiprocessors().max(1) as usize;
    let tile = Tile::choose(w.c_out, m, sms, kernel.wide.is_some());
    Geometry::new(x.dims, out_hw, DenseConv::of(w), tile)
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
    }
    .ok_or_else(|| EngineError::Device("the 128-channel convolution tile is not loaded".into()))?;
    launch(&be.ctx, func, g.tile, g.blocks as u32, &args)?;
    Ok(())
}

fn launch(
    ctx: &Context,
    func: sys::CUfunction,
    tile: Tile,
    blocks: u32,
    args: &[Arg],
) -> CudaResult<()> {
    // The arguments mirror the entry points' shared parameter list (a test counts
    // them); the dynamic shared memory is the tile's, allowed at load.
    crate::kernels::launch_function(
        ctx,
        func,
        (blocks.max(1), 1, 1),
        tile.threads(),
        tile.smem_bytes(),
        args,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv3(c_in: usize, c_out: usize, stride: usize) -> DenseConv {
        DenseConv {
            c_in,
            c_out,
            kh: 3,
            kw: 3,
            stride,
            pad: 1,
            kp: 9 * c_in,
            depthwise: false,
        }
    }

    #[test]
    fn takes_dense_convolutions_with_channels_in_eights() {
        let g = Geometry::new([2, 17, 23, 64], (17, 23), conv3(64, 64, 1), Tile::N64);
        let g = g.expect("3x3 64->64 fits");
        assert_eq!(g.m, 2 * 17 * 23);
        assert_eq!(g.k, 576);
        assert_eq!(g.n_tiles, 1);
        assert_eq!(g.blocks, (2 * 17 * 23usize).div_ceil(128));
        let s2 = Geometry::new([1, 80, 80, 128], (40, 40), conv3(128, 256, 2), Tile::N64);
        assert_eq!(s2.map(|g| (g.n_tiles, g.blocks)), Some((4, 13 * 4)));
        let five = DenseConv {
            kh: 5,
            kw: 5,
            pad: 2,
            kp: 25 * 8,
            ..conv3(8, 16, 1)
        };
        assert!(Geometry::new([1, 9, 9, 8], (9, 9), five, Tile::N64).is_some());
        // A 1x1 with stride 2 is no plain product: the kernel takes it.
        let strided_1x1 = DenseConv {
            kh: 1,
            kw: 1,
            pad: 0,
            kp: 16,
            ..conv3(16, 16, 2)
        };
        assert!(Geometry::new([1, 8, 8, 16], (4, 4), strided_1x1, Tile::N64).is_some());
        // Any output count, e.g. a 3-channel image output: one channel tile.
        let out3 = Geometry::new([1, 8, 8, 96], (8, 8), conv3(96, 3, 1), Tile::N64);
        assert_eq!(out3.map(|g| g.n_tiles), Some(1));
        assert!(Geometry::new([1, 8, 8, 96], (8, 8), conv3(96, 0, 1), Tile::N64).is_none());
    }

    #[test]
    fn leaves_other_convolutions_to_the_previous_paths() {
        // The 3-channel image input, other odd inputs, pointwise, depthwise, padded K.
        let image = DenseConv {
            kp: 32,
            ..conv3(3, 48, 1)
        };
        assert!(Geometry::new([1, 8, 8, 3], (8, 8), image, Tile::N64).is_none());
        assert!(Geometry::new([1, 8, 8, 12], (8, 8), conv3(12, 16, 1), Tile::N64).is_none());
        let pointwise = DenseConv {
            kh: 1,
            kw: 1,
            pad: 0,
            kp: 64,
            ..conv3(64, 64, 1)
        };
        assert!(Geometry::new([1, 8, 8, 64], (8, 8), pointwise, Tile::N64).is_none());
        let dw = DenseConv {
            depthwise: true,
            ..conv3(64, 64, 1)
        };
        assert!(Geometry::new([1, 8, 8, 64], (8, 8), dw, Tile::N64).is_none());
        let padded = DenseConv {
            kp: 9 * 64 + 8,
            ..conv3(64, 64, 1)
        };
        assert!(Geometry::new([1, 8, 8, 64], (8, 8), padded, Tile::N64).is_none());
        // Input channels that disagree with the weights, and 32-bit overflow.
        assert!(Geometry::new([1, 8, 8, 32], (8, 8), conv3(64, 64, 1), Tile::N64).is_none());
        assert!(Geometry::new(
            [40_000, 256, 256, 64],
            (256, 256),
            conv3(64, 64, 1),
            Tile::N64
        )
        .is_none());
    }

    /// The value of `#define NAME v` in conv.cu.
    fn define(name: &str) -> usize {
        let prefix = format!("#define {name} ");
        let line = CONV_SOURCE
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("conv.cu has no {name}"));
        line[prefix.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} is not a number"))
    }

    #[test]
    fn host_constants_match_the_kernel() {
        assert_eq!(define("IG_BM"), TILE_M);
        assert_eq!(define("IG_BN_SMALL"), Tile::N64.channels());
        assert_eq!(define("IG_BN_WIDE"), Tile::N128.channels());
        assert_eq!(define("IG_LD"), 40);
        assert_eq!(define("IG_STAGES"), 3);
        for tile in Tile::ALL {
            let smem = define("IG_STAGES") * (TILE_M + tile.channels()) * define("IG_LD") * 2;
            assert_eq!(smem, tile.smem_bytes() as usize);
            // Two warps along the pixels, 32 channels per warp.
            assert_eq!(tile.threads() as usize, 2 * 32 * tile.warps_n());
            // Under the 227 KB a block may ask for on sm_90 (and the 99 KB of sm_86).
            assert!(smem <= 99 * 1024);
        }
        assert!(Tile::N64.smem_bytes() <= 48 * 1024);
        // Rows of 16-byte aligned segments for cp.async and ldmatrix.
        assert_eq!(define("IG_LD") * 2 % 16, 0);
        assert_eq!(define("IG_BK") % 16, 0);
    }

    #[test]
    fn wide_tile_only_where_it_fills_the_gpu() {
        // D-FINE's 256-channel 3x3 at 80x80: batch 32 fills 132 SMs with wide tiles,
        // batch 1 (100 wide blocks) keeps the 64-channel tile (200 blocks).
        assert_eq!(Tile::choose(256, 32 * 6400, 132, true), Tile::N128);
        assert_eq!(Tile::choose(256, 6400, 132, true), Tile::N64);
        assert_eq!(Tile::choose(256, 32 * 6400, 132, false), Tile::N64);
        assert_eq!(Tile::choose(64, 32 * 6400, 132, true), Tile::N64);
        assert_eq!(Tile::choose(72, 132 * 128, 132, true), Tile::N128);
        let g = Geometry::new([2, 80, 80, 256], (80, 80), conv3(256, 256, 1), Tile::N128);
        assert_eq!(g.map(|g| (g.n_tiles, g.blocks)), Some((2, 100 * 2)));
    }

    #[test]
    fn launch_arguments_match_the_kernel_signature() {
        for (tile, bounds) in [(Tile::N64, "128, 4"), (Tile::N128, "256, 2")] {
            let decl = format!(
                "extern \"C\" __global__ void __launch_bounds__({bounds})\n{}(",
                tile.entry()
            );
            let start = CONV_SOURCE.find(&decl).expect("entry point is declared") + decl.len();
            let end = start + CONV_SOURCE[start..].find(')').expect("parameter list ends");
            check_parameters(&CONV_SOURCE[start..end]);
            assert_eq!(
                bounds.split(',').next(),
                Some(tile.threads().to_string().as_str())
            );
        }
    }

    fn check_parameters(list: &str) {
        let params: Vec<&str> = list.split(',').map(str::trim).collect();
        let pointers = params.iter().filter(|p| p.contains('*')).count();
        assert_eq!(pointers, 5);
        let g = Geometry::new([1, 8, 8, 8], (8, 8), conv3(8, 8, 1), Tile::N64).expect("fits");
        assert_eq!(params.len(), 5 + g.int_args(Activation::Gelu, 8, 8).len());
        // The integer arguments in the order int_args gives them.
        let names: Vec<&str> = params[5..]
            .iter()
            .map(|p| p.trim_start_matches("int ").trim())
            .collect();
        assert_eq!(
            names,
            [
                "H", "W", "C", "OH", "OW", "Cout", "KW", "stride", "pad", "M", "K", "Kp",
                "n_tiles", "act", "ldx", "ldy"
            ]
        );
    }

    #[test]
    fn sources_per_storage_type() {
        assert!(conv_source(Storage::F32).is_none());
        let f16 = conv_source(Storage::F16).expect("fp16 source");
        let bf16 = conv_source(Storage::BF16).expect("bf16 source");
        assert!(f16.contains("typedef __half T;") && !f16.contains("#define IGEMM_BF16"));
        assert!(bf16.contains("typedef __nv_bfloat16 T;") && bf16.contains("#define IGEMM_BF16 1"));
        for src in [f16, bf16] {
            assert!(!src.contains('\0'));
            assert_eq!(src.matches('{').count(), src.matches('}').count());
            assert_eq!(src.matches('(').count(), src.matches(')').count());
        }
    }
}
