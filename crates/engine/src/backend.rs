//! The [`Backend`] trait: the operations models are written against.
//!
//! Activations are NHWC. Weights are handed over once, in PyTorch's layout, through the
//! `prepare_*` calls; a backend converts them to whatever layout and precision its
//! kernels want. Fused operations (e.g. [`Backend::channel_attention`]) are part of the
//! trait so that a GPU backend can run them as one kernel while the CPU backend keeps a
//! plain reference implementation with the same semantics.

use crate::error::Result;
use crate::tensor::HostTensor;

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
        Self { stride: 1, padding: kernel / 2, groups: 1 }
    }

    pub fn depthwise(channels: usize, kernel: usize) -> Self {
        Self { stride: 1, padding: kernel / 2, groups: channels }
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

    /// Copies an NCHW f32 host tensor in, as NHWC.
    fn upload_nchw(&self, x: &HostTensor) -> Result<Self::Tensor>;
    /// Copies an NHWC activation out, as an NCHW f32 host tensor.
    fn download_nchw(&self, x: &Self::Tensor) -> Result<HostTensor>;
    /// `[N, H, W, C]` of an activation.
    fn dims(&self, x: &Self::Tensor) -> [usize; 4];

    /// Prepares convolution weights given as OIHW (`Conv2d.weight`) plus optional bias.
    fn prepare_conv(&self, weight: &HostTensor, bias: Option<&HostTensor>, spec: ConvSpec) -> Result<Self::Param>;
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
    fn layer_norm(&self, x: &Self::Tensor, weight: &Self::Param, bias: Option<&Self::Param>, eps: f32) -> Result<Self::Tensor>;

    /// Splits channels into halves `a | b` and returns `gelu(a) * b` (Restormer's GDFN gate).
    fn gelu_gate(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

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
}
