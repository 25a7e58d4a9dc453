//! Dense aggregations (HGNetV2's HG block, [`Backend::conv_chain_concat`]) with every
//! layer output written straight into its channels of the concatenation: the producer's
//! epilogue stores rows `total` elements apart, and the next layer reads its input from
//! there, so the only copy left is the block input's. Per convolution:
//! - 1x1 products: cuBLASLt with the concatenation's width as leading dimension (input
//!   and output; an activation other than identity runs on a separate output, as in
//!   `conv2d`);
//! - dense k x k: the implicit GEMM (`conv.cu`, `ldx`/`ldy`) where it is loaded;
//! - depthwise: the `dwk*` strip kernels (`vector.cu`, `ldo`);
//! - anything else (fp32 3x3, odd channel counts, switched-off kernels): the plain
//!   `conv2d` on a whole tensor and one copy into the slice, as before.
//!
//! The concatenation is allocated first and lives until the caller drops it, so the
//! memory plan (crate::plan) sees every slice written while it is alive; everything is a
//! kernel launch on the backend's stream (capturable).
//!
//! [`Backend::conv_chain_concat`]: aperture_engine::Backend::conv_chain_concat

use aperture_engine::backend::Activation;
use aperture_engine::{EngineError, Result};

use crate::backend::{ConvWeights, CudaBackend, CudaParam, CudaTensor};
use crate::conv::{act_residual, out_size, output_dims, plain_product};
use crate::conv_igemm::{DenseConv, Geometry, Tile};
use crate::cudnn_conv::{DenseLaunch, DensePtrs};
use crate::gemm::{GemmCall, Operand};

/// Channels of a tensor in device memory: `dims[3]` channels per pixel starting at `ptr`,
/// pixel rows `ld` elements apart (`ld == dims[3]` for a whole tensor).
#[derive(Clone, Copy, Debug)]
struct Slice {
    ptr: u64,
    ld: usize,
    dims: [usize; 4],
}

impl Slice {
    fn whole(t: &CudaTensor) -> Self {
        Self {
            ptr: t.ptr(),
            ld: t.dims[3],
            dims: t.dims,
        }
    }
    fn pixels(&self) -> usize {
        self.dims[0] * self.dims[1] * self.dims[2]
    }
}

/// A convolution input: a whole tensor or a slice of the concatenation.
#[derive(Clone, Copy)]
enum Src<'a> {
    Whole(&'a CudaTensor),
    Slice(Slice),
}

impl Src<'_> {
    fn view(&self) -> Slice {
        match self {
            Src::Whole(t) => Slice::whole(t),
            Src::Slice(s) => *s,
        }
    }
}

/// A whole tensor for the kernels that read only those: borrowed, or a copy of a slice.
enum Held<'a> {
    Borrowed(&'a CudaTensor),
    Owned(CudaTensor),
}

impl Held<'_> {
    fn get(&self) -> &CudaTensor {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

fn whole<'a>(be: &CudaBackend, src: Src<'a>) -> Result<Held<'a>> {
    match src {
        Src::Whole(t) => Ok(Held::Borrowed(t)),
        Src::Slice(s) => {
            let t = be.alloc_tensor(s.dims)?;
            copy_into(be, "concat_part", s, Slice::whole(&t))?;
            Ok(Held::Owned(t))
        }
    }
}

/// Copies `src` into `dst` (same pixels and channel count, any row strides).
fn copy_into(be: &CudaBackend, name: &'static str, src: Slice, dst: Slice) -> Result<()> {
    let (p, c) = (src.pixels(), src.dims[3]);
    if src.dims != dst.dims {
        return Err(EngineError::Shape(format!(
            "cannot copy {:?} into {:?}",
            src.dims, dst.dims
        )));
    }
    if p * c == 0 {
        return Ok(());
    }
    let bytes = (2 * p * c * be.esize()) as f64;
    be.profiler.op(be, name, 0.0, bytes, || {
        be.copy_rows(src.ptr, src.ld, dst.ptr, dst.ld, p, c)
    })
}

/// Where the next layer reads its input.
#[derive(Clone, Copy)]
enum Prev {
    /// The block input.
    Input,
    /// A slice of the concatenation.
    Slice(Slice),
    /// The tensor in `held` (a fallback's whole output).
    Held,
}

pub(crate) fn conv_chain_concat(
    be: &CudaBackend,
    x: &CudaTensor,
    layers: &[Vec<(&CudaParam, Activation)>],
) -> Result<CudaTensor> {
    let [n, h, wd, cx] = x.dims;
    let widths = layer_widths(x, layers)?;
    let total = cx + widths.iter().sum::<usize>();
    let es = be.esize();
    let cat = be.alloc_tensor([n, h, wd, total])?;
    let slice_at = |at: usize, c: usize| Slice {
        ptr: cat.ptr() + (at * es) as u64,
        ld: total,
        dims: [n, h, wd, c],
    };
    copy_into(be, "concat_input", Slice::whole(x), slice_at(0, cx))?;
    let mut prev = Prev::Input;
    let mut held: Option<CudaTensor> = None;
    let mut at = cx;
    for (chain, &c) in layers.iter().zip(&widths) {
        let dst = slice_at(at, c);
        let mut tmp: Option<CudaTensor> = None;
        let mut written = false;
        for (i, (param, act)) in chain.iter().enumerate() {
            let input = match (&tmp, prev, &held) {
                (Some(t), _, _) => Src::Whole(t),
                (None, Prev::Input, _) => Src::Whole(x),
                (None, Prev::Slice(s), _) => Src::Slice(s),
                (None, Prev::Held, Some(t)) => Src::Whole(t),
                (None, Prev::Held, None) => {
                    return Err(EngineError::Device(
                        "aggregation lost its previous layer output".into(),
                    ))
                }
            };
            let last = i + 1 == chain.len();
            let out = conv_slice(be, input, param.conv()?, *act, last.then_some(dst))?;
            match out {
                Some(t) => tmp = Some(t),
                None => written = true,
            }
        }
        if written {
            prev = Prev::Slice(dst);
            held = None;
        } else {
            let t = tmp.ok_or_else(|| {
                EngineError::Invalid("a chain of the aggregation has no convolution".into())
            })?;
            copy_into(be, "concat_part", Slice::whole(&t), dst)?;
            held = Some(t);
            prev = Prev::Held;
        }
        at += c;
    }
    Ok(cat)
}

/// Output channels of each chain, checking that the chains connect and keep H x W.
fn layer_widths(x: &CudaTensor, layers: &[Vec<(&CudaParam, Activation)>]) -> Result<Vec<usize>> {
    let [_, h, wd, cx] = x.dims;
    let mut c = cx;
    let mut widths = Vec::with_capacity(layers.len());
    for chain in layers {
        if chain.is_empty() {
            return Err(EngineError::Invalid(
                "a chain of the aggregation has no convolution".into(),
            ));
        }
        for (param, _) in chain {
            let w = param.conv()?;
            if w.c_in != c {
                return Err(EngineError::Shape(format!(
                    "aggregation layer expects {} input channels, the previous one gives {c}",
                    w.c_in
                )));
            }
            if out_size(w, h, wd)? != (h, wd) {
                return Err(EngineError::Shape(format!(
                    "aggregation layers must keep the {h}x{wd} size ({}x{} kernel, stride {}, padding {})",
                    w.kh, w.kw, w.spec.stride, w.spec.padding
                )));
            }
            c = w.c_out;
        }
        widths.push(c);
    }
    Ok(widths)
}

/// `act(conv(input) + bias)`: into `dst` when given and the producing kernel can store
/// there (returns `None`), else into a new whole tensor (returned).
fn conv_slice(
    be: &CudaBackend,
    src: Src<'_>,
    w: &ConvWeights,
    act: Activation,
    dst: Option<Slice>,
) -> Result<Option<CudaTensor>> {
    let input = src.view();
    let c = input.dims[3];
    let out_dims = output_dims(w, input.dims)?;
    let [n, oh, ow, _] = out_dims;
    let es = be.esize() as f64;
    let p_out = n * oh * ow;
    let io_bytes = (input.pixels() * c + p_out * w.c_out) as f64 * es;
    if w.depthwise {
        let held = whole(be, src)?;
        let x = held.get();
        if let Some(d) = dst {
            let flops = 2.0 * (w.kh * w.kw * p_out * w.c_out) as f64;
            let done = be.profiler.op(be, "conv_depthwise", flops, io_bytes, || {
                crate::depthwise::depthwise_tiled(be, x, w, act, None, (d.ptr, d.ld), (oh, ow))
            })?;
            if done {
                return Ok(None);
            }
        }
        return crate::conv::conv2d(be, x, w, act, None).map(Some);
    }
    let flops = 2.0 * (p_out * w.kh * w.kw * w.c_in * w.c_out) as f64;
    let bytes = io_bytes + (w.c_out * w.kp) as f64 * es;
    if plain_product(w.kh, w.kw, w.spec) && w.kp == w.c_in {
        // The product's epilogue finishes no activation or a ReLU, in place in a slice;
        // other activations run on a whole output (act_residual is element-wise over it).
        let in_product = matches!(act, Activation::Identity | Activation::Relu);
        let target = dst.filter(|_| in_product);
        return be.profiler.op(be, "conv1x1_gemm", flops, bytes, || {
            let fresh = match target {
                Some(_) => None,
                None => Some(be.alloc_tensor(out_dims)?),
            };
            let y = match (&fresh, target) {
                (Some(t), _) => (t.ptr(), w.c_out),
                (None, Some(d)) => (d.ptr, d.ld),
                (None, None) => return Err(EngineError::Device("1x1 output missing".into())),
            };
            let l = DenseLaunch::new(
                input.dims,
                input.ld,
                w,
                (oh, ow),
                y.1,
                if in_product {
                    act
                } else {
                    Activation::Identity
                },
                false,
            );
            let ptrs = DensePtrs::of(input.ptr, w, None, y.0);
            let relu = act == Activation::Relu;
            crate::cudnn_conv::run_dense(be, &l, &ptrs, || product_rows(be, input, w, y, relu))?;
            if let (Some(t), false) = (&fresh, in_product) {
                act_residual(be, t, act, None)?;
            }
            Ok(fresh)
        });
    }
    // The pool's blocks are 512-byte aligned: a new output passes the alignment check.
    let y_probe = dst.map(|d| (d.ptr, d.ld)).unwrap_or((0, w.c_out));
    if let Some(g) = plan_strided(be, input, w, (oh, ow), y_probe) {
        return be.profiler.op(be, g.tile.op_name(), flops, bytes, || {
            let fresh = match dst {
                Some(_) => None,
                None => Some(be.alloc_tensor(out_dims)?),
            };
            let y = fresh
                .as_ref()
                .map(|t| (t.ptr(), w.c_out))
                .unwrap_or(y_probe);
            crate::conv_igemm::run_strided(be, (input.ptr, input.ld), w, &g, act, None, y)?;
            Ok(fresh)
        });
    }
    let held = whole(be, src)?;
    crate::conv::conv2d(be, held.get(), w, act, None).map(Some)
}

/// The implicit-GEMM launch for a (possibly strided) input and output, when the kernel is
/// loaded and takes shapes, strides and pointers (16-byte aligned, `ldx % 8 == 0`).
fn plan_strided(
    be: &CudaBackend,
    input: Slice,
    w: &ConvWeights,
    out_hw: (usize, usize),
    (y, ldy): (u64, usize),
) -> Option<Geometry> {
    if be.kernels.igemm.reason().is_some() {
        return None;
    }
    let aligned = |p: u64| p.is_multiple_of(16);
    let c = input.dims[3];
    let fits = input.ld >= c
        && input.ld.is_multiple_of(8)
        && ldy >= w.c_out
        && input.ld < i32::MAX as usize
        && ldy < i32::MAX as usize
        && aligned(input.ptr)
        && aligned(y)
        && aligned(w.weight.ptr());
    if !fits {
        return None;
    }
    let m = input.dims[0]
        .saturating_mul(out_hw.0)
        .saturating_mul(out_hw.1);
    let sms = be.multiprocessors().max(1) as usize;
    let tile = Tile::choose(w.c_out, m, sms, be.kernels.igemm.tiles());
    Geometry::new(input.dims, out_hw, DenseConv::of(w), tile)
}

/// `y[p, :] = w x[p, :] + bias` over all pixels, rows `ld` apart on both sides.
fn product_rows(
    be: &CudaBackend,
    x: Slice,
    w: &ConvWeights,
    (y, ldy): (u64, usize),
    relu: bool,
) -> Result<()> {
    let elem = be.elem();
    let (p, k) = (x.pixels() as u64, w.c_in as u64);
    let call = GemmCall {
        a: Operand {
            ptr: w.weight.ptr(),
            rows: k,
            cols: w.c_out as u64,
            ld: k as i64,
            stride: 0,
            elem,
        },
        trans_a: true,
        b: Operand {
            ptr: x.ptr,
            rows: k,
            cols: p,
            ld: x.ld as i64,
            stride: 0,
            elem,
        },
        trans_b: false,
        c: None,
        d: Operand {
            ptr: y,
            rows: w.c_out as u64,
            cols: p,
            ld: ldy as i64,
            stride: 0,
            elem,
        },
        batch: 1,
        bias: w.bias.as_ref().map(|b| b.ptr()),
        relu,
        tf32: be.tf32(),
    };
    be.run_gemm(&call)?;
    Ok(())
}
