//! Recycles large activation buffers.
//!
//! Big allocations come from the kernel as fresh pages, and first touching them costs a
//! page fault per 4 KiB: at 512x512 that costs more than the arithmetic of the cheap
//! operations (LayerNorm, gating, shuffles). Dropped tensors hand their buffers back
//! here and new tensors reuse them.

use std::sync::Mutex;

/// Buffers smaller than this (256 KiB) are cheap from the allocator and not pooled.
const MIN_POOLED_LEN: usize = 1 << 16;
/// Upper bound on memory held by the pool.
const MAX_POOLED_BYTES: usize = 4 << 30;

struct Pool {
    buffers: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    buffers: Vec::new(),
    bytes: 0,
});

/// A zero-filled buffer of `len` floats, reusing a pooled one when one fits.
pub fn zeroed(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED_LEN {
        if let Some(mut v) = take(len) {
            v.clear();
            v.resize(len, 0.0);
            return v;
        }
    }
    vec![0.0; len]
}

/// Best fit: the smallest pooled buffer that holds `len`, if it is not twice too big.
fn take(len: usize) -> Option<Vec<f32>> {
    let mut pool = POOL.lock().ok()?;
    let (index, _) = pool
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * len)
        .min_by_key(|(_, b)| b.capacity())?;
    let v = pool.buffers.swap_remove(index);
    pool.bytes -= v.capacity() * 4;
    Some(v)
}

/// Keeps `v` for reuse while the pool is under its memory bound.
pub fn recycle(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if v.capacity() < MIN_POOLED_LEN {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        if pool.bytes + bytes <= MAX_POOLED_BYTES {
            pool.bytes += bytes;
            pool.buffers.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_buffers_come_back_zeroed() {
        let mut v = zeroed(MIN_POOLED_LEN + 3);
        v.iter_mut().for_each(|x| *x = 7.0);
        recycle(v);
        let again = zeroed(MIN_POOLED_LEN + 1);
        assert_eq!(again.len(), MIN_POOLED_LEN + 1);
        assert!(again.iter().all(|&x| x == 0.0));
    }
}
