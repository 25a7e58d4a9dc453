//! Loading the implicit-GEMM kernels: the module, its two tiles and the row copy.

use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};

use super::{
    conv_source, warp_specialised_requested, ConvExtras, Tile, Tiles, ENV_SWITCH, WGMMA_SWITCH,
};
use crate::driver::Context;
use crate::error::{CudaError, CudaResult};
use crate::kernels::Storage;
use crate::nvrtc;

/// The loaded kernels: the 128 x 64 and 64 x 64 tiles always, the 128-channel one unless
/// switched off or refused its shared memory.
pub(crate) struct IgemmKernel {
    module: sys::CUmodule,
    pub(super) small: sys::CUfunction,
    pub(super) m64: sys::CUfunction,
    pub(super) wide: Option<sys::CUfunction>,
    /// The `wgmma` tiles (in `Tile::WGMMA`'s order), where the module was built for
    /// sm_90a and they got their shared memory.
    pub(super) wgmma: Option<[sys::CUfunction; 3]>,
    wgmma_always: bool,
    /// `wgmma` holds the warp-specialised kernels (384 threads, mbarriers).
    pub(super) warp_specialised: bool,
    /// `sources_wgmma_n64`, `sources_wgmma_n128` (conv_sources.cu), where the module was
    /// built for sm_90a and they got their shared memory.
    pub(super) sources: Option<[sys::CUfunction; 2]>,
    /// `copy_rows16`: vectorised row copies (used by crate::detection's slices and
    /// concatenations where aligned).
    copy: Option<sys::CUfunction>,
    /// `norm_pointwise_depthwise` (crate::front), where the GPU grants its shared memory.
    pub(crate) front: Option<sys::CUfunction>,
    /// `norm_pointwise` (crate::front), likewise: any channel count, and its
    /// specialisations by channel count.
    pub(crate) norm_product: Option<sys::CUfunction>,
    norm_product_fixed: Vec<(usize, sys::CUfunction)>,
    /// The `dwm*` depthwise kernels (crate::depthwise_mma) that loaded, by name.
    depthwise: Vec<(&'static str, sys::CUfunction)>,
    /// `small_taps_mma32`, `small_taps_mma64` (crate::conv_small), when both loaded.
    pub(crate) small_taps: Option<[sys::CUfunction; 2]>,
    /// `small_taps_mma_staged32`, `small_taps_mma_staged64`, likewise.
    pub(crate) small_taps_staged: Option<[sys::CUfunction; 2]>,
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
    Ready(Box<IgemmKernel>),
    /// Not applicable (fp32 storage, an older GPU) or switched off: im2col, silently.
    Disabled(String),
    /// Should have loaded but did not (a compile error): im2col, and the self-test fails.
    Failed(String),
}

impl IgemmSlot {
    /// Compiles (or reads from the cache) and loads the kernel where it applies. Never
    /// fails: a backend without it runs im2col as before.
    pub(crate) fn load(ctx: &Context, storage: Storage) -> Self {
        let warp_specialised = warp_specialised_requested();
        let extras = ConvExtras {
            warp_specialised,
            depthwise_mma: crate::depthwise_mma::requested(),
            staged_small_taps: crate::conv_small::staged_requested(),
        };
        let Some(source) = conv_source(storage, extras) else {
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
        match load_kernel(ctx, &source, wide, warp_specialised) {
            Ok(k) => Self::Ready(Box::new(k)),
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

    /// The tiles [`Tile::choose`] may take (none when not ready: then nothing launches).
    pub(crate) fn tiles(&self) -> Tiles {
        match self {
            Self::Ready(k) => k.tiles(),
            _ => Tiles::default(),
        }
    }
}

/// Compiles the module: for sm_90a on Hopper (with the `wgmma` tiles; `true`), else, or
/// where that build fails, for the plain architecture.
fn compile(ctx: &Context, source: &str) -> CudaResult<(Vec<u8>, bool)> {
    let wanted =
        ctx.capability == (9, 0) && !std::env::var(WGMMA_SWITCH).is_ok_and(|v| v.trim() == "0");
    if wanted {
        match nvrtc::compile_cached_specific(source, ctx.capability) {
            Ok((cubin, _)) => return Ok((cubin, true)),
            Err(e) => eprintln!("warning: sm_90a build failed, convolutions without wgmma: {e}"),
        }
    }
    Ok((nvrtc::compile_cached(source, ctx.capability)?.0, false))
}

fn load_kernel(
    ctx: &Context,
    source: &str,
    wide: bool,
    warp_specialised: bool,
) -> CudaResult<IgemmKernel> {
    let (cubin, specific) = compile(ctx, source)?;
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
    let switch = std::env::var(WGMMA_SWITCH).unwrap_or_default();
    let wgmma = if specific {
        let funcs: Option<Vec<_>> = Tile::WGMMA
            .iter()
            .map(|&t| load_wgmma(module, t, warp_specialised))
            .collect();
        funcs.and_then(|f| f.try_into().ok())
    } else {
        None
    };
    let sources = if specific { load_sources(module) } else { None };
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
    let front = load_with_smem(
        module,
        "norm_pointwise_depthwise",
        crate::front::smem_bytes(crate::front::MAX_CHANNELS),
    );
    let norm_product = load_with_smem(
        module,
        "norm_pointwise",
        crate::front::product_smem_bytes(crate::front::MAX_CHANNELS),
    );
    let norm_product_fixed = crate::front::PRODUCT_SPECIALISED
        .iter()
        .filter_map(|&c| {
            let name = format!("norm_pointwise_c{c}");
            load_with_smem(module, &name, crate::front::product_smem_bytes(c)).map(|f| (c, f))
        })
        .collect();
    let depthwise = crate::depthwise_mma::KERNELS
        .iter()
        .filter_map(|&(_, _, name)| {
            load_with_smem(module, name, crate::depthwise_mma::MAX_SMEM).map(|f| (name, f))
        })
        .collect();
    let pair = |a: &str, b: &str, smem: usize| {
        load_with_smem(module, a, smem)
            .zip(load_with_smem(module, b, smem))
            .map(|(a, b)| [a, b])
    };
    let small_taps = pair("small_taps_mma32", "small_taps_mma64", 0);
    let small_taps_staged = pair(
        "small_taps_mma_staged32",
        "small_taps_mma_staged64",
        crate::conv_small::STAGED_MAX_SMEM,
    );
    Ok(IgemmKernel {
        module,
        front,
        depthwise,
        small_taps,
        small_taps_staged,
        norm_product,
        norm_product_fixed,
        small: funcs[0],
        m64: funcs[2],
        wide: wide_ok.then_some(wide_fn),
        wgmma,
        wgmma_always: matches!(switch.trim(), "force" | "ws-force"),
        warp_specialised,
        copy,
        sources,
    })
}

impl IgemmKernel {
    pub(super) fn tiles(&self) -> Tiles {
        Tiles {
            wide: self.wide.is_some(),
            wgmma: self.wgmma.is_some(),
            wgmma_always: self.wgmma_always,
            warp_specialised: self.warp_specialised,
        }
    }

    /// The depthwise kernel `name` (crate::depthwise_mma), when it loaded.
    pub(crate) fn depthwise(&self, name: &str) -> Option<sys::CUfunction> {
        self.depthwise
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, f)| f)
    }

    /// `norm_pointwise` for `c` input channels: the specialisation where there is one.
    pub(crate) fn norm_product_for(&self, c: usize) -> Option<sys::CUfunction> {
        self.norm_product_fixed
            .iter()
            .find(|(fixed, _)| *fixed == c)
            .map(|&(_, f)| f)
            .or(self.norm_product)
    }
}

/// A kernel of the module with `bytes` of dynamic shared memory allowed; `None` when
/// missing or refused (the caller then runs the operations it fuses one by one).
/// A `wgmma` tile (its warp-specialised kernel when `ws`) with its shared memory and no
/// more: the rest of the multiprocessor's 256 KB stays L1, which serves the taps'
/// repeated input reads (conv_wgmma.cu).
fn load_wgmma(module: sys::CUmodule, tile: Tile, ws: bool) -> Option<sys::CUfunction> {
    if ws {
        let bytes = tile.ws_smem_bytes() as usize;
        return load_with_blocks(module, tile.ws_entry()?, bytes, 1);
    }
    load_as_tile(module, tile.entry(), tile)
}

/// A kernel with a `wgmma` tile's shared memory and blocks per multiprocessor.
fn load_as_tile(module: sys::CUmodule, name: &str, tile: Tile) -> Option<sys::CUfunction> {
    let bytes = tile.smem_bytes() as usize;
    load_with_blocks(module, name, bytes, tile.blocks_per_multiprocessor())
}

/// The concatenation-free 1x1 products (conv_sources.cu), in [`super::sources`]' order.
fn load_sources(module: sys::CUmodule) -> Option<[sys::CUfunction; 2]> {
    let n64 = load_as_tile(module, "sources_wgmma_n64", Tile::Wg64)?;
    let n128 = load_as_tile(module, "sources_wgmma_n128", Tile::Wg128)?;
    Some([n64, n128])
}

/// A kernel with `bytes` of shared memory per block and the carveout for `blocks` of
/// them per multiprocessor.
fn load_with_blocks(
    module: sys::CUmodule,
    name: &str,
    bytes: usize,
    blocks: usize,
) -> Option<sys::CUfunction> {
    const SMEM_LIMIT: usize = 228 * 1024;
    let per_sm = blocks * (bytes + 1024);
    let carveout = (per_sm * 100).div_ceil(SMEM_LIMIT).min(100) as i32;
    load_with_smem_carveout(module, name, bytes, carveout)
}

fn load_with_smem(module: sys::CUmodule, name: &str, bytes: usize) -> Option<sys::CUfunction> {
    load_with_smem_carveout(module, name, bytes, 100)
}

/// A kernel of the module that may use `bytes` of dynamic shared memory, with
/// `carveout` percent of the multiprocessor's shared-memory maximum preferred over L1.
fn load_with_smem_carveout(
    module: sys::CUmodule,
    name: &str,
    bytes: usize,
    carveout: i32,
) -> Option<sys::CUfunction> {
    use sys::CUfunction_attribute::*;
    let name = CString::new(name).ok()?;
    // SAFETY: the module is loaded; the name is NUL-terminated.
    let f = unsafe { result::module::get_function(module, name) }.ok()?;
    let want = bytes as i32;
    let mut granted = 0i32;
    // SAFETY: `f` is a function of the loaded module; plain out-parameter.
    let ok = unsafe {
        let _ = sys::cuFuncLoad(f);
        let _ = sys::cuFuncSetAttribute(
            f,
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            carveout,
        );
        let _ = sys::cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, want);
        sys::cuFuncGetAttribute(
            &mut granted,
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            f,
        )
    } == sys::CUresult::CUDA_SUCCESS;
    (ok && granted >= want).then_some(f)
}
