//! The CPU reference backend: plain, obviously-correct NHWC kernels in f32,
//! parallelised with rayon. It is the oracle for every GPU kernel and the fallback on
//! machines without a GPU.

mod attention;
mod conv;
mod deformable;
mod detection;
pub mod gemm;
mod layout;
mod norm;
mod pool;
mod sequence;
mod spatial;

pub use conv::CpuConv;

use crate::backend::{Activation, Backend, ConvSpec, DeformableSpec};
use crate::error::{EngineError, Result};
use crate::tensor::HostTensor;

/// An NHWC f32 activation in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            n,
            h,
            w,
            c,
            data: pool::zeroed(n * h * w * c),
        }
    }

    pub fn dims(&self) -> [usize; 4] {
        [self.n, self.h, self.w, self.c]
    }

    /// Index of channel 0 at pixel (n, y, x).
    #[inline]
    pub fn offset(&self, n: usize, y: usize, x: usize) -> usize {
        ((n * self.h + y) * self.w + x) * self.c
    }
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        pool::recycle(std::mem::take(&mut self.data));
    }
}

/// A prepared parameter for the CPU backend.
#[derive(Clone, Debug)]
pub enum CpuParam {
    Conv(CpuConv),
    Vector(Vec<f32>),
}

impl CpuParam {
    fn conv(&self) -> Result<&CpuConv> {
        match self {
            CpuParam::Conv(c) => Ok(c),
            CpuParam::Vector(_) => Err(EngineError::Invalid(
                "expected convolution weights, got a vector".into(),
            )),
        }
    }

    fn vector(&self) -> Result<&[f32]> {
        match self {
            CpuParam::Vector(v) => Ok(v),
            CpuParam::Conv(_) => Err(EngineError::Invalid(
                "expected a vector parameter, got convolution weights".into(),
            )),
        }
    }
}

/// Exact GELU: `0.5 x (1 + erf(x / sqrt 2))`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline]
pub(crate) fn apply_activation(y: f32, act: Activation) -> f32 {
    match act {
        Activation::Identity => y,
        Activation::Gelu => gelu(y),
        Activation::Relu => y.max(0.0),
        Activation::Silu => y / (1.0 + (-y).exp()),
    }
}

/// The CPU backend. Uses rayon's global pool (`RAYON_NUM_THREADS` sets its size).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Param = CpuParam;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_nchw(&self, x: &HostTensor) -> Result<CpuTensor> {
        layout::nchw_to_nhwc(x)
    }

    fn download_nchw(&self, x: &CpuTensor) -> Result<HostTensor> {
        layout::nhwc_to_nchw(x)
    }

    fn dims(&self, x: &CpuTensor) -> [usize; 4] {
        x.dims()
    }

    fn prepare_conv(
        &self,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        spec: ConvSpec,
    ) -> Result<CpuParam> {
        Ok(CpuParam::Conv(CpuConv::from_oihw(weight, bias, spec)?))
    }

    fn prepare_vector(&self, v: &HostTensor) -> Result<CpuParam> {
        Ok(CpuParam::Vector(v.to_f32_vec()))
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        conv: &CpuParam,
        act: Activation,
        residual: Option<&CpuTensor>,
    ) -> Result<CpuTensor> {
        conv::conv2d(x, conv.conv()?, act, residual)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuParam,
        bias: Option<&CpuParam>,
        eps: f32,
    ) -> Result<CpuTensor> {
        let bias = bias.map(|b| b.vector()).transpose()?;
        norm::layer_norm(x, weight.vector()?, bias, eps)
    }

    fn gelu_gate(&self, x: &CpuTensor) -> Result<CpuTensor> {
        norm::gelu_gate(x)
    }

    fn channel_attention(
        &self,
        qkv: &CpuTensor,
        heads: usize,
        temperature: &CpuParam,
        project_out: &CpuParam,
        residual: Option<&CpuTensor>,
    ) -> Result<CpuTensor> {
        attention::channel_attention(
            qkv,
            heads,
            temperature.vector()?,
            project_out.conv()?,
            residual,
        )
    }

    fn pixel_shuffle(&self, x: &CpuTensor, r: usize) -> Result<CpuTensor> {
        layout::pixel_shuffle(x, r)
    }

    fn pixel_unshuffle(&self, x: &CpuTensor, r: usize) -> Result<CpuTensor> {
        layout::pixel_unshuffle(x, r)
    }

    fn concat_channels(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        layout::concat_channels(a, b)
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        if a.dims() != b.dims() {
            return Err(EngineError::Shape(format!(
                "cannot add {:?} and {:?}",
                a.dims(),
                b.dims()
            )));
        }
        let data = a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect();
        Ok(CpuTensor { data, ..*a })
    }

    fn upload_nhwc(&self, x: &HostTensor) -> Result<CpuTensor> {
        match x.shape() {
            &[n, h, w, c] => Ok(CpuTensor {
                n,
                h,
                w,
                c,
                data: x.to_f32_vec(),
            }),
            s => Err(EngineError::Shape(format!(
                "expected an NHWC tensor (4-D), got shape {s:?}"
            ))),
        }
    }

    fn download_nhwc(&self, x: &CpuTensor) -> Result<HostTensor> {
        HostTensor::from_f32(vec![x.n, x.h, x.w, x.c], x.data.clone())
    }

    fn reshape(&self, x: CpuTensor, dims: [usize; 4]) -> Result<CpuTensor> {
        spatial::reshape(x, dims)
    }

    fn pad_zeros(
        &self,
        x: &CpuTensor,
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    ) -> Result<CpuTensor> {
        Ok(spatial::pad_zeros(x, top, bottom, left, right))
    }

    fn max_pool2d(&self, x: &CpuTensor, kernel: usize, stride: usize) -> Result<CpuTensor> {
        spatial::max_pool2d(x, kernel, stride)
    }

    fn upsample_nearest(&self, x: &CpuTensor, factor: usize) -> Result<CpuTensor> {
        spatial::upsample_nearest(x, factor)
    }

    fn affine(&self, x: &CpuTensor, scale: f32, shift: f32) -> Result<CpuTensor> {
        Ok(spatial::map(x, |v| scale * v + shift))
    }

    fn slice_channels(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        spatial::slice_channels(x, start, len)
    }

    fn concat_channels_n(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        spatial::concat_channels_n(parts)
    }

    fn concat_rows(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        sequence::concat_rows(parts)
    }

    fn mul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        spatial::mul(a, b)
    }

    fn sigmoid(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(spatial::map(x, spatial::sigmoid))
    }

    fn clamp(&self, x: &CpuTensor, lo: f32, hi: f32) -> Result<CpuTensor> {
        Ok(spatial::map(x, |v| v.clamp(lo, hi)))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        heads: usize,
        scale: f32,
    ) -> Result<CpuTensor> {
        sequence::attention(q, k, v, heads, scale)
    }

    fn gated_sum(&self, a: &CpuTensor, b: &CpuTensor, gates: &CpuTensor) -> Result<CpuTensor> {
        sequence::gated_sum(a, b, gates)
    }

    fn deformable_attention(
        &self,
        value: &CpuTensor,
        offsets: &CpuTensor,
        attention_logits: &CpuTensor,
        reference_boxes: &CpuTensor,
        spec: &DeformableSpec,
    ) -> Result<CpuTensor> {
        deformable::deformable_attention(value, offsets, attention_logits, reference_boxes, spec)
    }

    fn top_k_rows(&self, x: &CpuTensor, k: usize) -> Result<Vec<Vec<usize>>> {
        detection::top_k_rows(x, k)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[Vec<usize>]) -> Result<CpuTensor> {
        detection::gather_rows(x, rows)
    }

    fn refine_boxes(&self, delta: &CpuTensor, boxes: &CpuTensor) -> Result<CpuTensor> {
        detection::refine_boxes(delta, boxes)
    }

    fn distribution_boxes(
        &self,
        corners: &CpuTensor,
        reference: &CpuTensor,
        project: &[f32],
        reg_scale: f32,
    ) -> Result<CpuTensor> {
        detection::distribution_boxes(corners, reference, project, reg_scale)
    }

    fn corner_stats(&self, corners: &CpuTensor, bins: usize, top_k: usize) -> Result<CpuTensor> {
        detection::corner_stats(corners, bins, top_k)
    }
}
