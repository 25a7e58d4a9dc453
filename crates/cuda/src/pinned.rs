//! Page-locked host buffers: copies from them to the device run at full PCIe speed and
//! truly asynchronously. Filling one from a large host tensor is split over a few threads,
//! since a single thread copies a batch of 640x640 images (150+ MB) slower than the DMA.

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::result;

use crate::error::CudaError;

/// Below this many values one thread copies; above, chunks of at least this size.
const PARALLEL_CHUNK: usize = 1 << 20;
const MAX_THREADS: usize = 8;

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

    /// Copies a host tensor's values in as f32 (without a temporary when it holds f32).
    pub(crate) fn fill_from_tensor(&mut self, x: &HostTensor) -> Result<()> {
        match x.as_f32() {
            Some(v) => self.fill_from(v),
            None => self.fill_from(&x.to_f32_vec()),
        }
    }

    /// Copies `src` (exactly this buffer's length) in, on up to eight threads.
    pub(crate) fn fill_from(&mut self, src: &[f32]) -> Result<()> {
        let dst = self.as_mut_slice();
        if dst.len() != src.len() {
            return Err(EngineError::Shape(format!(
                "staging holds {} values, the input has {}",
                dst.len(),
                src.len()
            )));
        }
        copy_parallel(dst, src);
        Ok(())
    }
}

fn copy_parallel(dst: &mut [f32], src: &[f32]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
        .min(src.len().div_ceil(PARALLEL_CHUNK))
        .max(1);
    if threads == 1 {
        dst.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
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
