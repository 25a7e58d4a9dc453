//! D-FINE's detection operations on the GPU: their own NVRTC module (compiled on first
//! use, so Restormer-only processes never pay for it), a launcher, and a cache of small
//! constant buffers (projection weights, fixed embeddings) so that a forward pass
//! uploads each constant once and stays capturable in a CUDA graph.

mod boxes;
mod graph;
mod layout;
mod masked;
mod pixel_graph;
mod pixel_key;
mod postprocess;
#[cfg(test)]
mod select_sim;
mod sequence;

pub use graph::{GraphOutput, MultiGraphCache};
pub(crate) use masked::conv2d_masked;
pub use pixel_graph::PixelGraphCache;
pub use pixel_key::{PixelGraphAdmission, PixelGraphKey};
pub use postprocess::{scale_detections, TopDetections, DETECTION_VALUES};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::result;

use crate::backend::{CudaBackend, CudaTensor};
use crate::error::CudaError;
use crate::kernels::{preamble, Arg, Kernels, Storage, MATH_SOURCE};
use crate::pool::DeviceBuffer;
use aperture_engine::{EngineError, HostTensor, Result};

pub const DETECTION_SOURCE: &str = include_str!("../../kernels/detection.cu");

/// Every entry point of `detection.cu`.
pub const DETECTION_KERNELS: &[&str] = &[
    "det_pad",
    "det_max_pool",
    "det_upsample",
    "det_pad_vec",
    "det_max_pool_vec",
    "det_upsample_vec",
    "det_unary",
    "det_copy_block",
    "det_mul",
    "det_gated_sum",
    "det_attention",
    "det_attention_tc16",
    "det_attention_tc32",
    "det_attention_tc48",
    "det_attention_tc64",
    "det_attention_tc80",
    "det_attention_tc96",
    "det_attention_tc112",
    "det_attention_tc128",
    "det_deformable",
    "det_deformable_vec",
    "det_deformable_vec32",
    "det_row_max",
    "det_gather",
    "det_refine",
    "det_distribution",
    "det_corner_stats",
    "det_to_f32",
    "det_topk_select",
    "det_topk_select_wide",
    "det_from_nchw",
    "det_from_nchw3x8",
    "det_fill_rows",
    "det_pixels_to_input",
    "det_score_keys",
    "det_topk_detections",
    "det_topk_detections_wide",
];

/// Largest upload (elements) kept in the constant cache.
const CACHED_UPLOAD_MAX: usize = 1 << 25;
/// Most constants cached.
const MAX_CONSTANTS: usize = 256;

/// Most levels a deformable attention call takes (the kernel's parameter block).
pub(crate) const MAX_LEVELS: usize = 4;

/// The translation unit for one storage type.
pub fn detection_source(s: Storage) -> String {
    format!("{}\n{}\n{}\n", preamble(s), MATH_SOURCE, DETECTION_SOURCE)
}

/// A constant's cache key: (1 for fp32, 0 for the storage type; f32 bit patterns).
type ConstKey = (u8, Vec<u32>);

/// Per-backend state of the detection operations.
#[derive(Default)]
pub struct DetectionState {
    kernels: Mutex<Option<Arc<Kernels>>>,
    /// Constant buffers by content (f32 bit patterns, tagged by kind).
    consts: Mutex<HashMap<ConstKey, Arc<DeviceBuffer>>>,
    /// `preprocess.cu` on this backend's context, for preprocessing inside graphs.
    pre_kernels: Mutex<Option<Arc<crate::kernels::Kernels>>>,
}

impl CudaBackend {
    fn det_kernels(&self) -> Result<Arc<Kernels>> {
        let mut k = self
            .detection
            .kernels
            .lock()
            .map_err(|_| EngineError::Device("detection kernels poisoned".into()))?;
        if let Some(k) = k.as_ref() {
            return Ok(k.clone());
        }
        let loaded = Arc::new(Kernels::load_source(
            &self.ctx,
            &detection_source(self.storage),
            DETECTION_KERNELS,
        )?);
        *k = Some(loaded.clone());
        Ok(loaded)
    }

    /// Launches `name` with `threads` threads in blocks of `block`.
    pub(crate) fn det_launch(
        &self,
        name: &str,
        threads: usize,
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let k = self.det_kernels()?;
        let blocks = threads.div_ceil(block as usize).max(1);
        if blocks > i32::MAX as usize {
            return Err(EngineError::Invalid(format!(
                "{name}: {threads} threads are too many for one launch"
            )));
        }
        k.launch(&self.ctx, name, (blocks as u32, 1, 1), block, smem, args)?;
        Ok(())
    }

    /// Launches `name` on a 2-D grid.
    pub(crate) fn det_launch_grid(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let k = self.det_kernels()?;
        k.launch(
            &self.ctx,
            name,
            (grid.0.max(1), grid.1.max(1), 1),
            block,
            smem,
            args,
        )?;
        Ok(())
    }

    /// Grid-stride element-wise launch over `n` items.
    pub(crate) fn det_launch_1d(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        let cap = self.ctx.multiprocessors.max(1) as usize * 32 * 256;
        self.det_launch(name, n.clamp(1, cap), 256, 0, args)
    }

    /// A device copy of constant f32 values in the storage type (`fp32 == false`) or in
    /// fp32, uploaded once per content and reused (so graph captures see no upload).
    pub(crate) fn det_constant(&self, data: &[f32], fp32: bool) -> Result<Arc<DeviceBuffer>> {
        let key = (
            fp32 as u8,
            data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(),
        );
        let mut consts = self
            .detection
            .consts
            .lock()
            .map_err(|_| EngineError::Device("constant cache poisoned".into()))?;
        if let Some(b) = consts.get(&key) {
            return Ok(b.clone());
        }
        let buf = Arc::new(if fp32 {
            self.upload_bytes(data)?
        } else {
            self.upload_storage(data)?
        });
        // Cached buffers live as long as the backend: graphs replay from them. Past the
        // limit a constant is uploaded afresh each time (correct, not capturable).
        if consts.len() < MAX_CONSTANTS {
            consts.insert(key, buf.clone());
        }
        Ok(buf)
    }

    /// Uploads an NHWC host tensor as is. D-FINE uploads only shape-derived constants
    /// (position embeddings, anchors, masks, learnt queries) during a forward pass, so
    /// small tensors come from a per-content cache through a device copy: a repeated
    /// forward pass does no host transfer and can be captured in a graph.
    pub(crate) fn det_upload_nhwc(&self, x: &HostTensor) -> Result<CudaTensor> {
        let s = x.shape();
        let dims: [usize; 4] = s.try_into().map_err(|_| {
            EngineError::Shape(format!("expected an NHWC tensor (4-D), got shape {s:?}"))
        })?;
        let data = x.to_f32_vec();
        if data.len() > CACHED_UPLOAD_MAX {
            let buf = self.upload_storage(&data)?;
            return Ok(CudaTensor { buf, dims });
        }
        let cached = self.det_constant(&data, false)?;
        let out = self.alloc_tensor(dims)?;
        let n = data.len() as i64;
        let args = [
            Arg::Ptr(cached.ptr()),
            Arg::Ptr(out.ptr()),
            Arg::I64(1),
            Arg::I64(n),
            Arg::I64(n),
            Arg::I64(0),
            Arg::I64(n),
            Arg::I64(0),
        ];
        self.det_launch_1d("det_copy_block", data.len(), &args)?;
        Ok(out)
    }

    /// Copies an activation out as an NHWC f32 host tensor.
    pub(crate) fn det_download_nhwc(&self, x: &CudaTensor) -> Result<HostTensor> {
        let n = x.numel();
        let staging = self.pool.alloc(n.max(1) * 4)?;
        self.det_launch_1d(
            "det_to_f32",
            n,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(staging.ptr()),
                Arg::I64(n as i64),
            ],
        )?;
        let host = self.det_read_f32(staging.ptr(), n)?;
        HostTensor::from_f32(x.dims.to_vec(), host)
    }

    /// Reads `n` f32 values from the device (synchronises the stream).
    pub(crate) fn det_read_f32(&self, ptr: u64, n: usize) -> Result<Vec<f32>> {
        let mut host = vec![0f32; n];
        self.ctx.bind()?;
        // SAFETY: `ptr` holds at least `n` f32 values; the stream is synchronised
        // before `host` is read.
        unsafe {
            result::memcpy_dtoh_async(&mut host, ptr, self.ctx.stream).map_err(CudaError::from)?;
            result::stream::synchronize(self.ctx.stream).map_err(CudaError::from)?;
        }
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_detection_kernel_is_an_extern_c_entry_point() {
        let source = DETECTION_SOURCE.replace("__launch_bounds__(1024) ", "");
        for name in DETECTION_KERNELS {
            let decl = format!("extern \"C\" __global__ void {name}(");
            assert!(
                source.contains(&decl),
                "{name} is not declared in detection.cu"
            );
        }
        let declared = DETECTION_SOURCE
            .matches("extern \"C\" __global__ void ")
            .count();
        assert_eq!(
            declared,
            DETECTION_KERNELS.len(),
            "a kernel of detection.cu is not registered"
        );
    }

    #[test]
    fn detection_source_is_balanced_for_every_storage() {
        for s in [Storage::F32, Storage::F16, Storage::BF16] {
            let src = detection_source(s);
            assert!(!src.contains('\0'));
            assert_eq!(src.matches('{').count(), src.matches('}').count(), "{s:?}");
            assert_eq!(src.matches('(').count(), src.matches(')').count(), "{s:?}");
        }
    }
}
