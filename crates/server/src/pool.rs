//! Reuse of large tensor storage between requests.
//!
//! A batch of 32 images of 3x640x640 f32 is 157 MB. Freshly allocated, such a buffer is
//! fresh pages from the kernel: filling it costs about ten times more than a memcpy into
//! memory already mapped (page faults, zeroing), and freeing it unmaps it again. The
//! server recycles storage it is done with (spent batch inputs, answered outputs) here,
//! and takes request tensors from here. Bounded: at most [`MAX_RETAINED`] bytes are kept;
//! buffers under [`MIN_BYTES`] go back to the allocator, which handles those well.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use aperture_engine::{DType, TensorData};
use half::{bf16, f16};

/// Smallest buffer worth keeping.
pub const MIN_BYTES: usize = 4 << 20;
/// Most bytes the pool holds at once.
pub const MAX_RETAINED: usize = 1 << 30;

#[derive(Default)]
struct Free {
    buffers: VecDeque<TensorData>,
    bytes: usize,
}

fn free_list() -> &'static Mutex<Free> {
    static POOL: OnceLock<Mutex<Free>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(Free::default()))
}

fn capacity_bytes(d: &TensorData) -> usize {
    match d {
        TensorData::F32(v) => v.capacity() * 4,
        TensorData::F16(v) => v.capacity() * 2,
        TensorData::BF16(v) => v.capacity() * 2,
    }
}

/// Storage for `n` elements of `dtype`. Contents are unspecified (a recycled buffer
/// keeps its old values): callers overwrite every element.
pub fn take(dtype: DType, n: usize) -> TensorData {
    let want = n.saturating_mul(dtype.size_bytes());
    if want >= MIN_BYTES {
        if let Ok(mut free) = free_list().lock() {
            // Same dtype, and no more than twice the size (no hoarding of a big buffer
            // for a small tensor).
            let hit = free.buffers.iter().position(|d| {
                d.dtype() == dtype && {
                    let cap = capacity_bytes(d);
                    cap >= want && cap / 2 <= want
                }
            });
            if let Some(d) = hit.and_then(|i| free.buffers.remove(i)) {
                free.bytes -= capacity_bytes(&d);
                drop(free);
                return fit(d, n);
            }
        }
    }
    match dtype {
        DType::F32 => TensorData::F32(vec![0.0; n]),
        DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
        DType::BF16 => TensorData::BF16(vec![bf16::ZERO; n]),
    }
}

/// Sets the length to `n` within the existing capacity.
fn fit(d: TensorData, n: usize) -> TensorData {
    match d {
        TensorData::F32(mut v) => {
            v.resize(n, 0.0);
            TensorData::F32(v)
        }
        TensorData::F16(mut v) => {
            v.resize(n, f16::ZERO);
            TensorData::F16(v)
        }
        TensorData::BF16(mut v) => {
            v.resize(n, bf16::ZERO);
            TensorData::BF16(v)
        }
    }
}

/// Hands storage back for reuse (dropped if small, or when the pool is full: the
/// oldest buffers make room first).
pub fn give(d: TensorData) {
    let bytes = capacity_bytes(&d);
    if !(MIN_BYTES..=MAX_RETAINED).contains(&bytes) {
        return;
    }
    let mut evicted = Vec::new();
    if let Ok(mut free) = free_list().lock() {
        while free.bytes + bytes > MAX_RETAINED {
            match free.buffers.pop_front() {
                Some(old) => {
                    free.bytes -= capacity_bytes(&old);
                    evicted.push(old);
                }
                None => break,
            }
        }
        free.bytes += bytes;
        free.buffers.push_back(d);
    }
    // Unmapping happens outside the lock.
    drop(evicted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_and_small_ones_are_not() {
        let n = MIN_BYTES; // f16: 2 bytes each, so twice the minimum
        let d = take(DType::F16, n);
        let TensorData::F16(v) = &d else {
            panic!("wrong dtype")
        };
        let ptr = v.as_ptr() as usize;
        give(d);
        // A slightly smaller tensor of the same dtype gets the same memory back.
        let again = take(DType::F16, n - 10);
        let TensorData::F16(v) = &again else {
            panic!("wrong dtype")
        };
        assert_eq!(v.len(), n - 10);
        assert_eq!(v.as_ptr() as usize, ptr);
        // Another dtype does not.
        give(again);
        let other = take(DType::BF16, n);
        let TensorData::BF16(w) = &other else {
            panic!("wrong dtype")
        };
        assert_ne!(w.as_ptr() as usize, ptr);
        let small = take(DType::F32, 16);
        assert_eq!(small.len(), 16);
    }
}
