//! CUDA graphs for forward passes with several outputs (D-FINE: logits and boxes, or
//! post-processed detections): one graph per input shape, input from an NCHW f32
//! staging buffer, every output converted (activations) or copied (f32 values) to f32
//! staging buffers inside the graph.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::result;

use super::postprocess::TopDetections;
use super::Arg;
use crate::backend::{CudaBackend, CudaTensor};
use crate::error::CudaError;
use crate::graph::{padded_shape, CudaGraph};
use crate::pool::DeviceBuffer;
use crate::transfer::{SlotsByShape, UploadSlots, UPLOAD_SLOTS};

/// Captures `f` into a graph over a private arena. `f` runs once eagerly into the same
/// arena first, so that under capture every allocation is served from the arena's
/// cache: no cuMemAlloc, and above all no cuMemFree (which would invalidate the capture
/// when the allocator makes room), whatever the batch size.
fn capture_warm(be: &CudaBackend, f: impl Fn(&CudaBackend) -> Result<()>) -> Result<CudaGraph> {
    let arena = be.pool.new_arena();
    be.pool.set_capture_arena(Some(arena.clone()));
    let warm = f(be).and_then(|()| be.synchronize());
    be.pool.set_capture_arena(None);
    warm?;
    Ok(be.capture_in(arena, f)?.0)
}

struct Entry {
    graph: CudaGraph,
    staging_in: DeviceBuffer,
    /// Where inputs from the host wait for the graph (page-locked and on the device, in
    /// the storage type for 16-bit models); shared with requests uploading right now.
    uploads: Arc<UploadSlots>,
    outs: Outputs,
}

type Entries = HashMap<Vec<usize>, Entry>;

pub(super) fn poisoned() -> EngineError {
    EngineError::Device("graph cache poisoned".into())
}

/// NCHW f32 staging buffer -> NHWC activation (a kernel, so capturable).
fn from_nchw(be: &CudaBackend, staging: u64, [n, c, h, w]: [usize; 4]) -> Result<CudaTensor> {
    let out = be.alloc_tensor([n, h, w, c])?;
    let hw = h * w;
    // Whole 16-byte vectors: the staging buffer and the arena's tensors start aligned.
    if c == 3 && hw.is_multiple_of(8) && staging.is_multiple_of(16) && out.ptr().is_multiple_of(16)
    {
        let args = [
            Arg::Ptr(staging),
            Arg::Ptr(out.ptr()),
            Arg::I32(n as i32),
            Arg::I64(hw as i64),
        ];
        be.det_launch_1d("det_from_nchw3x8", n * hw / 8, &args)?;
        return Ok(out);
    }
    let args = [
        Arg::Ptr(staging),
        Arg::Ptr(out.ptr()),
        Arg::I32(n as i32),
        Arg::I32(c as i32),
        Arg::I64(hw as i64),
    ];
    be.det_launch_1d("det_from_nchw", n * c * hw, &args)?;
    Ok(out)
}

/// One output of a captured forward pass: an activation in the backend's storage type
/// (converted to f32 inside the graph), or values already in f32 (copied). f32 outputs
/// (post-processed detections: scores and corners) must reach the host as f32, never
/// narrowed to a 16-bit storage type on the way.
pub struct GraphOutput(Output);

enum Output {
    Storage(CudaTensor),
    F32 { buf: DeviceBuffer, dims: [usize; 4] },
}

impl GraphOutput {
    fn dims(&self) -> [usize; 4] {
        match &self.0 {
            Output::Storage(t) => t.dims,
            Output::F32 { dims, .. } => *dims,
        }
    }

    /// Enqueues the f32 copy of this output into `dst`.
    fn write_f32(&self, be: &CudaBackend, dst: u64) -> Result<()> {
        let n: usize = self.dims().iter().product();
        match &self.0 {
            Output::Storage(y) => be.det_launch_1d(
                "det_to_f32",
                n,
                &[Arg::Ptr(y.ptr()), Arg::Ptr(dst), Arg::I64(n as i64)],
            ),
            Output::F32 { buf, .. } => {
                be.ctx.bind()?;
                // SAFETY: both buffers hold at least `n` f32 values (allocated from the
                // same dims); the copy is ordered on the stream (captured as a node).
                unsafe {
                    result::memcpy_dtod_async(dst, buf.ptr(), n * 4, be.ctx.stream)
                        .map_err(CudaError::from)?
                };
                Ok(())
            }
        }
    }
}

impl From<CudaTensor> for GraphOutput {
    fn from(t: CudaTensor) -> Self {
        Self(Output::Storage(t))
    }
}

impl From<TopDetections> for GraphOutput {
    fn from(t: TopDetections) -> Self {
        Self(Output::F32 {
            buf: t.buf,
            dims: t.dims,
        })
    }
}

/// Captured forward passes per input shape (NCHW). Like [`crate::GraphCache`], `infer`
/// uploads a request's input holding only an upload slot, so that
/// [`MultiGraphCache::CONCURRENCY`] callers overlap one's upload with another's replay.
///
/// A capture must be alone on the backend's stream: callers that also run eager passes
/// or other caches' replays on the same backend from other threads capture first (see
/// [`MultiGraphCache::is_captured`]) with those excluded.
#[derive(Default)]
pub struct MultiGraphCache {
    entries: Mutex<Entries>,
    slots: SlotsByShape,
}

impl MultiGraphCache {
    /// How many `infer` calls usefully run at once on one cache: one uploading its
    /// input while another replays. More wait for an upload slot.
    pub const CONCURRENCY: usize = UPLOAD_SLOTS;

    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a graph for `shape` (NCHW) has been captured.
    pub fn is_captured(&self, shape: &[usize]) -> bool {
        self.entries
            .lock()
            .map(|e| e.contains_key(shape))
            .unwrap_or(false)
    }

    /// Number of captured shapes.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Captures a graph for `shape` unless one exists. `forward` runs once eagerly first
    /// (kernels, matrix plans and constants get ready), then under capture; it must only
    /// enqueue device work.
    pub fn prepare<F, O>(&self, be: &CudaBackend, shape: &[usize], forward: F) -> Result<()>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
        O: Into<GraphOutput>,
    {
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        prepare_locked(&mut entries, be, shape, &forward)?;
        Ok(())
    }

    /// Enqueues one replay for `shape` (no copies; for timing device work).
    pub fn replay(&self, be: &CudaBackend, shape: &[usize]) -> Result<()> {
        let entries = self.entries.lock().map_err(|_| poisoned())?;
        let e = entries
            .get(shape)
            .ok_or_else(|| EngineError::Invalid(format!("no graph captured for {shape:?}")))?;
        be.replay(&e.graph)
    }

    /// Copy in, replay, copy every output out (NHWC f32).
    pub fn infer<F, O>(
        &self,
        be: &CudaBackend,
        x: &HostTensor,
        forward: F,
    ) -> Result<Vec<HostTensor>>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
        O: Into<GraphOutput>,
    {
        let rows = x.shape().first().copied().unwrap_or(0);
        self.infer_padded(be, x, rows, forward)
    }

    /// Like [`MultiGraphCache::infer`] through the graph for a batch of `graph_batch`
    /// (at least `x`'s rows): see [`crate::GraphCache::infer_padded`]. The input's host
    /// conversion and copy hold only an upload slot, not the graph.
    pub fn infer_padded<F, O>(
        &self,
        be: &CudaBackend,
        x: &HostTensor,
        graph_batch: usize,
        forward: F,
    ) -> Result<Vec<HostTensor>>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
        O: Into<GraphOutput>,
    {
        let shape = padded_shape(x.shape(), graph_batch)?;
        let rows = x.shape()[0];
        let uploads = self.slots.get_or(&shape, || {
            let mut entries = self.entries.lock().map_err(|_| poisoned())?;
            Ok(prepare_locked(&mut entries, be, &shape, &forward)?
                .uploads
                .clone())
        })?;
        // Stage one, beside whatever replay holds the graph now.
        let mut slot = uploads.acquire()?;
        slot.upload(be, x)?;
        // Stage two, the graph alone.
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        let e = prepare_locked(&mut entries, be, &shape, &forward)?;
        slot.land_into(be, e.staging_in.ptr())?;
        drop(slot);
        be.replay(&e.graph)?;
        read_outputs(be, e, rows)
    }

    /// Like [`MultiGraphCache::infer`] for an input of `shape` (NCHW f32) that
    /// `fill(ptr, bytes)` writes straight into the graph's device input buffer (e.g.
    /// GPU preprocessing): no host copy of the input. `fill` must have finished writing
    /// when it returns (work on another stream synchronised).
    pub fn infer_filled<F, W, O>(
        &self,
        be: &CudaBackend,
        shape: &[usize],
        fill: W,
        forward: F,
    ) -> Result<Vec<HostTensor>>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
        O: Into<GraphOutput>,
        W: FnOnce(u64, usize) -> Result<()>,
    {
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        let e = prepare_locked(&mut entries, be, shape, &forward)?;
        // Every replay ends with its outputs read back (the stream synchronised), so no
        // earlier replay still reads the input buffer; inputs from upload slots are
        // moved in under this lock too.
        fill(e.staging_in.ptr(), shape.iter().product::<usize>() * 4)?;
        be.replay(&e.graph)?;
        read_outputs(be, e, shape.first().copied().unwrap_or(0))
    }
}

/// [`MultiGraphCache::prepare`] with the cache already locked; the entry for `shape`.
fn prepare_locked<'a, F, O>(
    entries: &'a mut Entries,
    be: &CudaBackend,
    shape: &[usize],
    forward: &F,
) -> Result<&'a Entry>
where
    F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
    O: Into<GraphOutput>,
{
    if !entries.contains_key(shape) {
        capture_entry(entries, be, shape, forward)?;
    }
    entries
        .get(shape)
        .ok_or_else(|| EngineError::Device("graph vanished".into()))
}

/// Runs `forward` eagerly once, then captures it for `shape` into a new entry.
fn capture_entry<F, O>(
    entries: &mut Entries,
    be: &CudaBackend,
    shape: &[usize],
    forward: &F,
) -> Result<()>
where
    F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
    O: Into<GraphOutput>,
{
    let dims: [usize; 4] = shape
        .try_into()
        .map_err(|_| EngineError::Shape(format!("expected an NCHW input, got shape {shape:?}")))?;
    let numel: usize = dims.iter().product();
    let staging_in = be.pool.alloc(numel.max(1) * 4)?;
    be.memset(staging_in.ptr(), 0, numel * 4)?;
    let staged = staging_in.ptr();
    let (graph, outs) = capture_forward(be, &|b| from_nchw(b, staged, dims), forward)?;
    let uploads = UploadSlots::new(be, numel)?;
    entries.insert(
        shape.to_vec(),
        Entry {
            graph,
            staging_in,
            uploads,
            outs,
        },
    );
    Ok(())
}

/// The f32 output buffers of a captured forward pass, with their NHWC dims.
pub(super) type Outputs = Vec<(DeviceBuffer, [usize; 4])>;

/// Captures `input` (which enqueues the work that gives the NHWC model input: the
/// conversion of the copied-in NCHW f32 values, or GPU preprocessing of 8-bit pixels),
/// `forward` and the copies of its outputs to f32 buffers, into one graph. One eager
/// pass first learns the output shapes and readies kernels and constants.
pub(super) fn capture_forward<F, O>(
    be: &CudaBackend,
    input: &dyn Fn(&CudaBackend) -> Result<CudaTensor>,
    forward: &F,
) -> Result<(CudaGraph, Outputs)>
where
    F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
    O: Into<GraphOutput>,
{
    let out_dims: Vec<[usize; 4]> = {
        let x = input(be)?;
        let ys = forward(be, &x)?;
        be.synchronize()?;
        ys.into_iter().map(|y| y.into().dims()).collect()
    };
    be.trim_memory()?;
    let outs = out_dims
        .iter()
        .map(|d| Ok((be.pool.alloc(d.iter().product::<usize>().max(1) * 4)?, *d)))
        .collect::<Result<Vec<_>>>()?;
    let graph = capture_warm(be, |b| {
        let x = input(b)?;
        let ys: Vec<GraphOutput> = forward(b, &x)?.into_iter().map(Into::into).collect();
        if ys.len() != outs.len() {
            return Err(EngineError::Invalid(
                "the forward pass changed its outputs under capture".into(),
            ));
        }
        for (y, (buf, d)) in ys.iter().zip(&outs) {
            if y.dims() != *d {
                return Err(EngineError::Invalid(
                    "the forward pass changed its output shapes under capture".into(),
                ));
            }
            y.write_f32(b, buf.ptr())?;
        }
        Ok(())
    })?;
    Ok((graph, outs))
}

/// The first `rows` batch items of every output of the replay just enqueued, as NHWC
/// f32 host tensors.
fn read_outputs(be: &CudaBackend, e: &Entry, rows: usize) -> Result<Vec<HostTensor>> {
    let mut out = Vec::with_capacity(e.outs.len());
    for (buf, d) in &e.outs {
        let dims = [rows.min(d[0]), d[1], d[2], d[3]];
        let host = be.det_read_f32(buf.ptr(), dims.iter().product())?;
        out.push(HostTensor::from_f32(dims.to_vec(), host)?);
    }
    Ok(out)
}
