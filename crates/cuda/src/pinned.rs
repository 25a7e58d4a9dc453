//! Page-locked host buffers: copies from them to the device run at full PCIe speed and
//! truly asynchronously. Large transfers are staged in chunks so the host copy of one
//! chunk overlaps the DMA of the previous one, and host copies run on the rayon pool
//! (one thread copies a batch of 640x640 images, 150+ MB, slower than the DMA).

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::{result, sys};
use rayon::prelude::*;

use crate::driver::{Context, Event};
use crate::error::CudaError;

/// Values per parallel copy task.
const PARALLEL_CHUNK: usize = 1 << 18;
/// Values per staged DMA: large enough for full PCIe speed, small enough that the first
/// and last chunks (not overlapped) cost little.
const STAGE_CHUNK: usize = 2 << 20;

pub(crate) struct Pinned {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for Pinned {}
unsafe impl Sync for Pinned {}

impl Pinned {
    pub(crate) fn new(len: usize) -> Result<Self> {
        // SAFETY: allocation of `len` f32 values; freed in Drop.
        let ptr =
            unsafe { result::malloc_host(len.max(1) * 4, 0).map_err(CudaError::from)? } as *mut f32;
        Ok(Self { ptr, len })
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `ptr` holds `len` f32 values owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Enqueues the copy of `x` (as f32; at most this buffer's length) to the device
    /// buffer at `dst` on the context's stream, chunk by chunk: each chunk's DMA runs
    /// while the next is copied in. The caller must not touch this buffer again before
    /// the stream has passed the copies (every graph replay ends with a synchronising
    /// read-back).
    pub(crate) fn upload(
        &mut self,
        ctx: &Context,
        x: &HostTensor,
        dst: sys::CUdeviceptr,
    ) -> Result<()> {
        let converted;
        let src = match x.as_f32() {
            Some(v) => v,
            None => {
                converted = x.to_f32_vec();
                &converted
            }
        };
        self.check_len(src.len())?;
        ctx.bind().map_err(EngineError::from)?;
        let stream = ctx.stream;
        let staged = &mut self.as_mut_slice()[..src.len()];
        for (i, (d, s)) in staged
            .chunks_mut(STAGE_CHUNK)
            .zip(src.chunks(STAGE_CHUNK))
            .enumerate()
        {
            copy_parallel(d, s);
            let at = dst + (i * STAGE_CHUNK * 4) as u64;
            // SAFETY: `d` is page-locked memory owned by self, `at` lies inside the
            // caller's device buffer of this buffer's length; see the contract above.
            unsafe { result::memcpy_htod_async(at, &*d, stream).map_err(CudaError::from)? };
        }
        Ok(())
    }

    /// Enqueues the copy of the first `len` f32 values (at most this buffer's length) of
    /// the device buffer at `src` after the stream's earlier work, and returns them,
    /// copying each chunk out as soon as its DMA has finished. Returns once every copy
    /// is done.
    pub(crate) fn download(
        &mut self,
        ctx: &Context,
        src: sys::CUdeviceptr,
        len: usize,
    ) -> Result<Vec<f32>> {
        self.check_len(len)?;
        ctx.bind().map_err(EngineError::from)?;
        let stream = ctx.stream;
        let staged = &mut self.as_mut_slice()[..len];
        let mut arrived = Vec::with_capacity(staged.len().div_ceil(STAGE_CHUNK));
        for (i, d) in staged.chunks_mut(STAGE_CHUNK).enumerate() {
            let at = src + (i * STAGE_CHUNK * 4) as u64;
            // SAFETY: `d` is page-locked memory owned by self and is read only after the
            // event recorded behind its copy has completed.
            unsafe { result::memcpy_dtoh_async(d, at, stream).map_err(CudaError::from)? };
            let ev = Event::new(ctx).map_err(EngineError::from)?;
            ev.record(ctx).map_err(EngineError::from)?;
            arrived.push(ev);
        }
        // Zeroed memory comes from fresh pages that the copying threads fault in, in
        // parallel, instead of one thread touching them all.
        let mut out = vec![0.0f32; staged.len()];
        for ((d, s), ev) in out
            .chunks_mut(STAGE_CHUNK)
            .zip(staged.chunks(STAGE_CHUNK))
            .zip(&arrived)
        {
            ev.wait().map_err(EngineError::from)?;
            copy_parallel(d, s);
        }
        Ok(out)
    }

    fn check_len(&self, n: usize) -> Result<()> {
        if n > self.len {
            return Err(EngineError::Shape(format!(
                "staging holds {} values, the transfer has {n}",
                self.len
            )));
        }
        Ok(())
    }
}

fn copy_parallel(dst: &mut [f32], src: &[f32]) {
    if src.len() <= PARALLEL_CHUNK {
        dst.copy_from_slice(src);
        return;
    }
    dst.par_chunks_mut(PARALLEL_CHUNK)
        .zip(src.par_chunks(PARALLEL_CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host, freed once.
        unsafe {
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::copy_parallel;

    #[test]
    fn parallel_copy_matches_the_source_for_uneven_lengths() {
        for n in [0usize, 1, 1000, (1 << 20) + 7, 5 * (1 << 20) + 3] {
            let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let mut dst = vec![-1.0f32; n];
            copy_parallel(&mut dst, &src);
            assert_eq!(dst, src, "length {n}");
        }
    }
}
