//! Which convolutions the implicit GEMM takes, and the sizes of one launch.

use aperture_engine::backend::Activation;

use super::{Tile, TILE_M};
use crate::backend::ConvWeights;
use crate::kernels::Arg;

/// The sizes of one launch, checked against what the kernel assumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
    pub c_out: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    /// Output pixels (rows of the product).
    pub m: usize,
    /// `kh * kw * c` (the reduction).
    pub k: usize,
    pub kp: usize,
    pub tile: Tile,
    /// Channel tiles (the grid is pixel tiles x channel tiles, channel tile fastest).
    pub n_tiles: usize,
    pub blocks: usize,
}

/// A dense convolution's sizes, as `ConvWeights` holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DenseConv {
    pub c_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub kp: usize,
    pub depthwise: bool,
}

impl DenseConv {
    /// A 1x1 stride-1 product without padding.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    pub(crate) fn of(w: &ConvWeights) -> Self {
        Self {
            c_in: w.c_in,
            c_out: w.c_out,
            kh: w.kh,
            kw: w.kw,
            stride: w.spec.stride,
            pad: w.spec.padding,
            kp: w.kp,
            depthwise: w.depthwise,
        }
    }
}

impl Geometry {
    /// `None` when the kernel does not take this convolution (the caller keeps its
    /// previous path): depthwise, 1x1 stride-1 products (cuBLASLt does those well),
    /// input channel counts that are not multiples of 8, or sizes past 32-bit indices.
    /// Any output channel count is taken (odd ones store element by element).
    pub(crate) fn new(
        input: [usize; 4],
        out_hw: (usize, usize),
        cv: DenseConv,
        tile: Tile,
    ) -> Option<Self> {
        if cv.is_pointwise() {
            return None;
        }
        Self::any(input, out_hw, cv, tile)
    }

    /// A 1x1 stride-1 product on a `wgmma` tile (the kernel takes it as a 1x1
    /// convolution; see `plan_pointwise`), with [`Geometry::new`]'s other conditions.
    pub(crate) fn pointwise(
        input: [usize; 4],
        out_hw: (usize, usize),
        cv: DenseConv,
        tile: Tile,
    ) -> Option<Self> {
        if !cv.is_pointwise() || !Tile::WGMMA.contains(&tile) {
            return None;
        }
        Self::any(input, out_hw, cv, tile)
    }

    fn any(input: [usize; 4], out_hw: (usize, usize), cv: DenseConv, tile: Tile) -> Option<Self> {
        let [n, h, w, c] = input;
        let (oh, ow) = out_hw;
        if cv.depthwise || c != cv.c_in || cv.stride == 0 {
            return None;
        }
        if c == 0 || !c.is_multiple_of(8) || cv.c_out == 0 {
            return None;
        }
        let k = cv.kh.checked_mul(cv.kw)?.checked_mul(c)?;
        let m = n.checked_mul(oh)?.checked_mul(ow)?;
        let pixels_in = n.checked_mul(h)?.checked_mul(w)?;
        let limit = i32::MAX as usize - 2 * TILE_M;
        // The sentinel row offset in conv.cu is -2^30: taps and sizes stay far below it.
        let small = |v: usize| v < (1 << 28);
        if cv.kp != k || m == 0 || m > limit || k > limit || pixels_in > limit {
            return None;
        }
        if ![h, w, oh, ow, cv.kh, cv.kw, cv.pad, cv.c_out]
            .into_iter()
            .all(small)
            || !small(oh * cv.stride + cv.kh)
            || !small(ow * cv.stride + cv.kw)
        {
            return None;
        }
        let n_tiles = cv.c_out.div_ceil(tile.channels());
        let blocks = m.div_ceil(tile.pixels()).checked_mul(n_tiles)?;
        if blocks > i32::MAX as usize {
            return None;
        }
        Some(Self {
            h,
            w,
            c,
            oh,
            ow,
            c_out: cv.c_out,
            kw: cv.kw,
            stride: cv.stride,
            pad: cv.pad,
            m,
            k,
            kp: cv.kp,
            tile,
            n_tiles,
            blocks,
        })
    }

    /// The kernel's arguments after its five pointers, in declaration order, for input
    /// rows `ldx` and output rows `ldy` elements apart.
    pub(super) fn int_args(&self, act: Activation, ldx: usize, ldy: usize) -> [Arg; 16] {
        let i = |v: usize| Arg::I32(v as i32);
        [
            i(self.h),
            i(self.w),
            i(self.c),
            i(self.oh),
            i(self.ow),
            i(self.c_out),
            i(self.kw),
            i(self.stride),
            i(self.pad),
            i(self.m),
            i(self.k),
            i(self.kp),
            i(self.n_tiles),
            Arg::I32(crate::conv::act_code(act)),
            i(ldx),
            i(ldy),
        ]
    }
}
