//! Matrix products through cuBLASLt. Row-major NHWC products are expressed in
//! cuBLASLt's column-major terms by the callers; this module caches one descriptor set
//! and the chosen algorithm per problem shape so that replays do no host-side search.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result, sys};

use crate::error::{CudaError, CudaResult};

/// Element types cuBLASLt sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Elem {
    F32,
    F16,
    BF16,
}

impl Elem {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Elem::F32 => sys::cudaDataType::CUDA_R_32F,
            Elem::F16 => sys::cudaDataType::CUDA_R_16F,
            Elem::BF16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }
    pub(crate) fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            _ => 2,
        }
    }
}

/// One operand in column-major terms: `rows x cols` with leading dimension `ld`
/// (before any transpose), and the element offset between batch entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Operand {
    pub ptr: u64,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub stride: i64,
    pub elem: Elem,
}

/// `D = op(A) op(B) + beta C + bias` with fp32 accumulation. `C` (when present) has
/// D's layout; `bias` has one entry per row of D, in D's element type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmCall {
    pub a: Operand,
    pub trans_a: bool,
    pub b: Operand,
    pub trans_b: bool,
    pub c: Option<u64>,
    pub d: Operand,
    pub batch: i32,
    pub bias: Option<u64>,
    /// ReLU in the epilogue, after the bias (cuBLASLt has no SiLU).
    pub relu: bool,
    pub tf32: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    a: (u64, u64, i64, i64, Elem, bool, u32),
    b: (u64, u64, i64, i64, Elem, bool, u32),
    d: (u64, u64, i64, i64, Elem, u32),
    with_c: bool,
    batch: i32,
    bias: bool,
    relu: bool,
    tf32: bool,
}

/// cuBLASLt's ranked algorithms timed per new problem shape.
const CANDIDATES: usize = 8;
/// Timed runs per candidate (after one untimed run).
const TUNING_RUNS: usize = 3;

/// Whether `stream` is recording a graph (then nothing may be timed on it).
pub(crate) fn capturing(stream: sys::cudaStream_t) -> bool {
    use cudarc::driver::sys as drv;
    let mut status = drv::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: queries a live stream; writes one status value.
    let r = unsafe { drv::cuStreamIsCapturing(stream as drv::CUstream, &mut status) };
    // When the query fails, assume a capture: tuning is only an optimisation.
    r != drv::CUresult::CUDA_SUCCESS
        || status != drv::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
}

/// Largest power of two (up to 256) dividing the address: cuBLASLt picks kernels by it.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 4],
    algo: sys::cublasLtMatmulAlgo_t,
}

pub(crate) struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_size: usize,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and descriptors are used under the `plans` lock only; launches go
// to one stream.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

fn layout(op: &Operand, batch: i32) -> CudaResult<sys::cublasLtMatrixLayout_t> {
    let l = result::create_matrix_layout(op.elem.cuda(), op.rows, op.cols, op.ld)?;
    if batch > 1 {
        // SAFETY: `l` was just created; the buffers outlive the calls.
        unsafe {
            result::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &batch as *const i32 as *const c_void,
                4,
            )?;
            result::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &op.stride as *const i64 as *const c_void,
                8,
            )?;
        }
    }
    Ok(l)
}

impl Gemm {
    /// `workspace` must stay allocated as long as this object lives.
    pub(crate) fn new(workspace: u64, workspace_size: usize) -> CudaResult<Self> {
        Ok(Self {
            handle: result::create_handle()?,
            workspace,
            workspace_size,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, call: &GemmCall, stream: sys::cudaStream_t) -> CudaResult<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let compute = match (call.a.elem, call.tf32) {
            (Elem::F32, true) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let desc = result::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)?;
        let set = |attr, v: *const c_void, n| -> CudaResult<()> {
            // SAFETY: `desc` is alive; `v` points to `n` valid bytes.
            unsafe { result::set_matmul_desc_attribute(desc, attr, v, n)? };
            Ok(())
        };
        let (ta, tb) = (call.trans_a as i32, call.trans_b as i32);
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &ta as *const i32 as *const c_void,
            4,
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &tb as *const i32 as *const c_void,
            4,
        )?;
        let epilogue = match (call.bias.is_some(), call.relu) {
            (true, false) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
            (true, true) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS),
            (false, true) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU),
            (false, false) => None,
        };
        if let Some(epi) = epilogue {
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi as *const _ as *const c_void,
                std::mem::size_of_val(&epi),
            )?;
        }
        let la = layout(&call.a, call.batch)?;
        let lb = layout(&call.b, call.batch)?;
        let lc = layout(&call.d, call.batch)?;
        let ld = layout(&call.d, call.batch)?;
        let pref = result::create_matmul_pref()?;
        // SAFETY: all descriptors were created above and are alive.
        unsafe {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let ws = self.workspace_size as u64;
            result::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )?;
            let aligns = [
                (
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    alignment(call.a.ptr),
                ),
                (
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    alignment(call.b.ptr),
                ),
                (
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    alignment(call.c.unwrap_or(call.d.ptr)),
                ),
                (
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    alignment(call.d.ptr),
                ),
            ];
            for (attr, v) in aligns {
                result::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &v as *const u32 as *const c_void,
                    4,
                )?;
            }
            let mut found =
                [std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>(); CANDIDATES];
            let mut count = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                la,
                lb,
                lc,
                ld,
                pref,
                CANDIDATES as i32,
                found.as_mut_ptr(),
                &mut count,
            );
            let _ = result::destroy_matmul_pref(pref);
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || count < 1 {
                return Err(CudaError::Blas(format!(
                    "no cuBLASLt algorithm for {call:?}: {status:?}"
                )));
            }
            let candidates: Vec<sys::cublasLtMatmulAlgo_t> = found[..count as usize]
                .iter()
                .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|h| h.algo)
                .collect();
            let Some(&first) = candidates.first() else {
                return Err(CudaError::Blas(format!(
                    "no usable cuBLASLt algorithm for {call:?}"
                )));
            };
            let mut plan = Plan {
                desc,
                layouts: [la, lb, lc, ld],
                algo: first,
            };
            // Time the candidates on the real operands; never inside a capture, where
            // nothing runs and events cannot be waited on.
            if candidates.len() > 1 && !capturing(stream) {
                if let Ok(best) = self.fastest(&plan, call, &candidates, stream) {
                    plan.algo = best;
                }
            }
            Ok(plan)
        }
    }

    /// The candidate with the lowest median time over a few runs into a scratch output
    /// (the real one may be read as C, so it must not be written while tuning).
    fn fastest(
        &self,
        plan: &Plan,
        call: &GemmCall,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        stream: sys::cudaStream_t,
    ) -> CudaResult<sys::cublasLtMatmulAlgo_t> {
        use cudarc::driver::result as drv;
        let d = &call.d;
        let batches = call.batch.max(1) as u64;
        let elems = d.ld as u64 * d.cols + d.stride.max(0) as u64 * (batches - 1);
        let bytes = (elems as usize * d.elem.size()).max(256);
        // SAFETY: scratch device memory, freed below after the stream is idle.
        let scratch = unsafe { drv::malloc_sync(bytes) }
            .map_err(|e| CudaError::Blas(format!("tuning scratch: {e:?}")))?;
        let cu_stream = stream as cudarc::driver::sys::CUstream;
        let events = (
            drv::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT),
            drv::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT),
        );
        let outcome = match events {
            (Ok(start), Ok(end)) => {
                let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
                for algo in candidates {
                    let mut times = Vec::with_capacity(TUNING_RUNS);
                    // One untimed run, then the timed ones; a failing candidate is skipped.
                    let ok = (0..=TUNING_RUNS).all(|i| {
                        // SAFETY: events, stream and scratch are alive; operands as in run().
                        unsafe {
                            let launched = drv::event::record(start, cu_stream).is_ok()
                                && self.launch(plan, call, algo, scratch, stream).is_ok()
                                && drv::event::record(end, cu_stream).is_ok()
                                && drv::event::synchronize(end).is_ok();
                            if launched && i > 0 {
                                if let Ok(ms) = drv::event::elapsed(start, end) {
                                    times.push(ms);
                                }
                            }
                            launched
                        }
                    });
                    if !ok || times.is_empty() {
                        continue;
                    }
                    times.sort_by(f32::total_cmp);
                    let median = times[times.len() / 2];
                    if best.is_none_or(|(t, _)| median < t) {
                        best = Some((median, *algo));
                    }
                }
                best.map(|(_, a)| a)
            }
            _ => None,
        };
        // SAFETY: created above (when Ok) and destroyed once; the stream is idle after
        // the last synchronised event, so the scratch block is free to go.
        unsafe {
            if let Ok(e) = events.0 {
                let _ = drv::event::destroy(e);
            }
            if let Ok(e) = events.1 {
                let _ = drv::event::destroy(e);
            }
            let _ = drv::stream::synchronize(cu_stream);
            let _ = drv::free_sync(scratch);
        }
        outcome.ok_or_else(|| CudaError::Blas("no candidate ran".into()))
    }

    /// Enqueues the product with `algo`, writing D (and reading C) at `d_ptr`.
    ///
    /// # Safety
    /// The operands of `call` and `d_ptr` must be live device allocations large enough
    /// for the plan's layouts until the stream passes this launch.
    unsafe fn launch(
        &self,
        plan: &Plan,
        call: &GemmCall,
        algo: &sys::cublasLtMatmulAlgo_t,
        d_ptr: u64,
        stream: sys::cudaStream_t,
    ) -> CudaResult<()> {
        let alpha = 1.0f32;
        let beta = if call.c.is_some() { 1.0f32 } else { 0.0f32 };
        let c = if d_ptr == call.d.ptr {
            call.c.unwrap_or(d_ptr)
        } else {
            d_ptr
        };
        if let Some(bias) = call.bias {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const c_void,
                8,
            )?;
        }
        result::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            call.a.ptr as *const c_void,
            plan.layouts[0],
            call.b.ptr as *const c_void,
            plan.layouts[1],
            c as *const c_void,
            plan.layouts[2],
            d_ptr as *mut c_void,
            plan.layouts[3],
            algo,
            self.workspace as *mut c_void,
            self.workspace_size,
            stream,
        )?;
        Ok(())
    }

    pub(crate) fn run(&self, call: &GemmCall, stream: sys::cudaStream_t) -> CudaResult<()> {
        let key = Key {
            a: (
                call.a.rows,
                call.a.cols,
                call.a.ld,
                call.a.stride,
                call.a.elem,
                call.trans_a,
                alignment(call.a.ptr),
            ),
            b: (
                call.b.rows,
                call.b.cols,
                call.b.ld,
                call.b.stride,
                call.b.elem,
                call.trans_b,
                alignment(call.b.ptr),
            ),
            d: (
                call.d.rows,
                call.d.cols,
                call.d.ld,
                call.d.stride,
                call.d.elem,
                alignment(call.d.ptr).min(alignment(call.c.unwrap_or(call.d.ptr))),
            ),
            with_c: call.c.is_some(),
            batch: call.batch,
            bias: call.bias.is_some(),
            relu: call.relu,
            tf32: call.tf32,
        };
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| CudaError::Blas("plan cache poisoned".into()))?;
        if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(key) {
            slot.insert(self.plan(call, stream)?);
        }
        let plan = plans
            .get(&key)
            .ok_or_else(|| CudaError::Blas("plan cache lost an entry".into()))?;
        // SAFETY: descriptors come from the cached plan for exactly this shape; the
        // device pointers are live allocations the caller holds until the stream passes.
        unsafe { self.launch(plan, call, &plan.algo, call.d.ptr, stream) }
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: each descriptor is destroyed once, then the handle.
        unsafe {
            if let Ok(mut plans) = self.plans.lock() {
                for (_, p) in plans.drain() {
                    let _ = result::destroy_matmul_desc(p.desc);
                    for l in p.layouts {
                        let _ = result::destroy_matrix_layout(l);
                    }
                }
            }
            let _ = result::destroy_handle(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1060), 32);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0), 256);
    }
}
