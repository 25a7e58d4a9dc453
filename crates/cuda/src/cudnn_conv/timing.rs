//! Timing candidates as they will run: captured graphs of several launches.

use aperture_engine::Result;

use super::{GRAPH_REPS, TIMED_RUNS};
use crate::backend::CudaBackend;
use crate::error::{CudaError, CudaResult};

/// Device memory for the search and the timing runs, outside the pool (whose blocks
/// would otherwise stay in a graph's arena).
pub(super) struct Scratch(pub(super) u64);

impl Scratch {
    pub(super) fn new(bytes: usize) -> CudaResult<Self> {
        // SAFETY: a plain allocation, freed in Drop after the stream is idle.
        Ok(Self(unsafe {
            cudarc::driver::result::malloc_sync(bytes.max(256))?
        }))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: allocated above; timing runs end with a synchronised event and the
        // search is synchronous, so no kernel still uses it.
        unsafe {
            let _ = cudarc::driver::result::free_sync(self.0);
        }
    }
}

/// Time per launch of `f`, from replays of a graph of [`GRAPH_REPS`] launches (after one
/// eager launch, which also loads what the launch needs).
pub(super) fn graph_ms(be: &CudaBackend, f: &dyn Fn() -> Result<()>) -> Result<f32> {
    f()?;
    with_graph(be, GRAPH_REPS, f, |replay| {
        let mut times = Vec::with_capacity(TIMED_RUNS);
        replay()?;
        for _ in 0..TIMED_RUNS {
            let start = be.record_event()?;
            replay()?;
            let end = be.record_event()?;
            times.push(end.elapsed_ms(&start)?);
        }
        times.sort_by(f32::total_cmp);
        Ok(times[times.len() / 2] / GRAPH_REPS as f32)
    })
}

/// Runs `f` once as a captured graph (capture, instantiate, launch, wait), the way the
/// forward pass's graph will run it.
pub(super) fn replayed_once(be: &CudaBackend, f: &dyn Fn() -> Result<()>) -> Result<()> {
    with_graph(be, 1, f, |replay| replay())
}

/// Captures `reps` launches of `f` on the backend's stream, instantiates the graph and
/// hands `body` a function that launches it once; waits for the stream and destroys both
/// graphs afterwards, whatever `body` returns.
fn with_graph<T>(
    be: &CudaBackend,
    reps: usize,
    f: &dyn Fn() -> Result<()>,
    body: impl FnOnce(&dyn Fn() -> Result<()>) -> Result<T>,
) -> Result<T> {
    use cudarc::driver::{result, sys};
    be.synchronize()?;
    be.ctx.bind()?;
    let stream = be.ctx.stream;
    // SAFETY: the stream is alive; the capture is ended below on every path.
    unsafe {
        result::stream::begin_capture(
            stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        )
        .map_err(CudaError::from)?;
    }
    let captured = (0..reps).try_for_each(|_| f());
    // SAFETY: ends the capture begun above.
    let graph = unsafe { result::stream::end_capture(stream) }.map_err(CudaError::from)?;
    let out = captured.and_then(|()| {
        crate::graph_shape::before_instantiation(graph, "captured cuDNN candidate")?;
        // SAFETY: `graph` is a complete captured graph.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(CudaError::from)?;
        let replay = || -> Result<()> {
            // SAFETY: the executable graph and the stream are alive.
            unsafe { result::graph::launch(exec, stream) }.map_err(CudaError::from)?;
            Ok(())
        };
        let out = body(&replay);
        // SAFETY: the stream is synchronised before the executable graph goes.
        unsafe {
            let _ = result::stream::synchronize(stream);
            let _ = result::graph::exec_destroy(exec);
        }
        out
    });
    // SAFETY: destroyed once; its executable copy is gone.
    unsafe {
        let _ = result::graph::destroy(graph);
    }
    out
}
