//! Spatial and channel rearrangements and element-wise maps (the CPU twins are in
//! `aperture_engine::cpu::spatial` and `cpu::sequence::concat_rows`).

use aperture_engine::{Backend, EngineError, Result};

use super::Arg;
use crate::backend::{CudaBackend, CudaTensor};

/// `det_unary`'s operation codes.
const AFFINE: i32 = 0;
const SIGMOID: i32 = 1;
const CLAMP: i32 = 2;

fn i32s(v: &[usize]) -> Vec<Arg> {
    v.iter().map(|&x| Arg::I32(x as i32)).collect()
}

/// The output height and width of a `kernel` x `kernel` max pool with `stride` (no
/// padding, floor mode), or why it does not fit.
fn pool_output((h, w): (usize, usize), kernel: usize, stride: usize) -> Result<(usize, usize)> {
    if kernel == 0 || stride == 0 || h < kernel || w < kernel {
        return Err(EngineError::Shape(format!(
            "max pool {kernel}x{kernel} stride {stride} does not fit a {h}x{w} input"
        )));
    }
    Ok(((h - kernel) / stride + 1, (w - kernel) / stride + 1))
}

impl CudaBackend {
    fn bytes(&self, elems: usize) -> f64 {
        (elems * self.esize()) as f64
    }

    pub(crate) fn det_reshape(&self, x: CudaTensor, dims: [usize; 4]) -> Result<CudaTensor> {
        if dims.iter().product::<usize>() != x.numel() {
            return Err(EngineError::Shape(format!(
                "cannot reshape {:?} to {dims:?}",
                x.dims
            )));
        }
        Ok(CudaTensor { buf: x.buf, dims })
    }

    /// 16-byte vectors per pixel when `c` channels are whole vectors and every tensor
    /// starts on a 16-byte boundary (the `*_vec` kernels), else `None`.
    fn channel_vectors(&self, c: usize, tensors: &[&CudaTensor]) -> Option<usize> {
        let row = c * self.esize();
        (row > 0 && row.is_multiple_of(16) && tensors.iter().all(|t| t.ptr().is_multiple_of(16)))
            .then_some(row / 16)
    }

    pub(crate) fn det_pad_zeros(
        &self,
        x: &CudaTensor,
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    ) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        let (oh, ow) = (h + top + bottom, w + left + right);
        let out_n = n * oh * ow * c;
        self.profiler.op(
            self,
            "pad_zeros",
            0.0,
            self.bytes(x.numel() + out_n),
            || {
                let out = self.alloc_tensor([n, oh, ow, c])?;
                let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr())];
                if let Some(cv) = self.channel_vectors(c, &[x, &out]) {
                    args.extend(i32s(&[n, h, w, cv, top, left, oh, ow]));
                    self.det_launch_1d("det_pad_vec", n * oh * ow * cv, &args)?;
                    return Ok(out);
                }
                args.extend(i32s(&[n, h, w, c, top, left, oh, ow]));
                self.det_launch_1d("det_pad", out_n, &args)?;
                Ok(out)
            },
        )
    }

    pub(crate) fn det_max_pool2d(
        &self,
        x: &CudaTensor,
        kernel: usize,
        stride: usize,
    ) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        let (oh, ow) = pool_output((h, w), kernel, stride)?;
        let out_n = n * oh * ow * c;
        self.profiler.op(
            self,
            "max_pool",
            (out_n * kernel * kernel) as f64,
            self.bytes(x.numel() + out_n),
            || {
                let out = self.alloc_tensor([n, oh, ow, c])?;
                let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr())];
                if let Some(cv) = self.channel_vectors(c, &[x, &out]) {
                    args.extend(i32s(&[n, h, w, cv, oh, ow, kernel, stride, cv]));
                    self.det_launch_1d("det_max_pool_vec", n * oh * ow * cv, &args)?;
                    return Ok(out);
                }
                args.extend(i32s(&[n, h, w, c, oh, ow, kernel, stride]));
                self.det_launch_1d("det_max_pool", out_n, &args)?;
                Ok(out)
            },
        )
    }

    /// `concat_channels(max_pool2d(x, kernel, stride), other)` with the pool writing its
    /// channels of the concatenation itself (16-byte vectors), so only `other` is copied;
    /// the two steps where the channel counts are off whole vectors.
    pub(crate) fn det_max_pool_concat(
        &self,
        x: &CudaTensor,
        kernel: usize,
        stride: usize,
        other: &CudaTensor,
    ) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        let (oh, ow) = pool_output((h, w), kernel, stride)?;
        let [on, ooh, oow, co] = other.dims;
        if (on, ooh, oow) != (n, oh, ow) {
            return Err(EngineError::Shape(format!(
                "cannot concatenate a {n}x{oh}x{ow} pool output and {:?} along channels",
                other.dims
            )));
        }
        let total = c + co;
        let pixels = n * oh * ow;
        let es = self.esize();
        // The output comes from the pool, whose blocks are 512-byte aligned: its second
        // part starts `c` elements in.
        let copy_at = |out: u64| crate::copy_rows::RowCopy {
            src: other.ptr(),
            dst: out + (c * es) as u64,
            rows: pixels,
            len: co,
            src_ld: co,
            dst_ld: total,
        };
        let vectorised = (
            self.channel_vectors(c, &[x]),
            self.channel_vectors(total, &[]),
            self.can_copy_vectorised(&copy_at(0)),
        );
        let (Some(cv), Some(ldv), true) = vectorised else {
            return self.concat_channels(&self.det_max_pool2d(x, kernel, stride)?, other);
        };
        let bytes = self.bytes(x.numel() + 2 * pixels * co + pixels * total);
        self.profiler.op(
            self,
            "max_pool_concat",
            (pixels * c * kernel * kernel) as f64,
            bytes,
            || {
                let out = self.alloc_tensor([n, oh, ow, total])?;
                if !out.ptr().is_multiple_of(16) {
                    return Err(EngineError::Device(format!(
                        "pool output at {:#x} is not 16-byte aligned",
                        out.ptr()
                    )));
                }
                let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr())];
                args.extend(i32s(&[n, h, w, cv, oh, ow, kernel, stride, ldv]));
                self.det_launch_1d("det_max_pool_vec", pixels * cv, &args)?;
                if !self.copy_vectorised(&copy_at(out.ptr()))? {
                    return Err(EngineError::Device(
                        "the pool's concatenation partner was not copied".into(),
                    ));
                }
                Ok(out)
            },
        )
    }

    pub(crate) fn det_upsample_nearest(&self, x: &CudaTensor, factor: usize) -> Result<CudaTensor> {
        if factor == 0 {
            return Err(EngineError::Invalid(
                "upsampling factor must be at least 1".into(),
            ));
        }
        let [n, h, w, c] = x.dims;
        let out_n = x.numel() * factor * factor;
        self.profiler
            .op(self, "upsample", 0.0, self.bytes(x.numel() + out_n), || {
                let out = self.alloc_tensor([n, h * factor, w * factor, c])?;
                let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr())];
                if let Some(cv) = self.channel_vectors(c, &[x, &out]) {
                    args.extend(i32s(&[n, h, w, cv, factor]));
                    self.det_launch_1d("det_upsample_vec", out_n / c * cv, &args)?;
                    return Ok(out);
                }
                args.extend(i32s(&[n, h, w, c, factor]));
                self.det_launch_1d("det_upsample", out_n, &args)?;
                Ok(out)
            })
    }

    fn det_unary(
        &self,
        name: &'static str,
        x: &CudaTensor,
        op: i32,
        a: f32,
        b: f32,
    ) -> Result<CudaTensor> {
        let n = x.numel();
        self.profiler
            .op(self, name, n as f64, self.bytes(2 * n), || {
                let out = self.alloc_tensor(x.dims)?;
                let args = [
                    Arg::Ptr(x.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(n as i64),
                    Arg::I32(op),
                    Arg::F32(a),
                    Arg::F32(b),
                ];
                self.det_launch_1d("det_unary", n, &args)?;
                Ok(out)
            })
    }

    pub(crate) fn det_affine(&self, x: &CudaTensor, scale: f32, shift: f32) -> Result<CudaTensor> {
        self.det_unary("affine", x, AFFINE, scale, shift)
    }

    pub(crate) fn det_sigmoid(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.det_unary("sigmoid", x, SIGMOID, 0.0, 0.0)
    }

    pub(crate) fn det_clamp(&self, x: &CudaTensor, lo: f32, hi: f32) -> Result<CudaTensor> {
        self.det_unary("clamp", x, CLAMP, lo, hi)
    }

    /// `rows` blocks of `len` elements from `src` (stride, offset) to `dst` (stride, offset).
    #[allow(clippy::too_many_arguments)]
    fn copy_block(
        &self,
        src: u64,
        dst: u64,
        rows: usize,
        len: usize,
        src_stride: usize,
        src_off: usize,
        dst_stride: usize,
        dst_off: usize,
    ) -> Result<()> {
        let es = self.esize() as u64;
        let vector = crate::copy_rows::RowCopy {
            src: src + src_off as u64 * es,
            dst: dst + dst_off as u64 * es,
            rows,
            len,
            src_ld: src_stride,
            dst_ld: dst_stride,
        };
        if self.copy_vectorised(&vector)? {
            return Ok(());
        }
        let args = [
            Arg::Ptr(src),
            Arg::Ptr(dst),
            Arg::I64(rows as i64),
            Arg::I64(len as i64),
            Arg::I64(src_stride as i64),
            Arg::I64(src_off as i64),
            Arg::I64(dst_stride as i64),
            Arg::I64(dst_off as i64),
        ];
        self.det_launch_1d("det_copy_block", rows * len, &args)
    }

    /// `rows` rows of `len` elements from `src` (rows `src_ld` apart) to `dst` (rows
    /// `dst_ld` apart): channel slices in and out of concatenations.
    pub(crate) fn copy_rows(
        &self,
        src: u64,
        src_ld: usize,
        dst: u64,
        dst_ld: usize,
        rows: usize,
        len: usize,
    ) -> Result<()> {
        self.copy_block(src, dst, rows, len, src_ld, 0, dst_ld, 0)
    }

    pub(crate) fn det_slice_channels(
        &self,
        x: &CudaTensor,
        start: usize,
        len: usize,
    ) -> Result<CudaTensor> {
        let [n, h, w, c] = x.dims;
        if start + len > c {
            return Err(EngineError::Shape(format!(
                "channels {start}..{} of a {c}-channel tensor",
                start + len
            )));
        }
        let p = n * h * w;
        self.profiler
            .op(self, "slice_channels", 0.0, self.bytes(2 * p * len), || {
                let out = self.alloc_tensor([n, h, w, len])?;
                if len > 0 {
                    self.copy_block(x.ptr(), out.ptr(), p, len, c, start, len, 0)?;
                }
                Ok(out)
            })
    }

    pub(crate) fn det_concat_channels_n(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        let first = parts
            .first()
            .ok_or_else(|| EngineError::Invalid("nothing to concatenate".into()))?;
        let [n, h, w, _] = first.dims;
        if let Some(p) = parts.iter().find(|p| p.dims[..3] != first.dims[..3]) {
            return Err(EngineError::Shape(format!(
                "cannot concatenate {:?} and {:?} along channels",
                first.dims, p.dims
            )));
        }
        let c: usize = parts.iter().map(|p| p.dims[3]).sum();
        let px = n * h * w;
        self.profiler
            .op(self, "concat_channels", 0.0, self.bytes(2 * px * c), || {
                let out = self.alloc_tensor([n, h, w, c])?;
                let mut at = 0;
                for p in parts {
                    let pc = p.dims[3];
                    if pc > 0 {
                        self.copy_block(p.ptr(), out.ptr(), px, pc, pc, 0, c, at)?;
                    }
                    at += pc;
                }
                Ok(out)
            })
    }

    pub(crate) fn det_concat_rows(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        let first = parts
            .first()
            .ok_or_else(|| EngineError::Invalid("nothing to concatenate".into()))?;
        let [n, _, _, c] = first.dims;
        if let Some(p) = parts
            .iter()
            .find(|p| p.dims[1] != 1 || p.dims[0] != n || p.dims[3] != c)
        {
            return Err(EngineError::Shape(format!(
                "cannot concatenate sequences {:?} and {:?}",
                first.dims, p.dims
            )));
        }
        let total: usize = parts.iter().map(|p| p.dims[2]).sum();
        self.profiler.op(
            self,
            "concat_rows",
            0.0,
            self.bytes(2 * n * total * c),
            || {
                let out = self.alloc_tensor([n, 1, total, c])?;
                let mut at = 0;
                for p in parts {
                    let len = p.dims[2] * c;
                    if len > 0 {
                        self.copy_block(p.ptr(), out.ptr(), n, len, len, 0, total * c, at * c)?;
                    }
                    at += p.dims[2];
                }
                Ok(out)
            },
        )
    }

    pub(crate) fn det_mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let [n, h, w, c] = a.dims;
        let bc = b.dims[3];
        if a.dims[..3] != b.dims[..3] || (bc != c && bc != 1) {
            return Err(EngineError::Shape(format!(
                "cannot multiply {:?} by {:?}",
                a.dims, b.dims
            )));
        }
        let p = n * h * w;
        self.profiler.op(
            self,
            "mul",
            a.numel() as f64,
            self.bytes(2 * a.numel() + b.numel()),
            || {
                let out = self.alloc_tensor(a.dims)?;
                let args = [
                    Arg::Ptr(a.ptr()),
                    Arg::Ptr(b.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(p as i64),
                    Arg::I32(c as i32),
                    Arg::I32(bc as i32),
                ];
                self.det_launch_1d("det_mul", a.numel(), &args)?;
                Ok(out)
            },
        )
    }
}
