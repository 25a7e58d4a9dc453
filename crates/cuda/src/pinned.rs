//! Page-locked host buffers: copies from them to the device run at full PCIe speed and
//! truly asynchronously. Large transfers are staged in chunks so the host work on one
//! chunk overlaps the DMA of the previous one, and host copies run on the rayon pool
//! (one thread copies a batch of 640x640 images, 150+ MB, slower than the DMA).
//!
//! Values cross PCIe as f32 or, for 16-bit models, already rounded to the activations'
//! type ([`Wire`]): half the bytes, and the same values the graph's first kernel would
//! have rounded them to.

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::{result, sys};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::driver::{Context, Event};
use crate::error::CudaError;
use crate::kernels::Storage;

/// Values per parallel conversion task.
const PARALLEL_CHUNK: usize = 1 << 18;
/// Values per staged DMA: large enough for full PCIe speed, small enough that the first
/// and last chunks (not overlapped) cost little.
const STAGE_CHUNK: usize = 2 << 20;

/// Element type of a host <-> device transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    F32,
    F16,
    BF16,
}

impl Wire {
    /// The activations' own type: rounding to it on the host loses nothing the model
    /// would keep.
    pub(crate) fn for_storage(s: Storage) -> Self {
        match s {
            Storage::F32 => Wire::F32,
            Storage::F16 => Wire::F16,
            Storage::BF16 => Wire::BF16,
        }
    }

    pub(crate) fn size(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::F16 | Wire::BF16 => 2,
        }
    }
}

/// A transfer element: f32 values are rounded to nearest even on the way in (as the
/// device's `__float2half_rn` / `__float2bfloat16` do) and widened exactly on the way
/// out. Whole slices at a time: `half` converts them with F16C / SIMD where the CPU has
/// it (one value at a time is ~10x slower: 25 ms for a batch of 32 640x640 images).
trait WireValue: Copy + Send + Sync + Sized {
    /// `dst` and `src` have the same length.
    fn from_f32s(dst: &mut [Self], src: &[f32]);
    fn to_f32s(src: &[Self], dst: &mut [f32]);
}

impl WireValue for f32 {
    fn from_f32s(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl WireValue for f16 {
    fn from_f32s(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl WireValue for bf16 {
    fn from_f32s(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

pub(crate) struct Pinned {
    ptr: *mut u8,
    /// Capacity in values of `wire`.
    len: usize,
    wire: Wire,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for Pinned {}
unsafe impl Sync for Pinned {}

impl Pinned {
    /// Room for `len` values of `wire`.
    pub(crate) fn new(len: usize, wire: Wire) -> Result<Self> {
        // SAFETY: allocation of `len` values; freed in Drop. Page-locked allocations are
        // page aligned, so aligned for every wire type.
        let ptr =
            unsafe { result::malloc_host(len.max(1) * wire.size(), 0).map_err(CudaError::from)? }
                as *mut u8;
        Ok(Self { ptr, len, wire })
    }

    /// The buffer as `len` values of type `E` (the caller matches `E` to `self.wire`).
    ///
    /// # Safety
    /// `E` must be the Rust type of `self.wire`.
    unsafe fn typed<E>(&mut self) -> &mut [E] {
        std::slice::from_raw_parts_mut(self.ptr as *mut E, self.len)
    }

    /// Enqueues the copy of `x` (at most this buffer's length of values, converted to
    /// the wire type) to the device buffer at `dst` on `stream` (of `ctx`), chunk by
    /// chunk: each chunk's DMA runs while the next is converted. The caller must not
    /// touch this buffer again before the stream has passed the copies (an event
    /// recorded behind them has completed).
    pub(crate) fn upload(
        &mut self,
        ctx: &Context,
        stream: sys::CUstream,
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
        // SAFETY: each arm views the buffer as the type of its wire.
        unsafe {
            match self.wire {
                Wire::F32 => upload_as(&mut self.typed::<f32>()[..src.len()], src, dst, stream),
                Wire::F16 => upload_as(&mut self.typed::<f16>()[..src.len()], src, dst, stream),
                Wire::BF16 => upload_as(&mut self.typed::<bf16>()[..src.len()], src, dst, stream),
            }
        }
    }

    /// Enqueues the copy of the first `len` values (at most this buffer's length, of the
    /// wire type) of the device buffer at `src` after the stream's earlier work, and
    /// returns them as f32, converting each chunk as soon as its DMA has finished.
    /// Returns once every copy is done.
    pub(crate) fn download(
        &mut self,
        ctx: &Context,
        src: sys::CUdeviceptr,
        len: usize,
    ) -> Result<Vec<f32>> {
        self.check_len(len)?;
        ctx.bind().map_err(EngineError::from)?;
        // SAFETY: each arm views the buffer as the type of its wire.
        unsafe {
            match self.wire {
                Wire::F32 => download_as(&mut self.typed::<f32>()[..len], src, ctx),
                Wire::F16 => download_as(&mut self.typed::<f16>()[..len], src, ctx),
                Wire::BF16 => download_as(&mut self.typed::<bf16>()[..len], src, ctx),
            }
        }
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

fn upload_as<E: WireValue>(
    staged: &mut [E],
    src: &[f32],
    dst: sys::CUdeviceptr,
    stream: sys::CUstream,
) -> Result<()> {
    let size = std::mem::size_of::<E>();
    for (i, (d, s)) in staged
        .chunks_mut(STAGE_CHUNK)
        .zip(src.chunks(STAGE_CHUNK))
        .enumerate()
    {
        convert_parallel(d, s, E::from_f32s);
        let at = dst + (i * STAGE_CHUNK * size) as u64;
        // SAFETY: `d` is page-locked memory owned by the caller's buffer, `at` lies
        // inside the caller's device buffer; see `Pinned::upload`'s contract.
        unsafe { result::memcpy_htod_async(at, &*d, stream).map_err(CudaError::from)? };
    }
    Ok(())
}

fn download_as<E: WireValue>(
    staged: &mut [E],
    src: sys::CUdeviceptr,
    ctx: &Context,
) -> Result<Vec<f32>> {
    let size = std::mem::size_of::<E>();
    let mut arrived = Vec::with_capacity(staged.len().div_ceil(STAGE_CHUNK));
    for (i, d) in staged.chunks_mut(STAGE_CHUNK).enumerate() {
        let at = src + (i * STAGE_CHUNK * size) as u64;
        // SAFETY: `d` is page-locked memory read only after the event recorded behind
        // its copy has completed.
        unsafe { result::memcpy_dtoh_async(d, at, ctx.stream).map_err(CudaError::from)? };
        let ev = Event::new(ctx).map_err(EngineError::from)?;
        ev.record(ctx).map_err(EngineError::from)?;
        arrived.push(ev);
    }
    // Zeroed memory comes from fresh pages that the converting threads fault in, in
    // parallel, instead of one thread touching them all.
    let mut out = vec![0.0f32; staged.len()];
    for ((d, s), ev) in out
        .chunks_mut(STAGE_CHUNK)
        .zip(staged.chunks(STAGE_CHUNK))
        .zip(&arrived)
    {
        ev.wait().map_err(EngineError::from)?;
        convert_parallel(d, s, |dst: &mut [f32], src: &[E]| E::to_f32s(src, dst));
    }
    Ok(out)
}

/// `f(dst_piece, src_piece)` over equal-length pieces, on the rayon pool for long
/// slices.
fn convert_parallel<A: Sync, B: Send>(dst: &mut [B], src: &[A], f: impl Fn(&mut [B], &[A]) + Sync) {
    if src.len() <= PARALLEL_CHUNK {
        f(dst, src);
        return;
    }
    dst.par_chunks_mut(PARALLEL_CHUNK)
        .zip(src.par_chunks(PARALLEL_CHUNK))
        .for_each(|(d, s)| f(d, s));
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
    use super::*;

    fn narrow<E: WireValue + Default>(v: &[f32]) -> Vec<E> {
        let mut out = vec![E::default(); v.len()];
        convert_parallel(&mut out, v, E::from_f32s);
        out
    }

    #[test]
    fn parallel_conversion_matches_the_source_for_uneven_lengths() {
        for n in [0usize, 1, 1000, (1 << 20) + 7, 5 * (1 << 20) + 3] {
            let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            assert_eq!(narrow::<f32>(&src), src, "length {n}");
            let halves = narrow::<f16>(&src);
            let scalar: Vec<f16> = src.iter().map(|&v| f16::from_f32(v)).collect();
            assert_eq!(halves, scalar, "f16 slices as values, length {n}");
            let mut back = vec![0.0f32; n];
            convert_parallel(&mut back, &halves, |d: &mut [f32], s: &[f16]| {
                f16::to_f32s(s, d)
            });
            let widened: Vec<f32> = scalar.iter().map(|h| h.to_f32()).collect();
            assert_eq!(back, widened, "widened exactly, length {n}");
        }
    }

    #[test]
    fn sixteen_bit_wires_round_to_nearest_even() {
        // Halfway cases go to the even mantissa: 1 + 2^-11 between 1 and 1 + 2^-10 goes
        // down to 1, 1 + 3 * 2^-11 between 1 + 2^-10 and 1 + 2^-9 goes up to 1 + 2^-9.
        let h = narrow::<f16>(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)]);
        assert_eq!([h[0].to_bits(), h[1].to_bits()], [0x3c00, 0x3c02]);
        let b = narrow::<bf16>(&[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)]);
        assert_eq!([b[0].to_bits(), b[1].to_bits()], [0x3f80, 0x3f82]);
        assert_eq!(Wire::for_storage(Storage::F16).size(), 2);
        assert_eq!(Wire::for_storage(Storage::F32).size(), 4);
    }
}
