//! CUDA graphs: capture a forward pass once per input shape, then serve each request
//! with copy in, replay, copy out. A capture allocates from a private arena that lives
//! as long as its graph, so replays never write into memory someone else holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::{result, sys};

use crate::backend::{CudaBackend, CudaTensor};
use crate::error::CudaError;
use crate::pool::{Arena, DeviceBuffer};
use crate::transfer::{SlotsByShape, Transfer, UploadSlots, UPLOAD_SLOTS};

/// An instantiated graph with the memory its kernels use.
pub struct CudaGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    _arena: Arc<Arena>,
}

// SAFETY: graph handles are driver objects; launches are serialised on the stream.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: destroyed once, after which the handles are not used.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

impl CudaBackend {
    /// Records everything `f` enqueues into a graph instead of running it. `f` must
    /// only enqueue device work (no host copies, no synchronisation).
    pub fn capture<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<(CudaGraph, T)> {
        self.capture_in(self.pool.new_arena(), f)
    }

    /// As [`Self::capture`], with the allocations of `f` served from `arena`.
    pub(crate) fn capture_in<T>(
        &self,
        arena: Arc<Arena>,
        f: impl FnOnce(&Self) -> Result<T>,
    ) -> Result<(CudaGraph, T)> {
        self.ctx.bind()?;
        self.pool.set_capture_arena(Some(arena.clone()));
        // SAFETY: the stream is alive; relaxed mode lets the allocator call cuMemAlloc
        // while capturing.
        let begun = unsafe {
            result::stream::begin_capture(
                self.ctx.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        };
        if let Err(e) = begun {
            self.pool.set_capture_arena(None);
            return Err(CudaError::from(e).into());
        }
        let out = f(self);
        // SAFETY: ends the capture begun above, also when `f` failed.
        let ended = unsafe { result::stream::end_capture(self.ctx.stream) };
        self.pool.set_capture_arena(None);
        let graph = ended.map_err(CudaError::from)?;
        let value = match out {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: the graph was returned by end_capture and is not used again.
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                return Err(e);
            }
        };
        if let Err(e) = crate::graph_shape::before_instantiation(graph, "captured graph") {
            // SAFETY: as above.
            unsafe {
                let _ = result::graph::destroy(graph);
            }
            return Err(e.into());
        }
        // SAFETY: `graph` is a complete captured graph.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        let exec = match exec {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: as above.
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                return Err(CudaError::from(e).into());
            }
        };
        Ok((
            CudaGraph {
                graph,
                exec,
                _arena: arena,
            },
            value,
        ))
    }

    /// Enqueues one replay of `graph` on the backend's stream.
    pub fn replay(&self, graph: &CudaGraph) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: the executable graph and the stream are alive.
        unsafe { result::graph::launch(graph.exec, self.ctx.stream).map_err(CudaError::from)? };
        Ok(())
    }
}

/// One captured forward pass for one input shape, with its staging buffers.
struct Entry {
    graph: CudaGraph,
    staging_in: DeviceBuffer,
    staging_out: DeviceBuffer,
    /// Where inputs wait for the graph (shared with requests uploading right now).
    uploads: Arc<UploadSlots>,
    host_out: Transfer,
    out_shape: Vec<usize>,
    arena: ArenaSize,
}

/// The planned activation block of one graph, and the lower bound it is measured
/// against (the most bytes alive at once in the recorded pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaSize {
    pub planned: usize,
    pub live_peak: usize,
}

/// Graphs captured per input shape for one model on one backend. `infer` runs the
/// forward pass eagerly once for a new shape (so every plan and kernel is ready), then
/// captures it (NCHW->NHWC conversion, forward, NHWC->NCHW) and replays from then on.
///
/// `infer` is a two-stage pipeline: a request's input is converted and copied to the
/// device on a stream of its own, holding only an upload slot, while another request's
/// replay holds the graph; [`GraphCache::CONCURRENCY`] callers keep the GPU busy.
///
/// With [`GraphCache::dry_planned`] the recorded pass is a dry run instead: no kernel
/// runs and no memory is touched, so the only activation memory ever allocated is the
/// planned block (the pass's live set) rather than the caching allocator's high-water
/// mark of a real pass.
#[derive(Default)]
pub struct GraphCache {
    entries: Mutex<HashMap<Vec<usize>, Entry>>,
    slots: SlotsByShape,
    dry: bool,
}

type Entries = HashMap<Vec<usize>, Entry>;

fn poisoned() -> EngineError {
    EngineError::Device("graph cache poisoned".into())
}

impl GraphCache {
    /// How many `infer` calls usefully run at once on one cache: one uploading its
    /// input while another replays. More wait for an upload slot.
    pub const CONCURRENCY: usize = UPLOAD_SLOTS;

    pub fn new() -> Self {
        Self::default()
    }

    /// Plans the graph's memory from a dry run of the forward pass (see above). The
    /// forward pass must not read device data back to the host.
    pub fn dry_planned() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            slots: SlotsByShape::default(),
            dry: true,
        }
    }

    /// Number of captured shapes.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every captured graph and its memory.
    pub fn clear(&self) {
        if let Ok(mut e) = self.entries.lock() {
            e.clear();
        }
    }

    /// Makes sure a graph for `shape` (NCHW) exists, capturing it if needed. When the
    /// GPU runs out of memory while capturing, the graphs of other shapes (and their
    /// activation blocks) are dropped and the capture is tried once more: a server that
    /// sees many batch sizes keeps working, at the cost of capturing again later.
    pub fn prepare<F>(&self, be: &CudaBackend, shape: &[usize], forward: F) -> Result<()>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<CudaTensor>,
    {
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        self.prepare_locked(&mut entries, be, shape, &forward)?;
        Ok(())
    }

    /// [`GraphCache::prepare`] with the cache already locked; the entry for `shape`.
    fn prepare_locked<'a, F>(
        &self,
        entries: &'a mut Entries,
        be: &CudaBackend,
        shape: &[usize],
        forward: &F,
    ) -> Result<&'a mut Entry>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<CudaTensor>,
    {
        if !entries.contains_key(shape) {
            let entry = match self.capture_entry(be, shape, forward) {
                Err(EngineError::OutOfMemory(_)) if !entries.is_empty() => {
                    entries.clear();
                    be.trim_memory()?;
                    self.capture_entry(be, shape, forward)?
                }
                other => other?,
            };
            entries.insert(shape.to_vec(), entry);
        }
        entries
            .get_mut(shape)
            .ok_or_else(|| EngineError::Device("graph vanished".into()))
    }

    fn capture_entry<F>(&self, be: &CudaBackend, shape: &[usize], forward: &F) -> Result<Entry>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<CudaTensor>,
    {
        let [n, c, h, w] = match shape {
            [n, c, h, w] => [*n, *c, *h, *w],
            _ => {
                return Err(EngineError::Shape(format!(
                    "expected an NCHW input, got shape {shape:?}"
                )))
            }
        };
        let numel = n * c * h * w;
        let staging_in = be.pool.alloc(numel * 4)?;
        // Warm-up: one eager pass readies every cuBLASLt plan and tells the output
        // shape; its blocks go back to the driver before the capture allocates its own.
        // The pass is recorded; the capture then cuts its buffers out of one block at
        // the offsets planned from that record (about the largest live set).
        be.memset(staging_in.ptr(), 0, numel * 4)?;
        be.pool.record(true);
        if self.dry {
            be.ctx.dry.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let eager = (|| -> Result<[usize; 4]> {
            let x = be.tensor_from_staging(staging_in.ptr(), [n, c, h, w])?;
            let y = forward(be, &x)?;
            be.synchronize()?;
            Ok(y.dims())
        })();
        be.ctx
            .dry
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let events = be.pool.record(false);
        let out_dims = eager?;
        be.trim_memory()?;
        let plan = crate::plan::plan(&events);
        let arena_size = ArenaSize {
            planned: plan.total,
            live_peak: plan.live_peak,
        };
        let arena = be.pool.planned_arena(plan)?;
        let [on, oh, ow, oc] = out_dims;
        let out_numel = on * oh * ow * oc;
        let staging_out = be.pool.alloc(out_numel * 4)?;
        let (graph, ()) = be.capture_in(arena, |b| {
            let x = b.tensor_from_staging(staging_in.ptr(), [n, c, h, w])?;
            let y = forward(b, &x)?;
            b.to_staging(&y, staging_out.ptr())
        })?;
        let entry = Entry {
            graph,
            staging_in,
            staging_out,
            uploads: UploadSlots::new(be, numel)?,
            host_out: Transfer::new(be, out_numel)?,
            out_shape: vec![on, oc, oh, ow],
            arena: arena_size,
        };
        Ok(entry)
    }

    /// The activation block planned for `shape`, once its graph is captured.
    pub fn arena_size(&self, shape: &[usize]) -> Option<ArenaSize> {
        let entries = self.entries.lock().ok()?;
        entries.get(shape).map(|e| e.arena)
    }

    /// Enqueues one replay for `shape` without copies (for timing the device work).
    pub fn replay(&self, be: &CudaBackend, shape: &[usize]) -> Result<()> {
        let entries = self.entries.lock().map_err(|_| poisoned())?;
        let e = entries
            .get(shape)
            .ok_or_else(|| EngineError::Invalid(format!("no graph captured for {shape:?}")))?;
        be.replay(&e.graph)
    }

    /// Copy in, replay, copy out.
    pub fn infer<F>(&self, be: &CudaBackend, x: &HostTensor, forward: F) -> Result<HostTensor>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<CudaTensor>,
    {
        let rows = x.shape().first().copied().unwrap_or(0);
        self.infer_padded(be, x, rows, forward)
    }

    /// Like [`GraphCache::infer`] through the graph captured for a batch of
    /// `graph_batch >= x`'s rows: only `x`'s rows are copied in and out, the rest of the
    /// graph's batch computes on whatever its input buffer holds (every image is
    /// independent of the others). A server pads batches to a few sizes this way
    /// instead of capturing a graph (and planning its memory) for every batch size.
    ///
    /// The input's host conversion and copy hold only an upload slot, not the graph:
    /// see [`GraphCache::CONCURRENCY`].
    pub fn infer_padded<F>(
        &self,
        be: &CudaBackend,
        x: &HostTensor,
        graph_batch: usize,
        forward: F,
    ) -> Result<HostTensor>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<CudaTensor>,
    {
        let shape = padded_shape(x.shape(), graph_batch)?;
        let rows = x.shape()[0];
        let uploads = self.slots.get_or(&shape, || {
            let mut entries = self.entries.lock().map_err(|_| poisoned())?;
            Ok(self
                .prepare_locked(&mut entries, be, &shape, &forward)?
                .uploads
                .clone())
        })?;
        // Stage one, beside whatever replay holds the graph now.
        let mut slot = uploads.acquire()?;
        slot.upload(be, x)?;
        // Stage two, the graph alone. It is captured again if a capture for another
        // shape ran out of memory and dropped it meanwhile; the slot works all the same.
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        let e = self.prepare_locked(&mut entries, be, &shape, &forward)?;
        slot.land_into(be, e.staging_in.ptr())?;
        drop(slot);
        be.replay(&e.graph)?;
        let mut out_shape = e.out_shape.clone();
        let per_row = out_shape.iter().skip(1).product::<usize>();
        out_shape[0] = rows;
        let y = e
            .host_out
            .receive(be, e.staging_out.ptr(), rows * per_row)?;
        HostTensor::from_f32(out_shape, y)
    }
}

/// `shape` with its batch dimension raised to `graph_batch` (which must hold it).
pub(crate) fn padded_shape(shape: &[usize], graph_batch: usize) -> Result<Vec<usize>> {
    match shape.first() {
        Some(&rows) if rows > 0 && rows <= graph_batch => {
            let mut padded = shape.to_vec();
            padded[0] = graph_batch;
            Ok(padded)
        }
        _ => Err(EngineError::Shape(format!(
            "a batch of shape {shape:?} does not fit a graph for batch {graph_batch}"
        ))),
    }
}
