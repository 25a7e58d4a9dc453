//! The check a cuDNN candidate passes before it replaces ours: the same output, up to
//! rounding, on the real inputs of its first launch.

use aperture_engine::Result;
use half::{bf16, f16};

use crate::backend::CudaBackend;
use crate::error::CudaError;
use crate::kernels::Storage;

/// Largest relative L2 distance between cuDNN's output and ours that passes as rounding:
/// both accumulate in fp32; cuDNN's output is rounded to the storage type once more
/// before the epilogue. A wrong result is off by far more.
pub(super) fn tolerance(storage: Storage) -> f64 {
    match storage {
        Storage::F16 => 1e-2,
        Storage::BF16 => 5e-2,
        Storage::F32 => 1e-4,
    }
}

/// Pixel rows compared at each end of the output: enough to catch a wrong algorithm
/// (whole images or tiles off), few enough that a batch-32 launch is checked in
/// milliseconds rather than by copying gigabytes back.
const SAMPLE_ROWS: usize = 2048;

/// `APERTURE_CUDNN_CHECK=full` compares every row (slower first launches; for hunting a
/// wrong result the samples miss).
const CHECK_ENV: &str = "APERTURE_CUDNN_CHECK";

/// Whether `APERTURE_CUDNN_CHECK=full` is set.
fn full_check() -> bool {
    std::env::var(CHECK_ENV).as_deref() == Ok("full")
}

/// Relative L2 distance of `b` from `a` over the first `c` channels of pixel rows (`ld`
/// elements apart) in the backend's storage type: the first, the middle and the last
/// [`SAMPLE_ROWS`] of `rows` (all of them when fewer). Waits for the stream.
pub(super) fn slice_rel_l2(
    be: &CudaBackend,
    (a, b): (u64, u64),
    rows: usize,
    c: usize,
    ld: usize,
) -> Result<f64> {
    be.synchronize()?;
    let es = be.esize() as u64;
    let sample = if full_check() { rows } else { SAMPLE_ROWS };
    let ranges = sample_ranges(rows, sample);
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    let mut sampled = 0;
    for (first, count) in ranges {
        let off = (first * ld) as u64 * es;
        va.extend(download(be, a + off, count, c, ld)?);
        vb.extend(download(be, b + off, count, c, ld)?);
        sampled += count;
    }
    Ok(rel_l2_rows(&va, &vb, sampled, c, c))
}

/// Whether the sampled rows of the poisoned buffer at `ptr` (every byte 0xFF before the
/// launch) still hold the poison outside their first `c` of `ld` channels: a launch into
/// a channel slice must leave the concatenation's other slices alone. Waits for the
/// stream. 16-bit storage.
pub(super) fn outside_slice_untouched(
    be: &CudaBackend,
    ptr: u64,
    rows: usize,
    c: usize,
    ld: usize,
) -> Result<bool> {
    if ld == c {
        return Ok(true);
    }
    be.synchronize()?;
    be.ctx.bind()?;
    for (first, count) in sample_ranges(rows, SAMPLE_ROWS) {
        let mut v = vec![0u16; count * ld];
        let at = ptr + (first * ld * 2) as u64;
        // SAFETY: the buffer holds `rows` rows of `ld` 16-bit values.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, at) }.map_err(CudaError::from)?;
        if !poison_intact(&v, c, ld) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether every row of `v` (rows `ld` 16-bit values apart) still holds the 0xFFFF poison
/// past its first `c` values.
fn poison_intact(v: &[u16], c: usize, ld: usize) -> bool {
    v.chunks(ld).all(|row| {
        row.get(c..)
            .is_none_or(|rest| rest.iter().all(|&u| u == 0xFFFF))
    })
}

/// `(first, count)` row ranges of `sample` rows at the start, in the middle and at the end
/// of `rows`, in order and without overlap (one range when `rows <= 3 * sample`).
fn sample_ranges(rows: usize, sample: usize) -> Vec<(usize, usize)> {
    if rows <= 3 * sample {
        return vec![(0, rows)];
    }
    let middle = (rows - sample) / 2;
    vec![(0, sample), (middle, sample), (rows - sample, sample)]
}

/// The first `c` values of `rows` rows `ld` apart at `ptr`, packed, as f32.
fn download(be: &CudaBackend, ptr: u64, rows: usize, c: usize, ld: usize) -> Result<Vec<f32>> {
    let n = rows.saturating_sub(1) * ld + c;
    be.ctx.bind()?;
    let all: Vec<f32> = match be.storage {
        Storage::F32 => {
            let mut v = vec![0f32; n];
            // SAFETY: `ptr` holds at least `n` values of the storage type.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, ptr) }
                .map_err(CudaError::from)?;
            v
        }
        Storage::F16 | Storage::BF16 => {
            let mut v = vec![0u16; n];
            // SAFETY: as above, 2-byte values.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, ptr) }
                .map_err(CudaError::from)?;
            let bf = be.storage == Storage::BF16;
            v.into_iter()
                .map(|u| {
                    if bf {
                        bf16::from_bits(u).to_f32()
                    } else {
                        f16::from_bits(u).to_f32()
                    }
                })
                .collect()
        }
    };
    Ok((0..rows)
        .flat_map(|r| all.get(r * ld..r * ld + c).into_iter().flatten().copied())
        .collect())
}

/// Relative L2 distance of `b` from `a` over `c` values in each of `rows` rows `ld`
/// apart; 0 when both are zero, infinite when either holds a non-finite value.
pub(super) fn rel_l2_rows(a: &[f32], b: &[f32], rows: usize, c: usize, ld: usize) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..rows {
        let (Some(ra), Some(rb)) = (a.get(r * ld..r * ld + c), b.get(r * ld..r * ld + c)) else {
            return f64::INFINITY;
        };
        for (&x, &y) in ra.iter().zip(rb) {
            if !x.is_finite() || !y.is_finite() {
                return f64::INFINITY;
            }
            num += f64::from(x - y).powi(2);
            den += f64::from(x).powi(2);
        }
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::rel_l2_rows;

    #[test]
    fn compares_only_the_slice_of_each_row() {
        // Two rows of 4 with a 2-channel slice; the other channels differ wildly.
        let a = [1.0, 2.0, 100.0, -7.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 2.0, -9.0, 8.0, 3.0, 4.0, 0.0, 0.0];
        assert_eq!(rel_l2_rows(&a, &b, 2, 2, 4), 0.0);
        let c = [1.0, 2.0, 0.0, 0.0, 3.0, 5.0, 0.0, 0.0];
        let want = (1.0f64 / 30.0).sqrt();
        assert!((rel_l2_rows(&a, &c, 2, 2, 4) - want).abs() < 1e-12);
    }

    #[test]
    fn poison_must_survive_outside_the_slice_only() {
        use super::poison_intact;
        let p = 0xFFFF;
        // Two rows of 4 with a 2-channel slice written.
        assert!(poison_intact(&[1, 2, p, p, 3, 4, p, p], 2, 4));
        assert!(!poison_intact(&[1, 2, p, p, 3, 4, 0, p], 2, 4));
        assert!(!poison_intact(&[1, 2, 7, p, 3, 4, p, p], 2, 4));
        // A whole row is all slice.
        assert!(poison_intact(&[1, 2, 3, 4], 4, 4));
    }

    #[test]
    fn samples_cover_the_start_the_middle_and_the_end() {
        use super::sample_ranges;
        assert_eq!(sample_ranges(10, 4), vec![(0, 10)]);
        assert_eq!(sample_ranges(12, 4), vec![(0, 12)]);
        assert_eq!(sample_ranges(100, 4), vec![(0, 4), (48, 4), (96, 4)]);
    }

    #[test]
    fn non_finite_or_short_buffers_never_pass() {
        assert_eq!(
            rel_l2_rows(&[1.0, f32::NAN], &[1.0, 1.0], 1, 2, 2),
            f64::INFINITY
        );
        assert_eq!(rel_l2_rows(&[1.0, 2.0], &[1.0], 1, 2, 2), f64::INFINITY);
        assert_eq!(rel_l2_rows(&[0.0], &[1.0], 1, 1, 1), f64::INFINITY);
        assert_eq!(rel_l2_rows(&[0.0], &[0.0], 1, 1, 1), 0.0);
    }
}
