//! [`GpuPreprocessor`]: runs a [`BatchPlan`](super::plan::BatchPlan) on its own stream.
//! One call at a time (a mutex over the scratch buffers, which only grow): images go
//! into page-locked memory, up in one copy with the tap tables, through the resize
//! passes and the conversion, and the f32 batch comes back in one copy.
//!
//! Nothing here may synchronise the whole device: a model on another stream may be
//! capturing a CUDA graph at the same time, and a device-wide synchronisation (as
//! `cuMemFree` and `cuMemFreeHost` do) would invalidate that capture. Device scratch
//! therefore comes from the stream-ordered allocator (`cuMemAllocAsync` /
//! `cuMemFreeAsync` on this stream), and outgrown page-locked buffers are kept until
//! the preprocessor is dropped (they grow by doubling, so that is less than the
//! current size).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aperture_engine::{EngineError, HostTensor, Result};
use aperture_vision::RgbImage;
use cudarc::driver::{result, sys};

use super::plan::{plan_batch, BatchPlan, Region};
use super::steps::{enqueue_steps, FloatOut, Regions};
use super::PreprocessSpec;
use crate::driver::Context;
use crate::error::{CudaError, CudaResult};
use crate::kernels::Kernels;

pub const PREPROCESS_SOURCE: &str = include_str!("../../kernels/preprocess.cu");

/// Every entry point of `preprocess.cu`.
pub const PREPROCESS_KERNELS: &[&str] = &["pre_resize_h", "pre_resize_v", "pre_to_float"];

/// Calls that may run at once (each lane has its own stream and scratch buffers): a
/// server preprocesses many requests' images concurrently.
const LANES: usize = 4;

/// Device scratch sizes are rounded up to this, so that slightly larger images do not
/// reallocate.
const DEVICE_ROUND: usize = 1 << 20;

/// A device allocation that grows on demand (contents are not kept).
#[derive(Default)]
struct DevMem {
    ptr: u64,
    bytes: usize,
}

impl DevMem {
    /// At least `bytes`, stream-ordered on `stream`; call with the context current.
    fn ensure(&mut self, bytes: usize, stream: sys::CUstream) -> CudaResult<u64> {
        if bytes > self.bytes || self.ptr == 0 {
            self.free(stream);
            let size = bytes.max(1).next_multiple_of(DEVICE_ROUND);
            // SAFETY: a stream-ordered allocation, freed in `free` on the same stream.
            self.ptr = unsafe { result::malloc_async(stream, size)? };
            self.bytes = size;
        }
        Ok(self.ptr)
    }

    /// Returns the memory after the work already enqueued on `stream`.
    fn free(&mut self, stream: sys::CUstream) {
        if self.ptr != 0 {
            // SAFETY: allocated by malloc_async; nothing enqueued later uses it.
            unsafe {
                let _ = result::free_async(self.ptr, stream);
            }
        }
        self.ptr = 0;
        self.bytes = 0;
    }
}

/// Page-locked host memory that grows on demand (by doubling; see the module notes).
/// Freed on drop (or earlier by `free`); the owner makes sure no copy still uses it.
pub(crate) struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    /// Outgrown buffers, freed on drop.
    retired: Vec<(*mut u8, usize)>,
}

impl Default for Pinned {
    fn default() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            bytes: 0,
            retired: Vec::new(),
        }
    }
}

// SAFETY: the pointers are owned allocations; callers serialise access (a mutex).
unsafe impl Send for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.free();
    }
}

impl Pinned {
    pub(crate) fn ensure(&mut self, bytes: usize) -> CudaResult<()> {
        if bytes > self.bytes || self.ptr.is_null() {
            let size = bytes.max(1).max(self.bytes.saturating_mul(2));
            // SAFETY: a plain allocation, freed in `free`.
            let ptr = unsafe { result::malloc_host(size, 0)? } as *mut u8;
            if !self.ptr.is_null() {
                self.retired.push((self.ptr, self.bytes));
            }
            self.ptr = ptr;
            self.bytes = size;
        }
        Ok(())
    }

    pub(crate) fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` holds `self.bytes >= len` bytes owned by self (callers ensure).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.bytes)) }
    }

    pub(crate) fn f32_mut(&mut self, len: usize) -> &mut [f32] {
        // SAFETY: page-locked allocations are page aligned, so f32-aligned; the length
        // stays within the allocation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, len.min(self.bytes / 4)) }
    }

    pub(crate) fn free(&mut self) {
        self.retired.push((self.ptr, self.bytes));
        for (ptr, _) in self.retired.drain(..) {
            if !ptr.is_null() {
                // SAFETY: allocated by malloc_host and not used after this.
                unsafe {
                    let _ = result::free_host(ptr as *mut std::ffi::c_void);
                }
            }
        }
        self.ptr = std::ptr::null_mut();
        self.bytes = 0;
    }
}

#[derive(Default)]
struct Scratch {
    input: DevMem,
    tmp: DevMem,
    resized: DevMem,
    out: DevMem,
    pin_in: Pinned,
    pin_out: Pinned,
}

// SAFETY: the raw pointers are owned allocations, only touched under the mutex.
unsafe impl Send for Scratch {}

impl Scratch {
    fn region(&self, r: Region) -> u64 {
        Regions {
            input: self.input.ptr,
            tmp: self.tmp.ptr,
            resized: self.resized.ptr,
        }
        .at(r)
    }

    /// Frees everything; the stream must be idle afterwards before the page-locked
    /// memory goes (the caller synchronises in between).
    fn release_device(&mut self, stream: sys::CUstream) {
        for m in [
            &mut self.input,
            &mut self.tmp,
            &mut self.resized,
            &mut self.out,
        ] {
            m.free(stream);
        }
    }
}

/// One stream and its scratch buffers.
struct Lane {
    ctx: Arc<Context>,
    scratch: Mutex<Scratch>,
}

/// Preprocessing on one GPU, on streams of its own at the highest priority: the small
/// resize kernels overlap with model work on the backend's stream and do not wait
/// behind a long graph replay. Thread-safe; up to [`LANES`] calls run at once.
pub struct GpuPreprocessor {
    lanes: Vec<Lane>,
    kernels: Kernels,
    name: String,
    next: AtomicUsize,
}

impl GpuPreprocessor {
    /// Opens GPU `ordinal` and builds (or loads from the kernel cache) the kernels.
    pub fn new(ordinal: usize) -> CudaResult<Self> {
        let lanes = (0..LANES)
            .map(|_| {
                Ok(Lane {
                    ctx: Arc::new(Context::new_urgent(ordinal)?),
                    scratch: Mutex::new(Scratch::default()),
                })
            })
            .collect::<CudaResult<Vec<_>>>()?;
        let first = lanes
            .first()
            .ok_or(CudaError::NoSuchDevice { ordinal, count: 0 })?;
        let kernels = Kernels::load_source(&first.ctx, PREPROCESS_SOURCE, PREPROCESS_KERNELS)?;
        let name = first.ctx.name.clone();
        Ok(Self {
            lanes,
            kernels,
            name,
            next: AtomicUsize::new(0),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// A free lane if there is one, else the next in turn (waiting for it); its context
    /// is made current.
    fn acquire(&self) -> Result<(&Context, MutexGuard<'_, Scratch>)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.lanes.len().max(1);
        let free = self
            .lanes
            .iter()
            .cycle()
            .skip(start % n)
            .take(n)
            .find_map(|l| l.scratch.try_lock().ok().map(|g| (l, g)));
        let (lane, guard) = match free {
            Some(found) => found,
            None => {
                let lane = self
                    .lanes
                    .get(start % n)
                    .ok_or_else(|| EngineError::Device("no GPU preprocessing lane".into()))?;
                let guard = lane
                    .scratch
                    .lock()
                    .map_err(|_| EngineError::Device("GPU preprocessing state poisoned".into()))?;
                (lane, guard)
            }
        };
        lane.ctx.bind()?;
        Ok((&lane.ctx, guard))
    }

    /// Preprocesses a batch into a host tensor (`[N, 3, H, W]` or NHWC by
    /// `spec.layout`), image `i` in slot `i`.
    pub fn run(&self, images: &[&RgbImage], spec: &PreprocessSpec) -> Result<HostTensor> {
        let plan = plan_for(images, spec)?;
        let n = images.len() * plan.image_elems();
        let (ctx, mut s) = self.acquire()?;
        let out = s.out.ensure(n * 4, ctx.stream)?;
        self.enqueue(ctx, &mut s, &plan, images, spec, Some(out))?;
        s.pin_out.ensure(n * 4)?;
        let host = s.pin_out.f32_mut(n);
        // SAFETY: `out` holds `n` f32 values written by the kernels above; `host` is
        // page-locked and read only after the stream is synchronised.
        unsafe {
            result::memcpy_dtoh_async(&mut host[..], out, ctx.stream).map_err(CudaError::from)?;
            result::stream::synchronize(ctx.stream).map_err(CudaError::from)?;
        }
        HostTensor::from_f32(plan.out_shape(images.len(), spec.layout), host.to_vec())
    }

    /// Like [`GpuPreprocessor::run`], writing the f32 batch to device memory at `dst`
    /// (at least `dst_bytes` bytes, on this GPU) instead of the host; returns once the
    /// values are there. The caller keeps other streams off `dst` meanwhile.
    pub fn run_into(
        &self,
        images: &[&RgbImage],
        spec: &PreprocessSpec,
        dst: u64,
        dst_bytes: usize,
    ) -> Result<()> {
        let plan = plan_for(images, spec)?;
        let need = images.len() * plan.image_elems() * 4;
        if dst_bytes < need {
            return Err(EngineError::Invalid(format!(
                "preprocessing output needs {need} bytes, the destination has {dst_bytes}"
            )));
        }
        let (ctx, mut s) = self.acquire()?;
        self.enqueue(ctx, &mut s, &plan, images, spec, Some(dst))?;
        ctx.synchronize()?;
        Ok(())
    }

    /// [`GpuPreprocessor::run_into`] a fresh device buffer, read back: checks the
    /// device-destination path.
    pub(crate) fn run_through_device(
        &self,
        images: &[&RgbImage],
        spec: &PreprocessSpec,
    ) -> Result<HostTensor> {
        let plan = plan_for(images, spec)?;
        let n = images.len() * plan.image_elems();
        let (ctx, mut s) = self.acquire()?;
        let mut dst = DevMem::default();
        let ptr = dst.ensure(n * 4, ctx.stream)?;
        let mut host = vec![0f32; n];
        // SAFETY: `dst` holds `n` f32 values; the stream is synchronised before `host`
        // is read and before the buffer is freed in stream order.
        let read = self
            .enqueue(ctx, &mut s, &plan, images, spec, Some(ptr))
            .and_then(|()| unsafe {
                result::memcpy_dtoh_async(&mut host[..], ptr, ctx.stream)
                    .map_err(CudaError::from)?;
                Ok(ctx.synchronize()?)
            });
        dst.free(ctx.stream);
        read?;
        HostTensor::from_f32(plan.out_shape(images.len(), spec.layout), host)
    }

    /// The resize alone (8-bit RGB in, 8-bit RGB out), for checks against the CPU.
    pub fn resize_u8(&self, image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
        let spec = PreprocessSpec::resize(height as usize, width as usize);
        let plan = plan_for(&[image], &spec)?;
        let bytes = plan.resized_bytes;
        let (ctx, mut s) = self.acquire()?;
        self.enqueue(ctx, &mut s, &plan, &[image], &spec, None)?;
        let result = plan
            .result
            .first()
            .ok_or_else(|| EngineError::Device("resize plan without a result".into()))?;
        let src = s.region(*result);
        s.pin_out.ensure(bytes)?;
        let host = s.pin_out.bytes_mut(bytes);
        // SAFETY: the result region holds `bytes` bytes; `host` is read only after the
        // stream is synchronised.
        unsafe {
            result::memcpy_dtoh_async(&mut host[..], src, ctx.stream).map_err(CudaError::from)?;
            result::stream::synchronize(ctx.stream).map_err(CudaError::from)?;
        }
        RgbImage::from_raw(width, height, host.to_vec())
            .ok_or_else(|| EngineError::Device("resized image has the wrong size".into()))
    }

    /// Uploads the inputs and enqueues every step; `ToFloat` writes to `out` (skipped
    /// when `None`). The context must be current and the scratch locked.
    fn enqueue(
        &self,
        ctx: &Context,
        s: &mut Scratch,
        plan: &BatchPlan,
        images: &[&RgbImage],
        spec: &PreprocessSpec,
        out: Option<u64>,
    ) -> Result<()> {
        // Outgrown device buffers are freed in stream order; page-locked ones are kept
        // (every call ends synchronised, so none is being copied from here).
        let stream = ctx.stream;
        s.input.ensure(plan.input_bytes, stream)?;
        s.tmp.ensure(plan.tmp_bytes, stream)?;
        s.resized.ensure(plan.resized_bytes, stream)?;
        s.pin_in.ensure(plan.input_bytes)?;
        let raw: Vec<&[u8]> = images.iter().map(|i| i.as_raw().as_slice()).collect();
        plan.fill_input(&raw, s.pin_in.bytes_mut(plan.input_bytes))?;
        let input = s.input.ptr;
        // SAFETY: both buffers hold `input_bytes`; the page-locked source stays
        // untouched until the stream is synchronised at the end of the call.
        unsafe {
            let src = s.pin_in.bytes_mut(plan.input_bytes);
            result::memcpy_htod_async(input, &src[..], stream).map_err(CudaError::from)?;
        }
        let regions = Regions {
            input,
            tmp: s.tmp.ptr,
            resized: s.resized.ptr,
        };
        let out = out.map_or(FloatOut::Skip, FloatOut::F32);
        enqueue_steps(&self.kernels, ctx, plan, spec, regions, out)
    }
}

fn plan_for(images: &[&RgbImage], spec: &PreprocessSpec) -> Result<BatchPlan> {
    let sizes: Vec<(usize, usize)> = images
        .iter()
        .map(|i| (i.width() as usize, i.height() as usize))
        .collect();
    plan_batch(&sizes, spec)
}

impl Drop for GpuPreprocessor {
    fn drop(&mut self) {
        // Free with the context current; the kernel module is unloaded after this.
        for lane in &self.lanes {
            if lane.ctx.bind().is_ok() {
                if let Ok(mut s) = lane.scratch.lock() {
                    s.release_device(lane.ctx.stream);
                    let _ = lane.ctx.synchronize();
                    s.pin_in.free();
                    s.pin_out.free();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_name_is_an_extern_c_entry_point() {
        for name in PREPROCESS_KERNELS {
            let decl = format!("extern \"C\" __global__ void {name}(");
            assert!(PREPROCESS_SOURCE.contains(&decl), "{name} is not declared");
        }
        assert_eq!(
            PREPROCESS_SOURCE.matches("extern \"C\" __global__").count(),
            PREPROCESS_KERNELS.len()
        );
    }

    #[test]
    fn kernel_source_is_balanced_and_uses_the_visions_precision() {
        let src = PREPROCESS_SOURCE;
        assert_eq!(src.matches('{').count(), src.matches('}').count());
        assert_eq!(src.matches('(').count(), src.matches(')').count());
        let bits = format!(
            "#define PRE_PRECISION_BITS {}",
            aperture_vision::RESIZE_PRECISION_BITS
        );
        assert!(
            src.contains(&bits),
            "kernel fixed-point bits differ from the CPU's"
        );
    }
}
