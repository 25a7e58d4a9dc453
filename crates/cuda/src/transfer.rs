//! The host side of a captured graph's input or output. The graph reads and writes f32
//! NCHW staging buffers; for 16-bit models the values cross PCIe in the activations'
//! storage type instead (half the bytes), through a device buffer of that type next to
//! the staging buffer and one widening or narrowing kernel. The values the graph sees
//! are bit-identical either way: the host rounds to nearest even, as the graph's first
//! kernel would, and outputs came from the storage type to begin with.
//!
//! Inputs go through [`UploadSlots`]: the host conversion and the copy to the device run
//! on a stream of their own into a landing buffer, outside the graph's lock, so one
//! request's input travels while another request's replay runs (see `docs/server.md`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::{result, sys};

use crate::backend::CudaBackend;
use crate::driver::Context;
use crate::error::{CudaError, CudaResult};
use crate::kernels::Arg;
use crate::pinned::{Pinned, Wire};
use crate::pool::DeviceBuffer;

/// Upload slots per captured shape: one request's input lands while another request's
/// replay runs. Also how many `infer` calls usefully run at once on one graph cache.
pub(crate) const UPLOAD_SLOTS: usize = 2;

/// The way back from a graph's f32 staging output to the host.
pub(crate) struct Transfer {
    pinned: Pinned,
    /// The storage-type twin of the f32 staging buffer (16-bit models only).
    narrow: Option<DeviceBuffer>,
}

impl Transfer {
    /// Room for `values` values from an f32 staging buffer to the host.
    pub(crate) fn new(be: &CudaBackend, values: usize) -> Result<Self> {
        let wire = Wire::for_storage(be.storage);
        let narrow = match wire {
            Wire::F32 => None,
            _ => Some(be.pool.alloc(values.max(1) * wire.size())?),
        };
        Ok(Self {
            pinned: Pinned::new(values, wire)?,
            narrow,
        })
    }

    /// Enqueues the first `len` values of the f32 staging buffer at `staging` (after the
    /// stream's earlier work) and returns them once they have arrived.
    pub(crate) fn receive(
        &mut self,
        be: &CudaBackend,
        staging: u64,
        len: usize,
    ) -> Result<Vec<f32>> {
        match &self.narrow {
            None => self.pinned.download(&be.ctx, staging, len),
            Some(buf) => {
                let src = buf.ptr();
                convert(be, "narrow_from_f32", staging, src, len)?;
                self.pinned.download(&be.ctx, src, len)
            }
        }
    }
}

fn convert(be: &CudaBackend, kernel: &str, src: u64, dst: u64, n: usize) -> Result<()> {
    let args = [Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(n as i64)];
    Ok(be.launch_1d(kernel, n, &args)?)
}

/// The landing places of one captured shape's inputs, with the stream that fills them.
/// A request takes a slot ([`UploadSlots::acquire`]), converts and copies its input
/// into it on the upload stream ([`UploadSlot::upload`]) without the graph, then, under
/// the graph's lock, has the backend's stream wait for the copy and move the values
/// into the graph's staging buffer ([`UploadSlot::land_into`]). Two events per slot keep
/// it safe to reuse at once: the host writes the page-locked buffer only after the
/// slot's previous copies have completed, and the next copy into the landing buffer
/// waits (on the device) until the previous input has been moved out.
pub(crate) struct UploadSlots {
    // Declared before `stream`: slots go (waiting for their copies) before the stream.
    free: Mutex<Vec<Slot>>,
    returned: Condvar,
    stream: CopyStream,
}

impl UploadSlots {
    /// [`UPLOAD_SLOTS`] slots of `values` values each (the graph's input), in the wire
    /// type of the backend's storage. Allocates device memory: call it where no capture
    /// runs (the caching allocator serves captures from their own arena meanwhile).
    pub(crate) fn new(be: &CudaBackend, values: usize) -> Result<Arc<Self>> {
        let wire = Wire::for_storage(be.storage);
        let stream = CopyStream::new(&be.ctx)?;
        let slots = (0..UPLOAD_SLOTS)
            .map(|_| {
                Ok(Slot {
                    pinned: Pinned::new(values, wire)?,
                    landing: be.pool.alloc(values.max(1) * wire.size())?,
                    wire,
                    landed: Marker::new(&be.ctx)?,
                    consumed: Marker::new(&be.ctx)?,
                    uploaded: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Self {
            free: Mutex::new(slots),
            returned: Condvar::new(),
            stream,
        }))
    }

    /// A free slot, waiting for one while all are in use.
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<UploadSlot> {
        let mut free = self.lock()?;
        loop {
            if let Some(slot) = free.pop() {
                return Ok(UploadSlot {
                    slots: self.clone(),
                    slot: Some(slot),
                });
            }
            free = self
                .returned
                .wait(free)
                .map_err(|_| EngineError::Device("upload slots poisoned".into()))?;
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Vec<Slot>>> {
        self.free
            .lock()
            .map_err(|_| EngineError::Device("upload slots poisoned".into()))
    }
}

/// One slot taken from [`UploadSlots`]; goes back when dropped.
pub(crate) struct UploadSlot {
    slots: Arc<UploadSlots>,
    slot: Option<Slot>,
}

struct Slot {
    pinned: Pinned,
    /// The input on the device, in the wire type.
    landing: DeviceBuffer,
    wire: Wire,
    /// Recorded on the upload stream behind the last copy into `landing`.
    landed: Marker,
    /// Recorded on the backend's stream behind the last read of `landing`.
    consumed: Marker,
    /// Values of the input now in (or on its way to) `landing`, not yet moved out.
    uploaded: Option<usize>,
}

impl UploadSlot {
    fn slot(&mut self) -> Result<&mut Slot> {
        self.slot
            .as_mut()
            .ok_or_else(|| EngineError::Device("upload slot already returned".into()))
    }

    /// Stage one, no graph needed: converts `x` into the page-locked buffer and
    /// enqueues its copy into the landing buffer on the upload stream, chunk by chunk
    /// (each chunk's DMA runs while the next is converted). Returns once every copy is
    /// enqueued, not done.
    pub(crate) fn upload(&mut self, be: &CudaBackend, x: &HostTensor) -> Result<()> {
        let stream = self.slots.stream.0;
        let slot = self.slot()?;
        slot.uploaded = None;
        be.ctx.bind()?;
        // The host may write the page-locked buffer once its last copies are done, and
        // the device the landing buffer once its last reader is done.
        slot.landed.synchronize()?;
        slot.consumed.hold(stream)?;
        let sent = slot
            .pinned
            .upload(&be.ctx, stream, x, slot.landing.ptr())
            .and_then(|()| Ok(slot.landed.record(stream)?));
        if let Err(e) = sent {
            // Some chunks may be on their way, with no event behind them: let them
            // finish before the buffer is written again or freed.
            // SAFETY: the stream is alive (owned by `self.slots`).
            let _ = unsafe { result::stream::synchronize(stream) };
            return Err(e);
        }
        slot.uploaded = Some(x.numel());
        Ok(())
    }

    /// Stage two, under the graph's lock: enqueues on the backend's stream a wait for
    /// the uploaded input (no host synchronisation) and its move into the f32 staging
    /// buffer at `staging` (widened from a 16-bit wire by the same kernel as before, or
    /// copied). The slot may be returned as soon as this has been enqueued.
    pub(crate) fn land_into(&mut self, be: &CudaBackend, staging: u64) -> Result<()> {
        let slot = self.slot()?;
        let n = slot
            .uploaded
            .take()
            .ok_or_else(|| EngineError::Invalid("no input was uploaded into this slot".into()))?;
        be.ctx.bind()?;
        let compute = be.ctx.stream;
        let moved = (|| -> Result<()> {
            slot.landed.hold(compute)?;
            match slot.wire {
                Wire::F32 => {
                    // SAFETY: the landing and staging buffers hold at least `n` f32
                    // values (both sized for this graph's input); ordered on the stream.
                    unsafe {
                        result::memcpy_dtod_async(staging, slot.landing.ptr(), n * 4, compute)
                            .map_err(CudaError::from)?
                    }
                }
                Wire::F16 | Wire::BF16 => {
                    convert(be, "widen_to_f32", slot.landing.ptr(), staging, n)?;
                }
            }
            Ok(slot.consumed.record(compute)?)
        })();
        if moved.is_err() {
            // A move may be under way with no event behind it: let it finish before the
            // slot's next upload overwrites the landing buffer.
            let _ = be.synchronize();
        }
        moved
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if let Ok(mut free) = self.slots.free.lock() {
                free.push(slot);
            }
            self.slots.returned.notify_one();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Neither buffer may go while a copy or a kernel still uses it.
        let _ = self.landed.synchronize();
        let _ = self.consumed.synchronize();
    }
}

/// A non-blocking stream for host-to-device copies next to the backend's stream.
struct CopyStream(sys::CUstream);

// SAFETY: a stream handle is usable from any thread with its context current.
unsafe impl Send for CopyStream {}
unsafe impl Sync for CopyStream {}

impl CopyStream {
    fn new(ctx: &Context) -> CudaResult<Self> {
        ctx.bind()?;
        Ok(Self(result::stream::create(
            result::stream::StreamKind::NonBlocking,
        )?))
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        // SAFETY: destroyed once; work still queued on it completes first (driver).
        unsafe {
            let _ = result::stream::destroy(self.0);
        }
    }
}

/// An event that orders work between streams (no timing: cheaper to record).
struct Marker(sys::CUevent);

// SAFETY: event handles are plain driver handles; the driver serialises access.
unsafe impl Send for Marker {}
unsafe impl Sync for Marker {}

impl Marker {
    fn new(ctx: &Context) -> CudaResult<Self> {
        ctx.bind()?;
        Ok(Self(result::event::create(
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
        )?))
    }

    /// Marks the point `stream` has reached.
    fn record(&self, stream: sys::CUstream) -> CudaResult<()> {
        // SAFETY: event and stream are alive.
        unsafe { result::event::record(self.0, stream)? };
        Ok(())
    }

    /// Makes `stream`'s later work wait for the last recorded point (a device-side
    /// wait; nothing to wait for if never recorded).
    fn hold(&self, stream: sys::CUstream) -> CudaResult<()> {
        // SAFETY: event and stream are alive.
        unsafe {
            result::stream::wait_event(
                stream,
                self.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )?
        };
        Ok(())
    }

    /// Blocks the host until the last recorded point has been passed.
    fn synchronize(&self) -> CudaResult<()> {
        // SAFETY: the event is alive.
        unsafe { result::event::synchronize(self.0)? };
        Ok(())
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the driver defers the release of a pending event.
        unsafe {
            let _ = result::event::destroy(self.0);
        }
    }
}

/// Each graph shape's upload slots, reachable without the graph cache's lock (which a
/// replay holds until its outputs are back: taking it to find the slots would put the
/// next upload behind that replay).
#[derive(Default)]
pub(crate) struct SlotsByShape(Mutex<HashMap<Vec<usize>, Arc<UploadSlots>>>);

impl SlotsByShape {
    /// The slots for `shape`, from `make` (which may take the cache's lock and capture)
    /// the first time.
    pub(crate) fn get_or(
        &self,
        shape: &[usize],
        make: impl FnOnce() -> Result<Arc<UploadSlots>>,
    ) -> Result<Arc<UploadSlots>> {
        let poisoned = || EngineError::Device("upload slots poisoned".into());
        if let Some(s) = self.0.lock().map_err(|_| poisoned())?.get(shape) {
            return Ok(s.clone());
        }
        let made = make()?;
        self.0
            .lock()
            .map_err(|_| poisoned())?
            .insert(shape.to_vec(), made.clone());
        Ok(made)
    }
}
