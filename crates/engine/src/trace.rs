//! A backend that runs no arithmetic: it follows a model's forward pass with shapes
//! only and counts multiply-accumulates and the bytes each operation must move. This
//! gives the roofline numbers that `aperture info` prints and benchmarks compare to.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::backend::{Activation, Backend, ConvSpec};
use crate::error::{EngineError, Result};
use crate::tensor::HostTensor;

/// Shape of a traced activation (NHWC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceTensor(pub [usize; 4]);

#[derive(Clone, Debug)]
pub enum TraceParam {
    Conv {
        c_in: usize,
        c_out: usize,
        kh: usize,
        kw: usize,
        spec: ConvSpec,
        bias: bool,
    },
    Vector(usize),
}

/// Totals for one kind of operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpCost {
    pub calls: u64,
    pub macs: u64,
    /// Activation bytes read and written, each tensor once per operation.
    pub bytes: u64,
    pub weight_bytes: u64,
}

/// Shape-only backend; `elem_bytes` is the storage size of one element (2 for fp16).
pub struct TraceBackend {
    elem_bytes: u64,
    ops: Mutex<BTreeMap<&'static str, OpCost>>,
}

impl TraceBackend {
    pub fn new(elem_bytes: u64) -> Self {
        Self {
            elem_bytes,
            ops: Mutex::new(BTreeMap::new()),
        }
    }

    /// Per-operation totals so far.
    pub fn costs(&self) -> BTreeMap<&'static str, OpCost> {
        self.ops.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn total(&self) -> OpCost {
        self.costs().values().fold(OpCost::default(), |mut a, c| {
            a.calls += c.calls;
            a.macs += c.macs;
            a.bytes += c.bytes;
            a.weight_bytes += c.weight_bytes;
            a
        })
    }

    fn record(&self, op: &'static str, macs: u64, elems: u64, weight_elems: u64) {
        if let Ok(mut m) = self.ops.lock() {
            let e = m.entry(op).or_default();
            e.calls += 1;
            e.macs += macs;
            e.bytes += elems * self.elem_bytes;
            e.weight_bytes += weight_elems * self.elem_bytes;
        }
    }
}

fn numel(t: &TraceTensor) -> u64 {
    t.0.iter().product::<usize>() as u64
}

impl Backend for TraceBackend {
    type Tensor = TraceTensor;
    type Param = TraceParam;

    fn name(&self) -> String {
        "trace".into()
    }

    fn upload_nchw(&self, x: &HostTensor) -> Result<TraceTensor> {
        match *x.shape() {
            [n, c, h, w] => Ok(TraceTensor([n, h, w, c])),
            ref s => Err(EngineError::Shape(format!("expected NCHW, got {s:?}"))),
        }
    }

    fn download_nchw(&self, x: &TraceTensor) -> Result<HostTensor> {
        let [n, h, w, c] = x.0;
        Ok(HostTensor::zeros(vec![n, c, h, w]))
    }

    fn dims(&self, x: &TraceTensor) -> [usize; 4] {
        x.0
    }

    fn prepare_conv(
        &self,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        spec: ConvSpec,
    ) -> Result<TraceParam> {
        match *weight.shape() {
            [o, i, kh, kw] => Ok(TraceParam::Conv {
                c_in: i * spec.groups,
                c_out: o,
                kh,
                kw,
                spec,
                bias: bias.is_some(),
            }),
            ref s => Err(EngineError::Shape(format!(
                "convolution weight must be OIHW, got {s:?}"
            ))),
        }
    }

    fn prepare_vector(&self, v: &HostTensor) -> Result<TraceParam> {
        Ok(TraceParam::Vector(v.numel()))
    }

    fn conv2d(
        &self,
        x: &TraceTensor,
        conv: &TraceParam,
        _act: Activation,
        residual: Option<&TraceTensor>,
    ) -> Result<TraceTensor> {
        let TraceParam::Conv {
            c_in,
            c_out,
            kh,
            kw,
            spec,
            bias,
        } = conv
        else {
            return Err(EngineError::Invalid(
                "conv2d needs convolution weights".into(),
            ));
        };
        let [n, h, w, _] = x.0;
        let oh = (h + 2 * spec.padding - kh) / spec.stride + 1;
        let ow = (w + 2 * spec.padding - kw) / spec.stride + 1;
        let out = TraceTensor([n, oh, ow, *c_out]);
        let per_out = (c_in / spec.groups * kh * kw) as u64;
        let weights = *c_out as u64 * per_out + if *bias { *c_out as u64 } else { 0 };
        let op = if *kh == 1 && *kw == 1 && spec.groups == 1 {
            "conv1x1"
        } else if spec.groups == *c_in && spec.groups > 1 {
            "conv_depthwise"
        } else {
            "conv_dense"
        };
        let io = numel(x) + numel(&out) + residual.map_or(0, numel);
        self.record(op, numel(&out) * per_out, io, weights);
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &TraceTensor,
        _w: &TraceParam,
        _b: Option<&TraceParam>,
        _eps: f32,
    ) -> Result<TraceTensor> {
        self.record("layer_norm", 0, 2 * numel(x), 0);
        Ok(*x)
    }

    fn gelu_gate(&self, x: &TraceTensor) -> Result<TraceTensor> {
        let [n, h, w, c] = x.0;
        let out = TraceTensor([n, h, w, c / 2]);
        self.record("gelu_gate", 0, numel(x) + numel(&out), 0);
        Ok(out)
    }

    fn channel_attention(
        &self,
        qkv: &TraceTensor,
        heads: usize,
        _temperature: &TraceParam,
        project_out: &TraceParam,
        residual: Option<&TraceTensor>,
    ) -> Result<TraceTensor> {
        let [n, h, w, c3] = qkv.0;
        let c = c3 / 3;
        let c_out = match project_out {
            TraceParam::Conv { c_out, .. } => *c_out,
            TraceParam::Vector(_) => {
                return Err(EngineError::Invalid(
                    "project_out must be a convolution".into(),
                ))
            }
        };
        let d = c / heads.max(1);
        let px = (n * h * w) as u64;
        let out = TraceTensor([n, h, w, c_out]);
        // Counted as the reference computes it: q k^T, attn v, then the projection.
        let macs = px * (2 * c * d + c * c_out) as u64;
        self.record(
            "channel_attention",
            macs,
            numel(qkv) + numel(&out) + residual.map_or(0, numel),
            (c * c_out) as u64,
        );
        Ok(out)
    }

    fn pixel_shuffle(&self, x: &TraceTensor, r: usize) -> Result<TraceTensor> {
        let [n, h, w, c] = x.0;
        self.record("shuffle", 0, 2 * numel(x), 0);
        Ok(TraceTensor([n, h * r, w * r, c / (r * r)]))
    }

    fn pixel_unshuffle(&self, x: &TraceTensor, r: usize) -> Result<TraceTensor> {
        let [n, h, w, c] = x.0;
        self.record("shuffle", 0, 2 * numel(x), 0);
        Ok(TraceTensor([n, h / r, w / r, c * r * r]))
    }

    fn concat_channels(&self, a: &TraceTensor, b: &TraceTensor) -> Result<TraceTensor> {
        let [n, h, w, c] = a.0;
        let out = TraceTensor([n, h, w, c + b.0[3]]);
        self.record("concat", 0, numel(a) + numel(b) + numel(&out), 0);
        Ok(out)
    }

    fn add(&self, a: &TraceTensor, _b: &TraceTensor) -> Result<TraceTensor> {
        self.record("add", 0, 3 * numel(a), 0);
        Ok(*a)
    }
}
