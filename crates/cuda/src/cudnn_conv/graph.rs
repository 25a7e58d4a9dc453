//! One launch as a cuDNN operation graph (the backend API): convolution, bias, activation
//! and residual in one execution plan that reads and writes the operands in place, row
//! strides included. The legacy calls fuse only bias + ReLU/identity into packed outputs;
//! here SiLU is fused as well and a channel slice of a concatenation is written directly,
//! where cuDNN has an engine for it (its heuristics are asked; plans it cannot build are
//! skipped, and engines whose numerics are not direct fp32-accumulated products are not
//! taken).
//!
//! Offered by default (`APERTURE_CUDNN_GRAPH`, see `graph_offered` in the parent module).
//! cuDNN launches these kernels for programmatic dependent launch, which would let them
//! start before the kernel ahead of them has finished: eagerly a memset goes in between
//! (`run_graph`), in captured graphs the programmatic edges are made plain
//! (`graph_shape.rs`); docs/dfine-gpu.md has the measurements.

use std::ffi::c_void;

use cudarc::cudnn::sys as dnn;
use dnn::cudnnBackendAttributeName_t as Attr;
use dnn::cudnnBackendAttributeType_t as Ty;
use dnn::cudnnBackendDescriptorType_t as Kind;

use super::api::check;
use super::{DenseLaunch, DensePtrs};
use crate::error::{CudaError, CudaResult};
use crate::kernels::Storage;

/// Execution plans built per launch (the heuristics' first ones that finalize).
pub(super) const CANDIDATES: usize = 1;

/// Unique ids of the graph's real tensors (the variant pack's keys).
const X: i64 = 1;
const W: i64 = 2;
const B: i64 = 3;
const R: i64 = 4;
const Y: i64 = 5;
/// Virtual intermediates.
const CONV: i64 = 10;
const BIASED: i64 = 11;
const ACTIVATED: i64 = 12;

/// A backend descriptor destroyed when dropped.
struct Desc(dnn::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor and destroyed once.
        unsafe {
            let _ = dnn::cudnnBackendDestroyDescriptor(self.0);
        }
    }
}

// SAFETY: finalized descriptors are immutable; executions are serialised on the
// backend's one stream and handle.
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}

impl Desc {
    fn new(kind: Kind) -> CudaResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle.
        check(
            unsafe { dnn::cudnnBackendCreateDescriptor(kind, &mut raw) },
            "backend descriptor",
        )?;
        Ok(Self(raw))
    }

    fn set<T>(&self, name: Attr, ty: Ty, values: &[T]) -> CudaResult<&Self> {
        // SAFETY: `values` holds `len` elements of the C type `ty` names.
        check(
            unsafe {
                dnn::cudnnBackendSetAttribute(
                    self.0,
                    name,
                    ty,
                    values.len() as i64,
                    values.as_ptr() as *const c_void,
                )
            },
            "backend attribute",
        )?;
        Ok(self)
    }

    fn set_desc(&self, name: Attr, values: &[&Desc]) -> CudaResult<&Self> {
        let raw: Vec<dnn::cudnnBackendDescriptor_t> = values.iter().map(|d| d.0).collect();
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    fn finalize(self) -> CudaResult<Self> {
        // SAFETY: a descriptor with its required attributes set.
        check(
            unsafe { dnn::cudnnBackendFinalize(self.0) },
            "backend finalize",
        )?;
        Ok(self)
    }
}

/// An NHWC tensor as cuDNN's NCHW dims with strides: `ld` elements between pixels.
fn tensor(
    uid: i64,
    dtype: dnn::cudnnDataType_t,
    [n, h, w, c]: [usize; 4],
    ld: usize,
    is_virtual: bool,
) -> CudaResult<Desc> {
    let dims = [n, c, h, w].map(|v| v as i64);
    let strides = [h * w * ld, 1, w * ld, ld].map(|v| v as i64);
    let d = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_DATA_TYPE,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[dtype],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_DIMENSIONS,
        Ty::CUDNN_TYPE_INT64,
        &dims,
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_STRIDES,
        Ty::CUDNN_TYPE_INT64,
        &strides,
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID,
        Ty::CUDNN_TYPE_INT64,
        &[uid],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
        Ty::CUDNN_TYPE_INT64,
        &[16i64],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
        Ty::CUDNN_TYPE_BOOLEAN,
        &[is_virtual],
    )?;
    d.finalize()
}

/// `y = op(x[, b])` as a pointwise operation in fp32.
fn pointwise(
    mode: dnn::cudnnPointwiseMode_t,
    x: &Desc,
    b: Option<&Desc>,
    y: &Desc,
) -> CudaResult<Desc> {
    let pw = Desc::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    pw.set(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        Ty::CUDNN_TYPE_POINTWISE_MODE,
        &[mode],
    )?
    .set(
        Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[dnn::cudnnDataType_t::CUDNN_DATA_FLOAT],
    )?;
    let pw = pw.finalize()?;
    let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?
        .set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?
        .set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
    if let Some(b) = b {
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
    }
    op.finalize()
}

/// The activation codes of `act_code` that the graph expresses (GELU's erf form is not
/// cuDNN's default GELU, so it stays with the epilogue pass).
fn activation(act: i32) -> Option<Option<dnn::cudnnPointwiseMode_t>> {
    use dnn::cudnnPointwiseMode_t as M;
    match act {
        0 => Some(None),
        2 => Some(Some(M::CUDNN_POINTWISE_RELU_FWD)),
        3 => Some(Some(M::CUDNN_POINTWISE_SWISH_FWD)),
        _ => None,
    }
}

/// Whether a launch is offered as a graph: dense (groups 1), with a bias, an activation
/// the graph has, 16-bit storage, and something the legacy call cannot finish by itself
/// (SiLU, a residual, or an output slice). Building a plan may compile kernels inside
/// cuDNN, so launches the legacy call already finishes are not offered.
pub(super) fn expressible(l: &DenseLaunch, storage: Storage) -> bool {
    let legacy_finishes = l.act != 3 && !l.residual && l.ldy == l.c_out;
    l.groups == 1
        && l.bias
        && activation(l.act).is_some()
        && storage != Storage::F32
        && !legacy_finishes
}

/// The operation graph of one launch (convolution, bias, activation, residual).
fn operation_graph(
    handle: dnn::cudnnHandle_t,
    l: &DenseLaunch,
    storage: Storage,
) -> CudaResult<Desc> {
    let act = activation(l.act)
        .ok_or_else(|| CudaError::Unavailable("activation not in the cuDNN graph".into()))?;
    let io = match storage {
        Storage::BF16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        _ => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
    };
    let f32t = dnn::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let [n, _, _, c] = l.input;
    let (oh, ow) = l.out_hw;
    let out = [n, oh, ow, l.c_out];
    let x = tensor(X, io, l.input, l.ldx, false)?;
    // KRSC filter: [k][kh][kw][c], as NHWC with k images of kh x kw pixels.
    let w = tensor(W, io, [l.c_out, l.kh, l.kw, c], c, false)?;
    let b = tensor(B, io, [1, 1, 1, l.c_out], l.c_out, false)?;
    let conv_out = tensor(CONV, f32t, out, l.c_out, true)?;
    let biased = tensor(BIASED, f32t, out, l.c_out, true)?;
    let y = tensor(Y, io, out, l.ldy, false)?;

    let (s, p) = (l.stride as i64, l.pad as i64);
    let conv = Desc::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    conv.set(
        Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[f32t],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
        Ty::CUDNN_TYPE_CONVOLUTION_MODE,
        &[dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
        Ty::CUDNN_TYPE_INT64,
        &[2i64],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS,
        Ty::CUDNN_TYPE_INT64,
        &[1i64, 1],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
        Ty::CUDNN_TYPE_INT64,
        &[s, s],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
        Ty::CUDNN_TYPE_INT64,
        &[p, p],
    )?
    .set(
        Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
        Ty::CUDNN_TYPE_INT64,
        &[p, p],
    )?;
    let conv = conv.finalize()?;
    let conv_op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
    conv_op
        .set_desc(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?
        .set_desc(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&w])?
        .set_desc(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
            &[&conv_out],
        )?
        .set_desc(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
            &[&conv],
        )?
        .set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
            Ty::CUDNN_TYPE_FLOAT,
            &[1f32],
        )?
        .set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            Ty::CUDNN_TYPE_FLOAT,
            &[0f32],
        )?;
    let conv_op = conv_op.finalize()?;

    use dnn::cudnnPointwiseMode_t as M;
    // The chain after the bias: activation, then residual; the last one writes y.
    let residual = l
        .residual
        .then(|| tensor(R, io, out, l.c_out, false))
        .transpose()?;
    let activated = match (act, &residual) {
        (Some(_), Some(_)) => Some(tensor(ACTIVATED, f32t, out, l.c_out, true)?),
        _ => None,
    };
    let bias_target = if act.is_some() || residual.is_some() {
        &biased
    } else {
        &y
    };
    let mut ops = vec![
        conv_op,
        pointwise(M::CUDNN_POINTWISE_ADD, &conv_out, Some(&b), bias_target)?,
    ];
    let mut last = bias_target;
    if let Some(mode) = act {
        let target = activated.as_ref().unwrap_or(&y);
        ops.push(pointwise(mode, last, None, target)?);
        last = target;
    }
    if let Some(r) = &residual {
        ops.push(pointwise(M::CUDNN_POINTWISE_ADD, last, Some(r), &y)?);
    }
    let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph
        .set(
            Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            Ty::CUDNN_TYPE_HANDLE,
            &[handle],
        )?
        .set_desc(
            Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS,
            &ops.iter().collect::<Vec<_>>(),
        )?;
    graph.finalize()
}

/// What a configuration's engine is: cuDNN's global engine number, whether its numerics
/// are acceptable (no transforms that round intermediate values, no reduction below
/// fp32, no run-to-run variation) and whether its kernels are compiled at run time.
#[derive(Clone, Copy, Debug)]
pub(super) struct EngineInfo {
    pub global_index: i64,
    pub acceptable: bool,
    pub runtime_compiled: bool,
}

/// One array attribute of `desc` (at most `N` elements; the rest keep `fill`).
fn get_array<T: Copy, const N: usize>(
    desc: &Desc,
    name: Attr,
    ty: Ty,
    fill: T,
    what: &str,
) -> CudaResult<Vec<T>> {
    let mut values = [fill; N];
    let mut count = 0i64;
    // SAFETY: room for N values of the C type `ty` names; `count` says how many were
    // written.
    check(
        unsafe {
            dnn::cudnnBackendGetAttribute(
                desc.0,
                name,
                ty,
                N as i64,
                &mut count,
                values.as_mut_ptr() as *mut c_void,
            )
        },
        what,
    )?;
    Ok(values[..count.clamp(0, N as i64) as usize].to_vec())
}

/// Fills `into` (descriptors created by the caller) with `desc`'s descriptor-array
/// attribute `name`; returns how many cuDNN wrote. An empty `into` asks for the count.
fn get_descriptors(desc: &Desc, name: Attr, into: &[&Desc], what: &str) -> CudaResult<usize> {
    let mut raw: Vec<dnn::cudnnBackendDescriptor_t> = into.iter().map(|d| d.0).collect();
    let mut count = 0i64;
    let array = if raw.is_empty() {
        std::ptr::null_mut()
    } else {
        raw.as_mut_ptr() as *mut c_void
    };
    // SAFETY: `raw` holds `into.len()` created descriptors for cuDNN to fill (none: a
    // count query with a null array).
    check(
        unsafe {
            dnn::cudnnBackendGetAttribute(
                desc.0,
                name,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                raw.len() as i64,
                &mut count,
                array,
            )
        },
        what,
    )?;
    Ok(count.max(0) as usize)
}

fn engine_info(cfg: &Desc) -> CudaResult<EngineInfo> {
    use dnn::cudnnBackendBehaviorNote_t as Bn;
    use dnn::cudnnBackendNumericalNote_t as N;
    let engine = Desc::new(Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    get_descriptors(
        cfg,
        Attr::CUDNN_ATTR_ENGINECFG_ENGINE,
        &[&engine],
        "engine of a configuration",
    )?;
    let notes = get_array::<_, 16>(
        &engine,
        Attr::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
        Ty::CUDNN_TYPE_NUMERICAL_NOTE,
        N::CUDNN_NUMERICAL_NOTE_TENSOR_CORE,
        "numerical notes",
    )?;
    let behaviour = get_array::<_, 16>(
        &engine,
        Attr::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
        Ty::CUDNN_TYPE_BEHAVIOR_NOTE,
        Bn::CUDNN_BEHAVIOR_NOTE_TYPE_COUNT,
        "behaviour notes",
    )
    .unwrap_or_default();
    let index = get_array::<_, 1>(
        &engine,
        Attr::CUDNN_ATTR_ENGINE_GLOBAL_INDEX,
        Ty::CUDNN_TYPE_INT64,
        -1i64,
        "engine index",
    )?;
    Ok(EngineInfo {
        global_index: index.first().copied().unwrap_or(-1),
        acceptable: !notes.iter().any(|n| {
            matches!(
                n,
                N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS
                    | N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION
                    | N::CUDNN_NUMERICAL_NOTE_FFT
                    | N::CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC
                    | N::CUDNN_NUMERICAL_NOTE_WINOGRAD
                    | N::CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_4x4
                    | N::CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_6x6
                    | N::CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_13x13
            )
        }),
        runtime_compiled: behaviour.contains(&Bn::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION),
    })
}

/// An execution plan for one launch and the workspace it needs.
pub(super) struct GraphPlan {
    plan: Desc,
    pub workspace: usize,
    residual: bool,
    pub info: EngineInfo,
}

impl std::fmt::Debug for GraphPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuDNN engine {}{} (workspace {} bytes)",
            self.info.global_index,
            if self.info.runtime_compiled {
                ", compiled at run time"
            } else {
                ""
            },
            self.workspace
        )
    }
}

/// Up to [`CANDIDATES`] plans for `l` in the heuristics' order, each needing at most
/// `max_workspace` bytes.
pub(super) fn plans(
    handle: dnn::cudnnHandle_t,
    l: &DenseLaunch,
    storage: Storage,
    max_workspace: usize,
) -> CudaResult<Vec<GraphPlan>> {
    let cfgs = engine_configs(handle, l, storage)?;
    let mut plans = Vec::new();
    for cfg in &cfgs {
        if plans.len() == CANDIDATES {
            break;
        }
        if let Ok(Some(p)) = plan_from(handle, l, cfg, max_workspace) {
            plans.push(p);
        }
    }
    Ok(plans)
}

/// The plan of one engine configuration, if its numerics are acceptable and its
/// workspace fits.
fn plan_from(
    handle: dnn::cudnnHandle_t,
    l: &DenseLaunch,
    cfg: &Desc,
    max_workspace: usize,
) -> CudaResult<Option<GraphPlan>> {
    let info = engine_info(cfg)?;
    if !info.acceptable {
        return Ok(None);
    }
    let plan = execution_plan(handle, cfg)?;
    let workspace = workspace_size(&plan)?;
    Ok((workspace <= max_workspace).then_some(GraphPlan {
        plan,
        workspace,
        residual: l.residual,
        info,
    }))
}

/// The heuristics' engine configurations for `l`'s operation graph, best first.
fn engine_configs(
    handle: dnn::cudnnHandle_t,
    l: &DenseLaunch,
    storage: Storage,
) -> CudaResult<Vec<Desc>> {
    let graph = operation_graph(handle, l, storage)?;
    let heur = Desc::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_desc(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&graph])?
        .set(
            Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
            Ty::CUDNN_TYPE_HEUR_MODE,
            &[dnn::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A],
        )?;
    let heur = heur.finalize()?;
    let results = Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS;
    let count = get_descriptors(&heur, results, &[], "heuristics' result count")?.min(64);
    let mut cfgs = (0..count)
        .map(|_| Desc::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<CudaResult<Vec<_>>>()?;
    let into: Vec<&Desc> = cfgs.iter().collect();
    let got = get_descriptors(&heur, results, &into, "heuristics' results")?;
    cfgs.truncate(got.min(count));
    Ok(cfgs)
}

fn execution_plan(handle: dnn::cudnnHandle_t, cfg: &Desc) -> CudaResult<Desc> {
    let plan = Desc::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
    plan.set(
        Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        Ty::CUDNN_TYPE_HANDLE,
        &[handle],
    )?
    .set_desc(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[cfg])?;
    plan.finalize()
}

fn workspace_size(plan: &Desc) -> CudaResult<usize> {
    let bytes = get_array::<_, 1>(
        plan,
        Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
        Ty::CUDNN_TYPE_INT64,
        0i64,
        "plan workspace size",
    )?;
    Ok(bytes.first().copied().unwrap_or(0).max(0) as usize)
}

impl GraphPlan {
    /// Enqueues the plan on the handle's stream with these operands and `workspace`
    /// (at least `self.workspace` bytes).
    pub(super) fn launch(
        &self,
        handle: dnn::cudnnHandle_t,
        p: &DensePtrs,
        workspace: u64,
    ) -> CudaResult<()> {
        let bias = p
            .bias
            .ok_or_else(|| CudaError::Driver("a cuDNN graph launch needs its bias".into()))?;
        let mut uids = vec![X, W, B, Y];
        let mut ptrs = vec![p.x, p.w, bias, p.y];
        if self.residual {
            let r = p.residual.ok_or_else(|| {
                CudaError::Driver("a cuDNN graph launch lost its residual".into())
            })?;
            uids.push(R);
            ptrs.push(r);
        }
        let ptrs: Vec<*mut c_void> = ptrs.into_iter().map(|v| v as *mut c_void).collect();
        let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
            Ty::CUDNN_TYPE_INT64,
            &uids,
        )?
        .set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Ty::CUDNN_TYPE_VOID_PTR,
            &ptrs,
        )?
        .set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Ty::CUDNN_TYPE_VOID_PTR,
            &[workspace as *mut c_void],
        )?;
        let pack = pack.finalize()?;
        // SAFETY: the pack names live device buffers matching the graph's tensors; the
        // workspace holds what the plan asked for.
        check(
            unsafe { dnn::cudnnBackendExecute(handle, self.plan.0, pack.0) },
            "graph execution",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(act: i32, residual: bool, ldy: usize) -> DenseLaunch {
        DenseLaunch {
            input: [2, 8, 8, 64],
            ldx: 64,
            out_hw: (8, 8),
            c_out: 32,
            ldy,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
            act,
            residual,
            bias: true,
            groups: 1,
        }
    }

    #[test]
    fn graphs_are_offered_where_the_legacy_call_cannot_finish_the_launch() {
        // SiLU, a residual, or an output slice: offered.
        assert!(expressible(&launch(3, false, 32), Storage::F16));
        assert!(expressible(&launch(2, true, 32), Storage::BF16));
        assert!(expressible(&launch(0, false, 96), Storage::F16));
        // ReLU or identity into a whole output: the legacy fused call does it.
        assert!(!expressible(&launch(2, false, 32), Storage::F16));
        assert!(!expressible(&launch(0, false, 32), Storage::F16));
    }

    #[test]
    fn gelu_depthwise_fp32_and_bias_free_launches_stay_out() {
        assert!(!expressible(&launch(1, false, 96), Storage::F16));
        assert!(!expressible(&launch(3, false, 32), Storage::F32));
        let depthwise = DenseLaunch {
            groups: 64,
            ..launch(3, false, 32)
        };
        assert!(!expressible(&depthwise, Storage::F16));
        let no_bias = DenseLaunch {
            bias: false,
            ..launch(3, false, 32)
        };
        assert!(!expressible(&no_bias, Storage::F16));
    }
}
