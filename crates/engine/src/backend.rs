//! The [`Backend`] trait: the operations models are written against.
//!
//! Activations are NHWC. Weights are handed over once, in PyTorch's layout, through the
//! `prepare_*` calls; a backend converts them to whatever layout and precision its
//! kernels want. Fused operations (e.g. [`Backend::channel_attention`]) are part of the
//! trait so that a GPU backend can run them as one kernel while the CPU backend keeps a
//! plain reference implementation with the same semantics.

use crate::conv_nodes::{eval_conv_nodes, ConvNode, NodeRef};
use crate::error::{EngineError, Result};
use crate::tensor::HostTensor;

/// The parameters of [`Backend::norm_pointwise_depthwise`]: a channel LayerNorm (`bias`
/// `None` for the BiasFree variant), a 1x1 convolution to P channels, a depthwise 3x3
/// (stride 1, padding 1) over those P channels, and with `gate` the split into halves
/// `a | b` giving `gelu(a) * b`.
pub struct FrontHalf<'a, P> {
    pub norm_weight: &'a P,
    pub norm_bias: Option<&'a P>,
    pub eps: f32,
    pub pointwise: &'a P,
    pub depthwise: &'a P,
    pub gate: bool,
}

impl<'a, P> FrontHalf<'a, P> {
    /// The LayerNorm and the 1x1 product (the first two steps).
    pub fn norm_product(&self) -> NormProduct<'a, P> {
        NormProduct {
            norm_weight: self.norm_weight,
            norm_bias: self.norm_bias,
            eps: self.eps,
            pointwise: self.pointwise,
        }
    }
}

/// The parameters of [`Backend::norm_pointwise`]: a channel LayerNorm (`bias` `None` for
/// the BiasFree variant) and a 1x1 convolution.
pub struct NormProduct<'a, P> {
    pub norm_weight: &'a P,
    pub norm_bias: Option<&'a P>,
    pub eps: f32,
    pub pointwise: &'a P,
}

/// [`Backend::norm_pointwise`] as its two operations: the reference a fused version is
/// checked against, and the path where it does not apply.
pub fn norm_product_unfused<B: Backend>(
    b: &B,
    x: &B::Tensor,
    f: &NormProduct<'_, B::Param>,
) -> Result<B::Tensor> {
    let normed = b.layer_norm(x, f.norm_weight, f.norm_bias, f.eps)?;
    b.conv2d(&normed, f.pointwise, Activation::Identity, None)
}

/// [`Backend::norm_pointwise_depthwise`] as separate steps: [`Backend::norm_pointwise`],
/// then the depthwise convolution (with the gate). With the default `norm_pointwise` this
/// is the reference every backend's fused version is checked against.
pub fn front_half_unfused<B: Backend>(
    b: &B,
    x: &B::Tensor,
    f: &FrontHalf<'_, B::Param>,
) -> Result<B::Tensor> {
    let product = b.norm_pointwise(x, &f.norm_product())?;
    if f.gate {
        b.depthwise_gelu_gate(&product, f.depthwise)
    } else {
        b.conv2d(&product, f.depthwise, Activation::Identity, None)
    }
}

/// [`Backend::conv2d_masked`] as its two operations: the mask multiplied in, then the
/// convolution (the default, and the path where a backend's shortcut does not apply).
pub fn conv2d_masked_unfused<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    keep: &HostTensor,
    conv: &B::Param,
    act: Activation,
) -> Result<B::Tensor> {
    let masked = b.mul(x, &b.upload_nhwc(keep)?)?;
    b.conv2d(&masked, conv, act, None)
}

/// Geometry of a 2-D convolution (PyTorch's `Conv2d` arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvSpec {
    /// Stride 1 with "same" padding for an odd kernel size.
    pub fn same(kernel: usize) -> Self {
        Self {
            stride: 1,
            padding: kernel / 2,
            groups: 1,
        }
    }

    pub fn depthwise(channels: usize, kernel: usize) -> Self {
        Self {
            stride: 1,
            padding: kernel / 2,
            groups: channels,
        }
    }
}

/// The sizes of a convolution, read off its OIHW weight and checked against its
/// geometry and bias (shared by every backend's `prepare_conv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub c_out: usize,
    pub c_in: usize,
    pub kh: usize,
    pub kw: usize,
}

impl ConvShape {
    pub fn of(weight: &HostTensor, bias: Option<&HostTensor>, spec: ConvSpec) -> Result<Self> {
        let s = weight.shape();
        let &[c_out, cig, kh, kw] = s else {
            return Err(EngineError::Shape(format!(
                "convolution weight must be OIHW (4-D), got {s:?}"
            )));
        };
        if spec.groups == 0 || spec.stride == 0 || c_out % spec.groups != 0 {
            return Err(EngineError::Invalid(format!(
                "convolution with {c_out} outputs cannot use groups={} stride={}",
                spec.groups, spec.stride
            )));
        }
        if let Some(b) = bias {
            if b.numel() != c_out {
                return Err(EngineError::Shape(format!(
                    "convolution bias has {} elements, expected {c_out}",
                    b.numel()
                )));
            }
        }
        Ok(Self {
            c_out,
            c_in: cig * spec.groups,
            kh,
            kw,
        })
    }
}

/// Element-wise activation applied in a kernel's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Identity,
    /// Exact GELU (erf form), as `torch.nn.functional.gelu` by default.
    Gelu,
    Relu,
    Silu,
}

/// A compute backend. All activations are NHWC tensors owned by the backend.
pub trait Backend: Send + Sync {
    /// An activation tensor (NHWC) in the backend's memory.
    type Tensor: Send + Sync;
    /// A prepared parameter (convolution weights, a normalisation scale, ...).
    type Param: Send + Sync;

    /// Human-readable name, e.g. "cpu" or "cuda:0 (NVIDIA H100)".
    fn name(&self) -> String;

    /// Channel counts this backend runs fastest at multiples of (matrix units want
    /// 16-byte aligned rows). Models may pad internal widths with zero channels to it.
    fn preferred_channel_multiple(&self) -> usize {
        1
    }

    /// Copies an NCHW f32 host tensor in, as NHWC.
    fn upload_nchw(&self, x: &HostTensor) -> Result<Self::Tensor>;
    /// Copies an NHWC activation out, as an NCHW f32 host tensor.
    fn download_nchw(&self, x: &Self::Tensor) -> Result<HostTensor>;
    /// `[N, H, W, C]` of an activation.
    fn dims(&self, x: &Self::Tensor) -> [usize; 4];

    /// Prepares convolution weights given as OIHW (`Conv2d.weight`) plus optional bias.
    fn prepare_conv(
        &self,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        spec: ConvSpec,
    ) -> Result<Self::Param>;
    /// Prepares a 1-D parameter (normalisation scale or shift, per-head temperature).
    fn prepare_vector(&self, v: &HostTensor) -> Result<Self::Param>;

    /// `act(conv(x) + bias) + residual`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        conv: &Self::Param,
        act: Activation,
        residual: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// LayerNorm over the channels of every pixel (biased variance). `bias` is `None`
    /// for Restormer's BiasFree variant, which also skips the mean subtraction.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Param,
        bias: Option<&Self::Param>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Splits channels into halves `a | b` and returns `gelu(a) * b` (Restormer's GDFN gate).
    fn gelu_gate(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// `gelu_gate(conv2d(x, conv))` for a depthwise convolution: GPU backends run it as
    /// one kernel that never writes the 2x wider convolution output.
    fn depthwise_gelu_gate(&self, x: &Self::Tensor, conv: &Self::Param) -> Result<Self::Tensor> {
        let hidden = self.conv2d(x, conv, Activation::Identity, None)?;
        self.gelu_gate(&hidden)
    }

    /// `pointwise(layer_norm(x))` for a 1x1 convolution: GPU backends normalise in the
    /// product's prologue, so the normalised tensor never reaches memory.
    fn norm_pointwise(
        &self,
        x: &Self::Tensor,
        f: &NormProduct<'_, Self::Param>,
    ) -> Result<Self::Tensor>
    where
        Self: Sized,
    {
        norm_product_unfused(self, x, f)
    }

    /// Restormer's block front halves: `depthwise(pointwise(layer_norm(x)))`, and with
    /// `gate` the GELU gate of that (see [`FrontHalf`]). GPU backends run it as one kernel
    /// where the wide pointwise output never reaches memory.
    fn norm_pointwise_depthwise(
        &self,
        x: &Self::Tensor,
        f: &FrontHalf<'_, Self::Param>,
    ) -> Result<Self::Tensor>
    where
        Self: Sized,
    {
        front_half_unfused(self, x, f)
    }

    /// Restormer's MDTA from the depthwise-convolved `qkv` (3C channels): per head,
    /// `softmax(normalize(q) normalize(k)^T * temperature) v` over H*W, followed by the
    /// 1x1 `project_out` convolution and the optional residual.
    fn channel_attention(
        &self,
        qkv: &Self::Tensor,
        heads: usize,
        temperature: &Self::Param,
        project_out: &Self::Param,
        residual: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// `torch.nn.PixelShuffle(r)` semantics on an NHWC tensor.
    fn pixel_shuffle(&self, x: &Self::Tensor, r: usize) -> Result<Self::Tensor>;
    /// `torch.nn.PixelUnshuffle(r)` semantics on an NHWC tensor.
    fn pixel_unshuffle(&self, x: &Self::Tensor, r: usize) -> Result<Self::Tensor>;
    /// Concatenates along channels (`torch.cat([a, b], 1)`).
    fn concat_channels(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Element-wise `a + b`.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- Detection operations (D-FINE). A sequence `[B, L, C]` travels as an NHWC
    // tensor `[B, 1, L, C]`, so linear layers are 1x1 convolutions. Each has a default
    // that reports the operation as unsupported, so a backend can add them one by one.

    /// Copies an NHWC f32 host tensor (4-D) in as is.
    fn upload_nhwc(&self, x: &HostTensor) -> Result<Self::Tensor> {
        let _ = x;
        Err(unsupported(self, "upload_nhwc"))
    }
    /// Copies an activation out as an NHWC f32 host tensor.
    fn download_nhwc(&self, x: &Self::Tensor) -> Result<HostTensor> {
        let _ = x;
        Err(unsupported(self, "download_nhwc"))
    }
    /// Same elements, new `[N, H, W, C]` of equal size (e.g. `[B, H, W, C]` <-> `[B, 1, H*W, C]`).
    fn reshape(&self, x: Self::Tensor, dims: [usize; 4]) -> Result<Self::Tensor> {
        let _ = (x, dims);
        Err(unsupported(self, "reshape"))
    }
    /// Zero padding of the spatial borders (`F.pad(x, (left, right, top, bottom))`).
    fn pad_zeros(
        &self,
        x: &Self::Tensor,
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    ) -> Result<Self::Tensor> {
        let _ = (x, top, bottom, left, right);
        Err(unsupported(self, "pad_zeros"))
    }
    /// `nn.MaxPool2d(kernel, stride)` without padding (floor mode).
    fn max_pool2d(&self, x: &Self::Tensor, kernel: usize, stride: usize) -> Result<Self::Tensor> {
        let _ = (x, kernel, stride);
        Err(unsupported(self, "max_pool2d"))
    }
    /// `concat_channels(max_pool2d(x, kernel, stride), other)`; a GPU backend writes the
    /// pool's output straight into its channels of the concatenation.
    fn max_pool_concat(
        &self,
        x: &Self::Tensor,
        kernel: usize,
        stride: usize,
        other: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.concat_channels(&self.max_pool2d(x, kernel, stride)?, other)
    }
    /// `F.interpolate(x, scale_factor=factor, mode="nearest")` for an integer factor.
    fn upsample_nearest(&self, x: &Self::Tensor, factor: usize) -> Result<Self::Tensor> {
        let _ = (x, factor);
        Err(unsupported(self, "upsample_nearest"))
    }
    /// `scale * x + shift` with scalar scale and shift (HGNetV2's learnable affine block).
    fn affine(&self, x: &Self::Tensor, scale: f32, shift: f32) -> Result<Self::Tensor> {
        let _ = (x, scale, shift);
        Err(unsupported(self, "affine"))
    }
    /// Channels `start..start + len`.
    fn slice_channels(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor> {
        let _ = (x, start, len);
        Err(unsupported(self, "slice_channels"))
    }
    /// Concatenates any number of tensors along channels.
    fn concat_channels_n(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor> {
        let _ = parts;
        Err(unsupported(self, "concat_channels_n"))
    }
    /// A dense aggregation (HGNetV2's HG block): `concat_channels_n([x, y_1, .., y_n])`
    /// with `y_j` the chain of convolutions `layers[j]` (each with its activation, no
    /// residual) applied to `y_{j-1}`, `y_0 = x`. Every convolution must keep the height
    /// and width. A GPU backend writes each `y_j` straight into its channels of the
    /// result instead of copying it there afterwards.
    fn conv_chain_concat(
        &self,
        x: &Self::Tensor,
        layers: &[Vec<(&Self::Param, Activation)>],
    ) -> Result<Self::Tensor> {
        let outs = crate::conv_nodes::run_conv_chains(self, x, layers)?;
        let mut parts: Vec<&Self::Tensor> = vec![x];
        parts.extend(outs.iter());
        self.concat_channels_n(&parts)
    }
    /// The HG block's aggregation and its squeeze: `conv2d(conv_chain_concat(x, layers),
    /// squeeze, act)`. A GPU backend may read each part of the concatenation where it
    /// lies instead of writing the concatenation out.
    fn conv_chain_aggregate(
        &self,
        x: &Self::Tensor,
        layers: &[Vec<(&Self::Param, Activation)>],
        squeeze: &Self::Param,
        act: Activation,
    ) -> Result<Self::Tensor> {
        let cat = self.conv_chain_concat(x, layers)?;
        self.conv2d(&cat, squeeze, act, None)
    }
    /// `pad_zeros(conv2d(x, conv, act, None), 0, bottom, 0, right)`; a GPU backend may
    /// write the zeros with the convolution's output instead of in a pass of their own.
    fn conv2d_pad_after(
        &self,
        x: &Self::Tensor,
        conv: &Self::Param,
        act: Activation,
        bottom: usize,
        right: usize,
    ) -> Result<Self::Tensor> {
        let y = self.conv2d(x, conv, act, None)?;
        self.pad_zeros(&y, 0, bottom, 0, right)
    }
    /// `conv2d(x * keep, conv, act, None)` for a per-pixel mask `keep` (`[n, h, w, 1]` of
    /// zeros and ones, broadcast over the channels as `mul` does): D-FINE's encoder zeroes
    /// the anchors outside the image before its first projection. A GPU backend may run
    /// the product on `x` as is and then write the masked pixels' outputs (a 1x1
    /// product's activated bias), instead of a pass over `x` for the mask.
    fn conv2d_masked(
        &self,
        x: &Self::Tensor,
        keep: &HostTensor,
        conv: &Self::Param,
        act: Activation,
    ) -> Result<Self::Tensor> {
        conv2d_masked_unfused(self, x, keep, conv, act)
    }
    /// A block of convolutions feeding one channel concatenation (D-FINE's
    /// RepNCSPELAN4): evaluates `nodes` in order, node `i` computing
    /// `act(conv(input) + bias) + residual` from the block input `x` or earlier nodes'
    /// outputs (an input may be a channel range, see [`ConvNode`]), and returns
    /// `concat_channels_n` of the tensors `concat` names (`NodeRef::Input` is `x`). Nodes
    /// may read only `x` and earlier nodes; a residual is all of an earlier tensor with
    /// the output's dims. The default runs exactly those plain operations
    /// ([`eval_conv_nodes`]); a GPU backend allocates the concatenation first, lets each
    /// concatenated node's kernel store straight into its channels and reads channel
    /// ranges in place (rows the concatenation's width apart) instead of copying them.
    fn conv_nodes_concat(
        &self,
        x: &Self::Tensor,
        nodes: &[ConvNode<'_, Self::Param>],
        concat: &[NodeRef],
    ) -> Result<Self::Tensor>
    where
        Self: Sized,
    {
        eval_conv_nodes(self, x, nodes, concat)
    }
    /// Concatenates sequences `[B, 1, L_i, C]` along their length: `[B, 1, sum L_i, C]`.
    fn concat_rows(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor> {
        let _ = parts;
        Err(unsupported(self, "concat_rows"))
    }
    /// Element-wise `a * b`; `b` may have a single channel, broadcast over `a`'s channels.
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let _ = (a, b);
        Err(unsupported(self, "mul"))
    }
    /// Element-wise logistic sigmoid.
    fn sigmoid(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let _ = x;
        Err(unsupported(self, "sigmoid"))
    }
    /// Element-wise clamp to `[lo, hi]`.
    fn clamp(&self, x: &Self::Tensor, lo: f32, hi: f32) -> Result<Self::Tensor> {
        let _ = (x, lo, hi);
        Err(unsupported(self, "clamp"))
    }
    /// Multi-head scaled dot-product attention on sequences `[B, 1, L, C]`:
    /// per head, `softmax(q k^T * scale) v` (heads split the channels in order).
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        scale: f32,
    ) -> Result<Self::Tensor> {
        let _ = (q, k, v, heads, scale);
        Err(unsupported(self, "attention"))
    }
    /// D-FINE's gate: `sigmoid(g[..C]) * a + sigmoid(g[C..]) * b` with `gates` of 2C channels.
    fn gated_sum(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        gates: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let _ = (a, b, gates);
        Err(unsupported(self, "gated_sum"))
    }
    /// Multi-scale deformable attention (D-FINE's v2): see [`DeformableSpec`].
    fn deformable_attention(
        &self,
        value: &Self::Tensor,
        offsets: &Self::Tensor,
        attention_logits: &Self::Tensor,
        reference_boxes: &Self::Tensor,
        spec: &DeformableSpec,
    ) -> Result<Self::Tensor> {
        let _ = (value, offsets, attention_logits, reference_boxes, spec);
        Err(unsupported(self, "deformable_attention"))
    }
    /// For each batch item of a `[B, 1, L, C]` tensor, the indices of the `k` rows with the
    /// largest maximum over channels, best first (ties: lower index first).
    fn top_k_rows(&self, x: &Self::Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
        let _ = (x, k);
        Err(unsupported(self, "top_k_rows"))
    }
    /// Rows of a `[B, 1, L, C]` tensor picked per batch item: `[B, 1, K, C]`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[Vec<usize>]) -> Result<Self::Tensor> {
        let _ = (x, rows);
        Err(unsupported(self, "gather_rows"))
    }
    /// Query selection: the rows [`Backend::top_k_rows`] picks from `scores`, gathered
    /// from each of `sources` (`[B, 1, L, C_i]` -> `[B, 1, k, C_i]`). The default goes
    /// through host indices; a GPU backend keeps them on the device (no synchronisation,
    /// so the forward pass can be captured in a graph).
    fn select_rows(
        &self,
        scores: &Self::Tensor,
        k: usize,
        sources: &[&Self::Tensor],
    ) -> Result<Vec<Self::Tensor>> {
        let top = self.top_k_rows(scores, k)?;
        sources.iter().map(|s| self.gather_rows(s, &top)).collect()
    }
    /// `sigmoid(delta + inverse_sigmoid(boxes))` with DETR's clamped inverse sigmoid (eps 1e-5).
    fn refine_boxes(&self, delta: &Self::Tensor, boxes: &Self::Tensor) -> Result<Self::Tensor> {
        let _ = (delta, boxes);
        Err(unsupported(self, "refine_boxes"))
    }
    /// D-FINE's fine-grained distribution refinement: per box side, softmax over the
    /// `project.len()` bins of `corners` and the expected value under `project`, then
    /// `distance2bbox` around `reference` (cxcywh) with `reg_scale`. Returns cxcywh boxes.
    fn distribution_boxes(
        &self,
        corners: &Self::Tensor,
        reference: &Self::Tensor,
        project: &[f32],
        reg_scale: f32,
    ) -> Result<Self::Tensor> {
        let _ = (corners, reference, project, reg_scale);
        Err(unsupported(self, "distribution_boxes"))
    }
    /// D-FINE's LQE statistics: per box side, the `top_k` largest bin probabilities
    /// (softmax over `bins`) followed by their mean: `[B, 1, L, 4 * (top_k + 1)]`.
    fn corner_stats(
        &self,
        corners: &Self::Tensor,
        bins: usize,
        top_k: usize,
    ) -> Result<Self::Tensor> {
        let _ = (corners, bins, top_k);
        Err(unsupported(self, "corner_stats"))
    }
}

/// Geometry of a multi-scale deformable attention call. `value` is `[B, 1, S, C]` with
/// the levels' `H*W` rows concatenated; `offsets` `[B, 1, Q, heads * P * 2]` and
/// `attention_logits` `[B, 1, Q, heads * P]` (P = sum of `points`, level-major);
/// `reference_boxes` `[B, 1, Q, 4]` in normalised cxcywh. A point of a level with `n`
/// points samples at `xy + offset / n * wh * offset_scale`, bilinearly with zero padding
/// and `align_corners=False` (or, when `discrete`, at the nearest pixel, clamped).
#[derive(Clone, Debug, PartialEq)]
pub struct DeformableSpec {
    pub heads: usize,
    /// `(height, width)` of each level.
    pub shapes: Vec<(usize, usize)>,
    /// Sampling points per level and head.
    pub points: Vec<usize>,
    pub offset_scale: f32,
    pub discrete: bool,
}

fn unsupported<B: Backend + ?Sized>(backend: &B, op: &str) -> EngineError {
    EngineError::Unsupported(format!(
        "the {} backend does not implement {op} yet",
        backend.name()
    ))
}
