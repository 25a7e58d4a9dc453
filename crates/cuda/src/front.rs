//! Restormer's block front halves on fewer kernels (`kernels/front.cu`):
//!
//! * `norm_pointwise`: channel LayerNorm in the prologue of a 1x1 product, so the
//!   normalised tensor never reaches memory;
//! * `norm_pointwise_depthwise`: LayerNorm, the 1x1 product to P channels and a depthwise
//!   3x3 over them (and the GELU gate), where the P-wide product never reaches memory
//!   either.
//!
//! Both are opt-in: on the H100 neither is faster than the separate kernels yet
//! (Restormer fp16 at batch 32: 70.1 and 66.7 against 71.3 images/s; docs/cuda.md,
//! version 8). `APERTURE_NORM_PRODUCT=1` and `APERTURE_FUSED_FRONT=1` turn them on for a
//! run; the self-test turns them on for their parity cases.
//!
//! Per pixel and block in fp16 the unfused path moves 2C (LayerNorm in) + 2C (out) + 2C
//! (product in) + 2P (out) + 2P (depthwise in) + the output; fused, x is read once (1.27x
//! with the halo) and the output written once. Taken for 16-bit storage with the conv
//! module loaded, C a multiple of 16 up to 192, P even; else the caller runs the
//! operations one by one.

use aperture_engine::{EngineError, FrontHalf, NormProduct, Result};

use crate::backend::{CudaBackend, CudaParam, CudaTensor};
use crate::conv_igemm::{DenseConv, IgemmSlot};
use crate::kernels::Arg;

/// `front.cu`'s tile: output rows and columns per block, threads, halo pixels padded to
/// whole 16-row product tiles, products per slice, the product rows' stride in shared
/// memory, and the most channels the normalising lanes hold (tests check the defines).
pub(crate) const TILE_ROWS: usize = 8;
pub(crate) const TILE_COLS: usize = 16;
pub(crate) const THREADS: u32 = 256;
pub(crate) const HALO_ROWS: usize = 192;
pub(crate) const SLICE: usize = 64;
pub(crate) const PRODUCT_LD: usize = 72;
pub(crate) const MAX_CHANNELS: usize = 192;
const FRONT_SWITCH: &str = "APERTURE_FUSED_FRONT";

/// `APERTURE_FUSED_FRONT=1`.
pub(crate) fn fused_front_by_environment() -> bool {
    std::env::var(FRONT_SWITCH).is_ok_and(|v| v.trim() == "1")
}

/// `APERTURE_NORM_PRODUCT=1`.
pub(crate) fn norm_product_by_environment() -> bool {
    std::env::var(PRODUCT_SWITCH).is_ok_and(|v| v.trim() == "1")
}

/// Pixels per block of `norm_pointwise` (`NP_BM`).
pub(crate) const PRODUCT_TILE: usize = 128;
/// Channel counts with a `norm_pointwise_c{C}` specialisation (Restormer-base's).
pub(crate) const PRODUCT_SPECIALISED: [usize; 3] = [48, 96, 192];
const PRODUCT_SWITCH: &str = "APERTURE_NORM_PRODUCT";

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
        let pw_ok = !pointwise.depthwise
            && (pointwise.kh, pointwise.kw) == (1, 1)
            && pointwise.stride == 1
            && pointwise.pad == 0
            && pointwise.c_in == c
            && pointwise.kp >= c
            && pointwise.kp.is_multiple_of(8);
        let p = pointwise.c_out;
        let channels_ok = c > 0 && c.is_multiple_of(16) && c <= MAX_CHANNELS;
        if !(pw_ok && channels_ok && p > 0 && p.is_multiple_of(8)) {
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
    be.profiler
        .op(be, "layer_norm_conv1x1", flops as f64, bytes as f64, || {
            let [n, h, w, _] = x.dims;
            let out = be.alloc_tensor([n, h, w, l.p])?;
            let i = |v: usize| Arg::I32(v as i32);
            let args = [
                Arg::Ptr(x.ptr()),
                Arg::Ptr(nw),
                Arg::Ptr(nb),
                Arg::Ptr(pw.weight.ptr()),
                Arg::Ptr(pw.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
                Arg::Ptr(out.ptr()),
                i(l.m),
                i(l.c),
                i(l.ldw),
                i(l.p),
                Arg::F32(f.eps),
            ];
            crate::kernels::launch_function(
                &be.ctx,
                func,
                (l.blocks() as u32, 1, 1),
                THREADS,
                product_smem_bytes(l.c) as u32,
                &args,
            )?;
            Ok(out)
        })
        .map(Some)
}

/// The LayerNorm's weight and bias pointers (0 for no bias), checked against `c`.
fn norm_vectors(weight: &CudaParam, bias: Option<&CudaParam>, c: usize) -> Result<(u64, u64)> {
    let (nw, nw_len) = weight.vector()?;
    let nb = bias.map(|b| b.vector()).transpose()?;
    if nw_len != c || nb.is_some_and(|(_, len)| len != c) {
        return Err(EngineError::Shape(format!(
            "layer norm over {c} channels got parameters of another size"
        )));
    }
    Ok((nw.ptr(), nb.map(|(b, _)| b.ptr()).unwrap_or(0)))
}

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
        let pw_ok = !pointwise.depthwise
            && (pointwise.kh, pointwise.kw) == (1, 1)
            && pointwise.stride == 1
            && pointwise.pad == 0
            && pointwise.c_in == c
            && pointwise.kp >= c
            && pointwise.kp.is_multiple_of(8);
        let p = pointwise.c_out;
        let dw_ok = depthwise.depthwise
            && (depthwise.kh, depthwise.kw) == (3, 3)
            && depthwise.stride == 1
            && depthwise.pad == 1
            && depthwise.c_in == p
            && depthwise.c_out == p;
        let even = p.is_multiple_of(2) && (!gate || (p / 2).is_multiple_of(2));
        let channels_ok = c > 0 && c.is_multiple_of(16) && c <= MAX_CHANNELS;
        if !(pw_ok && dw_ok && even && channels_ok && p > 0 && h > 0 && w > 0) {
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
    be.profiler
        .op(be, name, flops as f64, bytes as f64, || {
            let out = be.alloc_tensor([l.n, l.h, l.w, l.out_channels()])?;
            let i = |v: usize| Arg::I32(v as i32);
            let args = [
                Arg::Ptr(x.ptr()),
                Arg::Ptr(nw),
                Arg::Ptr(nb),
                Arg::Ptr(pw.weight.ptr()),
                Arg::Ptr(pw.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
                Arg::Ptr(dw.weight.ptr()),
                Arg::Ptr(dw.bias.as_ref().map(|b| b.ptr()).unwrap_or(0)),
                Arg::Ptr(out.ptr()),
                i(l.h),
                i(l.w),
                i(l.c),
                i(l.ldw),
                i(l.p),
                i(usize::from(l.gate)),
                i(l.tiles_y),
                i(l.tiles_x),
                Arg::F32(f.eps),
            ];
            crate::kernels::launch_function(
                &be.ctx,
                func,
                (l.blocks() as u32, 1, 1),
                THREADS,
                smem_bytes(l.c) as u32,
                &args,
            )?;
            Ok(out)
        })
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv_igemm::FRONT_SOURCE;

    fn define(name: &str) -> usize {
        let prefix = format!("#define {name} ");
        let line = FRONT_SOURCE
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("front.cu has no {name}"));
        line[prefix.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} is not a number"))
    }

    #[test]
    fn host_constants_match_the_kernel() {
        assert_eq!(define("FR_TH"), TILE_ROWS);
        assert_eq!(define("FR_TW"), TILE_COLS);
        assert_eq!(define("FR_MROWS"), HALO_ROWS);
        assert_eq!(define("FR_NS"), SLICE);
        assert_eq!(define("FR_PLD"), PRODUCT_LD);
        assert_eq!(define("FR_CMAX"), MAX_CHANNELS);
        // The halo padded to whole 16-row product tiles; eight warps, two columns each.
        let halo = (TILE_ROWS + 2) * (TILE_COLS + 2);
        assert!(HALO_ROWS >= halo && HALO_ROWS.is_multiple_of(16) && HALO_ROWS - halo < 16);
        assert_eq!(THREADS as usize, 32 * TILE_COLS / 2);
        // The normalising pass covers the padded rows in whole rounds of 32 pixels.
        assert!(HALO_ROWS.is_multiple_of(THREADS as usize / 8));
        // Within the 227 KB a block may ask for on sm_90.
        assert!(smem_bytes(MAX_CHANNELS) <= 227 * 1024);
        let decl = "__launch_bounds__(256, 2)\nnorm_pointwise_depthwise(";
        assert!(FRONT_SOURCE.contains(decl));
    }

    fn pointwise(c_in: usize, c_out: usize) -> DenseConv {
        DenseConv {
            c_in,
            c_out,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
            kp: c_in,
            depthwise: false,
        }
    }

    fn depthwise(c: usize) -> DenseConv {
        DenseConv {
            c_in: c,
            c_out: c,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
            kp: 9,
            depthwise: true,
        }
    }

    #[test]
    fn takes_restormer_base_front_halves() {
        // Level 1 (48 channels): qkv 48 -> 144, project_in 48 -> 2 x 128 (hidden padded).
        let qkv = FrontLaunch::new([1, 512, 512, 48], pointwise(48, 144), depthwise(144), false)
            .expect("attention front");
        assert_eq!((qkv.tiles_y, qkv.tiles_x, qkv.blocks()), (64, 32, 2048));
        assert_eq!(qkv.out_channels(), 144);
        let ffn = FrontLaunch::new([2, 520, 776, 96], pointwise(96, 512), depthwise(512), true)
            .expect("feed-forward front");
        assert_eq!((ffn.tiles_y, ffn.tiles_x), (65, 49));
        assert_eq!(ffn.out_channels(), 256);
        for c in [48usize, 96, 192] {
            let h = 2 * ((c * 266 / 100).div_ceil(8) * 8);
            assert!(
                FrontLaunch::new([1, 64, 64, c], pointwise(c, h), depthwise(h), true).is_some()
            );
        }
    }

    #[test]
    fn leaves_other_shapes_to_the_separate_operations() {
        let dims = |c| [1, 32, 32, c];
        // 384 channels (level 4) exceed what the normalising lanes hold; 40 is not a
        // multiple of 16.
        assert!(
            FrontLaunch::new(dims(384), pointwise(384, 1152), depthwise(1152), false).is_none()
        );
        assert!(FrontLaunch::new(dims(40), pointwise(40, 120), depthwise(120), false).is_none());
        // Odd products, an odd gated half, mismatched depthwise widths.
        assert!(FrontLaunch::new(dims(48), pointwise(48, 145), depthwise(145), false).is_none());
        assert!(FrontLaunch::new(dims(48), pointwise(48, 130), depthwise(130), true).is_none());
        assert!(FrontLaunch::new(dims(48), pointwise(48, 144), depthwise(128), false).is_none());
        // Input channels other than the pointwise weight's, a 3x3 "pointwise", a strided
        // depthwise.
        assert!(FrontLaunch::new(dims(64), pointwise(48, 144), depthwise(144), false).is_none());
        let mut dense3 = pointwise(48, 144);
        (dense3.kh, dense3.kw, dense3.pad, dense3.kp) = (3, 3, 1, 432);
        assert!(FrontLaunch::new(dims(48), dense3, depthwise(144), false).is_none());
        let mut strided = depthwise(144);
        strided.stride = 2;
        assert!(FrontLaunch::new(dims(48), pointwise(48, 144), strided, false).is_none());
    }

    #[test]
    fn product_kernel_takes_restormer_base_widths() {
        let l = ProductLaunch::new([2, 512, 512, 48], pointwise(48, 144)).expect("qkv");
        assert_eq!((l.m, l.blocks()), (2 * 512 * 512, 2 * 512 * 512 / 128));
        assert!(ProductLaunch::new([1, 64, 64, 192], pointwise(192, 1024)).is_some());
        assert!(ProductLaunch::new([1, 7, 9, 96], pointwise(96, 512)).is_some());
        // Level 4's 384 channels, products not in whole 16-byte vectors, a 3x3.
        assert!(ProductLaunch::new([1, 32, 32, 384], pointwise(384, 1152)).is_none());
        assert!(ProductLaunch::new([1, 32, 32, 48], pointwise(48, 150)).is_none());
        let mut dense3 = pointwise(48, 144);
        (dense3.kh, dense3.kw, dense3.pad, dense3.kp) = (3, 3, 1, 432);
        assert!(ProductLaunch::new([1, 32, 32, 48], dense3).is_none());
        assert_eq!(define("NP_BM"), PRODUCT_TILE);
        for c in PRODUCT_SPECIALISED {
            assert!(FRONT_SOURCE.contains(&format!("NP_ENTRY(norm_pointwise_c{c}, {c},")));
            assert!(c.is_multiple_of(16) && c <= MAX_CHANNELS);
        }
        assert!(FRONT_SOURCE.contains("NP_ENTRY(norm_pointwise, 0,"));
        assert!(product_smem_bytes(MAX_CHANNELS) <= 227 * 1024);
        let start = FRONT_SOURCE
            .find("#define NP_PARAMS")
            .expect("parameter list")
            + "#define NP_PARAMS".len();
        let end = start + FRONT_SOURCE[start..].find("#define").expect("list ends");
        let list = FRONT_SOURCE[start..end].replace('\\', " ");
        assert_eq!(
            parameter_names(&list),
            ["x", "ln_w", "ln_b", "w1", "b1", "y", "M", "C", "ldw", "P", "eps"]
        );
    }

    fn parameter_names(list: &str) -> Vec<String> {
        list.split(',')
            .map(|p| {
                p.split_whitespace()
                    .last()
                    .unwrap_or("")
                    .trim_start_matches('*')
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn launch_arguments_match_the_kernel_signature() {
        let start = FRONT_SOURCE
            .find("norm_pointwise_depthwise(const")
            .expect("entry point")
            + "norm_pointwise_depthwise(".len();
        let end = start
            + FRONT_SOURCE[start..]
                .find(')')
                .expect("parameter list ends");
        assert_eq!(
            parameter_names(&FRONT_SOURCE[start..end]),
            [
                "x", "ln_w", "ln_b", "w1", "b1", "wd", "bd", "y", "H", "W", "C", "ldw", "P",
                "gate", "tiles_y", "tiles_x", "eps"
            ]
        );
    }
}
