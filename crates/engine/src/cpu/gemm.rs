//! Row-parallel f32 matrix products on top of `matrixmultiply`'s packed kernels.

use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise packing of `b`.
const ROW_BLOCK: usize = 256;

/// `c[m, n] = a[m, k] * b[k, n] (+ c if accumulate)`; all row-major and contiguous.
/// Rows of `a`/`c` are split across the rayon pool.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(b.len(), k * n);
    debug_assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    c.par_chunks_mut(ROW_BLOCK * n)
        .enumerate()
        .for_each(|(blk, c_blk)| {
            let rows = c_blk.len() / n;
            let a_blk = &a[blk * ROW_BLOCK * k..(blk * ROW_BLOCK + rows) * k];
            matmul_serial(a_blk, b, c_blk, rows, k, n, beta);
        });
}

/// Single-threaded `c = a * b + beta * c` (row-major, contiguous).
pub fn matmul_serial(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, beta: f32) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v *= beta);
        return;
    }
    // SAFETY: the slices hold exactly m*k, k*n and m*n elements (checked by callers'
    // debug asserts and by construction), and the strides describe row-major layout.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        let (m, k, n) = (300, 7, 5);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let mut c = vec![1.0; m * n];
        matmul(&a, &b, &mut c, m, k, n, true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum::<f32>();
                assert_eq!(c[i * n + j], want);
            }
        }
    }
}
