//! Dense k x k convolutions as an implicit GEMM on tensor cores (`kernels/conv.cu`): the
//! input patches are gathered into shared memory chunk by chunk instead of being written
//! out by im2col, and bias, activation and residual ride in the epilogue.
//!
//! Taken for 16-bit storage on sm_80+ when the input channel count is a multiple of 8 (an
//! 8-channel segment is one 16-byte copy); everything else (fp32/tf32, the 3-channel
//! image input, 1x1 products, depthwise) keeps its previous path. Three `mma.sync` block
//! shapes and, on Hopper (the module built for sm_90a), two `wgmma` ones (see [`Tile`]).
//! `APERTURE_CONV_IGEMM=0` turns the kernel off, `=64` keeps only the 64-wide `mma.sync`
//! tile (for A/B timing or as an escape hatch); `APERTURE_WGMMA=0` keeps the `mma.sync`
//! tiles only, `=force` takes the `wgmma` tiles for every grid (for checks).

use crate::kernels::{preamble, Storage, MATH_SOURCE};

mod geometry;
mod launch;
mod load;
#[cfg(test)]
mod sim;
pub(crate) mod sources;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod ws_model;

pub(crate) use geometry::{DenseConv, Geometry};
pub(crate) use launch::{
    plan, plan_pointwise, pointwise_wanted, run, run_strided, strided_output_staged,
};
pub(crate) use load::IgemmSlot;

pub const CONV_SOURCE: &str = include_str!("../../kernels/conv.cu");
/// Restormer's fused front halves (crate::front), built on conv.cu's helpers.
pub const FRONT_SOURCE: &str = include_str!("../../kernels/front.cu");
/// The `wgmma` tiles, appended to conv.cu's translation unit (empty kernels unless built
/// for sm_90a).
pub const WGMMA_SOURCE: &str = include_str!("../../kernels/conv_wgmma.cu");
/// The concatenation-free 1x1 products on `wgmma` ([`sources`]), after conv_wgmma.cu.
pub const SOURCES_SOURCE: &str = include_str!("../../kernels/conv_sources.cu");
/// Depthwise convolutions on `mma.sync` (crate::depthwise_mma), after conv.cu.
pub const DEPTHWISE_MMA_SOURCE: &str = include_str!("../../kernels/depthwise_mma.cu");
/// Few-taps dense convolutions on `mma.sync` (crate::conv_small), after conv.cu.
pub const SMALL_TAPS_MMA_SOURCE: &str = include_str!("../../kernels/small_taps_mma.cu");

/// Pixels per block of the two large tiles (`conv.cu`'s IG_BM; a test checks).
const TILE_M: usize = 128;
/// Pixels per block of the small tile (`IG_BM_SMALL`).
const TILE_M_SMALL: usize = 64;
/// K stages of the `wgmma` tiles (`WG_STAGES_N128`, `WG_STAGES_N64`; a test checks).
const WG_STAGES_N192: usize = 4;
const WG_STAGES_N128: usize = 5;
const WG_STAGES_N64: usize = 4;
/// Environment switch: `0` keeps every convolution on the im2col path, `64` uses only
/// the 64-channel tile (for A/B timing of the two shapes).
const ENV_SWITCH: &str = "APERTURE_CONV_IGEMM";
/// Environment switch of the `wgmma` tiles: `0` off, `force` for every grid, `ws` as
/// their warp-specialised kernels, `ws-force` both.
const WGMMA_SWITCH: &str = "APERTURE_WGMMA";

/// Whether `APERTURE_WGMMA` asks for the warp-specialised kernels (`ws`, `ws-force`):
/// only then are they compiled (`WG_WARP_SPECIALISED` in conv_wgmma.cu).
fn warp_specialised_requested() -> bool {
    std::env::var(WGMMA_SWITCH).is_ok_and(|v| v.trim().starts_with("ws"))
}

/// The block shapes: pixels x output channels. The first three are `conv.cu`'s
/// (`mma.sync`), the last two `conv_wgmma.cu`'s (Hopper's `wgmma`, sm_90a only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    /// `conv_igemm`: 128 x 64, 4 warps.
    N64,
    /// `conv_igemm_n128`: 128 x 128, 8 warps, half the input traffic per product.
    N128,
    /// `conv_igemm_m64`: 64 x 64, 4 warps: twice the blocks of `N64` for small grids.
    M64,
    /// `conv_wgmma_n192`: 128 x 192, two warpgroups, four 64-wide K stages.
    Wg192,
    /// `conv_wgmma_n128`: 128 x 128, two warpgroups, five stages.
    Wg128,
    /// `conv_wgmma_n64`: 128 x 64, two warpgroups, four stages (two blocks per SM).
    Wg64,
}

/// Which tiles a loaded module offers [`Tile::choose`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tiles {
    /// `conv_igemm_n128` got its shared memory.
    pub wide: bool,
    /// The `wgmma` tiles are loaded (an sm_90a build on a Hopper GPU).
    pub wgmma: bool,
    /// Take the `wgmma` tiles whatever the grid (`APERTURE_WGMMA=force`, for checks).
    pub wgmma_always: bool,
    /// The `wgmma` tiles run as their warp-specialised kernels (`APERTURE_WGMMA=ws`).
    pub warp_specialised: bool,
}

/// Threads of the warp-specialised `wgmma` kernels: a copying warpgroup and two that
/// multiply (`conv_wgmma_ws_*`).
const WS_THREADS: u32 = 384;
/// Shared memory of their mbarriers, after the stages (2 x stages x 8 bytes, rounded).
const WS_BARRIER_BYTES: u32 = 256;

impl Tile {
    /// The `mma.sync` tiles, always loaded together (the host model in `sim` covers them).
    const ALL: [Tile; 3] = [Tile::N64, Tile::N128, Tile::M64];
    /// The `wgmma` tiles, loaded where the module was built for sm_90a.
    pub(crate) const WGMMA: [Tile; 3] = [Tile::Wg192, Tile::Wg128, Tile::Wg64];

    fn entry(self) -> &'static str {
        match self {
            Tile::N64 => "conv_igemm",
            Tile::N128 => "conv_igemm_n128",
            Tile::M64 => "conv_igemm_m64",
            Tile::Wg192 => "conv_wgmma_n192",
            Tile::Wg128 => "conv_wgmma_n128",
            Tile::Wg64 => "conv_wgmma_n64",
        }
    }
    /// The warp-specialised kernel of a `wgmma` tile.
    fn ws_entry(self) -> Option<&'static str> {
        match self {
            Tile::Wg192 => Some("conv_wgmma_ws_n192"),
            Tile::Wg128 => Some("conv_wgmma_ws_n128"),
            Tile::Wg64 => Some("conv_wgmma_ws_n64"),
            _ => None,
        }
    }
    /// The operation's name in profiles.
    pub(crate) fn op_name(self) -> &'static str {
        match self {
            Tile::N64 => "conv_igemm",
            Tile::N128 => "conv_igemm_wide",
            Tile::M64 => "conv_igemm_m64",
            Tile::Wg192 => "conv_wgmma_n192",
            Tile::Wg128 => "conv_wgmma",
            Tile::Wg64 => "conv_wgmma_n64",
        }
    }
    /// Warps along the channels of the `mma.sync` tiles (two along the pixels).
    #[cfg(test)]
    pub(crate) fn warps_n(self) -> usize {
        self.channels() / 32
    }
    pub(crate) fn channels(self) -> usize {
        match self {
            Tile::N64 | Tile::M64 | Tile::Wg64 => 64,
            Tile::N128 | Tile::Wg128 => 128,
            Tile::Wg192 => 192,
        }
    }
    /// Output pixels per block.
    pub(crate) fn pixels(self) -> usize {
        match self {
            Tile::M64 => TILE_M_SMALL,
            _ => TILE_M,
        }
    }
    fn threads(self) -> u32 {
        match self {
            Tile::N64 | Tile::M64 => 128,
            Tile::N128 | Tile::Wg192 | Tile::Wg128 | Tile::Wg64 => 256,
        }
    }
    /// Dynamic shared memory. `mma.sync` tiles: 3 stages of A [pixels][40] and B
    /// [channels][40] (`IG_SMEM_BYTES` in conv.cu); `wgmma` tiles: their stages of A
    /// [128][64] and B [channels][64] and 1 KB of alignment (`WG_SMEM_BYTES`); 2 bytes an
    /// element.
    fn smem_bytes(self) -> u32 {
        let rows = self.pixels() + self.channels();
        let bytes = match self {
            Tile::N64 | Tile::N128 | Tile::M64 => 3 * rows * 40 * 2,
            Tile::Wg192 => WG_STAGES_N192 * rows * 64 * 2 + 1024,
            Tile::Wg128 => WG_STAGES_N128 * rows * 64 * 2 + 1024,
            Tile::Wg64 => WG_STAGES_N64 * rows * 64 * 2 + 1024,
        };
        bytes as u32
    }
    /// Threads and shared memory of the kernel that runs this tile.
    fn launch_shape(self, warp_specialised: bool) -> (u32, u32) {
        if warp_specialised && Tile::WGMMA.contains(&self) {
            (WS_THREADS, self.ws_smem_bytes())
        } else {
            (self.threads(), self.smem_bytes())
        }
    }
    /// Shared memory of the warp-specialised kernel: the stages and the mbarriers.
    fn ws_smem_bytes(self) -> u32 {
        self.smem_bytes() + WS_BARRIER_BYTES
    }
    /// Blocks a multiprocessor runs at once (the kernels' `__launch_bounds__`).
    fn blocks_per_multiprocessor(self) -> usize {
        match self {
            Tile::N64 | Tile::M64 => 4,
            Tile::N128 | Tile::Wg64 => 2,
            Tile::Wg192 | Tile::Wg128 => 1,
        }
    }
    fn blocks(self, c_out: usize, m: usize) -> usize {
        m.div_ceil(self.pixels()) * c_out.div_ceil(self.channels())
    }

    /// Where loaded, the `wgmma` tile whose grid gives every multiprocessor a block and
    /// that pads the output channels least (the wider on ties: fewer input re-reads);
    /// else the `mma.sync` wide tile where the outputs fill it and it still gives every
    /// multiprocessor a block; else the 128 x 64 one where it gives each two; else the
    /// small one (a grid of fewer blocks leaves most of each multiprocessor's warp slots
    /// empty, as at batch 1 on 40x40 and 20x20 maps).
    pub(crate) fn choose(c_out: usize, m: usize, multiprocessors: usize, t: Tiles) -> Tile {
        if t.wgmma {
            let padded = |tile: Tile| c_out.div_ceil(tile.channels()) * tile.channels();
            let best = Tile::WGMMA
                .into_iter()
                .filter(|&tile| t.wgmma_always || tile.blocks(c_out, m) >= multiprocessors)
                .min_by_key(|&tile| (padded(tile), usize::MAX - tile.channels()));
            if let Some(tile) = best {
                return tile;
            }
        }
        let wide = Tile::N128.blocks(c_out, m);
        if t.wide && c_out > Tile::N64.channels() && wide >= multiprocessors {
            Tile::N128
        } else if Tile::N64.blocks(c_out, m) >= 2 * multiprocessors {
            Tile::N64
        } else {
            Tile::M64
        }
    }
}

/// Kernels of the convolution module that are built only on request (their compile
/// time at a first start): the warp-specialised `wgmma` tiles (`APERTURE_WGMMA=ws`),
/// the tensor-core depthwise kernels (`APERTURE_DEPTHWISE_MMA=1`) and the staged
/// small-taps kernels (`APERTURE_SMALL_TAPS=staged`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvExtras {
    pub warp_specialised: bool,
    pub depthwise_mma: bool,
    pub staged_small_taps: bool,
}

/// The translation unit for a storage type, or `None` for fp32 (no 16-bit tensor-core
/// product to run), with the optional kernels `extras` asks for.
pub fn conv_source(s: Storage, extras: ConvExtras) -> Option<String> {
    let select = match s {
        Storage::F32 => return None,
        Storage::F16 => "",
        Storage::BF16 => "#define IGEMM_BF16 1\n",
    };
    let ws = if extras.warp_specialised {
        "#define WG_WARP_SPECIALISED 1\n"
    } else {
        ""
    };
    let staged = if extras.staged_small_taps {
        "#define SMALL_TAPS_STAGED 1\n"
    } else {
        ""
    };
    let depthwise = if extras.depthwise_mma {
        DEPTHWISE_MMA_SOURCE
    } else {
        ""
    };
    Some(format!(
        "{}\n{}\n{select}{ws}{staged}{CONV_SOURCE}\n{FRONT_SOURCE}\n{depthwise}\n{SMALL_TAPS_MMA_SOURCE}\n{WGMMA_SOURCE}\n{SOURCES_SOURCE}\n",
        preamble(s),
        MATH_SOURCE
    ))
}
