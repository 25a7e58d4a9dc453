//! D-FINE from 8-bit pixels to detection rows in one CUDA graph per
//! [`PixelGraphKey`]: the preprocessing kernels of `GpuPreprocessor` (same plan, same
//! launches: `crate::preprocess::steps`) on the backend's stream, then the forward pass
//! and its outputs as [`super::MultiGraphCache`] captures them. The host copies the
//! images' bytes in (page-locked staging, one asynchronous copy) and the outputs out.
//!
//! The graph reads its input from a device buffer laid out as the preprocessing plan
//! wants it: the resize tap tables (fixed per key, uploaded once when the graph is
//! captured), then each image at its offset. A call overwrites only the images.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aperture_engine::{EngineError, HostTensor, Result};
use aperture_vision::RgbImage;
use cudarc::driver::result;

use super::graph::{capture_forward, poisoned, GraphOutput, Outputs};
use super::pixel_key::PixelGraphKey;
use super::Arg;
use crate::backend::{CudaBackend, CudaTensor};
use crate::error::CudaError;
use crate::graph::CudaGraph;
use crate::kernels::Kernels;
use crate::pool::DeviceBuffer;
use crate::preprocess::plan::{plan_batch, BatchPlan};
use crate::preprocess::steps::{enqueue_steps, FloatOut, Regions};
use crate::preprocess::{Pinned, PreprocessSpec, PREPROCESS_KERNELS, PREPROCESS_SOURCE};

/// One captured graph and the buffers it reads and writes.
struct PixelEntry {
    graph: CudaGraph,
    plan: BatchPlan,
    /// Tap tables and images, as `plan` lays them out.
    input: DeviceBuffer,
    /// Where the images start in `input` (after the tables).
    pixels_at: usize,
    /// Scratch of the resize passes; only the graph uses them, kept alive with it.
    _scratch: [DeviceBuffer; 2],
    /// Page-locked twin of `input` (the host writes the images here).
    pin_in: Pinned,
    /// Page-locked copy of every output, one after the other.
    pin_out: Pinned,
    outs: Outputs,
}

impl PixelEntry {
    fn out_values(&self) -> usize {
        self.outs
            .iter()
            .map(|(_, d)| d.iter().product::<usize>())
            .sum()
    }

    /// Enqueues the images' upload from `pin_in`, the replay and the outputs' copy to
    /// `pin_out`, without waiting: the caller synchronises before reading `pin_out` or
    /// writing `pin_in` again.
    fn enqueue_run(&mut self, be: &CudaBackend) -> Result<()> {
        be.ctx.bind()?;
        let stream = be.ctx.stream;
        let (from, to) = (self.pixels_at, self.plan.input_bytes);
        let src = self.pin_in.bytes_mut(to);
        let pixels = src
            .get(from..to)
            .ok_or_else(|| EngineError::Device("pixel staging buffer too small".into()))?;
        // SAFETY: `input` holds `input_bytes`, of which the images take [from, to); the
        // page-locked source is not written again before the stream is synchronised.
        unsafe {
            result::memcpy_htod_async(self.input.ptr() + from as u64, pixels, stream)
                .map_err(CudaError::from)?
        };
        be.replay(&self.graph)?;
        let total = self.out_values();
        let host = self.pin_out.f32_mut(total);
        let mut at = 0;
        for (buf, d) in &self.outs {
            let n: usize = d.iter().product();
            let dst = host
                .get_mut(at..at + n)
                .ok_or_else(|| EngineError::Device("output staging buffer too small".into()))?;
            // SAFETY: `buf` holds `n` f32 values written by the graph; `dst` is
            // page-locked and read only after the stream is synchronised.
            unsafe { result::memcpy_dtoh_async(dst, buf.ptr(), stream).map_err(CudaError::from)? };
            at += n;
        }
        Ok(())
    }

    /// The outputs copied by the last [`PixelEntry::enqueue_run`] (stream synchronised).
    fn read_outputs(&mut self) -> Result<Vec<HostTensor>> {
        let total = self.out_values();
        let host = self.pin_out.f32_mut(total);
        let mut out = Vec::with_capacity(self.outs.len());
        let mut at = 0;
        for (_, d) in &self.outs {
            let n: usize = d.iter().product();
            let values = host
                .get(at..at + n)
                .ok_or_else(|| EngineError::Device("output staging buffer too small".into()))?;
            out.push(HostTensor::from_f32(d.to_vec(), values.to_vec())?);
            at += n;
        }
        Ok(out)
    }
}

type Entries = HashMap<PixelGraphKey, PixelEntry>;

/// Captured preprocessing + forward passes per [`PixelGraphKey`]. One call at a time
/// per cache (its copies, replay and read-back hold the cache's lock).
///
/// A capture must be alone on the backend's stream (see
/// [`super::MultiGraphCache::is_captured`]): callers capture first with other work on
/// the backend excluded, then replay beside other replays.
#[derive(Default)]
pub struct PixelGraphCache {
    entries: Mutex<Entries>,
}

impl PixelGraphCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_captured(&self, key: &PixelGraphKey) -> bool {
        self.entries
            .lock()
            .map(|e| e.contains_key(key))
            .unwrap_or(false)
    }

    /// Number of captured graphs.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Captures the graph for `key` unless it exists: the preprocessing of
    /// `key.spec()`, then `forward` on its output, as in
    /// [`super::MultiGraphCache::prepare`].
    pub fn prepare<F, O>(&self, be: &CudaBackend, key: &PixelGraphKey, forward: F) -> Result<()>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
        O: Into<GraphOutput>,
    {
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        if !entries.contains_key(key) {
            let entry = capture(be, key, &forward)?;
            entries.insert(key.clone(), entry);
        }
        Ok(())
    }

    /// Copies `images` (all of the key's size) in, replays, copies every output out
    /// (NHWC f32, as [`super::MultiGraphCache::infer`] gives them). Captures first if
    /// needed.
    pub fn infer<F, O>(
        &self,
        be: &CudaBackend,
        key: &PixelGraphKey,
        images: &[&RgbImage],
        forward: F,
    ) -> Result<Vec<HostTensor>>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
        O: Into<GraphOutput>,
    {
        key.check_images(images)?;
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        if !entries.contains_key(key) {
            let entry = capture(be, key, &forward)?;
            entries.insert(key.clone(), entry);
        }
        let e = entries
            .get_mut(key)
            .ok_or_else(|| EngineError::Device("graph vanished".into()))?;
        let raw: Vec<&[u8]> = images.iter().map(|i| i.as_raw().as_slice()).collect();
        let bytes = e.plan.input_bytes;
        e.plan.fill_input(&raw, e.pin_in.bytes_mut(bytes))?;
        e.enqueue_run(be)?;
        be.synchronize()?;
        e.read_outputs()
    }

    /// Enqueues the whole host-to-host run for `key` once more without waiting: the
    /// images staged by the last [`PixelGraphCache::infer`] copied in, the replay, the
    /// outputs copied out (for timing; the device time between two events around it is
    /// what a request costs on the GPU).
    pub fn run_staged(&self, be: &CudaBackend, key: &PixelGraphKey) -> Result<()> {
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        let e = entries
            .get_mut(key)
            .ok_or_else(|| EngineError::Invalid(format!("no graph captured for {key:?}")))?;
        e.enqueue_run(be)
    }
}

/// Plans, allocates and captures the graph for `key`.
fn capture<F, O>(be: &CudaBackend, key: &PixelGraphKey, forward: &F) -> Result<PixelEntry>
where
    F: Fn(&CudaBackend, &CudaTensor) -> Result<Vec<O>>,
    O: Into<GraphOutput>,
{
    let spec = key.spec();
    let plan = plan_batch(&vec![(key.width, key.height); key.batch], &spec)?;
    let pixels_at = plan.image_at.first().copied().unwrap_or(plan.input_bytes);
    let kernels = be.pre_kernels()?;
    let input = be.pool.alloc(plan.input_bytes.max(1))?;
    let tmp = be.pool.alloc(plan.tmp_bytes.max(1))?;
    let resized = be.pool.alloc(plan.resized_bytes.max(1))?;
    let dims = key.model_input_shape();
    // The tables once; the images start as zeros (the warm-up and capture runs read
    // them).
    let mut pin_in = Pinned::default();
    pin_in.ensure(plan.input_bytes)?;
    plan.fill_input(&[], pin_in.bytes_mut(plan.input_bytes))?;
    be.memset(input.ptr(), 0, plan.input_bytes)?;
    let tables = pin_in
        .bytes_mut(plan.input_bytes)
        .get(..pixels_at)
        .ok_or_else(|| EngineError::Device("pixel staging buffer too small".into()))?;
    be.ctx.bind()?;
    // SAFETY: `input` holds `input_bytes >= pixels_at` bytes; the stream is synchronised
    // before the page-locked source is written again.
    unsafe {
        result::memcpy_htod_async(input.ptr(), tables, be.ctx.stream).map_err(CudaError::from)?
    };
    be.synchronize()?;
    let regions = Regions {
        input: input.ptr(),
        tmp: tmp.ptr(),
        resized: resized.ptr(),
    };
    // The resize passes, each image then rescaled straight into the NHWC model input
    // (before the next image reuses the resize scratch).
    let [n, c, h, w] = dims;
    let model_input = |b: &CudaBackend| -> Result<CudaTensor> {
        let x = b.alloc_tensor([n, h, w, c])?;
        let convert =
            |src: u64, pixels: usize, at: usize| pixels_to_input(b, &spec, &x, (src, pixels, at));
        b.ctx.bind()?;
        enqueue_steps(
            &kernels,
            &b.ctx,
            &plan,
            &spec,
            regions,
            FloatOut::Convert(&convert),
        )?;
        Ok(x)
    };
    let (graph, outs) = capture_forward(be, &model_input, forward)?;
    let mut entry = PixelEntry {
        graph,
        plan,
        input,
        pixels_at,
        _scratch: [tmp, resized],
        pin_in,
        pin_out: Pinned::default(),
        outs,
    };
    let total = entry.out_values();
    entry.pin_out.ensure(total.max(1) * 4)?;
    Ok(entry)
}

/// One resized image's HWC bytes at `src` into the NHWC model input `x` at element
/// `at`, in the storage type: `pre_to_float`'s rescale and normalisation with the same
/// roundings, each value then stored as the NCHW staging path's conversion stores it
/// (one kernel instead of the f32 staging buffer and a transpose).
fn pixels_to_input(
    be: &CudaBackend,
    spec: &PreprocessSpec,
    x: &CudaTensor,
    (src, pixels, at): (u64, usize, usize),
) -> Result<()> {
    if at + pixels * 3 > x.numel() {
        return Err(EngineError::Shape(format!(
            "preprocessed image at element {at} does not fit the model input {:?}",
            x.dims
        )));
    }
    let (norm, mean, std) = match spec.normalize {
        Some((m, d)) => (1, m, d),
        None => (0, [0.0; 3], [1.0; 3]),
    };
    let args = [
        Arg::Ptr(src),
        Arg::Ptr(x.ptr() + (at * be.esize()) as u64),
        Arg::I64((pixels * 3) as i64),
        Arg::F32(spec.scale),
        Arg::I32(norm),
        Arg::F32(mean[0]),
        Arg::F32(mean[1]),
        Arg::F32(mean[2]),
        Arg::F32(std[0]),
        Arg::F32(std[1]),
        Arg::F32(std[2]),
    ];
    be.det_launch_1d("det_pixels_to_input", pixels * 3, &args)
}

impl CudaBackend {
    /// The preprocessing kernels (`preprocess.cu`) loaded for this backend's context,
    /// launched on its stream (so that they can be captured with the model).
    pub(crate) fn pre_kernels(&self) -> Result<Arc<Kernels>> {
        let mut k = self
            .detection
            .pre_kernels
            .lock()
            .map_err(|_| EngineError::Device("preprocessing kernels poisoned".into()))?;
        if let Some(k) = k.as_ref() {
            return Ok(k.clone());
        }
        let loaded = Arc::new(Kernels::load_source(
            &self.ctx,
            PREPROCESS_SOURCE,
            PREPROCESS_KERNELS,
        )?);
        *k = Some(loaded.clone());
        Ok(loaded)
    }
}
