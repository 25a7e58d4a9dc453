//! Loading the CUDA driver without panicking, the device context and its stream, events.

use std::panic::catch_unwind;

use cudarc::driver::{result, sys};

use crate::error::{CudaError, CudaResult};

/// Checks the three libraries the backend needs and initialises the driver. cudarc's
/// loaders panic when a library is missing, so each check is made first through
/// cudarc's presence probes and the first real call runs under `catch_unwind`.
pub fn probe() -> CudaResult<()> {
    // SAFETY: the presence probes only try to dlopen candidate library names.
    let present = |f: unsafe fn() -> bool| catch_unwind(|| unsafe { f() }).unwrap_or(false);
    if !present(sys::is_culib_present) {
        return Err(CudaError::Unavailable(
            "no NVIDIA driver found (libcuda.so.1)".into(),
        ));
    }
    if !present(cudarc::nvrtc::sys::is_culib_present) {
        return Err(CudaError::Unavailable(
            "NVRTC not found (libnvrtc.so): install the CUDA toolkit or add its lib64 folder to LD_LIBRARY_PATH".into(),
        ));
    }
    if !present(cudarc::cublaslt::sys::is_culib_present) {
        return Err(CudaError::Unavailable(
            "cuBLASLt not found (libcublasLt.so): install the CUDA toolkit or add its lib64 folder to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let count = catch_unwind(|| -> CudaResult<usize> {
        result::init()?;
        Ok(result::device::get_count()? as usize)
    })
    .map_err(|_| CudaError::Unavailable("the CUDA driver library could not be loaded".into()))??;
    if count == 0 {
        return Err(CudaError::Unavailable(
            "the NVIDIA driver reports no CUDA device".into(),
        ));
    }
    Ok(())
}

/// Number of CUDA devices, or 0 when the driver is missing.
pub fn device_count() -> usize {
    if probe().is_err() {
        return 0;
    }
    catch_unwind(|| result::device::get_count().map(|c| c as usize).unwrap_or(0)).unwrap_or(0)
}

/// A device's primary context with one stream. All work of a backend runs on it.
pub struct Context {
    pub(crate) ctx: sys::CUcontext,
    pub(crate) stream: sys::CUstream,
    pub name: String,
    pub ordinal: usize,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub multiprocessors: i32,
    pub total_memory: usize,
    /// While set, launches, products and memsets are skipped and allocations get
    /// addresses that are never dereferenced: a forward pass only reports what it
    /// would allocate (see `GraphCache`).
    pub(crate) dry: std::sync::atomic::AtomicBool,
}

// SAFETY: a CUcontext and a CUstream are handles usable from any thread once the
// context is made current there, which `bind` does before every use.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    pub fn new(ordinal: usize) -> CudaResult<Self> {
        Self::open(ordinal, false)
    }

    /// Like [`Context::new`], with a stream of the highest priority: its kernels are
    /// scheduled ahead of other streams' as soon as SMs free up (short, latency-bound
    /// work next to a long graph replay).
    pub fn new_urgent(ordinal: usize) -> CudaResult<Self> {
        Self::open(ordinal, true)
    }

    fn open(ordinal: usize, urgent: bool) -> CudaResult<Self> {
        probe()?;
        let count = result::device::get_count()? as usize;
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        let dev = result::device::get(ordinal as i32)?;
        // SAFETY: `dev` is a valid device handle obtained above.
        unsafe {
            let ctx = result::primary_ctx::retain(dev)?;
            result::ctx::set_current(ctx)?;
            let attr = |a| result::device::get_attribute(dev, a);
            use sys::CUdevice_attribute::*;
            let capability = (
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let multiprocessors = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            let total_memory = result::device::total_mem(dev)?;
            let name = result::device::get_name(dev)?;
            let kind = result::stream::StreamKind::NonBlocking;
            let stream = if urgent {
                let (_, greatest) = result::stream::get_priority_range()?;
                result::stream::create_with_priority(kind, greatest)?
            } else {
                result::stream::create(kind)?
            };
            Ok(Self {
                ctx,
                stream,
                name,
                ordinal,
                capability,
                multiprocessors,
                total_memory,
                dry: std::sync::atomic::AtomicBool::new(false),
            })
        }
    }

    pub(crate) fn is_dry(&self) -> bool {
        self.dry.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the context current on the calling thread.
    pub fn bind(&self) -> CudaResult<()> {
        // SAFETY: the context is retained for the lifetime of `self`.
        unsafe { result::ctx::set_current(self.ctx)? };
        Ok(())
    }

    pub fn synchronize(&self) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: the stream is alive for the lifetime of `self`.
        unsafe { result::stream::synchronize(self.stream)? };
        Ok(())
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> CudaResult<(usize, usize)> {
        self.bind()?;
        Ok(result::mem_get_info()?)
    }
}

/// A CUDA event on the backend's stream, for timing.
pub struct Event {
    ev: sys::CUevent,
}

// SAFETY: events are plain driver handles; the driver serialises access to them.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub(crate) fn new(ctx: &Context) -> CudaResult<Self> {
        ctx.bind()?;
        Ok(Self {
            ev: result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?,
        })
    }

    pub(crate) fn record(&self, ctx: &Context) -> CudaResult<()> {
        // SAFETY: event and stream are alive.
        unsafe { result::event::record(self.ev, ctx.stream)? };
        Ok(())
    }

    /// Blocks until the work enqueued before `record` has completed.
    pub(crate) fn wait(&self) -> CudaResult<()> {
        // SAFETY: the event is alive.
        unsafe { result::event::synchronize(self.ev)? };
        Ok(())
    }

    /// Milliseconds from `start` to `self`; waits for `self` to complete.
    pub fn elapsed_ms(&self, start: &Event) -> CudaResult<f32> {
        // SAFETY: both events are alive and recorded.
        unsafe {
            result::event::synchronize(self.ev)?;
            Ok(result::event::elapsed(start.ev, self.ev)?)
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroyed once; an error at teardown has nowhere to go.
        unsafe {
            let _ = result::event::destroy(self.ev);
        }
    }
}
