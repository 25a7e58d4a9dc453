//! `norm_pointwise`: LayerNorm in the prologue of a 1x1 product.

use aperture_engine::{NormProduct, Result};

use super::{launch_into, leading_args, norm_vectors, takes_pointwise, PRODUCT_LD, SLICE};
use crate::backend::{CudaBackend, CudaParam, CudaTensor};
use crate::conv_igemm::{DenseConv, IgemmSlot};
use crate::kernels::Arg;

/// Pixels per block of `norm_pointwise` (`NP_BM`).
pub(crate) const PRODUCT_TILE: usize = 128;
/// Channel counts with a `norm_pointwise_c{C}` specialisation (Restormer-base's).
pub(crate) const PRODUCT_SPECIALISED: [usize; 3] = [48, 96, 192];

/// Dynamic shared memory of `norm_pointwise` for `c` input channels (`NP_SMEM_BYTES`).
pub(crate) fn product_smem_bytes(c: usize) -> usize {
    (PRODUCT_TILE * (c + 8) + 2 * SLICE * (c + 8) + PRODUCT_TILE * PRODUCT_LD) * 2
}

/// The sizes of one `norm_pointwise` launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProductLaunch {
    /// Pixels.
    pub m: usize,
    pub c: usize,
    pub ldw: usize,
    pub p: usize,
}

impl ProductLaunch {
    /// `None` where the kernel does not take these shapes.
    pub(crate) fn new(dims: [usize; 4], pointwise: DenseConv) -> Option<Self> {
        let [n, h, w, c] = dims;
        let p = pointwise.c_out;
        if !(takes_pointwise(&pointwise, c) && p > 0 && p.is_multiple_of(8)) {
            return None;
        }
        let m = n.checked_mul(h)?.checked_mul(w)?;
        let fits = |v: usize| v < i32::MAX as usize;
        if m == 0 || !fits(m.checked_mul(c.max(p))?) || !fits(p.checked_mul(pointwise.kp)?) {
            return None;
        }
        Some(Self {
            m,
            c,
            ldw: pointwise.kp,
            p,
        })
    }

    pub(crate) fn blocks(&self) -> usize {
        self.m.div_ceil(PRODUCT_TILE)
    }
}

/// LayerNorm then a 1x1 product in one kernel where it applies; `None` leaves the caller
/// to run the two operations.
pub(crate) fn norm_pointwise(
    be: &CudaBackend,
    x: &CudaTensor,
    f: &NormProduct<'_, CudaParam>,
) -> Result<Option<CudaTensor>> {
    let IgemmSlot::Ready(kernels) = &be.kernels.igemm else {
        return Ok(None);
    };
    if !be.norm_product.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(None);
    }
    let pw = f.pointwise.conv()?;
    let Some(l) = ProductLaunch::new(x.dims, DenseConv::of(pw)) else {
        return Ok(None);
    };
    let Some(func) = kernels.norm_product_for(l.c) else {
        return Ok(None);
    };
    let (nw, nb) = norm_vectors(f.norm_weight, f.norm_bias, l.c)?;
    if !(x.ptr().is_multiple_of(16) && pw.weight.ptr().is_multiple_of(16)) {
        return Ok(None);
    }
    let flops = 2 * l.c * l.p * l.m;
    let bytes = (l.c + l.p) * l.m * be.esize();
    let [n, h, w, _] = x.dims;
    let i = |v: usize| Arg::I32(v as i32);
    launch_into(
        be,
        ("layer_norm_conv1x1", flops, bytes),
        (func, l.blocks(), product_smem_bytes(l.c)),
        [n, h, w, l.p],
        |out| {
            let mut args = leading_args(x, (nw, nb), pw).to_vec();
            args.extend([
                Arg::Ptr(out),
                i(l.m),
                i(l.c),
                i(l.ldw),
                i(l.p),
                Arg::F32(f.eps),
            ]);
            args
        },
    )
}
