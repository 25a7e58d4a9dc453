//! `norm_pointwise_depthwise`: LayerNorm, 1x1 product, depthwise 3x3 (and the GELU
//! gate) in one kernel.

use aperture_engine::{FrontHalf, Result};

use super::{launch_into, leading_args, norm_vectors, takes_pointwise, PRODUCT_LD, SLICE};
use crate::backend::{CudaBackend, CudaParam, CudaTensor};
use crate::conv_igemm::{DenseConv, IgemmSlot};
use crate::kernels::Arg;

/// Output rows and columns per block, and the halo pixels padded to whole 16-row
/// product tiles (`FR_TH`, `FR_TW`, `FR_MROWS`).
pub(crate) const TILE_ROWS: usize = 8;
pub(crate) const TILE_COLS: usize = 16;
pub(crate) const HALO_ROWS: usize = 192;

/// Dynamic shared memory for `c` input channels (`FR_SMEM_BYTES`).
pub(crate) fn smem_bytes(c: usize) -> usize {
    let halo = (TILE_ROWS + 2) * (TILE_COLS + 2);
    (HALO_ROWS * (c + 8) + 2 * SLICE * (c + 8) + halo * PRODUCT_LD) * 2
}

/// The sizes of one launch, checked against what the kernel assumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrontLaunch {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    /// Elements between the pointwise weight's rows.
    pub ldw: usize,
    /// Product channels (the pointwise outputs).
    pub p: usize,
    pub gate: bool,
    pub tiles_y: usize,
    pub tiles_x: usize,
}

impl FrontLaunch {
    /// `None` where the kernel does not take these shapes.
    pub(crate) fn new(
        dims: [usize; 4],
        pointwise: DenseConv,
        depthwise: DenseConv,
        gate: bool,
    ) -> Option<Self> {
        let [n, h, w, c] = dims;
        let pw_ok = takes_pointwise(&pointwise, c);
        let p = pointwise.c_out;
        let dw_ok = depthwise.depthwise
            && (depthwise.kh, depthwise.kw) == (3, 3)
            && depthwise.stride == 1
            && depthwise.pad == 1
            && depthwise.c_in == p
            && depthwise.c_out == p;
        let even = p.is_multiple_of(2) && (!gate || (p / 2).is_multiple_of(2));
        if !(pw_ok && dw_ok && even && p > 0 && h > 0 && w > 0) {
            return None;
        }
        let (tiles_y, tiles_x) = (h.div_ceil(TILE_ROWS), w.div_ceil(TILE_COLS));
        let fits = |v: usize| v < i32::MAX as usize;
        let blocks = n.checked_mul(tiles_y)?.checked_mul(tiles_x)?;
        let elements = n.checked_mul(h)?.checked_mul(w)?.checked_mul(c.max(p))?;
        if !fits(blocks) || !fits(elements) || !fits(p.checked_mul(pointwise.kp)?) {
            return None;
        }
        Some(Self {
            n,
            h,
            w,
            c,
            ldw: pointwise.kp,
            p,
            gate,
            tiles_y,
            tiles_x,
        })
    }

    pub(crate) fn blocks(&self) -> usize {
        self.n * self.tiles_y * self.tiles_x
    }

    /// Output channels: the gated half, or every product.
    pub(crate) fn out_channels(&self) -> usize {
        if self.gate {
            self.p / 2
        } else {
            self.p
        }
    }
}

/// Runs the fused kernel where it applies; `None` leaves the caller to run the operations
/// one by one.
pub(crate) fn norm_pointwise_depthwise(
    be: &CudaBackend,
    x: &CudaTensor,
    f: &FrontHalf<'_, CudaParam>,
) -> Result<Option<CudaTensor>> {
    let IgemmSlot::Ready(kernels) = &be.kernels.igemm else {
        return Ok(None);
    };
    let Some(func) = kernels.front else {
        return Ok(None);
    };
    if !be.fused_front.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(None);
    }
    let (pw, dw) = (f.pointwise.conv()?, f.depthwise.conv()?);
    let Some(l) = FrontLaunch::new(x.dims, DenseConv::of(pw), DenseConv::of(dw), f.gate) else {
        return Ok(None);
    };
    let (nw, nb) = norm_vectors(f.norm_weight, f.norm_bias, l.c)?;
    let aligned = x.ptr().is_multiple_of(16) && pw.weight.ptr().is_multiple_of(16);
    if !aligned {
        return Ok(None);
    }
    let pixels = l.n * l.h * l.w;
    let flops = (2 * l.c * l.p + 18 * l.p) * pixels;
    let bytes = (l.c + l.out_channels()) * pixels * be.esize();
    let name = if l.gate {
        "front_ffn_fused"
    } else {
        "front_qkv_fused"
    };
    let i = |v: usize| Arg::I32(v as i32);
    launch_into(
        be,
        (name, flops, bytes),
        (func, l.blocks(), smem_bytes(l.c)),
        [l.n, l.h, l.w, l.out_channels()],
        |out| {
            let mut args = leading_args(x, (nw, nb), pw).to_vec();
            args.extend([
                Arg::Ptr(dw.weight.ptr()),
                Arg::Ptr(dw.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
                Arg::Ptr(out),
                i(l.h),
                i(l.w),
                i(l.c),
                i(l.ldw),
                i(l.p),
                i(usize::from(l.gate)),
                i(l.tiles_y),
                i(l.tiles_x),
                Arg::F32(f.eps),
            ]);
            args
        },
    )
}
