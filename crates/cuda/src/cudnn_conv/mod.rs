//! Convolutions through cuDNN where it is faster than ours (the implicit GEMM, cuBLASLt's
//! 1x1 products, the depthwise strip kernels).
//!
//! On Hopper, cuDNN's convolution engines use the warpgroup matrix instructions that
//! `conv_igemm` (mma.sync) does not; on D-FINE's shapes PyTorch's cuDNN convolutions run
//! at about twice our rate. Each distinct launch (shapes, strides, activation, residual)
//! is timed once, eagerly: ours, and cuDNN's fastest algorithm
//! (`cudnnFindConvolutionForwardAlgorithmEx`) followed by a vectorised epilogue kernel
//! for bias, activation and residual or with its own bias + activation (and, opt-in,
//! operation-graph plans: `graph`). The fastest that agrees with ours (checked on a
//! poisoned buffer) is remembered and used from then on,
//! including under graph capture (a launch first seen while capturing keeps ours: nothing
//! can be timed there). Where cuDNN has no algorithm for a channel slice of a wider
//! tensor (the in-place concatenations), the input is packed first and/or the output
//! goes to a packed buffer that the epilogue moves into the slice.
//!
//! 16-bit storage only (fp32/tf32 keep their checked path); the library is loaded on the
//! first eligible convolution, and a machine without it keeps ours. `APERTURE_CUDNN=0`
//! turns the path off (for A/B runs), `APERTURE_CUDNN=1x1` offers it 1x1 launches only,
//! `APERTURE_CUDNN=force` skips the timing and takes cuDNN wherever it runs (for parity
//! checks of its numerics).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use aperture_engine::backend::Activation;
use aperture_engine::Result;
use cudarc::cudnn::sys as dnn;

use crate::backend::{ConvWeights, CudaBackend};
use crate::conv::act_code;
use crate::error::CudaError;
use crate::kernels::Storage;

mod agree;
mod api;
mod graph;
mod timing;

use api::{Descriptors, FusedEpilogue, Handle, Temps};
use timing::{graph_ms, Scratch};

const ENV_SWITCH: &str = "APERTURE_CUDNN";
/// Largest cuDNN workspace taken for one convolution.
const MAX_WORKSPACE: usize = 256 << 20;
/// Algorithms asked of cuDNN's search.
const ALGOS: i32 = 8;
/// Timed replays per candidate (after one untimed replay).
const TIMED_RUNS: usize = 3;
/// Launches per timing graph: small convolutions take microseconds, so each candidate is
/// timed as a captured graph of several launches, as it will run (no host in between).
const GRAPH_REPS: usize = 10;

/// One dense convolution launch: input rows `ldx` apart, output rows `ldy` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DenseLaunch {
    /// Input NHWC dims.
    pub input: [usize; 4],
    pub ldx: usize,
    pub out_hw: (usize, usize),
    pub c_out: usize,
    pub ldy: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub act: i32,
    pub residual: bool,
    pub bias: bool,
    /// 1 (dense) or the channel count (depthwise).
    pub groups: usize,
}

impl DenseLaunch {
    pub(crate) fn new(
        input: [usize; 4],
        ldx: usize,
        w: &ConvWeights,
        out_hw: (usize, usize),
        ldy: usize,
        act: Activation,
        residual: bool,
    ) -> Self {
        Self {
            input,
            ldx,
            out_hw,
            c_out: w.c_out,
            ldy,
            kh: w.kh,
            kw: w.kw,
            stride: w.spec.stride,
            pad: w.spec.padding,
            act: act_code(act),
            residual,
            bias: w.bias.is_some(),
            groups: if w.depthwise { w.c_out } else { 1 },
        }
    }

    fn pixels_out(&self) -> usize {
        self.input[0] * self.out_hw.0 * self.out_hw.1
    }

    fn pixels_in(&self) -> usize {
        self.input[0] * self.input[1] * self.input[2]
    }
}

/// Device pointers of one launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DensePtrs {
    pub x: u64,
    pub w: u64,
    pub bias: Option<u64>,
    pub residual: Option<u64>,
    pub y: u64,
}

impl DensePtrs {
    /// `w`'s weight and bias with the given input, residual and output.
    pub(crate) fn of(x: u64, w: &ConvWeights, residual: Option<u64>, y: u64) -> Self {
        let (weight, bias) = w.cudnn_operands();
        Self {
            x,
            w: weight,
            bias,
            residual,
            y,
        }
    }
}

/// Which sides of a launch go through packed buffers (cuDNN has algorithms for fewer
/// strided layouts than we launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Staging {
    pub input: bool,
    pub output: bool,
}

impl Staging {
    /// The layouts to try for `l`, fewest copies first.
    fn options(l: &DenseLaunch) -> Vec<Staging> {
        let strided_in = l.ldx != l.input[3];
        let strided_out = l.ldy != l.c_out;
        let mut v = vec![Staging {
            input: false,
            output: false,
        }];
        if strided_out {
            v.push(Staging {
                input: false,
                output: true,
            });
        }
        if strided_in {
            v.push(Staging {
                input: true,
                output: strided_out,
            });
        }
        v
    }
}

/// cuDNN's way for one launch.
struct Plan {
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    staging: Staging,
    desc: Descriptors,
    /// Bias and activation in cuDNN's own call instead of our epilogue pass.
    fused: Option<FusedEpilogue>,
}

#[derive(Clone)]
enum Choice {
    Ours,
    Cudnn(Arc<Plan>),
    Graph(Arc<graph::GraphPlan>),
}

/// The backend's cuDNN state: the handle (made on first use) and the choice per launch.
#[derive(Default)]
pub(crate) struct CudnnConvs {
    handle: OnceLock<Option<Handle>>,
    choices: Mutex<HashMap<DenseLaunch, Choice>>,
    /// Set: shapes not chosen yet stay on ours (see `CudaBackend::freeze_convolution_choices`).
    frozen: AtomicBool,
    /// Launches given an operation-graph plan so far (see `graph_limit`).
    graphs_taken: std::sync::atomic::AtomicUsize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Timed,
    /// Timed, 1x1 launches only (A/B runs of the k x k choices).
    TimedPointwise,
    Forced,
}

fn mode() -> Mode {
    match std::env::var(ENV_SWITCH).as_deref() {
        Ok("0") | Ok("off") => Mode::Off,
        Ok("force") => Mode::Forced,
        Ok("1x1") => Mode::TimedPointwise,
        _ => Mode::Timed,
    }
}

impl CudnnConvs {
    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }
    fn handle(&self, be: &CudaBackend) -> Option<dnn::cudnnHandle_t> {
        self.handle
            .get_or_init(|| match api::open(be) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::info!("cuDNN not used for convolutions: {e}");
                    None
                }
            })
            .as_ref()
            .map(|h| h.0)
    }
}

/// The way `l` runs: the one remembered, else (eagerly, outside capture) timed now.
/// `Choice::Ours` where cuDNN is not offered or nothing can be timed.
fn choice_for(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    ours: &dyn Fn() -> Result<()>,
) -> Choice {
    let m = mode();
    let offered = match m {
        Mode::Off => false,
        Mode::TimedPointwise => l.kh == 1 && l.kw == 1,
        Mode::Timed | Mode::Forced => true,
    };
    if !offered || !eligible(be, l, p) {
        return Choice::Ours;
    }
    if let Some(c) = be.cudnn.choices.lock().ok().and_then(|c| c.get(l).cloned()) {
        return c;
    }
    if be.cudnn.frozen.load(Ordering::Relaxed)
        || be.ctx.is_dry()
        || crate::gemm::capturing(be.ctx.stream as _)
    {
        return Choice::Ours;
    }
    let c = choose(be, l, p, ours, m == Mode::Forced).unwrap_or_else(|e| {
        tracing::debug!("cuDNN convolution {l:?} not taken: {e}");
        Choice::Ours
    });
    if let Ok(mut map) = be.cudnn.choices.lock() {
        map.insert(*l, c.clone());
    }
    c
}

/// Whether `l` runs through cuDNN into a packed buffer that is then moved into its
/// (strided) output: making the choice first where it is not made yet, which may run
/// `ours` into the real output while timing.
pub(crate) fn stages_output(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    ours: impl Fn() -> Result<()>,
) -> bool {
    matches!(choice_for(be, l, p, &ours), Choice::Cudnn(plan) if plan.staging.output)
}

/// Runs the convolution `l` either with `ours` or through cuDNN, whichever was faster
/// when `l` was first seen.
pub(crate) fn run_dense(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    ours: impl Fn() -> Result<()>,
) -> Result<()> {
    let plan = match choice_for(be, l, p, &ours) {
        Choice::Ours => return ours(),
        Choice::Graph(g) => return run_graph(be, &g, p),
        Choice::Cudnn(plan) => plan,
    };
    let handle = be
        .cudnn
        .handle(be)
        .ok_or_else(|| CudaError::Driver("cuDNN handle vanished".into()))?;
    // Pool blocks: under capture they come from the graph's arena and live with it.
    let es = be.esize();
    let alloc = |on: bool, bytes: usize| on.then(|| be.pool.alloc(bytes)).transpose();
    let ws = alloc(plan.workspace > 0, plan.workspace)?;
    let x = alloc(plan.staging.input, l.pixels_in() * l.input[3] * es)?;
    let y = alloc(plan.staging.output, l.pixels_out() * l.c_out * es)?;
    let ptr = |b: &Option<crate::pool::DeviceBuffer>| b.as_ref().map(|b| b.ptr()).unwrap_or(0);
    let temps = Temps {
        x: ptr(&x),
        y: ptr(&y),
        workspace: (ptr(&ws), plan.workspace),
    };
    api::launch(
        be,
        handle,
        (l, &plan.desc, plan.staging),
        p,
        (plan.algo, plan.fused.as_ref()),
        &temps,
    )?;
    Ok(())
}

/// One launch of an operation-graph plan (its workspace from the pool).
fn run_graph(be: &CudaBackend, g: &graph::GraphPlan, p: &DensePtrs) -> Result<()> {
    if be.ctx.is_dry() {
        return Ok(());
    }
    let handle = be
        .cudnn
        .handle(be)
        .ok_or_else(|| CudaError::Driver("cuDNN handle vanished".into()))?;
    let ws = (g.workspace > 0)
        .then(|| be.pool.alloc(g.workspace))
        .transpose()?;
    // cuDNN launches these kernels for programmatic dependent launch: behind a kernel
    // that allows it (cuBLASLt's do) one may start, and read that kernel's output, before
    // it is complete (measured: eager outputs that changed from run to run). A memset in
    // between starts only once the kernel before it has finished. Captured graphs get
    // the same order from plain edges instead (graph_shape.rs).
    if !crate::gemm::capturing(be.ctx.stream as _) {
        let barrier = be.pool.alloc(16)?;
        be.memset(barrier.ptr(), 0, 16)?;
    }
    g.launch(handle, p, ws.as_ref().map_or(0, |b| b.ptr()))?;
    Ok(())
}

/// 16-bit storage, whole 16-byte vectors in the epilogue, sizes within cuDNN's int.
fn eligible(be: &CudaBackend, l: &DenseLaunch, p: &DensePtrs) -> bool {
    let vec = 8;
    let fits_int = |v: usize| v < i32::MAX as usize;
    let [n, h, w, c] = l.input;
    be.storage != Storage::F32
        && l.c_out.is_multiple_of(vec)
        && l.ldy.is_multiple_of(vec)
        && p.y.is_multiple_of(16)
        && p.bias.is_none_or(|b| b.is_multiple_of(16))
        && p.residual.is_none_or(|r| r.is_multiple_of(16))
        && fits_int(n * h * w * l.ldx)
        && fits_int(l.pixels_out() * l.ldy)
        && fits_int(c * l.kh * l.kw * l.c_out)
}

/// Whether `algo` computes the convolution as direct products (fp32 accumulation of the
/// same terms as ours). FFT and Winograd transforms round intermediate values that the
/// direct products never form, so their error in 16-bit storage is not ours to vouch for.
fn exact_products(algo: dnn::cudnnConvolutionFwdAlgo_t) -> bool {
    use dnn::cudnnConvolutionFwdAlgo_t as A;
    matches!(
        algo,
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM
            | A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
            | A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM
            | A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT
    )
}

/// cuDNN's fastest algorithm for `l` with `staging`, searched on the real inputs into
/// the scratch output `out` (the extent of `l`'s output) with up to [`MAX_WORKSPACE`]
/// bytes at `workspace`: some of the algorithms it tries write outside a strided output's
/// channel slice, which here is the middle of a concatenation whose other slices already
/// hold results.
fn search(
    be: &CudaBackend,
    handle: dnn::cudnnHandle_t,
    (l, p, staging): (&DenseLaunch, &DensePtrs, Staging),
    temps: &Temps,
    (out, workspace): (u64, u64),
) -> Result<Option<Plan>> {
    let desc = Descriptors::new(be, l, staging)?;
    let x = if staging.input {
        // Packs the real input into the scratch (the launch does the same).
        api::pack_input(be, p.x, temps.x, l.pixels_in(), l.input[3], l.ldx)?;
        temps.x
    } else {
        p.x
    };
    let perf = api::find(
        handle,
        &desc,
        (x, p.w, out),
        (workspace, MAX_WORKSPACE),
        ALGOS,
    )?;
    Ok(perf
        .iter()
        .find(|r| {
            r.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && r.memory <= MAX_WORKSPACE
                && exact_products(r.algo)
        })
        .map(|best| Plan {
            algo: best.algo,
            workspace: best.memory,
            staging,
            desc,
            fused: None,
        }))
}

/// cuDNN's ways for one launch, as timed.
enum Way {
    /// The legacy call, with its own bias/activation or followed by our epilogue pass.
    Legacy { fused: bool },
    /// The i-th operation-graph plan.
    Graph(usize),
}

fn way_name(w: &Way, graphs: &[graph::GraphPlan]) -> String {
    match w {
        Way::Legacy { fused: false } => "legacy + epilogue".into(),
        Way::Legacy { fused: true } => "legacy fused".into(),
        Way::Graph(i) => format!("graph #{i} ({:?})", graphs.get(*i)),
    }
}

/// `APERTURE_CUDNN_GRAPH_LIMIT=N`: at most N launches take graph plans (bisecting which
/// launch's plan misbehaves).
fn graph_limit() -> usize {
    std::env::var("APERTURE_CUDNN_GRAPH_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Whether operation-graph plans are offered for `l`: by default for every launch,
/// channel slices included; `APERTURE_CUDNN_GRAPH=packed` only for launches with whole
/// operands, `=off` never.
fn graph_offered(l: &DenseLaunch) -> bool {
    match std::env::var("APERTURE_CUDNN_GRAPH").as_deref() {
        Ok("off") => false,
        Ok("packed") => l.ldx == l.input[3] && l.ldy == l.c_out,
        _ => true,
    }
}

/// Times ours and cuDNN's ways (the legacy call with the first staging it has an
/// algorithm for, with and without its own bias/activation, and the operation-graph
/// plans), and takes cuDNN's fastest only if it beats ours and its output agrees with
/// ours. Ours writes the real output (only its slice; the real launch writes it again);
/// cuDNN's candidates write scratch buffers.
fn choose(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    ours: &dyn Fn() -> Result<()>,
    forced: bool,
) -> Result<Choice> {
    let handle = be
        .cudnn
        .handle(be)
        .ok_or_else(|| CudaError::Unavailable("cuDNN not loaded".into()))?;
    let es = be.esize();
    let x_scratch = Scratch::new(l.pixels_in() * l.input[3] * es)?;
    let y_scratch = Scratch::new(l.pixels_out() * l.c_out * es)?;
    let out = Scratch::new(l.pixels_out() * l.ldy.max(l.c_out) * es)?;
    // One workspace for the search and the timing runs (the chosen way needs at most
    // what the search allowed).
    let ws = Scratch::new(MAX_WORKSPACE)?;
    let mut temps = Temps {
        x: x_scratch.0,
        y: y_scratch.0,
        workspace: (0, 0),
    };
    let mut legacy = None;
    for staging in Staging::options(l) {
        legacy = search(be, handle, (l, p, staging), &temps, (out.0, ws.0))?;
        if legacy.is_some() {
            break;
        }
    }
    let under_limit = be.cudnn.graphs_taken.load(Ordering::Relaxed) < graph_limit();
    let graphs = if under_limit && graph_offered(l) && graph::expressible(l, be.storage) {
        graph::plans(handle, l, be.storage, MAX_WORKSPACE).unwrap_or_else(|e| {
            tracing::debug!("no cuDNN graph for {l:?}: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    if legacy.is_none() && graphs.is_empty() {
        return Err(CudaError::Driver("cuDNN has no algorithm for this convolution".into()).into());
    }
    if let Some(plan) = &legacy {
        temps.workspace = (ws.0, plan.workspace);
    }
    let p_scratch = DensePtrs { y: out.0, ..*p };
    // cuDNN's own bias + activation where the legacy call can finish the launch.
    let fused = legacy
        .as_ref()
        .filter(|plan| api::can_fuse(l, plan.staging, plan.algo))
        .and_then(|_| FusedEpilogue::new(be, l).ok());
    let run = |way: &Way| -> Result<()> {
        match (way, &legacy) {
            (Way::Legacy { fused: f }, Some(plan)) => {
                let l_plan = (l, &plan.desc, plan.staging);
                let epi = if *f { fused.as_ref() } else { None };
                api::launch(be, handle, l_plan, &p_scratch, (plan.algo, epi), &temps)
                    .map_err(Into::into)
            }
            (Way::Graph(i), _) => graphs[*i]
                .launch(handle, &p_scratch, ws.0)
                .map_err(Into::into),
            (Way::Legacy { .. }, None) => {
                Err(CudaError::Driver("no legacy cuDNN plan".into()).into())
            }
        }
    };
    let mut ways: Vec<Way> = Vec::new();
    if legacy.is_some() {
        ways.push(Way::Legacy { fused: false });
        if fused.is_some() {
            ways.push(Way::Legacy { fused: true });
        }
    }
    ways.extend((0..graphs.len()).map(Way::Graph));
    // Every candidate writes while timed (ours the real output, cuDNN's the scratch).
    let (candidates, timing) = if forced {
        ours()?;
        // A forced run checks the graph's numerics where there is one.
        let way = if graphs.is_empty() {
            Way::Legacy { fused: false }
        } else {
            Way::Graph(0)
        };
        (vec![way], None)
    } else {
        let mut timed: Vec<(Way, f32)> = Vec::new();
        for way in ways {
            if let Ok(ms) = graph_ms(be, &|| run(&way)) {
                timed.push((way, ms));
            }
        }
        let mine = graph_ms(be, ours)?;
        let summary = timed
            .iter()
            .map(|(w, t)| format!("{} {t:.3}", way_name(w, &graphs)))
            .collect::<Vec<_>>()
            .join(", ");
        timed.sort_by(|a, b| a.1.total_cmp(&b.1));
        let faster = timed
            .into_iter()
            .filter(|(_, t)| *t < mine)
            .map(|(w, _)| w)
            .collect();
        (faster, Some((mine, summary)))
    };
    // The fastest candidate that passes the checks is taken.
    let scratch = Poisoned {
        ptr: out.0,
        bytes: l.pixels_out() * l.ldy.max(l.c_out) * es,
    };
    let mut taken = None;
    for way in candidates {
        match verify(be, l, p, scratch, &way, &|| run(&way))? {
            Ok(diff) => {
                taken = Some((way, diff));
                break;
            }
            Err(why) => tracing::warn!(
                "cuDNN's convolution {l:?} ({}) {why}: not taken",
                way_name(&way, &graphs)
            ),
        }
    }
    if let Some((mine, summary)) = &timing {
        let (what, diff) = match &taken {
            Some((w, d)) => (way_name(w, &graphs), format!("{d:.1e}")),
            None => ("ours".to_string(), "-".to_string()),
        };
        tracing::debug!(
            "convolution {:?} {}x{} s{} g{} -> {} channels (ldx {}, ldy {}, act {}): ours {mine:.3} ms, cuDNN {summary} ms; took {what} (outputs {diff} apart)",
            l.input,
            l.kh,
            l.kw,
            l.stride,
            l.groups,
            l.c_out,
            l.ldx,
            l.ldy,
            l.act,
        );
    }
    let Some((way, _)) = taken else {
        return Ok(Choice::Ours);
    };
    Ok(match way {
        Way::Graph(i) => {
            let mut graphs = graphs;
            be.cudnn.graphs_taken.fetch_add(1, Ordering::Relaxed);
            Choice::Graph(Arc::new(graphs.swap_remove(i)))
        }
        Way::Legacy { fused: f } => {
            let mut plan =
                legacy.ok_or_else(|| CudaError::Driver("no legacy cuDNN plan".into()))?;
            if f {
                plan.fused = fused;
            }
            Choice::Cudnn(Arc::new(plan))
        }
    })
}

/// The candidate's scratch output, filled with NaN (0xFF bytes) before each checked run so
/// that elements a candidate leaves unwritten fail the comparison.
#[derive(Clone, Copy)]
struct Poisoned {
    ptr: u64,
    bytes: usize,
}

/// Checks a cuDNN candidate against ours (already in the real output `p.y`): its output,
/// run eagerly into the poisoned scratch, within rounding of ours; for an operation-graph
/// plan also nothing written outside its channel slice, the same bits from a second
/// eager run, and all of that again when it runs replayed from a captured CUDA graph (as
/// the forward pass's graph will run it). Returns the relative L2 distance, or why the
/// candidate fails.
fn verify(
    be: &CudaBackend,
    l: &DenseLaunch,
    p: &DensePtrs,
    scratch: Poisoned,
    way: &Way,
    run: &dyn Fn() -> Result<()>,
) -> Result<std::result::Result<f64, String>> {
    let graph = matches!(way, Way::Graph(_));
    let modes: &[bool] = if graph { &[false, true] } else { &[false] };
    let mut worst = 0f64;
    // A graph plan's first eager output, to compare a second run and the replay with.
    let first = if graph {
        Some(timing::Scratch::new(scratch.bytes)?)
    } else {
        None
    };
    for &replayed in modes {
        be.memset(scratch.ptr, 0xFF, scratch.bytes)?;
        if replayed {
            timing::replayed_once(be, run)?;
        } else {
            run()?;
        }
        let how = if replayed {
            "replayed from a CUDA graph"
        } else {
            "run eagerly"
        };
        let diff = agree::slice_rel_l2(be, (p.y, scratch.ptr), l.pixels_out(), l.c_out, l.ldy)?;
        if diff.is_nan() || diff > agree::tolerance(be.storage) {
            return Ok(Err(format!(
                "differs from ours by {diff:.2e} (relative L2), {how}"
            )));
        }
        if graph
            && !agree::outside_slice_untouched(be, scratch.ptr, l.pixels_out(), l.c_out, l.ldy)?
        {
            return Ok(Err(format!("writes outside its channel slice, {how}")));
        }
        worst = worst.max(diff);
        // A graph plan gives the same bits when run again and when replayed.
        if let Some(first) = &first {
            let again = if replayed {
                "replayed"
            } else {
                be.copy_bytes(first.0, scratch.ptr, scratch.bytes)?;
                be.memset(scratch.ptr, 0xFF, scratch.bytes)?;
                run()?;
                "run again"
            };
            let apart =
                agree::slice_rel_l2(be, (first.0, scratch.ptr), l.pixels_out(), l.c_out, l.ldy)?;
            if apart != 0.0 {
                return Ok(Err(format!(
                    "{again}, differs from its first eager run by {apart:.2e} (relative L2)"
                )));
            }
        }
    }
    Ok(Ok(worst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(c: usize, ldx: usize, c_out: usize, ldy: usize) -> DenseLaunch {
        DenseLaunch {
            input: [2, 8, 8, c],
            ldx,
            out_hw: (8, 8),
            c_out,
            ldy,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
            act: 0,
            residual: false,
            bias: true,
            groups: 1,
        }
    }

    fn staging(input: bool, output: bool) -> Staging {
        Staging { input, output }
    }

    #[test]
    fn packed_launches_need_no_staging() {
        assert_eq!(
            Staging::options(&launch(64, 64, 32, 32)),
            vec![staging(false, false)]
        );
    }

    #[test]
    fn slices_are_tried_as_they_are_first_then_with_fewest_copies() {
        // Output into a concatenation slice: as is, then through a packed output.
        assert_eq!(
            Staging::options(&launch(64, 64, 32, 448)),
            vec![staging(false, false), staging(false, true)]
        );
        // Input and output slices: as is, output packed, then both packed.
        assert_eq!(
            Staging::options(&launch(64, 448, 64, 448)),
            vec![
                staging(false, false),
                staging(false, true),
                staging(true, true)
            ]
        );
        // Input slice only.
        assert_eq!(
            Staging::options(&launch(64, 448, 64, 64)),
            vec![staging(false, false), staging(true, false)]
        );
    }

    #[test]
    fn cudnn_finishes_bias_with_relu_silu_or_identity_in_place_only() {
        use dnn::cudnnConvolutionFwdAlgo_t as A;
        let (precomp, gemm) = (
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        );
        let relu = DenseLaunch {
            act: 2,
            ..launch(64, 64, 32, 32)
        };
        let plain = staging(false, false);
        assert!(api::can_fuse(&relu, plain, gemm));
        // Identity runs with the precomputed implicit GEMM only.
        let identity = launch(64, 64, 32, 32);
        assert!(api::can_fuse(&identity, plain, precomp));
        assert!(!api::can_fuse(&identity, plain, gemm));
        // SiLU is offered to cuDNN (which may turn it down while timed).
        let silu = DenseLaunch { act: 3, ..relu };
        assert!(api::can_fuse(&silu, plain, precomp));
        assert!(api::can_fuse(&silu, plain, gemm));
        // GELU, a residual, no bias or a staged output stay with our epilogue.
        assert!(!api::can_fuse(
            &DenseLaunch { act: 1, ..relu },
            plain,
            precomp
        ));
        let residual = DenseLaunch {
            residual: true,
            ..relu
        };
        assert!(!api::can_fuse(&residual, plain, precomp));
        let no_bias = DenseLaunch {
            bias: false,
            ..relu
        };
        assert!(!api::can_fuse(&no_bias, plain, precomp));
        assert!(!api::can_fuse(&relu, staging(false, true), precomp));
    }

    #[test]
    fn only_direct_product_algorithms_are_taken() {
        use dnn::cudnnConvolutionFwdAlgo_t as A;
        assert!(exact_products(
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        ));
        assert!(exact_products(A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM));
        assert!(!exact_products(A::CUDNN_CONVOLUTION_FWD_ALGO_FFT));
        assert!(!exact_products(
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED
        ));
    }
}
