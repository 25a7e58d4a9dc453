//! `impl Backend for CudaBackend`: each engine operation, to its kernel or module.

use aperture_engine::backend::{
    conv2d_masked_unfused, front_half_unfused, norm_product_unfused, Activation, Backend, ConvSpec,
    DeformableSpec, FrontHalf, NormProduct,
};
use aperture_engine::{ConvNode, EngineError, HostTensor, NodeRef, Result};
use cudarc::driver::result;

use super::{CudaBackend, CudaParam, CudaTensor};
use crate::error::CudaError;
use crate::kernels::Arg;

fn check_same(a: &CudaTensor, b: &CudaTensor, what: &str) -> Result<()> {
    if a.dims != b.dims {
        return Err(EngineError::Shape(format!(
            "cannot {what} {:?} and {:?}",
            a.dims, b.dims
        )));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Param = CudaParam;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, {})",
            self.ctx.ordinal, self.ctx.name, self.precision
        )
    }

    /// Eight 2-byte elements: rows of 16 bytes for the tensor-core products.
    fn preferred_channel_multiple(&self) -> usize {
        8
    }

    fn upload_nchw(&self, x: &HostTensor) -> Result<CudaTensor> {
        let s = x.shape();
        if s.len() != 4 {
            return Err(EngineError::Shape(format!(
                "expected an NCHW image tensor (4-D), got shape {s:?}"
            )));
        }
        let staging = self.upload_bytes(&x.to_f32_vec())?;
        self.tensor_from_staging(staging.ptr(), [s[0], s[1], s[2], s[3]])
    }

    fn download_nchw(&self, x: &CudaTensor) -> Result<HostTensor> {
        let staging = self.pool.alloc(x.numel() * 4)?;
        self.to_staging(x, staging.ptr())?;
        let mut host = vec![0f32; x.numel()];
        self.ctx.bind()?;
        // SAFETY: `staging` holds numel f32 values; the stream is synchronised before
        // `host` is read.
        unsafe {
            result::memcpy_dtoh_async(&mut host, staging.ptr(), self.ctx.stream)
                .map_err(CudaError::from)?;
            result::stream::synchronize(self.ctx.stream).map_err(CudaError::from)?;
        }
        let [n, h, w, c] = x.dims;
        HostTensor::from_f32(vec![n, c, h, w], host)
    }

    fn dims(&self, x: &CudaTensor) -> [usize; 4] {
        x.dims
    }

    fn prepare_conv(
        &self,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        spec: ConvSpec,
    ) -> Result<CudaParam> {
        Ok(CudaParam::Conv(crate::conv::prepare(
            self, weight, bias, spec,
        )?))
    }

    fn prepare_vector(&self, v: &HostTensor) -> Result<CudaParam> {
        let data = v.to_f32_vec();
        Ok(CudaParam::Vector {
            buf: self.upload_bytes(&data)?,
            len: data.len(),
        })
    }

    fn conv2d(
        &self,
        x: &CudaTensor,
        conv: &CudaParam,
        act: Activation,
        residual: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        crate::conv::conv2d(self, x, conv.conv()?, act, residual)
    }

    fn depthwise_gelu_gate(&self, x: &CudaTensor, conv: &CudaParam) -> Result<CudaTensor> {
        match crate::depthwise::depthwise_gelu_gate(self, x, conv.conv()?)? {
            Some(out) => Ok(out),
            None => self.gelu_gate(&self.conv2d(x, conv, Activation::Identity, None)?),
        }
    }

    fn norm_pointwise(&self, x: &CudaTensor, f: &NormProduct<'_, CudaParam>) -> Result<CudaTensor> {
        match crate::front::norm_pointwise(self, x, f)? {
            Some(out) => Ok(out),
            None => norm_product_unfused(self, x, f),
        }
    }

    fn norm_pointwise_depthwise(
        &self,
        x: &CudaTensor,
        f: &FrontHalf<'_, CudaParam>,
    ) -> Result<CudaTensor> {
        match crate::front::norm_pointwise_depthwise(self, x, f)? {
            Some(out) => Ok(out),
            None => front_half_unfused(self, x, f),
        }
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaParam,
        bias: Option<&CudaParam>,
        eps: f32,
    ) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        let (wb, wl) = weight.vector()?;
        let bias = bias.map(|b| b.vector()).transpose()?;
        if wl != c || bias.is_some_and(|(_, l)| l != c) {
            return Err(EngineError::Shape(format!(
                "layer norm over {c} channels got parameters of another size"
            )));
        }
        let p = n * h * w;
        let bytes = 2 * x.numel() * self.esize();
        self.profiler.op(
            self,
            "layer_norm",
            8.0 * x.numel() as f64,
            bytes as f64,
            || {
                let out = self.alloc_tensor(x.dims)?;
                // Eight lanes per pixel with 16-byte accesses when the channels allow it,
                // else a warp per pixel.
                let (kernel, lanes) = if c % 8 == 0 && c <= 384 && x.ptr().is_multiple_of(16) {
                    ("layer_norm8", 8usize)
                } else if c % 2 == 0 && c <= 512 {
                    ("layer_norm2", 32)
                } else {
                    ("layer_norm", 32)
                };
                let pixels_per_block = 256 / lanes;
                let grid = p.div_ceil(pixels_per_block) as u32;
                self.kernels.launch(
                    &self.ctx,
                    kernel,
                    (grid.max(1), 1, 1),
                    256,
                    0,
                    &[
                        Arg::Ptr(x.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::Ptr(wb.ptr()),
                        Arg::Ptr(bias.map(|(b, _)| b.ptr()).unwrap_or(0)),
                        Arg::I64(p as i64),
                        Arg::I32(c as i32),
                        Arg::F32(eps),
                        Arg::I32(bias.is_some() as i32),
                    ],
                )?;
                Ok(out)
            },
        )
    }

    fn gelu_gate(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        if c % 2 != 0 {
            return Err(EngineError::Shape(format!(
                "gated GELU needs an even channel count, got {c}"
            )));
        }
        let p = n * h * w;
        let bytes = (x.numel() + x.numel() / 2) * self.esize();
        self.profiler.op(
            self,
            "gelu_gate",
            10.0 * (x.numel() / 2) as f64,
            bytes as f64,
            || {
                let out = self.alloc_tensor([n, h, w, c / 2])?;
                self.launch_1d(
                    "gelu_gate",
                    p * c / 2,
                    &[
                        Arg::Ptr(x.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::I64(p as i64),
                        Arg::I32((c / 2) as i32),
                    ],
                )?;
                Ok(out)
            },
        )
    }

    fn channel_attention(
        &self,
        qkv: &CudaTensor,
        heads: usize,
        temperature: &CudaParam,
        project_out: &CudaParam,
        residual: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        crate::attention::channel_attention(
            self,
            qkv,
            heads,
            temperature,
            project_out.conv()?,
            residual,
        )
    }

    fn pixel_shuffle(&self, x: &CudaTensor, r: usize) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        if r == 0 || c % (r * r) != 0 {
            return Err(EngineError::Shape(format!(
                "pixel shuffle by {r} needs channels divisible by {}, got {c}",
                r * r
            )));
        }
        let bytes = 2 * x.numel() * self.esize();
        self.profiler
            .op(self, "pixel_shuffle", 0.0, bytes as f64, || {
                let out = self.alloc_tensor([n, h * r, w * r, c / (r * r)])?;
                let dims = [n, h, w, c].map(|v| Arg::I32(v as i32));
                let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr())];
                args.extend(dims);
                args.push(Arg::I32(r as i32));
                self.launch_1d("pixel_shuffle", x.numel(), &args)?;
                Ok(out)
            })
    }

    fn pixel_unshuffle(&self, x: &CudaTensor, r: usize) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        if r == 0 || h % r != 0 || w % r != 0 {
            return Err(EngineError::Shape(format!(
                "pixel unshuffle by {r} needs H and W divisible by {r}, got {h}x{w}"
            )));
        }
        let bytes = 2 * x.numel() * self.esize();
        self.profiler
            .op(self, "pixel_unshuffle", 0.0, bytes as f64, || {
                let out = self.alloc_tensor([n, h / r, w / r, c * r * r])?;
                let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr())];
                args.extend([n, h, w, c].map(|v| Arg::I32(v as i32)));
                args.push(Arg::I32(r as i32));
                self.launch_1d("pixel_unshuffle", x.numel(), &args)?;
                Ok(out)
            })
    }

    fn concat_channels(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let ([n, h, w, ca], [bn, bh, bw, cb]) = (a.dims, b.dims);
        if (n, h, w) != (bn, bh, bw) {
            return Err(EngineError::Shape(format!(
                "cannot concatenate {:?} and {:?} along channels",
                a.dims, b.dims
            )));
        }
        let p = n * h * w;
        let bytes = 2 * (a.numel() + b.numel()) * self.esize();
        self.profiler.op(self, "concat", 0.0, bytes as f64, || {
            let out = self.alloc_tensor([n, h, w, ca + cb])?;
            // Both halves as 16-byte vector copies where they allow (16-bit storage,
            // channel counts in eights), else one element-wise kernel.
            let es = self.esize() as u64;
            let part = |t: &CudaTensor, c: usize, at: usize| crate::copy_rows::RowCopy {
                src: t.ptr(),
                dst: out.ptr() + at as u64 * es,
                rows: p,
                len: c,
                src_ld: c,
                dst_ld: ca + cb,
            };
            let halves = [part(a, ca, 0), part(b, cb, ca)];
            if halves.iter().all(|c| self.can_copy_vectorised(c)) {
                for c in &halves {
                    self.copy_vectorised(c)?;
                }
                return Ok(out);
            }
            self.launch_1d(
                "concat_channels",
                p * (ca + cb),
                &[
                    Arg::Ptr(a.ptr()),
                    Arg::Ptr(b.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(p as i64),
                    Arg::I32(ca as i32),
                    Arg::I32(cb as i32),
                ],
            )?;
            Ok(out)
        })
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        check_same(a, b, "add")?;
        let bytes = 3 * a.numel() * self.esize();
        self.profiler
            .op(self, "add", a.numel() as f64, bytes as f64, || {
                let out = self.alloc_tensor(a.dims)?;
                self.launch_1d(
                    "add",
                    a.numel(),
                    &[
                        Arg::Ptr(a.ptr()),
                        Arg::Ptr(b.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::I64(a.numel() as i64),
                    ],
                )?;
                Ok(out)
            })
    }

    // ---- Detection operations: crate::detection.

    fn upload_nhwc(&self, x: &HostTensor) -> Result<CudaTensor> {
        self.det_upload_nhwc(x)
    }
    fn download_nhwc(&self, x: &CudaTensor) -> Result<HostTensor> {
        self.det_download_nhwc(x)
    }
    fn reshape(&self, x: CudaTensor, dims: [usize; 4]) -> Result<CudaTensor> {
        self.det_reshape(x, dims)
    }
    fn pad_zeros(
        &self,
        x: &CudaTensor,
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    ) -> Result<CudaTensor> {
        self.det_pad_zeros(x, top, bottom, left, right)
    }
    fn max_pool2d(&self, x: &CudaTensor, kernel: usize, stride: usize) -> Result<CudaTensor> {
        self.det_max_pool2d(x, kernel, stride)
    }
    fn max_pool_concat(
        &self,
        x: &CudaTensor,
        kernel: usize,
        stride: usize,
        other: &CudaTensor,
    ) -> Result<CudaTensor> {
        self.det_max_pool_concat(x, kernel, stride, other)
    }
    fn conv2d_pad_after(
        &self,
        x: &CudaTensor,
        conv: &CudaParam,
        act: Activation,
        bottom: usize,
        right: usize,
    ) -> Result<CudaTensor> {
        crate::conv::conv2d_pad_after(self, x, conv.conv()?, act, (bottom, right))
    }
    fn conv2d_masked(
        &self,
        x: &CudaTensor,
        keep: &HostTensor,
        conv: &CudaParam,
        act: Activation,
    ) -> Result<CudaTensor> {
        match crate::detection::conv2d_masked(self, x, keep, conv.conv()?, act)? {
            Some(y) => Ok(y),
            None => conv2d_masked_unfused(self, x, keep, conv, act),
        }
    }
    fn upsample_nearest(&self, x: &CudaTensor, factor: usize) -> Result<CudaTensor> {
        self.det_upsample_nearest(x, factor)
    }
    fn affine(&self, x: &CudaTensor, scale: f32, shift: f32) -> Result<CudaTensor> {
        self.det_affine(x, scale, shift)
    }
    fn slice_channels(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        self.det_slice_channels(x, start, len)
    }
    fn concat_channels_n(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        self.det_concat_channels_n(parts)
    }
    fn conv_chain_concat(
        &self,
        x: &CudaTensor,
        layers: &[Vec<(&CudaParam, Activation)>],
    ) -> Result<CudaTensor> {
        crate::conv_concat::conv_chain_concat(self, x, layers)
    }
    fn conv_chain_aggregate(
        &self,
        x: &CudaTensor,
        layers: &[Vec<(&CudaParam, Activation)>],
        squeeze: &CudaParam,
        act: Activation,
    ) -> Result<CudaTensor> {
        crate::conv_aggregate::conv_chain_aggregate(self, x, layers, squeeze, act)
    }
    fn conv_nodes_concat(
        &self,
        x: &CudaTensor,
        nodes: &[ConvNode<'_, CudaParam>],
        concat: &[NodeRef],
    ) -> Result<CudaTensor> {
        crate::conv_concat::conv_nodes_concat(self, x, nodes, concat)
    }
    fn concat_rows(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        self.det_concat_rows(parts)
    }
    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.det_mul(a, b)
    }
    fn sigmoid(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.det_sigmoid(x)
    }
    fn clamp(&self, x: &CudaTensor, lo: f32, hi: f32) -> Result<CudaTensor> {
        self.det_clamp(x, lo, hi)
    }
    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        scale: f32,
    ) -> Result<CudaTensor> {
        self.det_attention(q, k, v, heads, scale)
    }
    fn gated_sum(&self, a: &CudaTensor, b: &CudaTensor, gates: &CudaTensor) -> Result<CudaTensor> {
        self.det_gated_sum(a, b, gates)
    }
    fn deformable_attention(
        &self,
        value: &CudaTensor,
        offsets: &CudaTensor,
        attention_logits: &CudaTensor,
        reference_boxes: &CudaTensor,
        spec: &DeformableSpec,
    ) -> Result<CudaTensor> {
        self.det_deformable(value, offsets, attention_logits, reference_boxes, spec)
    }
    fn top_k_rows(&self, x: &CudaTensor, k: usize) -> Result<Vec<Vec<usize>>> {
        self.det_top_k_rows(x, k)
    }
    fn select_rows(
        &self,
        scores: &CudaTensor,
        k: usize,
        sources: &[&CudaTensor],
    ) -> Result<Vec<CudaTensor>> {
        self.det_select_rows(scores, k, sources)
    }
    fn gather_rows(&self, x: &CudaTensor, rows: &[Vec<usize>]) -> Result<CudaTensor> {
        self.det_gather_rows(x, rows)
    }
    fn refine_boxes(&self, delta: &CudaTensor, boxes: &CudaTensor) -> Result<CudaTensor> {
        self.det_refine_boxes(delta, boxes)
    }
    fn distribution_boxes(
        &self,
        corners: &CudaTensor,
        reference: &CudaTensor,
        project: &[f32],
        reg_scale: f32,
    ) -> Result<CudaTensor> {
        self.det_distribution_boxes(corners, reference, project, reg_scale)
    }
    fn corner_stats(&self, corners: &CudaTensor, bins: usize, top_k: usize) -> Result<CudaTensor> {
        self.det_corner_stats(corners, bins, top_k)
    }
}
