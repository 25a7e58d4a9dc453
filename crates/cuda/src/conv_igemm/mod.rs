//! Dense k x k convolutions as an implicit GEMM on tensor cores (`kernels/conv.cu`): the
//! input patches are gathered into shared memory chunk by chunk instead of being written
//! out by im2col, and bias, activation and residual ride in the epilogue.
//!
//! Taken for 16-bit storage on sm_80+ when the input channel count is a multiple of 8 (an
//! 8-channel segment is one 16-byte copy); everything else (fp32/tf32, the 3-channel
//! image input, 1x1 products, depthwise) keeps its previous path. Three block shapes
//! (see [`Tile`]). `APERTURE_CONV_IGEMM=0` turns the kernel off, `=64` keeps only the 64-wide
//! tile (for A/B timing or as an escape hatch).

use crate::kernels::{preamble, Storage, MATH_SOURCE};

mod geometry;
mod launch;
mod load;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub(crate) use geometry::{DenseConv, Geometry};
pub(crate) use launch::{plan, run, run_strided};
pub(crate) use load::IgemmSlot;

pub const CONV_SOURCE: &str = include_str!("../../kernels/conv.cu");
/// Restormer's fused front halves (crate::front), built on conv.cu's helpers.
pub const FRONT_SOURCE: &str = include_str!("../../kernels/front.cu");

/// Pixels per block of the two large tiles (`conv.cu`'s IG_BM; a test checks).
const TILE_M: usize = 128;
/// Pixels per block of the small tile (`IG_BM_SMALL`).
const TILE_M_SMALL: usize = 64;
/// Environment switch: `0` keeps every convolution on the im2col path, `64` uses only
/// the 64-channel tile (for A/B timing of the two shapes).
const ENV_SWITCH: &str = "APERTURE_CONV_IGEMM";

/// The block shapes of `conv.cu`: pixels x output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    /// `conv_igemm`: 128 x 64, 4 warps.
    N64,
    /// `conv_igemm_n128`: 128 x 128, 8 warps, half the input traffic per product.
    N128,
    /// `conv_igemm_m64`: 64 x 64, 4 warps: twice the blocks of `N64` for small grids.
    M64,
}

impl Tile {
    const ALL: [Tile; 3] = [Tile::N64, Tile::N128, Tile::M64];

    fn entry(self) -> &'static str {
        match self {
            Tile::N64 => "conv_igemm",
            Tile::N128 => "conv_igemm_n128",
            Tile::M64 => "conv_igemm_m64",
        }
    }
    /// The operation's name in profiles.
    pub(crate) fn op_name(self) -> &'static str {
        match self {
            Tile::N64 => "conv_igemm",
            Tile::N128 => "conv_igemm_wide",
            Tile::M64 => "conv_igemm_m64",
        }
    }
    /// Warps along the channels (two along the pixels).
    pub(crate) fn warps_n(self) -> usize {
        match self {
            Tile::N64 | Tile::M64 => 2,
            Tile::N128 => 4,
        }
    }
    pub(crate) fn channels(self) -> usize {
        32 * self.warps_n()
    }
    /// Output pixels per block.
    pub(crate) fn pixels(self) -> usize {
        match self {
            Tile::N64 | Tile::N128 => TILE_M,
            Tile::M64 => TILE_M_SMALL,
        }
    }
    fn threads(self) -> u32 {
        64 * self.warps_n() as u32
    }
    /// Dynamic shared memory: 3 stages of A [pixels][40] and B [channels][40], 2 bytes
    /// each (`IG_SMEM_BYTES` in conv.cu).
    fn smem_bytes(self) -> u32 {
        (3 * (self.pixels() + self.channels()) * 40 * 2) as u32
    }
    fn blocks(self, c_out: usize, m: usize) -> usize {
        m.div_ceil(self.pixels()) * c_out.div_ceil(self.channels())
    }

    /// The wide tile where the outputs fill it and it still gives every multiprocessor
    /// a block; else the 128 x 64 one where it gives each two; else the small one (a
    /// grid of fewer blocks leaves most of each multiprocessor's warp slots empty, as at
    /// batch 1 on 40x40 and 20x20 maps).
    pub(crate) fn choose(c_out: usize, m: usize, multiprocessors: usize, wide_ok: bool) -> Tile {
        let wide = Tile::N128.blocks(c_out, m);
        if wide_ok && c_out > Tile::N64.channels() && wide >= multiprocessors {
            Tile::N128
        } else if Tile::N64.blocks(c_out, m) >= 2 * multiprocessors {
            Tile::N64
        } else {
            Tile::M64
        }
    }
}

/// The translation unit for a storage type, or `None` for fp32 (no 16-bit tensor-core
/// product to run).
pub fn conv_source(s: Storage) -> Option<String> {
    let select = match s {
        Storage::F32 => return None,
        Storage::F16 => "",
        Storage::BF16 => "#define IGEMM_BF16 1\n",
    };
    Some(format!(
        "{}\n{}\n{select}{CONV_SOURCE}\n{FRONT_SOURCE}\n",
        preamble(s),
        MATH_SOURCE
    ))
}
