//! HGNetV2's HG block up to its squeeze ([`Backend::conv_chain_aggregate`]): the layer
//! chains, their channel concatenation with the block input, and the 1x1 squeeze.
//!
//! Two ways to run it:
//! - through the concatenation (crate::conv_concat): each layer writes its slice where
//!   its kernel can, else a whole output and one copy; cuBLASLt's squeeze reads the
//!   concatenation;
//! - without it (crate::conv_igemm::sources): each layer keeps its own packed output and
//!   the squeeze reads the parts where they lie. Dense k x k layers go through cuDNN,
//!   which writes packed outputs only, so there this saves one copy of every layer's
//!   output and of the block input; the squeeze runs on our `wgmma` tile instead of
//!   cuBLASLt.
//!
//! `APERTURE_AGGREGATE=concat` keeps every block on the first, `=parts` takes the second
//! wherever the kernel can; by default the second is taken for chains with a dense k x k
//! convolution (light blocks' depthwise layers already write their slices), in fp16
//! storage (the precision it has been checked in on a GPU; bf16 with `=parts`).
//!
//! [`Backend::conv_chain_aggregate`]: aperture_engine::Backend::conv_chain_aggregate

use aperture_engine::backend::Activation;
use aperture_engine::{EngineError, Result};

use crate::backend::{ConvWeights, CudaBackend, CudaParam, CudaTensor};
use crate::conv_igemm::sources::{self, Part, PartTable, CHUNK, MAX_PARTS};

/// Which way [`conv_chain_aggregate`] runs a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// Always through the concatenation.
    Concat,
    /// Without it wherever the kernel can.
    Parts,
    /// Without it where a layer is a dense k x k convolution.
    Auto,
}

fn policy() -> Policy {
    static POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    *POLICY.get_or_init(|| {
        match std::env::var("APERTURE_AGGREGATE")
            .as_deref()
            .map(str::trim)
        {
            Ok("concat") => Policy::Concat,
            Ok("parts") => Policy::Parts,
            _ => Policy::Auto,
        }
    })
}

/// `conv2d(concat([x, y_1, .., y_n]), squeeze, act)` with `y_j` the chain `layers[j]`
/// applied to `y_{j-1}` (`y_0 = x`).
pub(crate) fn conv_chain_aggregate(
    be: &CudaBackend,
    x: &CudaTensor,
    layers: &[Vec<(&CudaParam, Activation)>],
    squeeze: &CudaParam,
    act: Activation,
) -> Result<CudaTensor> {
    let w = squeeze.conv()?;
    let fp16 = be.storage == crate::kernels::Storage::F16;
    if chosen(policy(), x, layers, w, sources::loaded(be), fp16)? {
        return without_concatenation(be, x, layers, w, act);
    }
    let cat = crate::conv_concat::conv_chain_concat(be, x, layers)?;
    crate::conv::conv2d(be, &cat, w, act, None)
}

/// Whether the block runs without its concatenation: the kernel is loaded, takes the
/// squeeze's weights and every part's channel count, and the policy wants it.
fn chosen(
    policy: Policy,
    x: &CudaTensor,
    layers: &[Vec<(&CudaParam, Activation)>],
    squeeze: &ConvWeights,
    loaded: bool,
    fp16: bool,
) -> Result<bool> {
    if policy == Policy::Concat || !loaded || !sources::takes_weights(squeeze) {
        return Ok(false);
    }
    let mut block = BlockShape {
        parts: vec![x.dims[3]],
        dense: false,
        squeeze_in: squeeze.c_in,
        fp16,
    };
    for chain in layers {
        let mut last = None;
        for (conv, _) in chain {
            let w = conv.conv()?;
            block.dense |= !w.depthwise && w.kh * w.kw > 1;
            last = Some(w.c_out);
        }
        block.parts.extend(last);
    }
    Ok(block.without_concatenation(policy))
}

/// What the choice needs to know of a block.
struct BlockShape {
    /// Channels of the block input and of each chain's output.
    parts: Vec<usize>,
    /// Some layer is a dense k x k convolution (cuDNN writes it packed).
    dense: bool,
    /// The squeeze's input channels.
    squeeze_in: usize,
    /// fp16 storage (else bf16).
    fp16: bool,
}

impl BlockShape {
    fn without_concatenation(&self, policy: Policy) -> bool {
        let readable = self.parts.len() <= MAX_PARTS
            && self.parts.iter().all(|c| *c > 0 && c.is_multiple_of(CHUNK))
            && self.parts.iter().sum::<usize>() == self.squeeze_in;
        match policy {
            Policy::Concat => false,
            Policy::Parts => readable,
            Policy::Auto => readable && self.dense && self.fp16,
        }
    }
}

/// The chains into whole tensors, then the squeeze over them and the block input.
fn without_concatenation(
    be: &CudaBackend,
    x: &CudaTensor,
    layers: &[Vec<(&CudaParam, Activation)>],
    w: &ConvWeights,
    act: Activation,
) -> Result<CudaTensor> {
    let outs = aperture_engine::conv_nodes::run_conv_chains(be, x, layers)?;
    if let Some(h) = outs.iter().find(|h| h.dims[..3] != x.dims[..3]) {
        return Err(EngineError::Shape(format!(
            "cannot concatenate {:?} and {:?} along channels",
            x.dims, h.dims
        )));
    }
    let parts: Vec<&CudaTensor> = std::iter::once(x).chain(outs.iter()).collect();
    let table = parts
        .iter()
        .map(|t| Part {
            ptr: t.ptr(),
            ld: t.dims[3],
            channels: t.dims[3],
        })
        .collect::<Vec<_>>();
    let table = match PartTable::new(&table, w.c_in) {
        Ok(t) => t,
        Err(why) => {
            // Checked before the chains ran; only a pointer could disagree now.
            tracing::debug!("aggregation through its concatenation: {why}");
            let cat = be.det_concat_channels_n(&parts)?;
            return crate::conv::conv2d(be, &cat, w, act, None);
        }
    };
    let [n, h, wd, _] = x.dims;
    let pixels = n * h * wd;
    let y = be.alloc_tensor([n, h, wd, w.c_out])?;
    let es = be.esize() as f64;
    let flops = 2.0 * (pixels * w.c_in * w.c_out) as f64;
    let bytes = ((pixels * (w.c_in + w.c_out)) as f64 + (w.c_in * w.c_out) as f64) * es;
    be.profiler.op(be, "conv1x1_parts", flops, bytes, || {
        sources::run(be, &table, pixels, w, act, y.ptr())
    })?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(parts: &[usize], dense: bool) -> BlockShape {
        BlockShape {
            parts: parts.to_vec(),
            dense,
            squeeze_in: parts.iter().sum(),
            fp16: true,
        }
    }

    #[test]
    fn dense_blocks_read_their_parts_by_default() {
        // D-FINE-X's stage 1 and stage 2 blocks (3x3 layers).
        assert!(block(&[64; 7], true).without_concatenation(Policy::Auto));
        assert!(
            block(&[512, 128, 128, 128, 128, 128, 128], true).without_concatenation(Policy::Auto)
        );
        // Light blocks keep the concatenation unless asked.
        let light = block(&[1024, 256, 256, 256, 256, 256, 256], false);
        assert!(!light.without_concatenation(Policy::Auto));
        assert!(light.without_concatenation(Policy::Parts));
        assert!(!block(&[64; 7], true).without_concatenation(Policy::Concat));
        // bf16 only when asked.
        let bf16 = BlockShape {
            fp16: false,
            ..block(&[64; 7], true)
        };
        assert!(!bf16.without_concatenation(Policy::Auto));
        assert!(bf16.without_concatenation(Policy::Parts));
    }

    #[test]
    fn parts_the_kernel_cannot_read_keep_the_concatenation() {
        // Channels off 64s, more than eight parts, a squeeze of another width.
        assert!(!block(&[64, 32, 32], true).without_concatenation(Policy::Parts));
        assert!(!block(&[64; 9], true).without_concatenation(Policy::Parts));
        let mut wrong = block(&[64; 3], true);
        wrong.squeeze_in = 256;
        assert!(!wrong.without_concatenation(Policy::Parts));
    }
}
