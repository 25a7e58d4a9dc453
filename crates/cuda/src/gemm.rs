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
    tf32: bool,
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

    fn plan(&self, call: &GemmCall) -> CudaResult<Plan> {
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
        if call.bias.is_some() {
            let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
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
            let heur = result::get_matmul_algo_heuristic(self.handle, desc, la, lb, lc, ld, pref);
            let _ = result::destroy_matmul_pref(pref);
            let heur = heur.map_err(|e| {
                CudaError::Blas(format!("no cuBLASLt algorithm for {call:?}: {e:?}"))
            })?;
            Ok(Plan {
                desc,
                layouts: [la, lb, lc, ld],
                algo: heur.algo,
            })
        }
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
            tf32: call.tf32,
        };
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| CudaError::Blas("plan cache poisoned".into()))?;
        if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(key) {
            slot.insert(self.plan(call)?);
        }
        let plan = plans
            .get(&key)
            .ok_or_else(|| CudaError::Blas("plan cache lost an entry".into()))?;
        if let Some(bias) = call.bias {
            // SAFETY: the descriptor is alive; the pointer value is copied.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    8,
                )?;
            }
        }
        let alpha = 1.0f32;
        let beta = if call.c.is_some() { 1.0f32 } else { 0.0f32 };
        let c = call.c.unwrap_or(call.d.ptr);
        // SAFETY: descriptors come from the cached plan for exactly this shape; the
        // device pointers are live allocations the caller holds until the stream passes.
        unsafe {
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
                call.d.ptr as *mut c_void,
                plan.layouts[3],
                &plan.algo,
                self.workspace as *mut c_void,
                self.workspace_size,
                stream as sys::cudaStream_t,
            )?;
        }
        Ok(())
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
