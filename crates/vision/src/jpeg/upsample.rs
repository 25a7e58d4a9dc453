//! Chroma upsampling as libjpeg-turbo does it with PIL's settings: "fancy"
//! (triangle-filter) upsampling for 2x factors (`jdsample.c`), replication for
//! the other integer factors. Works one output row at a time so that colour
//! conversion reads rows that are still in cache and no full-size chroma
//! planes are ever stored.

/// One component's samples at its own (downsampled) resolution, in a buffer
/// whose rows are `stride >= width` samples apart.
pub(crate) struct Plane {
    pub width: usize,
    pub height: usize,
    pub stride: usize,
    pub data: Vec<u8>,
}

impl Plane {
    /// Inverse DCT of block (`bx`, `by`) into place; blocks past the plane
    /// (MCU padding) are dropped.
    #[inline]
    pub(crate) fn put_block(&mut self, bx: usize, by: usize, coef: &[i16; 64], quant: &[u16; 64]) {
        let stride = self.stride;
        let off = by * 8 * stride + bx * 8;
        if bx * 8 < stride && off + 7 * stride + 8 <= self.data.len() {
            crate::jpeg::idct::idct_islow(coef, quant, &mut self.data[off..], stride);
        }
    }

    #[inline]
    fn row(&self, y: usize) -> &[u8] {
        &self.data[y * self.stride..y * self.stride + self.width]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Copy,
    H2V1,
    H1V2,
    H2V2,
    Replicate,
}

/// Produces the rows of one plane upsampled by integer factors (`fx`, `fy`).
pub(crate) struct RowUpsampler {
    plane: Plane,
    fx: usize,
    fy: usize,
    mode: Mode,
    /// The current output row, when it is not a row of `plane` itself.
    buf: Vec<u8>,
    /// Vertically filtered source row (fancy modes).
    sums: Vec<i32>,
    /// `Copy` mode: the source row of the current output row.
    src_row: usize,
}

impl RowUpsampler {
    pub(crate) fn new(plane: Plane, fx: usize, fy: usize) -> Self {
        // libjpeg uses the fancy filters only for components wider than 2 samples
        // in the 2x horizontal cases.
        let mode = match (fx, fy) {
            (1, 1) => Mode::Copy,
            (2, 1) if plane.width > 2 => Mode::H2V1,
            (1, 2) => Mode::H1V2,
            (2, 2) if plane.width > 2 => Mode::H2V2,
            _ => Mode::Replicate,
        };
        let wide = plane.width * fx;
        RowUpsampler {
            buf: vec![0; if mode == Mode::Copy { 0 } else { wide }],
            sums: vec![0; if mode == Mode::Copy { 0 } else { plane.width }],
            plane,
            fx,
            fy,
            mode,
            src_row: 0,
        }
    }

    /// Compute output row `y` (must be below `plane.height * fy`).
    pub(crate) fn prepare(&mut self, y: usize) {
        let p = &self.plane;
        let src = y / self.fy;
        // Fancy vertical filters blend with the row above for even output rows
        // and the row below for odd ones (edge rows repeated), biases 1 / 2.
        let even = y.is_multiple_of(2);
        let other = if even {
            src.saturating_sub(1)
        } else {
            (src + 1).min(p.height - 1)
        };
        match self.mode {
            Mode::Copy => self.src_row = src,
            Mode::H2V1 => {
                for (s, &v) in self.sums.iter_mut().zip(p.row(src)) {
                    *s = i32::from(v);
                }
                fancy_h2(&self.sums, &mut self.buf, (1, 2), 2);
            }
            Mode::H1V2 => {
                let bias = if even { 1 } else { 2 };
                for ((o, &a), &b) in self.buf.iter_mut().zip(p.row(src)).zip(p.row(other)) {
                    *o = ((i32::from(a) * 3 + i32::from(b) + bias) >> 2) as u8;
                }
            }
            Mode::H2V2 => {
                for ((s, &a), &b) in self.sums.iter_mut().zip(p.row(src)).zip(p.row(other)) {
                    *s = i32::from(a) * 3 + i32::from(b);
                }
                fancy_h2(&self.sums, &mut self.buf, (8, 7), 4);
            }
            Mode::Replicate => {
                let fx = self.fx;
                for (out, &v) in self.buf.chunks_exact_mut(fx).zip(p.row(src)) {
                    out.fill(v);
                }
            }
        }
    }

    /// The row computed by the last `prepare` (full upsampled width).
    #[inline]
    pub(crate) fn row(&self) -> &[u8] {
        match self.mode {
            Mode::Copy => self.plane.row(self.src_row),
            _ => &self.buf,
        }
    }
}

/// Horizontal 2x triangle filter: each output is 3 parts the nearer input and
/// 1 part the next nearer (the edge sample beyond the ends), plus `bias.0` for
/// left and `bias.1` for right outputs, shifted down by `shift`.
/// `src.len() >= 2` and `dst.len() == 2 * src.len()`.
fn fancy_h2(src: &[i32], dst: &mut [u8], (b0, b1): (i32, i32), shift: u32) {
    let w = src.len();
    let px = |this: i32, left: i32, right: i32| {
        [
            ((this * 3 + left + b0) >> shift) as u8,
            ((this * 3 + right + b1) >> shift) as u8,
        ]
    };
    let (first, rest) = dst.split_at_mut(2);
    first.copy_from_slice(&px(src[0], src[0], src[1]));
    for (win, out) in src.windows(3).zip(rest.chunks_exact_mut(2)) {
        out.copy_from_slice(&px(win[1], win[0], win[2]));
    }
    dst[2 * w - 2..].copy_from_slice(&px(src[w - 1], src[w - 2], src[w - 1]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsample(width: usize, height: usize, data: &[u8], fx: usize, fy: usize) -> Vec<u8> {
        let plane = Plane {
            width,
            height,
            stride: width,
            data: data.to_vec(),
        };
        let mut u = RowUpsampler::new(plane, fx, fy);
        let mut out = Vec::new();
        for y in 0..height * fy {
            u.prepare(y);
            out.extend_from_slice(u.row());
        }
        out
    }

    #[test]
    fn fancy_upsampling_of_a_step() {
        // One row 0, 100, 200 -> 2x: edges copy, inner samples 3:1 blends.
        assert_eq!(
            upsample(3, 1, &[0, 100, 200], 2, 1),
            [0, 25, 75, 125, 175, 200]
        );
        assert_eq!(upsample(1, 2, &[0, 100], 1, 2), [0, 25, 75, 100]);
        // 2x2: column blends 3:1 then row blends 3:1 over 16 with biases 8 / 7.
        // Rows 0 / 160 give column sums 0 (row 0 up), 160 (row 0 down), ...
        let got = upsample(3, 2, &[0, 0, 0, 160, 160, 160], 2, 2);
        assert_eq!(&got[..6], &[0; 6]);
        assert_eq!(&got[6..12], &[40; 6]);
        assert_eq!(&got[12..18], &[120; 6]);
        assert_eq!(&got[18..], &[160; 6]);
        // Narrow planes and other factors replicate.
        assert_eq!(upsample(2, 1, &[10, 20], 2, 1), [10, 10, 20, 20]);
        assert_eq!(upsample(1, 1, &[7], 3, 2), [7; 6]);
    }

    #[test]
    fn constant_planes_stay_constant() {
        for (fx, fy) in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (2, 4)] {
            let out = upsample(5, 3, &[77; 15], fx, fy);
            assert_eq!(out.len(), 15 * fx * fy);
            assert!(out.iter().all(|&v| v == 77));
        }
    }

    #[test]
    fn strided_rows_ignore_padding() {
        let plane = Plane {
            width: 3,
            height: 2,
            stride: 8,
            data: [[1, 2, 3, 99, 99, 99, 99, 99], [4, 5, 6, 99, 99, 99, 99, 99]].concat(),
        };
        let mut u = RowUpsampler::new(plane, 1, 1);
        u.prepare(1);
        assert_eq!(u.row(), [4, 5, 6]);
    }
}
