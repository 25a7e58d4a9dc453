//! Blocks of convolutions feeding one channel concatenation
//! ([`Backend::conv_nodes_concat`]: D-FINE's RepNCSPELAN4; [`Backend::conv_chain_concat`],
//! HGNetV2's HG block, is one such block) with every concatenated output written straight
//! into its channels: the producer's epilogue stores rows `total` elements apart, and
//! the nodes that read it (all of it or a channel range) take their input from there, so
//! the only copies left are the block input's and the fallbacks'. Per convolution:
//! - 1x1 products: cuBLASLt with the input's and the output's row strides as leading
//!   dimensions; an activation other than ReLU, or a residual, follows as one vector pass
//!   in place in the slice (`conv_epilogue_vec`), or on a new output where the slice's
//!   channels are off whole 16-byte vectors;
//! - dense k x k: the implicit GEMM (`conv.cu`, `ldx`/`ldy`) where it is loaded, or
//!   cuDNN where it was timed faster; where cuDNN would stage the slice through a packed
//!   buffer, a whole output and one copy instead, the whole tensor kept for the nodes
//!   that read it (no packing copy for them);
//! - depthwise: the `dwk*` strip kernels (`vector.cu`, `ldo`);
//! - anything else (fp32 3x3, odd channel counts, switched-off kernels): the plain
//!   `conv2d` on a whole tensor and one copy into the slice.
//!
//! Residuals are whole tensors (the kernels read them with rows `C` apart): one that only
//! lives in the concatenation is copied out first. A node's input that is all of a whole
//! tensor with its output not concatenated runs the plain `conv2d`.
//!
//! The concatenation is allocated first and lives until the caller drops it, so the
//! memory plan (crate::plan) sees every slice written while it is alive; everything is a
//! kernel launch on the backend's stream (capturable).
//!
//! [`Backend::conv_nodes_concat`]: aperture_engine::Backend::conv_nodes_concat
//! [`Backend::conv_chain_concat`]: aperture_engine::Backend::conv_chain_concat

use aperture_engine::backend::Activation;
use aperture_engine::conv_nodes::{check_conv_nodes, last_reads};
use aperture_engine::{ConvNode, EngineError, NodeRef, NodeSource, Result};

use crate::backend::{ConvWeights, CudaBackend, CudaParam, CudaTensor};
use crate::conv::{act_code, act_residual, output_dims, plain_product, ProductEpilogue};
use crate::conv_igemm::{DenseConv, Geometry, Tile};
use crate::cudnn_conv::{DenseLaunch, DensePtrs};
use crate::gemm::{GemmCall, Operand};
use crate::kernels::Arg;

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

/// A node's output once computed: its slice of the concatenation (a concatenated node),
/// a whole tensor (an output nothing concatenates, or a fallback's before its copy into
/// the slice), or both.
struct Value {
    whole: Option<CudaTensor>,
    slice: Option<Slice>,
}

/// HGNetV2's HG-block aggregation as a node block: the chains one after the other, each
/// reading the previous chain's output, concatenated after the block input.
pub(crate) fn conv_chain_concat(
    be: &CudaBackend,
    x: &CudaTensor,
    layers: &[Vec<(&CudaParam, Activation)>],
) -> Result<CudaTensor> {
    let mut nodes: Vec<ConvNode<'_, CudaParam>> = Vec::new();
    let mut concat = vec![NodeRef::Input];
    let mut prev = NodeRef::Input;
    for chain in layers {
        if chain.is_empty() {
            return Err(EngineError::Invalid(
                "a chain of the aggregation has no convolution".into(),
            ));
        }
        for &(conv, act) in chain {
            nodes.push(ConvNode {
                input: NodeSource::whole(prev),
                conv,
                act,
                residual: None,
            });
            prev = NodeRef::Node(nodes.len() - 1);
        }
        concat.push(prev);
    }
    conv_nodes_concat(be, x, &nodes, &concat)
}

/// [`Backend::conv_nodes_concat`]: the concatenation is allocated first; a node it
/// names stores straight into its slice where the producing kernel can (else a whole
/// output and one copy, the whole tensor kept for the node's readers), the block input
/// is copied in, and channel ranges are read in place (rows `ld` apart). Whole node
/// outputs are freed after their last reader.
///
/// [`Backend::conv_nodes_concat`]: aperture_engine::Backend::conv_nodes_concat
pub(crate) fn conv_nodes_concat(
    be: &CudaBackend,
    x: &CudaTensor,
    nodes: &[ConvNode<'_, CudaParam>],
    concat: &[NodeRef],
) -> Result<CudaTensor> {
    check_conv_nodes(nodes, concat)?;
    let dims = node_dims(x, nodes)?;
    let dims_of = |r: NodeRef| match r {
        NodeRef::Input => x.dims,
        NodeRef::Node(i) => dims[i],
    };
    let first = dims_of(concat[0]);
    if let Some(d) = concat
        .iter()
        .map(|&r| dims_of(r))
        .find(|d| d[..3] != first[..3])
    {
        return Err(EngineError::Shape(format!(
            "cannot concatenate {first:?} and {d:?} along channels"
        )));
    }
    let [n, h, wd, _] = first;
    let total: usize = concat.iter().map(|&r| dims_of(r)[3]).sum();
    let es = be.esize();
    let cat = be.alloc_tensor([n, h, wd, total])?;
    // Each concatenated tensor's slices: the first is a node's own, the others copies.
    let mut slices: Vec<Vec<Slice>> = vec![Vec::new(); nodes.len()];
    let mut at = 0;
    for &r in concat {
        let c = dims_of(r)[3];
        let s = Slice {
            ptr: cat.ptr() + (at * es) as u64,
            ld: total,
            dims: [n, h, wd, c],
        };
        match r {
            NodeRef::Input => copy_into(be, "concat_input", Slice::whole(x), s)?,
            NodeRef::Node(i) => slices[i].push(s),
        }
        at += c;
    }
    let last = last_reads(nodes);
    let mut values: Vec<Value> = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let home = slices[i].first().copied();
        let out = {
            let src = source(be, x, &values, node.input)?;
            let residual = node
                .residual
                .map(|r| residual_of(be, x, &values, r))
                .transpose()?;
            conv_slice(
                be,
                src,
                node.conv.conv()?,
                node.act,
                residual.as_ref().map(Held::get),
                home,
            )?
        };
        let value = match (out, home) {
            (None, _) => Value {
                whole: None,
                slice: home,
            },
            (Some(t), Some(d)) => {
                copy_into(be, "concat_part", Slice::whole(&t), d)?;
                Value {
                    whole: Some(t),
                    slice: home,
                }
            }
            (Some(t), None) => Value {
                whole: Some(t),
                slice: None,
            },
        };
        let view = value
            .whole
            .as_ref()
            .map(Slice::whole)
            .or(value.slice)
            .ok_or_else(|| EngineError::Device(format!("node {i} left no output")))?;
        for &s in slices[i].iter().skip(1) {
            copy_into(be, "concat_part", view, s)?;
        }
        values.push(value);
        // Whole outputs nothing reads any more go back to the pool now.
        for (k, v) in values.iter_mut().enumerate() {
            if last[k].is_none_or(|l| l <= i) {
                v.whole = None;
            }
        }
    }
    Ok(cat)
}

/// The NHWC output dims of every node, checking channel ranges, input channels and
/// residual dims before anything runs.
fn node_dims(x: &CudaTensor, nodes: &[ConvNode<'_, CudaParam>]) -> Result<Vec<[usize; 4]>> {
    let mut dims: Vec<[usize; 4]> = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let of = |r: NodeRef| match r {
            NodeRef::Input => x.dims,
            NodeRef::Node(k) => dims[k],
        };
        let at = |e: EngineError| match e {
            EngineError::Shape(m) => EngineError::Shape(format!("node {i}: {m}")),
            other => other,
        };
        let [n, h, wd, c] = of(node.input.of);
        let (_, len) = node.input.range(c).map_err(at)?;
        let out = output_dims(node.conv.conv()?, [n, h, wd, len]).map_err(at)?;
        if let Some(r) = node.residual.map(of).filter(|r| *r != out) {
            return Err(EngineError::Shape(format!(
                "node {i}: residual {r:?} does not match convolution output {out:?}"
            )));
        }
        dims.push(out);
    }
    Ok(dims)
}

/// A node's input: a whole tensor where it reads all of one, else a slice view (a
/// channel range keeps its parent's row stride).
fn source<'a>(
    be: &CudaBackend,
    x: &'a CudaTensor,
    values: &'a [Value],
    src: NodeSource,
) -> Result<Src<'a>> {
    let (whole, slice) = match src.of {
        NodeRef::Input => (Some(x), None),
        NodeRef::Node(k) => {
            let v = values
                .get(k)
                .ok_or_else(|| EngineError::Invalid(format!("node {k} is read before it runs")))?;
            (v.whole.as_ref(), v.slice)
        }
    };
    let view = whole
        .map(Slice::whole)
        .or(slice)
        .ok_or_else(|| EngineError::Device("a node block lost an output it reads".into()))?;
    let c = view.dims[3];
    let (start, len) = src.range(c)?;
    if (start, len) == (0, c) {
        return Ok(whole.map(Src::Whole).unwrap_or(Src::Slice(view)));
    }
    let [n, h, wd, _] = view.dims;
    Ok(Src::Slice(Slice {
        ptr: view.ptr + (start * be.esize()) as u64,
        ld: view.ld,
        dims: [n, h, wd, len],
    }))
}

/// A residual as a whole tensor (the kernels read residuals with rows `C` apart): the
/// block input, a node's whole output, or a copy of its slice.
fn residual_of<'a>(
    be: &CudaBackend,
    x: &'a CudaTensor,
    values: &'a [Value],
    r: NodeRef,
) -> Result<Held<'a>> {
    whole(be, source(be, x, values, NodeSource::whole(r))?)
}

/// `act(conv(input) + bias) + residual` (the residual whole, with the output's dims):
/// into `dst` when given and the producing kernel can store there (returns `None`),
/// else into a new whole tensor (returned).
fn conv_slice(
    be: &CudaBackend,
    src: Src<'_>,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    dst: Option<Slice>,
) -> Result<Option<CudaTensor>> {
    if let (Src::Whole(x), None) = (src, dst) {
        // Nothing strided: the plain convolution's own choice of kernel.
        return crate::conv::conv2d(be, x, w, act, residual).map(Some);
    }
    let input = src.view();
    let c = input.dims[3];
    let out_dims = output_dims(w, input.dims)?;
    if let Some(r) = residual.filter(|r| r.dims != out_dims) {
        return Err(EngineError::Shape(format!(
            "residual {:?} does not match convolution output {out_dims:?}",
            r.dims
        )));
    }
    let [n, oh, ow, _] = out_dims;
    let es = be.esize() as f64;
    let p_out = n * oh * ow;
    let res_bytes = residual.map(|r| r.numel()).unwrap_or(0) as f64 * es;
    let io_bytes = (input.pixels() * c + p_out * w.c_out) as f64 * es + res_bytes;
    if w.depthwise {
        let held = whole(be, src)?;
        let x = held.get();
        if let Some(d) = dst {
            let flops = 2.0 * (w.kh * w.kw * p_out * w.c_out) as f64;
            let done = be.profiler.op(be, "conv_depthwise", flops, io_bytes, || {
                crate::depthwise::depthwise_tiled(be, x, w, act, residual, (d.ptr, d.ld), (oh, ow))
            })?;
            if done {
                return Ok(None);
            }
        }
        return crate::conv::conv2d(be, x, w, act, residual).map(Some);
    }
    let flops = 2.0 * (p_out * w.kh * w.kw * w.c_in * w.c_out) as f64;
    let bytes = io_bytes + (w.c_out * w.kp) as f64 * es;
    if plain_product(w.kh, w.kw, w.spec) && w.kp == w.c_in {
        return be.profiler.op(be, "conv1x1_gemm", flops, bytes, || {
            pointwise(be, input, w, act, residual, dst, out_dims)
        });
    }
    // The pool's blocks are 512-byte aligned: a new output passes the alignment check.
    let y_probe = dst.map(|d| (d.ptr, d.ld)).unwrap_or((0, w.c_out));
    let res = residual.map(|r| r.ptr());
    if let Some(g) = plan_strided(be, input, w, (oh, ow), y_probe, res) {
        let staged = |d: Slice| {
            crate::conv_igemm::strided_output_staged(
                be,
                (input.ptr, input.ld),
                w,
                &g,
                act,
                res,
                (d.ptr, d.ld),
            )
        };
        if whole_outputs_for_staged() && dst.is_some_and(staged) {
            // cuDNN would write a packed buffer and move it into the slice anyway: a
            // whole output (moved by the caller) costs the same and spares the nodes
            // reading it a packing copy of their input.
            let held = whole(be, src)?;
            return crate::conv::conv2d(be, held.get(), w, act, residual).map(Some);
        }
        return be.profiler.op(be, g.tile.op_name(), flops, bytes, || {
            let fresh = match dst {
                Some(_) => None,
                None => Some(be.alloc_tensor(out_dims)?),
            };
            let y = fresh
                .as_ref()
                .map(|t| (t.ptr(), w.c_out))
                .unwrap_or(y_probe);
            crate::conv_igemm::run_strided(be, (input.ptr, input.ld), w, &g, act, res, y)?;
            Ok(fresh)
        });
    }
    let held = whole(be, src)?;
    crate::conv::conv2d(be, held.get(), w, act, residual).map(Some)
}

/// `APERTURE_CONCAT_STAGED=slice` keeps cuDNN's staged launches writing into their slice
/// (for A/B runs of the whole outputs above).
fn whole_outputs_for_staged() -> bool {
    std::env::var("APERTURE_CONCAT_STAGED").as_deref() != Ok("slice")
}

/// A 1x1 product over all pixels (input rows `ld` apart) into `dst` or a new tensor.
/// cuBLASLt's epilogue adds the bias, and a ReLU or, on a new output without an
/// activation, the residual (its `C` has the output's layout); anything else runs as
/// one vector pass after the product, in place in the slice (`conv_epilogue_vec`) or
/// over the new tensor (`act_residual`). A slice the vector pass cannot cover (channel
/// counts or strides off whole 16-byte vectors) gets a new tensor.
fn pointwise(
    be: &CudaBackend,
    input: Slice,
    w: &ConvWeights,
    act: Activation,
    residual: Option<&CudaTensor>,
    dst: Option<Slice>,
    out_dims: [usize; 4],
) -> Result<Option<CudaTensor>> {
    let [_, oh, ow, _] = out_dims;
    let res = residual.map(|r| r.ptr());
    let in_product = residual.is_none() && matches!(act, Activation::Identity | Activation::Relu);
    let target = dst.filter(|d| in_product || epilogue_fits(be, *d, w.c_out, res));
    let fresh = match target {
        Some(_) => None,
        None => Some(be.alloc_tensor(out_dims)?),
    };
    let y = match (&fresh, target) {
        (Some(t), _) => (t.ptr(), w.c_out),
        (None, Some(d)) => (d.ptr, d.ld),
        (None, None) => return Err(EngineError::Device("1x1 output missing".into())),
    };
    let (epi, pass) = match target {
        Some(_) if in_product => (
            ProductEpilogue {
                bias: true,
                residual: None,
                relu: act == Activation::Relu,
            },
            false,
        ),
        Some(_) => (
            ProductEpilogue {
                bias: true,
                ..ProductEpilogue::default()
            },
            true,
        ),
        None => ProductEpilogue::for_launch(act, res),
    };
    let l = DenseLaunch::new(input.dims, input.ld, w, (oh, ow), y.1, act, res.is_some());
    let ptrs = DensePtrs::of(input.ptr, w, res, y.0);
    crate::cudnn_conv::run_dense(be, &l, &ptrs, || {
        product_rows(be, input, w, y, epi)?;
        if pass {
            match &fresh {
                Some(t) => act_residual(be, t, act, residual)?,
                None => epilogue_in_place(be, y, input.pixels(), w.c_out, act, res)?,
            }
        }
        Ok(())
    })?;
    Ok(fresh)
}

/// Whether `conv_epilogue_vec` can run over `c` channels of `d` (whole 16-byte vectors,
/// aligned pointers).
fn epilogue_fits(be: &CudaBackend, d: Slice, c: usize, residual: Option<u64>) -> bool {
    let v = 16 / be.esize();
    c.is_multiple_of(v)
        && d.ld.is_multiple_of(v)
        && d.ptr.is_multiple_of(16)
        && residual.is_none_or(|r| r.is_multiple_of(16))
}

/// `y = act(y) + residual` over `c` channels of `pixels` rows `ld` apart, in place
/// (the residual whole: rows `c` apart).
fn epilogue_in_place(
    be: &CudaBackend,
    (y, ld): (u64, usize),
    pixels: usize,
    c: usize,
    act: Activation,
    residual: Option<u64>,
) -> Result<()> {
    let v = 16 / be.esize();
    be.launch_1d(
        "conv_epilogue_vec",
        pixels * c / v,
        &[
            Arg::Ptr(y),
            Arg::I64(ld as i64),
            Arg::Ptr(y),
            Arg::I64(ld as i64),
            Arg::Ptr(0),
            Arg::Ptr(residual.unwrap_or(0)),
            Arg::I64(pixels as i64),
            Arg::I32(c as i32),
            Arg::I32(act_code(act)),
        ],
    )?;
    Ok(())
}

/// The implicit-GEMM launch for a (possibly strided) input and output, when the kernel is
/// loaded and takes shapes, strides and pointers (16-byte aligned, `ldx % 8 == 0`; the
/// residual, when there is one, is whole).
fn plan_strided(
    be: &CudaBackend,
    input: Slice,
    w: &ConvWeights,
    out_hw: (usize, usize),
    (y, ldy): (u64, usize),
    residual: Option<u64>,
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
        && aligned(w.weight.ptr())
        && residual.is_none_or(aligned);
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

/// `y[p, :] = w x[p, :]` plus `epi` over all pixels, rows `ld` apart on both sides (a
/// residual in `epi` has the output's layout).
fn product_rows(
    be: &CudaBackend,
    x: Slice,
    w: &ConvWeights,
    (y, ldy): (u64, usize),
    epi: ProductEpilogue,
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
        c: epi.residual,
        d: Operand {
            ptr: y,
            rows: w.c_out as u64,
            cols: p,
            ld: ldy as i64,
            stride: 0,
            elem,
        },
        batch: 1,
        bias: if epi.bias {
            w.bias.as_ref().map(|b| b.ptr())
        } else {
            None
        },
        relu: epi.relu,
        tf32: be.tf32(),
    };
    be.run_gemm(&call)?;
    Ok(())
}
