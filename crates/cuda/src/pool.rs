//! A caching device allocator. Freed buffers go back to a free list of their arena and
//! are handed out again, so a forward pass allocates nothing from the driver once it has
//! run once. A graph capture gets a private arena so that the blocks a graph replays
//! into are never handed to anyone else.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::result;

use crate::driver::Context;
use crate::error::{CudaError, CudaResult};
use crate::plan::{AllocEvent, Plan};

/// Where allocations are being recorded (shared by the pool and its arenas).
type Recorder = Arc<Mutex<Option<Vec<AllocEvent>>>>;

/// One preallocated block cut up by a [`Plan`].
struct Planned {
    base: u64,
    plan: Plan,
    cursor: Mutex<usize>,
}

/// Allocation granularity: every block is 512-byte aligned and sized.
const SMALL: usize = 512;
/// Blocks at least this large are rounded to 2 MiB so that similar sizes share blocks.
const LARGE: usize = 1 << 20;
const LARGE_ROUND: usize = 2 << 20;

pub(crate) fn round_size(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b >= LARGE {
        b.div_ceil(LARGE_ROUND) * LARGE_ROUND
    } else {
        b.div_ceil(SMALL) * SMALL
    }
}

/// Bytes held from the driver, now and at most since the last reset.
#[derive(Default, Debug)]
pub struct MemStats {
    current: AtomicUsize,
    peak: AtomicUsize,
    in_use: AtomicUsize,
    peak_in_use: AtomicUsize,
}

impl MemStats {
    fn add(counter: &AtomicUsize, peak: &AtomicUsize, bytes: usize) {
        let now = counter.fetch_add(bytes, Ordering::Relaxed) + bytes;
        peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Bytes allocated from the driver (cached or in use).
    pub fn reserved(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
    pub fn peak_reserved(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    /// Bytes held by live tensors and workspaces.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
    pub fn peak_in_use(&self) -> usize {
        self.peak_in_use.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.reserved(), Ordering::Relaxed);
        self.peak_in_use.store(self.in_use(), Ordering::Relaxed);
    }
}

/// A set of cached blocks. Dropping the last reference returns its memory to the driver.
pub(crate) struct Arena {
    ctx: Arc<Context>,
    stats: Arc<MemStats>,
    /// Free blocks by size.
    free: Mutex<BTreeMap<usize, Vec<u64>>>,
    /// Set for arenas that serve a graph capture: their blocks stay mapped for the
    /// graph's lifetime, so nothing may be returned to the driver early.
    keep: bool,
    planned: Option<Planned>,
    recorder: Recorder,
    /// Addresses handed out in a dry run: never dereferenced, never freed.
    fake: bool,
}

impl Arena {
    fn new(ctx: Arc<Context>, stats: Arc<MemStats>, keep: bool, recorder: Recorder) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            stats,
            free: Mutex::new(BTreeMap::new()),
            keep,
            planned: None,
            recorder,
            fake: false,
        })
    }

    fn take_cached(&self, size: usize) -> Option<(u64, usize)> {
        let mut free = self.free.lock().ok()?;
        // Best fit among blocks no more than twice the request.
        let (&found, _) = free
            .range(size..=size.saturating_mul(2))
            .find(|(_, v)| !v.is_empty())?;
        let list = free.get_mut(&found)?;
        let ptr = list.pop()?;
        if list.is_empty() {
            free.remove(&found);
        }
        Some((ptr, found))
    }

    /// On a cache miss of `size` bytes: when at least that much sits unused in the
    /// cache, returns cached blocks (largest first) to the driver until `size` bytes
    /// are freed. Blocks are never split, so without this the cache would grow with
    /// every new size class; with it the arena stays near the live set. Freeing is
    /// stream-safe: cuMemFree waits for work that may still use the block, and during a
    /// capture a block is only free once its last captured use is behind.
    fn make_room(&self, size: usize) -> CudaResult<()> {
        if self.keep {
            return Ok(());
        }
        let victims: Vec<(usize, u64)> = {
            let Ok(mut free) = self.free.lock() else {
                return Ok(());
            };
            let cached: usize = free.iter().map(|(s, v)| s * v.len()).sum();
            if cached < size {
                return Ok(());
            }
            let mut out = Vec::new();
            let mut freed = 0;
            while freed < size {
                let Some((&s, _)) = free.iter().next_back() else {
                    break;
                };
                let Some(list) = free.get_mut(&s) else { break };
                if let Some(p) = list.pop() {
                    out.push((s, p));
                    freed += s;
                }
                if list.is_empty() {
                    free.remove(&s);
                }
            }
            out
        };
        if victims.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // Kernels still queued may read a cached block: let them finish first.
        // SAFETY: the stream is alive.
        unsafe { result::stream::synchronize(self.ctx.stream)? };
        for (size, ptr) in victims {
            // SAFETY: the block came from cuMemAlloc and no live buffer references it.
            unsafe { result::free_sync(ptr)? };
            self.stats.current.fetch_sub(size, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Returns every cached block to the driver.
    pub(crate) fn trim(&self) -> CudaResult<()> {
        if self.fake {
            return Ok(());
        }
        let blocks: Vec<(usize, Vec<u64>)> = match self.free.lock() {
            Ok(mut f) => std::mem::take(&mut *f).into_iter().collect(),
            Err(_) => return Ok(()),
        };
        self.ctx.bind()?;
        for (size, list) in blocks {
            for ptr in list {
                // SAFETY: the block came from cuMemAlloc and nothing references it.
                unsafe { result::free_sync(ptr)? };
                self.stats.current.fetch_sub(size, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn release(&self, ptr: u64, size: usize, id: u64) {
        if let Ok(mut r) = self.recorder.lock() {
            if let Some(ev) = r.as_mut() {
                ev.push(AllocEvent::Free { id });
            }
        }
        if self.fake {
            return;
        }
        self.stats.in_use.fetch_sub(size, Ordering::Relaxed);
        if self.planned.is_some() {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            f.entry(size).or_default().push(ptr);
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let _ = self.trim();
        if let Some(p) = &self.planned {
            if self.ctx.bind().is_ok() {
                // SAFETY: the block came from cuMemAlloc; every buffer cut from it is
                // gone (each holds a reference to this arena).
                unsafe {
                    let _ = result::free_sync(p.base);
                }
                self.stats
                    .current
                    .fetch_sub(p.plan.total, Ordering::Relaxed);
            }
        }
    }
}

/// A device allocation owned by a tensor or workspace; returns to its arena on drop.
pub struct DeviceBuffer {
    ptr: u64,
    size: usize,
    id: u64,
    arena: Arc<Arena>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.arena.release(self.ptr, self.size, self.id);
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.size)
    }
}

/// The backend's allocator: a default arena plus, while a graph is being captured, the
/// capture's private arena.
pub(crate) struct Pool {
    ctx: Arc<Context>,
    pub(crate) stats: Arc<MemStats>,
    default: Arc<Arena>,
    capture: Mutex<Option<Arc<Arena>>>,
    recorder: Recorder,
    next_id: AtomicU64,
    /// Serves dry runs (`Context::dry`).
    fake: Arc<Arena>,
    fake_next: AtomicU64,
}

impl Pool {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        let stats = Arc::new(MemStats::default());
        let recorder: Recorder = Arc::new(Mutex::new(None));
        let default = Arena::new(ctx.clone(), stats.clone(), false, recorder.clone());
        let fake = Arc::new(Arena {
            ctx: ctx.clone(),
            stats: stats.clone(),
            free: Mutex::new(BTreeMap::new()),
            keep: true,
            planned: None,
            recorder: recorder.clone(),
            fake: true,
        });
        Self {
            ctx,
            stats,
            default,
            capture: Mutex::new(None),
            recorder,
            next_id: AtomicU64::new(1),
            fake,
            // Far above any real device address; multiples of 512 like real blocks.
            fake_next: AtomicU64::new(1 << 52),
        }
    }

    /// A caching arena for a capture (never returns blocks to the driver early).
    pub(crate) fn new_arena(&self) -> Arc<Arena> {
        Arena::new(
            self.ctx.clone(),
            self.stats.clone(),
            true,
            self.recorder.clone(),
        )
    }

    /// One block of `plan.total` bytes handed out in the plan's order.
    pub(crate) fn planned_arena(&self, plan: Plan) -> CudaResult<Arc<Arena>> {
        self.ctx.bind()?;
        let total = plan.total.max(SMALL);
        self.default.make_room(total)?;
        // SAFETY: plain device allocation owned by the arena.
        let base = unsafe { result::malloc_sync(total) }.map_err(|e| match CudaError::from(e) {
            CudaError::OutOfMemory(_) => CudaError::OutOfMemory(format!(
                "the graph needs {:.2} GiB of activations; use a smaller batch",
                total as f64 / (1u64 << 30) as f64
            )),
            other => other,
        })?;
        MemStats::add(&self.stats.current, &self.stats.peak, total);
        let planned = Planned {
            base,
            plan,
            cursor: Mutex::new(0),
        };
        Ok(Arc::new(Arena {
            ctx: self.ctx.clone(),
            stats: self.stats.clone(),
            free: Mutex::new(BTreeMap::new()),
            keep: true,
            planned: Some(planned),
            recorder: self.recorder.clone(),
            fake: false,
        }))
    }

    /// Starts (true) or stops (false) recording allocations; stopping returns them.
    pub(crate) fn record(&self, on: bool) -> Vec<AllocEvent> {
        match self.recorder.lock() {
            Ok(mut r) => {
                let events = r.take().unwrap_or_default();
                if on {
                    *r = Some(Vec::new());
                }
                events
            }
            Err(_) => Vec::new(),
        }
    }

    /// Routes allocations to `arena` (Some) or back to the default arena (None).
    pub(crate) fn set_capture_arena(&self, arena: Option<Arc<Arena>>) {
        if let Ok(mut c) = self.capture.lock() {
            *c = arena;
        }
    }

    pub(crate) fn trim(&self) -> CudaResult<()> {
        self.default.trim()
    }

    pub(crate) fn alloc(&self, bytes: usize) -> CudaResult<DeviceBuffer> {
        let arena = self
            .capture
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .unwrap_or_else(|| self.default.clone());
        let size = round_size(bytes);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.recorder.lock() {
            if let Some(ev) = r.as_mut() {
                ev.push(AllocEvent::Alloc { id, size });
            }
        }
        if self.ctx.is_dry() {
            let ptr = self.fake_next.fetch_add(size as u64, Ordering::Relaxed);
            return Ok(DeviceBuffer {
                ptr,
                size,
                id,
                arena: self.fake.clone(),
            });
        }
        if let Some(p) = &arena.planned {
            let mut cur = p
                .cursor
                .lock()
                .map_err(|_| CudaError::Driver("planned arena poisoned".into()))?;
            let i = *cur;
            if p.plan.sizes.get(i) != Some(&size) {
                return Err(CudaError::Driver(format!(
                    "allocation {i} of the captured pass ({size} bytes) differs from the planned pass; the forward pass must allocate the same way every time"
                )));
            }
            *cur += 1;
            MemStats::add(&self.stats.in_use, &self.stats.peak_in_use, size);
            return Ok(DeviceBuffer {
                ptr: p.base + p.plan.offsets[i] as u64,
                size,
                id,
                arena: arena.clone(),
            });
        }
        if let Some((ptr, size)) = arena.take_cached(size) {
            MemStats::add(&self.stats.in_use, &self.stats.peak_in_use, size);
            return Ok(DeviceBuffer {
                ptr,
                size,
                id,
                arena,
            });
        }
        arena.make_room(size)?;
        self.ctx.bind()?;
        // SAFETY: plain device allocation; the pointer is owned by the returned buffer.
        let ptr = match unsafe { result::malloc_sync(size) } {
            Ok(p) => p,
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // Give cached blocks back and try once more before reporting.
                self.default.trim()?;
                arena.trim()?;
                // SAFETY: as above.
                unsafe { result::malloc_sync(size) }.map_err(|_| {
                    CudaError::OutOfMemory(format!(
                        "could not allocate {:.1} MiB ({:.2} GiB already held); use a smaller batch",
                        size as f64 / (1 << 20) as f64,
                        self.stats.reserved() as f64 / (1u64 << 30) as f64
                    ))
                })?
            }
            Err(e) => return Err(e.into()),
        };
        MemStats::add(&self.stats.current, &self.stats.peak, size);
        MemStats::add(&self.stats.in_use, &self.stats.peak_in_use, size);
        Ok(DeviceBuffer {
            ptr,
            size,
            id,
            arena,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_granularity() {
        assert_eq!(round_size(0), 512);
        assert_eq!(round_size(1), 512);
        assert_eq!(round_size(513), 1024);
        assert_eq!(round_size(LARGE), LARGE_ROUND);
        assert_eq!(round_size(LARGE_ROUND + 1), 2 * LARGE_ROUND);
        for b in [1usize, 700, 5000, 3 << 20, 123_456_789] {
            let r = round_size(b);
            assert!(r >= b && r.is_multiple_of(SMALL), "{b} -> {r}");
        }
    }
}
