//! A 1x1 convolution over a channel concatenation that is never written
//! (`kernels/conv_sources.cu`): the kernel reads each part where it lies, so the layers
//! producing the parts keep their own packed outputs and nothing is copied.

use aperture_engine::backend::Activation;
use aperture_engine::{EngineError, Result};

use super::{IgemmSlot, Tile};
use crate::backend::{ConvWeights, CudaBackend};
use crate::conv::act_code;
use crate::kernels::Arg;

/// Parts one launch reads (`SRC_PARTS`).
pub(crate) const MAX_PARTS: usize = 8;
/// K elements per chunk (`WG_BK`): every part's channel count is a multiple, so a chunk
/// lies in one part.
pub(crate) const CHUNK: usize = 64;
/// Threads per block of both entry points.
const THREADS: u32 = 256;

/// One part of the concatenation: `channels` per pixel at `ptr`, pixel rows `ld`
/// elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub ptr: u64,
    pub ld: usize,
    pub channels: usize,
}

/// The kernel's two table arguments (`SrcPointers`, `SrcLayout`) as 16 ints each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PartTable {
    pointers: [i32; 16],
    layout: [i32; 16],
}

impl PartTable {
    /// The table for `parts` read as `k` concatenated channels, or why the kernel
    /// cannot read them.
    pub(crate) fn new(parts: &[Part], k: usize) -> std::result::Result<Self, String> {
        let Some(first) = parts.first() else {
            return Err("no parts".into());
        };
        if parts.len() > MAX_PARTS {
            return Err(format!("{} parts, at most {MAX_PARTS}", parts.len()));
        }
        let mut pointers = [0i32; 16];
        let mut layout = [0i32; 16];
        let mut end = 0usize;
        for (i, p) in parts.iter().enumerate() {
            if p.channels == 0 || !p.channels.is_multiple_of(CHUNK) {
                return Err(format!(
                    "part {i} has {} channels, not a multiple of {CHUNK}",
                    p.channels
                ));
            }
            if p.ld < p.channels || !p.ld.is_multiple_of(8) || p.ld >= i32::MAX as usize {
                return Err(format!("part {i} has rows {} elements apart", p.ld));
            }
            if !p.ptr.is_multiple_of(16) {
                return Err(format!("part {i} at {:#x} is not 16-byte aligned", p.ptr));
            }
            end += p.channels;
            set_pointer(&mut pointers, i, p.ptr);
            layout[i] = p.ld as i32;
            layout[MAX_PARTS + i] = i32::try_from(end).map_err(|_| "too many channels")?;
        }
        if end != k {
            return Err(format!("the parts have {end} channels, the weights {k}"));
        }
        // Unused entries: a valid pointer and the end of K, so no chunk selects them.
        for i in parts.len()..MAX_PARTS {
            set_pointer(&mut pointers, i, first.ptr);
            layout[MAX_PARTS + i] = end as i32;
        }
        Ok(Self { pointers, layout })
    }
}

/// Entry `i` of `SrcPointers`: the little-endian halves of a 64-bit pointer.
fn set_pointer(words: &mut [i32; 16], i: usize, ptr: u64) {
    words[2 * i] = ptr as u32 as i32;
    words[2 * i + 1] = (ptr >> 32) as u32 as i32;
}

/// Whether the kernels are loaded (an sm_90a build on a Hopper GPU, 16-bit storage).
pub(crate) fn loaded(be: &CudaBackend) -> bool {
    matches!(&be.kernels.igemm, IgemmSlot::Ready(k) if k.sources.is_some())
}

/// Whether the weights are a plain 1x1 product the kernel reads row by row.
pub(crate) fn takes_weights(w: &ConvWeights) -> bool {
    crate::conv::plain_product(w.kh, w.kw, w.spec)
        && !w.depthwise
        && w.kp == w.c_in
        && w.weight.ptr().is_multiple_of(16)
}

/// `y = act(w . concat(parts) + bias)` over `pixels` rows (`y` whole: rows `c_out`
/// apart).
pub(crate) fn run(
    be: &CudaBackend,
    table: &PartTable,
    pixels: usize,
    w: &ConvWeights,
    act: Activation,
    y: u64,
) -> Result<()> {
    let IgemmSlot::Ready(kernel) = &be.kernels.igemm else {
        return Err(EngineError::Device(
            "concatenation-free product planned without its module".into(),
        ));
    };
    let funcs = kernel.sources.ok_or_else(|| {
        EngineError::Device("concatenation-free product planned without its kernel".into())
    })?;
    let (func, tile) = if w.c_out <= Tile::Wg64.channels() {
        (funcs[0], Tile::Wg64)
    } else {
        (funcs[1], Tile::Wg128)
    };
    let n_tiles = w.c_out.div_ceil(tile.channels());
    let blocks = pixels
        .div_ceil(tile.pixels())
        .checked_mul(n_tiles)
        .filter(|&b| b <= u32::MAX as usize && pixels < i32::MAX as usize)
        .ok_or_else(|| {
            EngineError::Shape(format!("{pixels} pixels are too many for one launch"))
        })?;
    let int = |v: usize| Arg::I32(v as i32);
    let args = [
        Arg::I32x16(table.pointers),
        Arg::I32x16(table.layout),
        Arg::Ptr(w.weight.ptr()),
        Arg::Ptr(w.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
        Arg::Ptr(y),
        int(pixels),
        int(w.c_in),
        int(w.c_out),
        int(n_tiles),
        Arg::I32(act_code(act)),
        int(w.c_out),
    ];
    crate::kernels::launch_function(
        &be.ctx,
        func,
        (blocks as u32, 1, 1),
        THREADS,
        tile.smem_bytes(),
        &args,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(ptr: u64, channels: usize) -> Part {
        Part {
            ptr,
            ld: channels,
            channels,
        }
    }

    #[test]
    fn table_holds_pointers_strides_and_running_ends() {
        let parts = [part(0x1_0000_0200, 128), part(0x2000, 64), part(0x4000, 64)];
        let t = PartTable::new(&parts, 256).expect("table");
        assert_eq!(&t.pointers[..6], &[0x200, 1, 0x2000, 0, 0x4000, 0]);
        // Unused entries point at the first part.
        assert_eq!(&t.pointers[6..8], &[0x200, 1]);
        assert_eq!(&t.layout[..4], &[128, 64, 64, 0]);
        assert_eq!(&t.layout[8..], &[128, 192, 256, 256, 256, 256, 256, 256]);
    }

    #[test]
    fn table_refuses_what_the_kernel_cannot_read() {
        let ok = part(0x1000, 64);
        let cases: [(&[Part], usize, &str); 6] = [
            (&[], 0, "no parts"),
            (&[ok; 9], 576, "9 parts"),
            (&[ok, part(0x2000, 96)], 160, "96 channels"),
            (&[ok, part(0x2008, 64)], 128, "not 16-byte aligned"),
            (&[ok, Part { ld: 68, ..ok }], 128, "68 elements apart"),
            (&[ok, ok], 192, "128 channels, the weights 192"),
        ];
        for (parts, k, why) in cases {
            let e = PartTable::new(parts, k).expect_err(why);
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
    }
}
