//! The NVRTC-built kernel module of one precision and a launcher for it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};

use crate::driver::Context;
use crate::error::{CudaError, CudaResult};
use crate::nvrtc;

pub const OPS_SOURCE: &str = include_str!("../kernels/ops.cu");
pub const ATTENTION_SOURCE: &str = include_str!("../kernels/attention.cu");
pub const VECTOR_SOURCE: &str = include_str!("../kernels/vector.cu");
/// Device functions every translation unit uses (after the preamble).
pub const MATH_SOURCE: &str = include_str!("../kernels/math.cu");

/// Every kernel entry point the backend launches.
pub const KERNEL_NAMES: &[&str] = &[
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "widen_to_f32",
    "narrow_from_f32",
    "layer_norm",
    "conv_epilogue_vec",
    "layer_norm2",
    "layer_norm8",
    "dwconv3x3_vec",
    "dwconv3x3_gate_vec",
    "dwk3s1",
    "dwk3s2",
    "dwk5s1",
    "dwk5s2",
    "dwk7s1",
    "dwk7s2",
    "dwk3_gate",
    "dws5",
    "dws5_128",
    "dwconv",
    "dwconv3x3",
    "dwconv3x3_gate",
    "im2col",
    "im2col_rows",
    "act_residual",
    "act_residual_vec",
    "conv_small_taps32",
    "conv_small_taps64",
    "gelu_gate",
    "add",
    "concat_channels",
    "pixel_shuffle",
    "pixel_unshuffle",
    "mdta_sumsq",
    "mdta_gram_sum",
    "mdta_softmax",
    "mdta_fold",
];

/// Storage element type of the activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    F16,
    BF16,
}

/// Defines `T`, `ldf` (load as float) and `stf` (store from float) for a storage type.
pub fn preamble(s: Storage) -> &'static str {
    match s {
        Storage::F32 => {
            "typedef float T;\n__device__ __forceinline__ float ldf(float v) { return v; }\n\
             __device__ __forceinline__ float stf(float v) { return v; }\n\
             __device__ __forceinline__ float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }\n\
             __device__ __forceinline__ void st2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }\n"
        }
        Storage::F16 => {
            "#include <cuda_fp16.h>\ntypedef __half T;\n\
             __device__ __forceinline__ float ldf(__half v) { return __half2float(v); }\n\
             __device__ __forceinline__ __half stf(float v) { return __float2half_rn(v); }\n\
             __device__ __forceinline__ float2 ld2(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }\n\
             __device__ __forceinline__ void st2(__half* p, float2 v) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v.x, v.y); }\n"
        }
        Storage::BF16 => {
            "#include <cuda_bf16.h>\ntypedef __nv_bfloat16 T;\n\
             __device__ __forceinline__ float ldf(__nv_bfloat16 v) { return __bfloat162float(v); }\n\
             __device__ __forceinline__ __nv_bfloat16 stf(float v) { return __float2bfloat16_rn(v); }\n\
             __device__ __forceinline__ float2 ld2(const __nv_bfloat16* p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p)); }\n\
             __device__ __forceinline__ void st2(__nv_bfloat16* p, float2 v) { *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v.x, v.y); }\n"
        }
    }
}

/// The value of `#define NAME v` in a kernel source (`file` names it in the panic): host
/// constants are checked against the kernels' with it.
#[cfg(test)]
pub(crate) fn source_define(source: &str, file: &str, name: &str) -> usize {
    let prefix = format!("#define {name} ");
    let line = source
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{file} has no {name}"));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {file} is not a number"))
}

/// Every kernel module's translation unit for one storage type, as the backend compiles
/// them (main, detection and, for 16-bit storage, the convolution module with its sm_90a
/// `wgmma` parts): for compiling and comparing kernels without a GPU
/// (`tools/kernel_ptx.py`).
pub fn module_sources(s: Storage) -> Vec<(&'static str, String)> {
    let mut modules = vec![
        ("main", full_source(s)),
        ("detection", crate::detection::detection_source(s)),
    ];
    // With the opt-in depthwise and staged small-taps kernels, so that a compile check
    // covers them too.
    let extras = crate::conv_igemm::ConvExtras {
        depthwise_mma: true,
        staged_small_taps: true,
        ..Default::default()
    };
    if let Some(conv) = crate::conv_igemm::conv_source(s, extras) {
        modules.push(("conv", conv));
    }
    modules
}

/// The full translation unit for one storage type.
pub fn full_source(s: Storage) -> String {
    format!(
        "{}\n{}\n{}\n{}\n{}\n",
        preamble(s),
        MATH_SOURCE,
        OPS_SOURCE,
        ATTENTION_SOURCE,
        VECTOR_SOURCE
    )
}

/// A kernel argument, stored by value so that its address stays valid for the launch.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    /// A by-value struct of 16 ints (detection's per-level table, `DetLevels`).
    I32x16([i32; 16]),
}

pub struct Kernels {
    module: sys::CUmodule,
    funcs: HashMap<&'static str, sys::CUfunction>,
    /// Whether the binary came from the on-disk cache.
    pub from_cache: bool,
    /// The implicit-GEMM convolution (its own module; 16-bit storage on sm_80+).
    pub(crate) igemm: crate::conv_igemm::IgemmSlot,
}

// SAFETY: module and function handles are immutable driver objects, usable from any
// thread with the context current.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    pub fn load(ctx: &Context, storage: Storage) -> CudaResult<Self> {
        // The two modules compile independently: on a first start (no cached binaries)
        // NVRTC takes a minute or more for each, so they run on two threads.
        let (main, igemm) = std::thread::scope(|scope| {
            let igemm = scope.spawn(|| crate::conv_igemm::IgemmSlot::load(ctx, storage));
            let main = Self::load_source(ctx, &full_source(storage), KERNEL_NAMES);
            let igemm = igemm.join().unwrap_or_else(|_| {
                crate::conv_igemm::IgemmSlot::Failed("the compiling thread panicked".into())
            });
            (main, igemm)
        });
        let mut k = main?;
        k.igemm = igemm;
        Ok(k)
    }

    /// Compiles (or takes from the cache) `source` and loads the entry points `names`.
    pub fn load_source(
        ctx: &Context,
        source: &str,
        names: &'static [&'static str],
    ) -> CudaResult<Self> {
        let (cubin, from_cache) = nvrtc::compile_cached(source, ctx.capability)?;
        ctx.bind()?;
        // SAFETY: `cubin` is a complete CUBIN image for this device.
        let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void)? };
        let mut funcs = HashMap::new();
        for &name in names {
            let cname = CString::new(name)
                .map_err(|_| CudaError::Driver(format!("bad kernel name {name}")))?;
            // SAFETY: the module is loaded; the name is NUL-terminated.
            let f = unsafe { result::module::get_function(module, cname)? };
            // Load now rather than at the first launch (lazy loading), which may fall
            // inside a graph capture.
            // Best effort: without it the first launch loads the function.
            // SAFETY: `f` is a function of the loaded module.
            let _ = unsafe { sys::cuFuncLoad(f) };
            funcs.insert(name, f);
        }
        Ok(Self {
            module,
            funcs,
            from_cache,
            igemm: crate::conv_igemm::IgemmSlot::Disabled("not the main kernel module".into()),
        })
    }

    /// Launches `name` on the context's stream and checks the launch.
    pub fn launch(
        &self,
        ctx: &Context,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> CudaResult<()> {
        launch_function(ctx, self.function(name)?, grid, block, smem, args)
    }

    /// The entry point `name` of this module.
    pub(crate) fn function(&self, name: &str) -> CudaResult<sys::CUfunction> {
        self.funcs
            .get(name)
            .copied()
            .ok_or_else(|| CudaError::Driver(format!("kernel {name} is not loaded")))
    }

    /// Launches an element-wise kernel over `n` items with a grid-stride loop.
    pub fn launch_1d(&self, ctx: &Context, name: &str, n: i64, args: &[Arg]) -> CudaResult<()> {
        let block = 256u32;
        let blocks = ((n.max(1) as u64).div_ceil(block as u64))
            .min(ctx.multiprocessors.max(1) as u64 * 32) as u32;
        self.launch(ctx, name, (blocks.max(1), 1, 1), block, 0, args)
    }
}

/// Launches `f` on the context's stream (nothing in a dry run). `args` must match the
/// kernel's parameter list, as each call site mirrors its .cu declaration.
pub(crate) fn launch_function(
    ctx: &Context,
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[Arg],
) -> CudaResult<()> {
    if ctx.is_dry() {
        return Ok(());
    }
    let mut vals: Vec<Arg> = args.to_vec();
    let mut ptrs: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(p) => p as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::I64(v) => v as *mut i64 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
            Arg::I32x16(v) => v.as_mut_ptr() as *mut c_void,
        })
        .collect();
    // SAFETY: the argument list matches the kernel's signature (see above); values live
    // in `vals` until the call returns, and the driver copies them at launch.
    unsafe { result::launch_kernel(f, grid, (block, 1, 1), smem, ctx.stream, &mut ptrs)? };
    Ok(())
}

impl Drop for Kernels {
    fn drop(&mut self) {
        // SAFETY: unloaded once; functions are not used afterwards.
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_name_is_an_extern_c_entry_point() {
        let sources = [OPS_SOURCE, ATTENTION_SOURCE, VECTOR_SOURCE];
        for name in KERNEL_NAMES {
            let decl = format!("extern \"C\" __global__ void {name}(");
            // The small-taps kernels come from one macro, one instance per width.
            let instance = format!("CONV_SMALL_KERNEL({name},");
            assert!(
                sources
                    .iter()
                    .any(|s| s.contains(&decl) || s.contains(&instance)),
                "{name} is not declared in the kernel sources"
            );
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        }
    }

    #[test]
    fn sources_are_balanced_and_nul_free() {
        for s in [Storage::F32, Storage::F16, Storage::BF16] {
            let src = full_source(s);
            assert!(!src.contains('\0'));
            let opens = src.matches('{').count();
            assert_eq!(
                opens,
                src.matches('}').count(),
                "unbalanced braces for {s:?}"
            );
            assert_eq!(
                src.matches('(').count(),
                src.matches(')').count(),
                "unbalanced parentheses for {s:?}"
            );
        }
    }

    #[test]
    fn preambles_define_the_storage_type() {
        assert!(preamble(Storage::F16).contains("typedef __half T;"));
        assert!(preamble(Storage::BF16).contains("typedef __nv_bfloat16 T;"));
        assert!(preamble(Storage::F32).contains("typedef float T;"));
    }
}
