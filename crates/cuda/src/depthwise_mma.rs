//! Depthwise 3x3 and 5x5 convolutions (stride 1) on tensor cores (`dwm*` in
//! kernels/depthwise_mma.cu, loaded with the 16-bit convolution module): the plan of a
//! launch (channels and columns per block, strip height, grid, shared memory).

use aperture_engine::backend::Activation;
use aperture_engine::Result;

use crate::backend::{ConvWeights, CudaBackend, CudaTensor};
use crate::conv::act_code;
use crate::conv_igemm::IgemmSlot;
use crate::cudnn_conv::{DenseLaunch, DensePtrs};
use crate::kernels::Arg;

/// Input rows staged beyond those a step reads (DWM_AHEAD_ROWS in the kernel).
const AHEAD_ROWS: usize = 2;
/// 16-byte pieces of a staged row one thread copies at most (DWM_PIECES).
const PIECES_PER_THREAD: usize = 4;
/// Output columns per block at most: wider maps are split into column tiles.
const MAX_COLUMNS: usize = 64;
/// Blocks per multiprocessor the kernels are built for (their launch bounds); a plan
/// leaves shared memory for that many.
const BLOCKS_PER_SM: usize = 3;
/// Shared memory per multiprocessor a plan may count on (H100: 228 KB, 1 KB reserved
/// per block).
const SM_SHARED: usize = 228 * 1024;
/// The limit on grid.y (images x strips).
const MAX_GRID_Y: usize = 65_535;

/// The entry points: kernel size, warps (8-channel groups) per block, name.
pub(crate) const KERNELS: [(usize, usize, &str); 6] = [
    (3, 4, "dwm3_w4"),
    (3, 6, "dwm3_w6"),
    (3, 8, "dwm3_w8"),
    (5, 4, "dwm5_w4"),
    (5, 6, "dwm5_w6"),
    (5, 8, "dwm5_w8"),
];

/// Dynamic shared memory a `dwm*` kernel is loaded with: the most a plan takes.
pub(crate) const MAX_SMEM: usize = SM_SHARED / BLOCKS_PER_SM - 1024;

/// Rows of the kernel's ring: the k + 1 rows a step reads, two rows in flight and the
/// two a step stages (NR in depthwise_mma.cu).
const fn ring_rows(k: usize) -> usize {
    2 * (k.div_ceil(2) + AHEAD_ROWS / 2) + 2
}

/// The ring's bytes: rows of `bw + k - 1` staged pixels of 8 `warps` channels, each
/// pixel 16 bytes wider than its channels.
const fn smem_bytes(k: usize, warps: usize, bw: usize) -> usize {
    ring_rows(k) * (bw + k - 1) * (16 * warps + 16)
}

/// One launch of a `dwm*` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MmaPlan {
    pub k: usize,
    pub warps: usize,
    pub rows: usize,
    pub bw: usize,
    pub grid: (u32, u32, u32),
    pub smem: u32,
}

impl MmaPlan {
    /// The plan for a k x k stride-1 depthwise convolution of `x` (NHWC `[n, h, w, c]`)
    /// on a GPU with `sms` multiprocessors; `None` where the kernels do not apply.
    pub(crate) fn shape([n, h, w, c]: [usize; 4], k: usize, sms: usize) -> Option<Self> {
        if !(k == 3 || k == 5) || n == 0 || h == 0 || w == 0 || !c.is_multiple_of(8) || c == 0 {
            return None;
        }
        // The widest block that splits the channels into whole blocks (8 warps when none
        // does: the last block's spare warps idle).
        let warps = [8, 6, 4]
            .into_iter()
            .find(|&g| c.is_multiple_of(8 * g))
            .unwrap_or(8);
        // Column tiles of at most MAX_COLUMNS, narrower where the ring would not leave room
        // for BLOCKS_PER_SM blocks.
        let mut tiles = w.div_ceil(MAX_COLUMNS);
        while smem_bytes(k, warps, w.div_ceil(tiles)) > MAX_SMEM {
            tiles += 1;
        }
        let bw = w.div_ceil(tiles);
        let smem = smem_bytes(k, warps, bw);
        if (bw + k - 1) * warps > PIECES_PER_THREAD * 32 * warps {
            return None;
        }
        let base = c.div_ceil(8 * warps) * n * tiles;
        // Strips of at least two rows, minimising the staged rows of the busiest
        // multiprocessor (its blocks share its bandwidth, however many run at once:
        // blocks per multiprocessor times rows plus the halo); ties go to fewer strips.
        let sms = sms.max(1);
        let cost = |strips: usize| (base * strips).div_ceil(sms) * (h.div_ceil(strips) + k - 1);
        let strips = (1..=h.div_ceil(2)).min_by_key(|&s| (cost(s), s))?;
        let rows = h.div_ceil(strips);
        let strips = h.div_ceil(rows);
        if n * strips > MAX_GRID_Y {
            return None;
        }
        Some(Self {
            k,
            warps,
            rows,
            bw,
            grid: (
                c.div_ceil(8 * warps) as u32,
                (n * strips) as u32,
                tiles as u32,
            ),
            smem: smem as u32,
        })
    }

    /// The kernel's name (every plan's kernel size and warps have an entry point).
    pub(crate) fn kernel(&self) -> Option<&'static str> {
        KERNELS
            .iter()
            .find(|&&(k, g, _)| k == self.k && g == self.warps)
            .map(|&(_, _, name)| name)
    }
}

/// Whether `APERTURE_DEPTHWISE_MMA=1` asks for the tensor-core kernels (only then are
/// they compiled into the convolution module). Off by default:
/// on the H100 they ran slower than the FMA kernels (docs/cuda.md, "Depthwise on tensor
/// cores"), because seven of every eight products are zeros and `mma.sync` issues them
/// all.
pub(crate) fn requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("APERTURE_DEPTHWISE_MMA").is_ok_and(|v| v.trim() == "1"))
}

/// Runs the depthwise convolution on tensor cores where asked for and the kernel applies (square 3x3
/// or 5x5, stride 1, padding k/2, 16-bit storage, channels a multiple of 8, aligned
/// tensors), writing output pixels `ldo` elements apart at `y`; `false`, with nothing
/// launched, elsewhere.
pub(crate) fn try_run(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    (y, ldo): (u64, usize),
) -> Result<bool> {
    let [_, h, wd, c] = x.dims;
    let IgemmSlot::Ready(kernels) = &be.kernels.igemm else {
        return Ok(false);
    };
    let square = w.kh == w.kw && w.spec.padding == w.kh / 2 && w.spec.stride == 1;
    let aligned = x.ptr().is_multiple_of(16)
        && y.is_multiple_of(4)
        && residual.is_none_or(|r| r.ptr().is_multiple_of(4));
    let fits = square
        && requested()
        && aligned
        && ldo >= c
        && ldo.is_multiple_of(2)
        && h * wd * ldo <= i32::MAX as usize;
    if !fits {
        return Ok(false);
    }
    let sms = be.multiprocessors().max(1) as usize;
    let Some(plan) = MmaPlan::shape(x.dims, w.kh, sms) else {
        return Ok(false);
    };
    let Some(func) = plan.kernel().and_then(|name| kernels.depthwise(name)) else {
        return Ok(false);
    };
    let mut args = crate::depthwise::pointer_args(x, y, w, residual);
    args.extend([h, wd, c, plan.rows, plan.bw].map(|v| Arg::I32(v as i32)));
    args.push(Arg::I32(act_code(act)));
    args.push(Arg::I32(ldo as i32));
    let launch = DenseLaunch::new(x.dims, c, w, (h, wd), ldo, act, residual.is_some());
    let ptrs = DensePtrs::of(x.ptr(), w, residual.map(|r| r.ptr()), y);
    let threads = (32 * plan.warps) as u32;
    crate::cudnn_conv::run_dense(be, &launch, &ptrs, || {
        Ok(crate::kernels::launch_function(
            &be.ctx, func, plan.grid, threads, plan.smem, &args,
        )?)
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_dfine_and_restormer_maps() {
        // D-FINE-X's 5x5 at 40x40x256, batch 64: 64-channel blocks, one column tile, one
        // strip (two blocks per multiprocessor beat more strips with their halos).
        let p = MmaPlan::shape([64, 40, 40, 256], 5, 132).expect("fits");
        assert_eq!((p.warps, p.bw, p.rows, p.grid), (8, 40, 40, (4, 64, 1)));
        assert_eq!(p.kernel(), Some("dwm5_w8"));
        assert_eq!(p.smem as usize, 10 * 44 * 144);
        // Batch 1: short strips to fill the GPU.
        let p = MmaPlan::shape([1, 40, 40, 256], 5, 132).expect("fits");
        assert_eq!(p.rows, 2);
        // Restormer's qkv 3x3 at 512x512x144: 48-channel blocks, eight 64-column tiles.
        let p = MmaPlan::shape([2, 512, 512, 144], 3, 132).expect("fits");
        assert_eq!((p.warps, p.bw, p.grid.0, p.grid.2), (6, 64, 3, 8));
        assert_eq!(p.kernel(), Some("dwm3_w6"));
        // 576 channels (64-channel blocks): a 64-column ring still leaves room for three
        // blocks; a 5x5's does not, so its tiles narrow.
        let p = MmaPlan::shape([2, 128, 128, 576], 3, 132).expect("fits");
        assert_eq!((p.warps, p.bw, p.grid.2), (8, 64, 2));
        let p = MmaPlan::shape([2, 128, 128, 576], 5, 132).expect("fits");
        assert_eq!((p.warps, p.bw, p.grid.2), (8, 43, 3));
        assert!(3 * (p.smem as usize + 1024) <= SM_SHARED);
        // 80 columns split in two tiles of 40.
        let p = MmaPlan::shape([1, 80, 80, 64], 3, 132).expect("fits");
        assert_eq!((p.bw, p.grid.2), (40, 2));
        // Channels off the 8-channel groups, other kernel sizes, empty maps: none.
        assert!(MmaPlan::shape([1, 40, 40, 12], 5, 132).is_none());
        assert!(MmaPlan::shape([1, 40, 40, 64], 7, 132).is_none());
        assert!(MmaPlan::shape([0, 40, 40, 64], 5, 132).is_none());
        // Every strip is non-empty and they cover the map; the ring fits the load.
        for h in 1..40 {
            let p = MmaPlan::shape([3, h, 24, 64], 5, 132).expect("fits");
            let strips = p.grid.1 as usize / 3;
            assert!(p.rows * strips >= h && p.rows * (strips - 1) < h, "h {h}");
            assert!(p.smem as usize <= MAX_SMEM);
        }
    }

    #[test]
    fn constants_match_the_kernel() {
        let src = crate::conv_igemm::DEPTHWISE_MMA_SOURCE;
        assert_eq!(
            crate::kernels::source_define(src, "depthwise_mma.cu", "DWM_AHEAD_ROWS"),
            AHEAD_ROWS
        );
        assert_eq!(
            crate::kernels::source_define(src, "depthwise_mma.cu", "DWM_PIECES"),
            PIECES_PER_THREAD
        );
        // NR = 2 * G0 + 2 with G0 = (K + 1) / 2 + DWM_AHEAD_ROWS / 2.
        assert_eq!((ring_rows(3), ring_rows(5)), (8, 10));
        for (k, warps, name) in KERNELS {
            assert!(
                src.contains(&format!("DWM_KERNEL({name}, {k}, {warps})")),
                "{name} is built with k = {k} and {warps} warps"
            );
        }
    }
}
