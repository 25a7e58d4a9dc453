//! Restormer's MDTA in three steps: (1) per-head Gram maps q.k^T over H*W as batched
//! tensor-core products over pixel chunks, plus squared norms of q and k; (2) one small
//! kernel per (image, head) that sums the chunks, normalises, scales by the temperature,
//! takes the softmax and folds the map into the project_out weights; (3) one batched
//! product per image `y = v . folded + bias + residual`. q, k and v are read in place
//! from the qkv tensor; nothing of size H*W*C is written besides the output.

use aperture_engine::{EngineError, Result};

use crate::backend::{ConvWeights, CudaBackend, CudaParam, CudaTensor};
use crate::gemm::{Elem, GemmCall, Operand};
use crate::kernels::Arg;

/// Pixels per partial Gram product (the split of the H*W reduction).
const MAX_CHUNK: usize = 4096;
/// Pixels per block of the sum-of-squares kernel.
const SUMSQ_PIXELS: usize = 256;

/// Largest divisor of `hw` no larger than `MAX_CHUNK`, so chunks never straddle images.
pub(crate) fn chunk_pixels(hw: usize) -> usize {
    if hw <= MAX_CHUNK {
        return hw.max(1);
    }
    let best = (1..=MAX_CHUNK)
        .rev()
        .find(|s| hw.is_multiple_of(*s))
        .unwrap_or(1);
    // A tiny divisor (H*W with a large prime factor) would mean many tiny products:
    // one chunk per image is better then.
    if best < 256 {
        hw
    } else {
        best
    }
}

pub(crate) fn channel_attention(
    be: &CudaBackend,
    qkv: &CudaTensor,
    heads: usize,
    temperature: &CudaParam,
    proj: &ConvWeights,
    residual: Option<&CudaTensor>,
) -> Result<CudaTensor> {
    let [n, h, w, c3] = qkv.dims;
    if c3 % 3 != 0 || heads == 0 || (c3 / 3) % heads != 0 {
        return Err(EngineError::Shape(format!(
            "attention over {c3} qkv channels cannot split into {heads} heads"
        )));
    }
    let c = c3 / 3;
    let d = c / heads;
    let (temp, tlen) = temperature.vector()?;
    if tlen != heads {
        return Err(EngineError::Shape(format!(
            "temperature has {tlen} entries for {heads} heads"
        )));
    }
    let w_f32 = match (&proj.weight_f32, proj.c_in == c, proj.depthwise) {
        (Some(wf), true, false) => wf,
        _ => {
            return Err(EngineError::Shape(format!(
                "project_out must be a 1x1 convolution from {c} channels"
            )))
        }
    };
    if d * d * 4 > 48 * 1024 {
        return Err(EngineError::Unsupported(format!(
            "attention heads of {d} channels (the CUDA kernel takes up to 110)"
        )));
    }
    let c_out = proj.c_out;
    let dims = [n, h, w, c_out];
    if let Some(r) = residual {
        if r.dims != dims {
            return Err(EngineError::Shape(format!(
                "residual {:?} does not match attention output {dims:?}",
                r.dims
            )));
        }
    }
    let hw = h * w;
    let chunk = chunk_pixels(hw);
    let chunks = hw / chunk;
    let elem = be.elem();
    let es = be.esize() as u64;
    let base = qkv.ptr();

    // (1) Gram maps and norms.
    let gram_flops = 2.0 * (n * hw * heads * d * d) as f64;
    let gram = be.profiler.op(
        be,
        "mdta_gram",
        gram_flops,
        (2 * n * hw * c) as f64 * es as f64,
        || {
            let gram = be.pool.alloc(n * chunks * heads * d * d * 4)?;
            for hd in 0..heads {
                let q = Operand {
                    ptr: base + (hd * d) as u64 * es,
                    rows: d as u64,
                    cols: chunk as u64,
                    ld: c3 as i64,
                    stride: (chunk * c3) as i64,
                    elem,
                };
                let k = Operand {
                    ptr: base + (c + hd * d) as u64 * es,
                    ..q
                };
                let out = Operand {
                    ptr: gram.ptr() + (hd * d * d * 4) as u64,
                    rows: d as u64,
                    cols: d as u64,
                    ld: d as i64,
                    stride: (heads * d * d) as i64,
                    elem: Elem::F32,
                };
                let call = GemmCall {
                    a: q,
                    trans_a: false,
                    b: k,
                    trans_b: true,
                    c: None,
                    d: out,
                    batch: (n * chunks) as i32,
                    bias: None,
                    relu: false,
                    tf32: be.tf32(),
                };
                be.run_gemm(&call)?;
            }
            Ok(gram)
        },
    )?;
    let nrm = be.profiler.op(
        be,
        "mdta_norms",
        4.0 * (n * hw * c) as f64,
        (2 * n * hw * c) as f64 * es as f64,
        || {
            let nrm = be.pool.alloc(n * 2 * c * 4)?;
            be.memset(nrm.ptr(), 0, n * 2 * c * 4)?;
            let block = (2 * c).div_ceil(32).clamp(1, 32) as u32 * 32;
            be.kernels.launch(
                &be.ctx,
                "mdta_sumsq",
                (hw.div_ceil(SUMSQ_PIXELS) as u32, n as u32, 1),
                block,
                0,
                &[
                    Arg::Ptr(base),
                    Arg::Ptr(nrm.ptr()),
                    Arg::I64(hw as i64),
                    Arg::I32(c as i32),
                    Arg::I32(SUMSQ_PIXELS as i32),
                ],
            )?;
            Ok(nrm)
        },
    )?;

    // (2) Softmax of the normalised maps, then the fold into the projection:
    // folded[n][o][c] in the storage type.
    let fold_flops = 2.0 * (n * heads * c_out * d * d) as f64;
    let folded = be.profiler.op(
        be,
        "mdta_softmax_fold",
        fold_flops,
        (n * chunks * heads * d * d * 4) as f64,
        || {
            let attn = be.pool.alloc(n * heads * d * d * 4)?;
            // Sum the chunk partials in parallel first, so the softmax reads one map.
            let summed;
            let maps = if chunks > 1 {
                summed = be.pool.alloc(n * heads * d * d * 4)?;
                let per_image = heads * d * d;
                be.kernels.launch(
                    &be.ctx,
                    "mdta_gram_sum",
                    (per_image.div_ceil(256) as u32, n as u32, 1),
                    256,
                    0,
                    &[
                        Arg::Ptr(gram.ptr()),
                        Arg::Ptr(summed.ptr()),
                        Arg::I32(chunks as i32),
                        Arg::I32(per_image as i32),
                    ],
                )?;
                summed.ptr()
            } else {
                gram.ptr()
            };
            be.kernels.launch(
                &be.ctx,
                "mdta_softmax",
                (heads as u32, n as u32, 1),
                256,
                (d * d * 4) as u32,
                &[
                    Arg::Ptr(maps),
                    Arg::Ptr(nrm.ptr()),
                    Arg::Ptr(temp.ptr()),
                    Arg::Ptr(attn.ptr()),
                    Arg::I32(1),
                    Arg::I32(heads as i32),
                    Arg::I32(d as i32),
                    Arg::I32(c as i32),
                ],
            )?;
            let folded = be.pool.alloc(n * c_out * c * es as usize)?;
            be.kernels.launch(
                &be.ctx,
                "mdta_fold",
                ((c_out * d).div_ceil(128) as u32, heads as u32, n as u32),
                128,
                0,
                &[
                    Arg::Ptr(attn.ptr()),
                    Arg::Ptr(w_f32.ptr()),
                    Arg::Ptr(folded.ptr()),
                    Arg::I32(heads as i32),
                    Arg::I32(d as i32),
                    Arg::I32(c as i32),
                    Arg::I32(c_out as i32),
                ],
            )?;
            Ok(folded)
        },
    )?;

    // (3) y = v . folded (+ bias + residual), one product per image.
    let apply_flops = 2.0 * (n * hw * c * c_out) as f64;
    let apply_bytes =
        (n * hw * (c + c_out) + residual.map(|r| r.numel()).unwrap_or(0)) as f64 * es as f64;
    be.profiler
        .op(be, "mdta_apply_gemm", apply_flops, apply_bytes, || {
            let out = be.alloc_tensor(dims)?;
            let call = GemmCall {
                a: Operand {
                    ptr: folded.ptr(),
                    rows: c as u64,
                    cols: c_out as u64,
                    ld: c as i64,
                    stride: (c * c_out) as i64,
                    elem,
                },
                trans_a: true,
                b: Operand {
                    ptr: base + (2 * c) as u64 * es,
                    rows: c as u64,
                    cols: hw as u64,
                    ld: c3 as i64,
                    stride: (hw * c3) as i64,
                    elem,
                },
                trans_b: false,
                c: residual.map(|r| r.ptr()),
                d: Operand {
                    ptr: out.ptr(),
                    rows: c_out as u64,
                    cols: hw as u64,
                    ld: c_out as i64,
                    stride: (hw * c_out) as i64,
                    elem,
                },
                batch: n as i32,
                bias: proj.bias.as_ref().map(|b| b.ptr()),
                relu: false,
                tf32: be.tf32(),
            };
            be.run_gemm(&call)?;
            Ok(out)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_divide_the_image() {
        for hw in [64usize, 4096, 262_144, 65_536, 520 * 776, 65 * 97, 131_071] {
            let s = chunk_pixels(hw);
            assert_eq!(hw % s, 0, "{hw}");
            assert!(s <= MAX_CHUNK || s == hw, "{hw} -> {s}");
        }
        assert_eq!(chunk_pixels(262_144), 4096);
        // A prime pixel count falls back to one chunk per image.
        assert_eq!(chunk_pixels(131_071), 131_071);
    }
}
