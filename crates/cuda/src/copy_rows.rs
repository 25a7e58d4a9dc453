//! Row copies in 16-byte vectors (`copy_rows16` in kernels/conv.cu, loaded with the
//! implicit-GEMM module, so 16-bit storage on sm_80+): channel slices in and out of
//! concatenations. The element-wise kernels stay for everything else (fp32, channel
//! counts or offsets off multiples of 8).

use aperture_engine::Result;

use crate::backend::CudaBackend;
use crate::kernels::Arg;

/// Elements per 16-byte vector of 16-bit storage.
const VEC: usize = 8;

/// `rows` rows of `len` elements from `src` (rows `src_ld` elements apart) to `dst` (rows
/// `dst_ld` apart); the pointers already include any channel offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowCopy {
    pub src: u64,
    pub dst: u64,
    pub rows: usize,
    pub len: usize,
    pub src_ld: usize,
    pub dst_ld: usize,
}

impl RowCopy {
    /// Whether the vector kernel takes it at `esize` bytes per element: 16-bit elements,
    /// whole vectors everywhere, 16-byte aligned pointers, 32-bit counts.
    pub(crate) fn vectorisable(&self, esize: usize) -> bool {
        let limit = i32::MAX as usize;
        esize == 2
            && [self.len, self.src_ld, self.dst_ld]
                .iter()
                .all(|v| v.is_multiple_of(VEC))
            && self.src.is_multiple_of(16)
            && self.dst.is_multiple_of(16)
            && self.len > 0
            && self.rows.saturating_mul(self.len / VEC) < limit
            && self.src_ld / VEC < limit
            && self.dst_ld / VEC < limit
    }
}

impl CudaBackend {
    /// Whether [`CudaBackend::copy_vectorised`] would take `c`.
    pub(crate) fn can_copy_vectorised(&self, c: &RowCopy) -> bool {
        self.kernels.igemm.copy_rows().is_some() && c.vectorisable(self.esize())
    }

    /// Runs `c` on the vector kernel; `false`, with nothing launched, where it does not
    /// fit (the caller copies element-wise).
    pub(crate) fn copy_vectorised(&self, c: &RowCopy) -> Result<bool> {
        let Some(func) = self.kernels.igemm.copy_rows() else {
            return Ok(false);
        };
        if !c.vectorisable(self.esize()) {
            return Ok(false);
        }
        let vecs = c.len / VEC;
        let args = [
            Arg::Ptr(c.src),
            Arg::Ptr(c.dst),
            Arg::I32(c.rows as i32),
            Arg::I32(vecs as i32),
            Arg::I32((c.src_ld / VEC) as i32),
            Arg::I32((c.dst_ld / VEC) as i32),
        ];
        let grid = ((c.rows * vecs).div_ceil(256) as u32, 1, 1);
        crate::kernels::launch_function(&self.ctx, func, grid, 256, 0, &args)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(len: usize, src_ld: usize, dst_ld: usize, src: u64, dst: u64) -> RowCopy {
        RowCopy {
            src,
            dst,
            rows: 32 * 40 * 40,
            len,
            src_ld,
            dst_ld,
        }
    }

    #[test]
    fn takes_whole_vectors_of_16_bit_elements_only() {
        // ELAN's second half (384 of 768 channels) and an HG input into its concatenation.
        assert!(copy(384, 768, 384, 0x1000 + 384 * 2, 0x2000).vectorisable(2));
        assert!(copy(1024, 1024, 2560, 0x1000, 0x2000).vectorisable(2));
        // fp32 storage, lengths or strides off whole vectors, unaligned pointers, nothing.
        assert!(!copy(384, 768, 384, 0x1000, 0x2000).vectorisable(4));
        assert!(!copy(10, 24, 10, 0x1000, 0x2000).vectorisable(2));
        assert!(!copy(16, 24 + 4, 16, 0x1000, 0x2000).vectorisable(2));
        assert!(!copy(16, 24, 16, 0x1000 + 6, 0x2000).vectorisable(2));
        assert!(!copy(16, 24, 16, 0x1000, 0x2008).vectorisable(2));
        assert!(!copy(0, 24, 16, 0x1000, 0x2000).vectorisable(2));
        // Counts past 32 bits.
        let mut huge = copy(8, 8, 8, 0x1000, 0x2000);
        huge.rows = 1 << 31;
        assert!(!huge.vectorisable(2));
    }
}
