//! Sequence operations on `[B, 1, L, C]` tensors: multi-head attention, D-FINE's gated
//! residual and multi-scale deformable attention (CPU twins: `cpu::sequence`,
//! `cpu::deformable`).

use std::sync::OnceLock;

use aperture_engine::backend::DeformableSpec;
use aperture_engine::{EngineError, Result};

use super::{Arg, MAX_LEVELS};
use crate::backend::{CudaBackend, CudaTensor};
use crate::kernels::Storage;

/// Warps per block of the attention kernels (one query row per warp).
const WARPS: usize = 4;
/// Shared memory the attention kernel may use per block without opting in.
const SMEM_LIMIT: usize = 48 * 1024;
/// Channels per head the deformable kernel holds per lane (4 x 32).
const MAX_HEAD_DIM: usize = 128;

/// Query rows per block of the tensor-core attention kernels (`DET_TC_ROWS`).
const TC_ROWS: usize = 64;
/// Threads per block of the tensor-core attention kernels (`DET_TC_THREADS`).
const TC_THREADS: u32 = 128;

/// The tensor-core attention kernel for head size `d`, if one applies: 16-bit storage,
/// `d` a multiple of 16 up to 128, compute capability 8.0 or later (mma.sync, cp.async)
/// and 16-byte aligned tensors (`aligned`). Anything else takes the scalar kernel.
fn tensor_core_kernel(
    storage: Storage,
    capability: (i32, i32),
    d: usize,
    aligned: bool,
) -> Option<&'static str> {
    if storage == Storage::F32 || capability.0 < 8 || !aligned {
        return None;
    }
    Some(match d {
        16 => "det_attention_tc16",
        32 => "det_attention_tc32",
        48 => "det_attention_tc48",
        64 => "det_attention_tc64",
        80 => "det_attention_tc80",
        96 => "det_attention_tc96",
        112 => "det_attention_tc112",
        128 => "det_attention_tc128",
        _ => return None,
    })
}

impl CudaBackend {
    pub(crate) fn det_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        scale: f32,
    ) -> Result<CudaTensor> {
        let [b, qh, lq, c] = q.dims;
        if heads == 0 || c % heads != 0 {
            return Err(EngineError::Shape(format!(
                "{c} channels cannot split into {heads} heads"
            )));
        }
        if qh != 1 || k.dims[1] != 1 || k.dims != v.dims || k.dims[3] != c || k.dims[0] != b {
            return Err(EngineError::Shape(format!(
                "attention needs sequences [B, 1, L, C]: q {:?}, k {:?}, v {:?}",
                q.dims, k.dims, v.dims
            )));
        }
        let lk = k.dims[2];
        let d = c / heads;
        if [b, lq, lk, c].iter().any(|&n| n > i32::MAX as usize) {
            return Err(EngineError::Unsupported(format!(
                "attention over {:?} x {:?} exceeds the kernels' 32-bit sizes",
                q.dims, k.dims
            )));
        }
        let flops = 4.0 * (b * heads * lq * lk * d) as f64;
        let bytes = ((2 * q.numel() + 2 * k.numel()) * self.esize()) as f64;
        let aligned = [q.ptr(), k.ptr(), v.ptr()].iter().all(|p| p % 16 == 0);
        let blocks = b * heads * lq.div_ceil(TC_ROWS);
        let tc = tensor_core_kernel(self.storage, self.ctx.capability, d, aligned)
            .filter(|_| lk > 0 && blocks <= i32::MAX as usize);
        if tc.is_none() && WARPS * (d + lk) * 4 > SMEM_LIMIT {
            return Err(EngineError::Unsupported(format!(
                "the CUDA attention kernel takes up to {} keys of head size {d} in {:?}; got {lk}",
                (SMEM_LIMIT / (4 * WARPS)).saturating_sub(d),
                self.storage
            )));
        }
        self.profiler.op(self, "attention", flops, bytes, || {
            let out = self.alloc_tensor(q.dims)?;
            if lq == 0 || b == 0 {
                return Ok(out);
            }
            let ptrs = [
                Arg::Ptr(q.ptr()),
                Arg::Ptr(k.ptr()),
                Arg::Ptr(v.ptr()),
                Arg::Ptr(out.ptr()),
            ];
            if let Some(name) = tc {
                if out.ptr() % 16 != 0 {
                    return Err(EngineError::Device(format!(
                        "{name}: the output buffer is not 16-byte aligned"
                    )));
                }
                let mut args = ptrs.to_vec();
                args.extend([
                    Arg::I32(lq as i32),
                    Arg::I32(lk as i32),
                    Arg::I32(c as i32),
                    Arg::I32(heads as i32),
                    Arg::F32(scale),
                ]);
                self.det_launch_grid(name, (blocks as u32, 1), TC_THREADS, 0, &args)?;
                return Ok(out);
            }
            let mut args = ptrs.to_vec();
            args.extend([
                Arg::I32(b as i32),
                Arg::I32(lq as i32),
                Arg::I32(lk as i32),
                Arg::I32(c as i32),
                Arg::I32(heads as i32),
                Arg::F32(scale),
            ]);
            let smem = WARPS * (d + lk) * 4;
            self.det_launch(
                "det_attention",
                b * heads * lq * 32,
                (WARPS * 32) as u32,
                smem as u32,
                &args,
            )?;
            Ok(out)
        })
    }

    pub(crate) fn det_gated_sum(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        gates: &CudaTensor,
    ) -> Result<CudaTensor> {
        let [n, h, w, c] = a.dims;
        if a.dims != b.dims || gates.dims != [n, h, w, 2 * c] {
            return Err(EngineError::Shape(format!(
                "gate over {:?} and {:?} needs gates of {} channels, got {:?}",
                a.dims,
                b.dims,
                2 * c,
                gates.dims
            )));
        }
        let p = n * h * w;
        self.profiler.op(
            self,
            "gated_sum",
            10.0 * a.numel() as f64,
            ((5 * a.numel()) * self.esize()) as f64,
            || {
                let out = self.alloc_tensor(a.dims)?;
                let args = [
                    Arg::Ptr(a.ptr()),
                    Arg::Ptr(b.ptr()),
                    Arg::Ptr(gates.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(p as i64),
                    Arg::I32(c as i32),
                ];
                self.det_launch_1d("det_gated_sum", a.numel(), &args)?;
                Ok(out)
            },
        )
    }

    pub(crate) fn det_deformable(
        &self,
        value: &CudaTensor,
        offsets: &CudaTensor,
        logits: &CudaTensor,
        boxes: &CudaTensor,
        spec: &DeformableSpec,
    ) -> Result<CudaTensor> {
        let [b, _, _, c] = value.dims;
        let heads = spec.heads;
        let p_total: usize = spec.points.iter().sum();
        let s_total: usize = spec.shapes.iter().map(|(h, w)| h * w).sum();
        let q = offsets.dims[2];
        if heads == 0
            || c % heads != 0
            || spec.points.len() != spec.shapes.len()
            || spec.points.contains(&0)
        {
            return Err(EngineError::Shape(format!(
                "deformable attention: {c} channels, {heads} heads, {} levels, points {:?}",
                spec.shapes.len(),
                spec.points
            )));
        }
        if spec.shapes.len() > MAX_LEVELS || c / heads > MAX_HEAD_DIM {
            return Err(EngineError::Unsupported(format!(
                "the CUDA deformable attention takes up to {MAX_LEVELS} levels and heads of up to {MAX_HEAD_DIM} channels; got {} levels of {} channels",
                spec.shapes.len(),
                c / heads
            )));
        }
        let want = [
            (value, [b, 1, s_total, c]),
            (offsets, [b, 1, q, heads * p_total * 2]),
            (logits, [b, 1, q, heads * p_total]),
            (boxes, [b, 1, q, 4]),
        ];
        for (t, dims) in want {
            if t.dims != dims {
                return Err(EngineError::Shape(format!(
                    "deformable attention: expected {dims:?}, got {:?}",
                    t.dims
                )));
            }
        }
        if b * q * heads > i32::MAX as usize || s_total * c > i32::MAX as usize {
            return Err(EngineError::Unsupported(format!(
                "the CUDA deformable attention takes fewer than 2^31 (image, query, head) tasks and value elements per image; got {b} x {q} x {heads} tasks, {s_total} x {c} values"
            )));
        }
        let mut levels = [0i32; 4 * MAX_LEVELS];
        let mut start = 0;
        for (l, (&(h, w), &np)) in spec.shapes.iter().zip(&spec.points).enumerate() {
            levels[4 * l..4 * l + 4].copy_from_slice(&[
                h as i32,
                w as i32,
                start as i32,
                np as i32,
            ]);
            start += h * w;
        }
        let d = c / heads;
        let flops = 8.0 * (b * q * heads * p_total * d) as f64;
        let bytes = ((b * q * (c + heads * p_total * 3 + 4) + b * q * heads * p_total * 4 * d)
            * self.esize()) as f64;
        self.profiler
            .op(self, "deformable_attention", flops, bytes, || {
                let out = self.alloc_tensor([b, 1, q, c])?;
                let args = [
                    Arg::Ptr(value.ptr()),
                    Arg::Ptr(offsets.ptr()),
                    Arg::Ptr(logits.ptr()),
                    Arg::Ptr(boxes.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I32(b as i32),
                    Arg::I32(q as i32),
                    Arg::I32(c as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(s_total as i32),
                    Arg::I32(spec.shapes.len() as i32),
                    Arg::F32(spec.offset_scale),
                    Arg::I32(spec.discrete as i32),
                    Arg::I32x16(levels),
                ];
                self.det_launch(
                    deformable_kernel(c, d),
                    b * q * heads * 32,
                    (WARPS * 32) as u32,
                    0,
                    &args,
                )?;
                Ok(out)
            })
    }
}

/// `det_deformable_vec` (four taps per load instruction, four channels per lane; with
/// up to 32 points the lanes share the softmax and sample arithmetic, one point per lane)
/// where heads and rows allow its vector loads (`c` and `d` multiples of 4), in its
/// one-group form `det_deformable_vec32` for heads of up to 32 channels, else
/// `det_deformable`; `APERTURE_DEFORMABLE=scalar` keeps `det_deformable` (A/B runs).
/// On the H100 the vector kernel took D-FINE-X from 26.2 to 25.4 ms per batch of 32 (p50).
fn deformable_kernel(c: usize, d: usize) -> &'static str {
    static VEC: OnceLock<bool> = OnceLock::new();
    let vec = *VEC.get_or_init(|| std::env::var("APERTURE_DEFORMABLE").as_deref() != Ok("scalar"));
    deformable_kernel_for(vec, c, d)
}

fn deformable_kernel_for(vec: bool, c: usize, d: usize) -> &'static str {
    if vec && c.is_multiple_of(4) && d.is_multiple_of(4) {
        // One 32-channel group per lane set where the heads are that narrow.
        if d <= 32 {
            "det_deformable_vec32"
        } else {
            "det_deformable_vec"
        }
    } else {
        "det_deformable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::DETECTION_KERNELS;

    #[test]
    fn kernel_level_limit_matches_the_host() {
        let define = format!("#define DET_MAX_LEVELS {MAX_LEVELS}\n");
        assert!(crate::detection::DETECTION_SOURCE.contains(&define));
    }

    #[test]
    fn vector_deformable_kernel_needs_whole_four_channel_groups() {
        assert_eq!(deformable_kernel_for(true, 256, 32), "det_deformable_vec32");
        assert_eq!(deformable_kernel_for(true, 64, 16), "det_deformable_vec32");
        assert_eq!(deformable_kernel_for(true, 384, 128), "det_deformable_vec");
        assert_eq!(deformable_kernel_for(true, 384, 48), "det_deformable_vec");
        assert_eq!(deformable_kernel_for(true, 30, 6), "det_deformable");
        assert_eq!(deformable_kernel_for(true, 18, 9), "det_deformable");
        assert_eq!(deformable_kernel_for(false, 256, 32), "det_deformable");
        assert!(DETECTION_KERNELS.contains(&"det_deformable_vec"));
    }

    #[test]
    fn tensor_cores_serve_16_bit_heads_of_16_to_128_channels() {
        for s in [Storage::F16, Storage::BF16] {
            for d in (16..=128).step_by(16) {
                let name = tensor_core_kernel(s, (9, 0), d, true).unwrap();
                assert_eq!(name, format!("det_attention_tc{d}"));
                assert!(
                    DETECTION_KERNELS.contains(&name),
                    "{name} is not registered"
                );
            }
            for d in [8, 24, 40, 144, 256] {
                assert_eq!(tensor_core_kernel(s, (9, 0), d, true), None, "d = {d}");
            }
            assert_eq!(tensor_core_kernel(s, (7, 5), 32, true), None);
            assert_eq!(tensor_core_kernel(s, (9, 0), 32, false), None);
        }
        assert_eq!(tensor_core_kernel(Storage::F32, (9, 0), 32, true), None);
    }
}
