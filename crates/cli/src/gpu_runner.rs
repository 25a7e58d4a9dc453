//! Models on the CUDA backend served through captured CUDA graphs: per input shape,
//! one graph holds the whole forward pass; a request is copy in, replay, copy out.
//! Batches are padded to a power of two (at most the model's maximum batch size), so a
//! dynamic batcher's many batch sizes share a handful of graphs.
//!
//! Both runners take [`Runner::concurrency`] = 2 calls at once: one call's input is
//! converted and copied to the GPU while another call's graph replays (see the graph
//! caches), so a server runs two workers per instance on one runner and one set of
//! graphs. Served that way, a backend must not time a convolution against cuDNN once
//! serving has begun (`CudaBackend::freeze_convolution_choices`; with choices made while
//! two calls were in flight, served D-FINE fell to 0.01-0.40 of in-process):
//! `GraphDFine::warmed` times D-FINE's shapes at load, one eager pass per graph batch
//! size, then freezes; `GraphRestormer::prepare_for_serving` does the same at a
//! configured image size, and without one (shapes follow each request's image size) a
//! served Restormer runs every convolution on our kernels (`crate::device`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aperture_cuda::detection::{
    scale_detections, GraphOutput, MultiGraphCache, PixelGraphAdmission, PixelGraphCache,
    PixelGraphKey, DETECTION_VALUES,
};
use aperture_cuda::preprocess::{GpuPreprocessor, PreprocessSpec, TensorLayout};
use aperture_cuda::{CudaBackend, CudaTensor, GraphCache};
use aperture_engine::{Backend, DType, EngineError, HostTensor, NamedTensors, Runner, TensorSpec};
use aperture_models::dfine::{pixel_values_input, post_process, DFineRunner, Detection};
use aperture_models::restormer::{single_input, Restormer, RestormerConfig};
use aperture_models::ModelError;
use aperture_weights::StateDict;

pub struct GraphRestormer {
    backend: CudaBackend,
    model: Restormer<CudaBackend>,
    graphs: GraphCache,
    max_batch_size: usize,
}

impl GraphRestormer {
    pub fn new(
        backend: CudaBackend,
        config: RestormerConfig,
        sd: &StateDict,
        max_batch_size: usize,
    ) -> Result<Self, ModelError> {
        let model = Restormer::prepare(&backend, config, sd)?;
        Ok(Self {
            backend,
            model,
            graphs: GraphCache::new(),
            max_batch_size,
        })
    }

    /// Readies the runner for concurrent calls: with an image size, one eager pass per
    /// graph batch size at that size (padded to a multiple of 8, as the server pads)
    /// times the convolutions against cuDNN; then no more choices are made.
    pub fn prepare_for_serving(&self, size: Option<(usize, usize)>) {
        if let Some((h, w)) = size {
            let forward = |x: &CudaTensor| Ok(self.model.forward(&self.backend, x).map(drop)?);
            let dims = [3, h.next_multiple_of(8), w.next_multiple_of(8)];
            warm_convolutions(&self.backend, self.max_batch_size, dims, &forward);
        }
        self.backend.freeze_convolution_choices();
    }
}

/// One eager forward pass per batch size the graphs will use (see [`graph_batch`]) on
/// `[batch, c, h, w]` inputs, so that every convolution shape is timed against cuDNN
/// before serving. A failing pass (e.g. out of memory) ends it with a warning; the
/// passes' cached blocks go back to the driver (the graphs plan their own memory).
fn warm_convolutions(
    be: &CudaBackend,
    max_batch: usize,
    [c, h, w]: [usize; 3],
    forward: &dyn Fn(&CudaTensor) -> anyhow::Result<()>,
) {
    let started = std::time::Instant::now();
    let max_batch = max_batch.max(1);
    let mut batches: Vec<usize> = (1..=max_batch)
        .map(|n| graph_batch(&[n], max_batch))
        .collect();
    batches.dedup();
    let mut warmed = 0;
    for &batch in &batches {
        let pass = || -> anyhow::Result<()> {
            let n = batch * c * h * w;
            // A ramp in [0, 1): zeros could take other paths or time apart.
            let values = (0..n).map(|i| (i % 251) as f32 / 251.0).collect();
            let x = HostTensor::from_f32(vec![batch, c, h, w], values)?;
            forward(&be.upload_nchw(&x)?)?;
            be.synchronize()?;
            Ok(())
        };
        if let Err(e) = pass() {
            tracing::warn!("convolution warm-up stopped at batch {batch}: {e:#}");
            break;
        }
        warmed = batch;
    }
    if let Err(e) = be.trim_memory() {
        tracing::warn!("after the convolution warm-up: {e}");
    }
    tracing::info!(
        "convolutions timed against cuDNN for batches up to {warmed} at {h}x{w} in {:.1?}",
        started.elapsed()
    );
}

impl Runner for GraphRestormer {
    fn architecture(&self) -> &str {
        "restormer"
    }

    fn device(&self) -> String {
        self.backend.name()
    }

    fn inputs(&self) -> Vec<TensorSpec> {
        let c = self.model.config().inp_channels as i64;
        vec![TensorSpec::new("x", DType::F32, &[c, -1, -1])]
    }

    fn outputs(&self) -> Vec<TensorSpec> {
        let c = self.model.config().out_channels as i64;
        vec![TensorSpec::new("y", DType::F32, &[c, -1, -1])]
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        let x = single_input(inputs)?;
        let forward = |b: &CudaBackend, t: &CudaTensor| Ok(self.model.forward(b, t)?);
        let batch = graph_batch(x.shape(), self.max_batch_size);
        let y = self.graphs.infer_padded(&self.backend, x, batch, forward)?;
        Ok(vec![("y".to_string(), y)])
    }

    /// The graph cache captures under its own lock and replays nothing else on this
    /// backend, so concurrent calls need no more than the cache's own pipeline.
    fn concurrency(&self) -> usize {
        GraphCache::CONCURRENCY
    }
}

/// D-FINE's forward pass as the graph caches take it: input -> (logits, boxes).
type Forward<'a> =
    dyn Fn(&CudaBackend, &CudaTensor) -> aperture_engine::Result<Vec<CudaTensor>> + 'a;

/// D-FINE's forward pass with post-processing on the GPU: input -> top-K detection rows.
type PostForward<'a> =
    dyn Fn(&CudaBackend, &CudaTensor) -> aperture_engine::Result<Vec<GraphOutput>> + 'a;

/// Where `GraphDFine::detection_rows` preprocesses a batch of decoded images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreprocessPath {
    /// Inside the graph with the forward pass and the post-processing (images of one
    /// size only): the host copies 8-bit pixels in.
    InGraph,
    /// `GpuPreprocessor` on its own stream into the graph's f32 input, then the replay.
    SeparateStep,
}

/// D-FINE on the GPU through one CUDA graph per input shape, captured on first use
/// (`aperture check-dfine` checks replays against eager passes). Three kinds of graph:
/// forward passes ending in logits and boxes (the tensor API), forward passes with
/// post-processing (`detect_*_post`: the host gets K detection rows per image), and,
/// for batches of images of one size, preprocessing + forward pass + post-processing
/// (`detect_images_post`: the host sends 8-bit pixels). Falls back to eager passes,
/// host post-processing or separate preprocessing if a capture fails.
///
/// Safe to call from several threads: replays (of either cache) share the backend's
/// stream, while a capture or an eager pass has it to itself.
pub struct GraphDFine {
    runner: DFineRunner<CudaBackend>,
    graphs: MultiGraphCache,
    post_graphs: MultiGraphCache,
    /// Preprocessing, forward pass and post-processing, per (batch, image size, spec).
    pixel_graphs: PixelGraphCache,
    /// Which (batch, image size, spec) keys get a pixel graph (sizes met repeatedly).
    admission: PixelGraphAdmission,
    eager: AtomicBool,
    host_post: AtomicBool,
    /// Set once preprocessing inside a graph failed: separate preprocessing from then on.
    separate_pre: AtomicBool,
    /// Read: a replay (with its upload). Write: a capture or an eager pass, whose work
    /// on the stream must not interleave with another thread's.
    stream: RwLock<()>,
}

impl GraphDFine {
    /// [`GraphDFine::new`] after one eager forward pass per graph batch size (see
    /// [`graph_batch`]) at the processor's image size: each convolution
    /// shape the graphs will hold is timed against cuDNN once, before the choices freeze.
    /// A model without a fixed processor size is not warmed. A failing pass (e.g. out of
    /// memory at a large batch) ends the warm-up with a warning; the runner still works.
    pub fn warmed(runner: DFineRunner<CudaBackend>) -> Self {
        let spec = runner.inputs();
        let dims = spec.first().map(|s| s.shape.clone()).unwrap_or_default();
        if let [c, h, w] = dims[..] {
            if let (Ok(c), Ok(h), Ok(w)) = (c.try_into(), h.try_into(), w.try_into()) {
                let forward =
                    |x: &CudaTensor| Ok(runner.model().forward(runner.backend(), x).map(drop)?);
                warm_convolutions(
                    runner.backend(),
                    runner.max_batch_size(),
                    [c, h, w],
                    &forward,
                );
            }
        }
        runner.backend().freeze_convolution_choices();
        Self::new(runner)
    }

    pub fn new(runner: DFineRunner<CudaBackend>) -> Self {
        Self {
            runner,
            graphs: MultiGraphCache::new(),
            post_graphs: MultiGraphCache::new(),
            pixel_graphs: PixelGraphCache::new(),
            admission: PixelGraphAdmission::default(),
            eager: AtomicBool::new(false),
            host_post: AtomicBool::new(false),
            separate_pre: AtomicBool::new(false),
            stream: RwLock::new(()),
        }
    }

    /// The stream shared with other replays. The lock guards no data, so a panic
    /// elsewhere while holding it leaves nothing inconsistent.
    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.stream.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stream to this thread alone.
    fn alone(&self) -> RwLockWriteGuard<'_, ()> {
        self.stream.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `infer` (a replay through `cache`'s graph for `graph_shape`) beside other
    /// threads' replays, capturing that graph first, alone, if it is new.
    fn on_graph<F, O, T>(
        &self,
        cache: &MultiGraphCache,
        graph_shape: &[usize],
        forward: &F,
        infer: impl FnOnce(&F) -> aperture_engine::Result<T>,
    ) -> aperture_engine::Result<T>
    where
        F: Fn(&CudaBackend, &CudaTensor) -> aperture_engine::Result<Vec<O>> + ?Sized,
        O: Into<GraphOutput>,
    {
        if !cache.is_captured(graph_shape) {
            let _alone = self.alone();
            cache.prepare(self.runner.backend(), graph_shape, forward)?;
        }
        let _shared = self.shared();
        infer(forward)
    }

    pub fn runner(&self) -> &DFineRunner<CudaBackend> {
        &self.runner
    }

    /// NCHW pixels -> (`logits [B, Q, C]`, `pred_boxes [B, Q, 4]`).
    pub fn detect(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> {
        let s = pixels.shape();
        if !self.eager.load(Ordering::Relaxed) && s.len() == 4 && s[1] == 3 {
            match self.replay(pixels) {
                Ok(out) => return Ok(out),
                Err(e) => {
                    tracing::warn!("CUDA graph capture failed ({e:#}); running eagerly");
                    self.eager.store(true, Ordering::Relaxed);
                }
            }
        }
        let _alone = self.alone();
        Ok(self.runner.detect(pixels)?)
    }

    /// Decoded images -> (`logits`, `pred_boxes`), preprocessed by `pre` (on this
    /// model's GPU) straight into the captured graph's input: the host sends 8-bit
    /// pixels only. Falls back to preprocessing into a host tensor where the graph
    /// path is off.
    pub fn detect_images(
        &self,
        pre: &GpuPreprocessor,
        images: &[&aperture_vision::RgbImage],
        spec: &PreprocessSpec,
    ) -> anyhow::Result<(HostTensor, HostTensor)> {
        let shape = input_shape(images, spec)?;
        if !self.eager.load(Ordering::Relaxed) && spec.layout == TensorLayout::Nchw {
            let fill = |ptr: u64, bytes: usize| pre.run_into(images, spec, ptr, bytes);
            match self.replay_with(&shape, &shape, |forward| {
                self.graphs
                    .infer_filled(self.runner.backend(), &shape, fill, forward)
            }) {
                Ok(out) => return Ok(out),
                Err(e) => {
                    tracing::warn!("CUDA graph capture failed ({e:#}); running eagerly");
                    self.eager.store(true, Ordering::Relaxed);
                }
            }
        }
        self.detect(&pre.run(images, spec)?)
    }

    /// Decoded images -> each image's detections above `threshold` in its own pixels:
    /// preprocessing, forward pass and post-processing (sigmoid, top-K over queries x
    /// classes, corners) on the GPU; the host receives K rows of 6 values per image and
    /// applies the threshold and the image size. Same detections as `post_process` on
    /// the logits and boxes. Images of one size run in one graph from their 8-bit
    /// pixels ([`PreprocessPath::InGraph`]) from the second batch of that size on (up
    /// to [`PixelGraphAdmission::MAX`] sizes); mixed sizes, sizes met once, or a failed
    /// capture of that graph preprocess as a separate step first (same rows, bit for
    /// bit).
    pub fn detect_images_post(
        &self,
        pre: &GpuPreprocessor,
        images: &[&aperture_vision::RgbImage],
        spec: &PreprocessSpec,
        threshold: f32,
    ) -> anyhow::Result<Vec<Vec<Detection>>> {
        let sizes: Vec<(u32, u32)> = images.iter().map(|i| (i.height(), i.width())).collect();
        if self.post_on() && !self.separate_pre.load(Ordering::Relaxed) {
            // Images of one size, from that size's second batch on (PixelGraphAdmission);
            // mixed sizes or an invalid spec (reported by the path below): separate.
            let key = PixelGraphKey::for_images(images, spec).ok().flatten();
            let key = key.filter(|k| self.pixel_graphs.is_captured(k) || self.admission.admit(k));
            if let Some(key) = key {
                let first = !self.pixel_graphs.is_captured(&key);
                let rows = self.pixel_rows(&key, images).and_then(|r| {
                    if first {
                        self.confirm_first_rows(pre, images, spec, r)
                    } else {
                        Ok(r)
                    }
                });
                match rows.and_then(|r| detections_from_rows(&r, &sizes, threshold)) {
                    Ok(d) => return Ok(d),
                    Err(e) => {
                        tracing::warn!(
                            "preprocessing inside the CUDA graph failed ({e:#}); preprocessing as a separate step"
                        );
                        self.separate_pre.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        if self.post_on() && spec.layout == TensorLayout::Nchw {
            let rows = self.separate_rows(pre, images, spec);
            match rows.and_then(|r| detections_from_rows(&r, &sizes, threshold)) {
                Ok(d) => return Ok(d),
                Err(e) => self.post_failed(&e),
            }
        }
        let (logits, boxes) = self.detect_images(pre, images, spec)?;
        self.host_post_process(&logits, &boxes, &sizes, threshold)
    }

    /// The detection rows `[B, K, 6]` (f32, unthresholded, boxes as fractions) of
    /// `images` through `path` alone, without fallback: for checks that the two paths
    /// agree. [`PreprocessPath::InGraph`] needs images of one size.
    pub fn detection_rows(
        &self,
        pre: &GpuPreprocessor,
        images: &[&aperture_vision::RgbImage],
        spec: &PreprocessSpec,
        path: PreprocessPath,
    ) -> anyhow::Result<Vec<f32>> {
        match path {
            PreprocessPath::InGraph => match PixelGraphKey::for_images(images, spec)? {
                Some(key) => self.pixel_rows(&key, images),
                None => anyhow::bail!(
                    "preprocessing inside the graph needs NCHW output and images of one size"
                ),
            },
            PreprocessPath::SeparateStep => self.separate_rows(pre, images, spec),
        }
    }

    /// A key's first in-graph rows, checked against the separate step's: the two run the
    /// same kernels, so anything but the same bits means the in-graph path is not to be
    /// trusted here (an error: the caller then stays on the separate step).
    fn confirm_first_rows(
        &self,
        pre: &GpuPreprocessor,
        images: &[&aperture_vision::RgbImage],
        spec: &PreprocessSpec,
        rows: Vec<f32>,
    ) -> anyhow::Result<Vec<f32>> {
        let separate = self.separate_rows(pre, images, spec)?;
        let same = rows.len() == separate.len()
            && rows
                .iter()
                .zip(&separate)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        anyhow::ensure!(
            same,
            "the first in-graph detection rows differ from the separate preprocessing step's"
        );
        Ok(rows)
    }

    /// `pre` into the post-processing graph's input, then its replay.
    fn separate_rows(
        &self,
        pre: &GpuPreprocessor,
        images: &[&aperture_vision::RgbImage],
        spec: &PreprocessSpec,
    ) -> anyhow::Result<Vec<f32>> {
        let shape = input_shape(images, spec)?;
        let fill = |ptr: u64, bytes: usize| pre.run_into(images, spec, ptr, bytes);
        self.post_with(&shape, |forward| {
            self.post_graphs
                .infer_filled(self.runner.backend(), &shape, fill, forward)
        })
    }

    /// The graph for `key` (captured alone if new) replayed on `images`.
    fn pixel_rows(
        &self,
        key: &PixelGraphKey,
        images: &[&aperture_vision::RgbImage],
    ) -> anyhow::Result<Vec<f32>> {
        let be = self.runner.backend();
        let model = self.runner.model();
        let k = model.num_queries();
        let forward: &PostForward<'_> = &|b, x| {
            let o = model.forward(b, x)?;
            Ok(vec![b.top_k_detections(&o.logits, &o.boxes, k)?.into()])
        };
        if !self.pixel_graphs.is_captured(key) {
            let _alone = self.alone();
            self.pixel_graphs.prepare(be, key, forward)?;
        }
        let _shared = self.shared();
        let outs = self.pixel_graphs.infer(be, key, images, forward)?;
        let [rows] = <[HostTensor; 1]>::try_from(outs)
            .map_err(|_| anyhow::anyhow!("the captured forward pass gave other outputs"))?;
        Ok(rows.to_f32_vec())
    }

    /// NCHW pixels (already preprocessed) -> each image's detections above `threshold`,
    /// image `i` scaled to `sizes[i]` = (height, width): like
    /// [`GraphDFine::detect_images_post`] with the input copied from the host.
    pub fn detect_post(
        &self,
        pixels: &HostTensor,
        sizes: &[(u32, u32)],
        threshold: f32,
    ) -> anyhow::Result<Vec<Vec<Detection>>> {
        let s = pixels.shape();
        if s.first() != Some(&sizes.len()) {
            anyhow::bail!("{} image sizes for an input of shape {s:?}", sizes.len());
        }
        if self.post_on() && s.len() == 4 && s[1] == 3 {
            let batch = graph_batch(s, self.runner.max_batch_size());
            let rows = self.post_with(&with_batch(s, batch), |forward| {
                self.post_graphs
                    .infer_padded(self.runner.backend(), pixels, batch, forward)
            });
            match rows.and_then(|r| detections_from_rows(&r, sizes, threshold)) {
                Ok(d) => return Ok(d),
                Err(e) => self.post_failed(&e),
            }
        }
        let (logits, boxes) = self.detect(pixels)?;
        self.host_post_process(&logits, &boxes, sizes, threshold)
    }

    fn post_on(&self) -> bool {
        !self.eager.load(Ordering::Relaxed) && !self.host_post.load(Ordering::Relaxed)
    }

    fn post_failed(&self, e: &anyhow::Error) {
        tracing::warn!("post-processing on the GPU failed ({e:#}); post-processing on the host");
        self.host_post.store(true, Ordering::Relaxed);
    }

    /// Runs `infer` with the forward pass + post-processing captured for an input of
    /// `graph_shape`; returns the detection rows `[B, K, 6]` as f32 values.
    fn post_with(
        &self,
        graph_shape: &[usize],
        infer: impl FnOnce(&PostForward<'_>) -> aperture_engine::Result<Vec<HostTensor>>,
    ) -> anyhow::Result<Vec<f32>> {
        let model = self.runner.model();
        let k = model.num_queries();
        let forward: &PostForward<'_> = &|b, x| {
            let o = model.forward(b, x)?;
            Ok(vec![b.top_k_detections(&o.logits, &o.boxes, k)?.into()])
        };
        let outs = self.on_graph(&self.post_graphs, graph_shape, forward, infer)?;
        let [rows] = <[HostTensor; 1]>::try_from(outs)
            .map_err(|_| anyhow::anyhow!("the captured forward pass gave other outputs"))?;
        Ok(rows.to_f32_vec())
    }

    fn host_post_process(
        &self,
        logits: &HostTensor,
        boxes: &HostTensor,
        sizes: &[(u32, u32)],
        threshold: f32,
    ) -> anyhow::Result<Vec<Vec<Detection>>> {
        let (l, b) = (logits.to_f32_vec(), boxes.to_f32_vec());
        let n = sizes.len().max(1);
        let (lp, bp) = (l.len() / n, b.len() / n);
        let classes = self.runner.config().num_labels;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let (li, bi) = (&l[i * lp..(i + 1) * lp], &b[i * bp..(i + 1) * bp]);
                Ok(post_process(li, bi, classes, threshold, size)?)
            })
            .collect()
    }

    fn replay(&self, pixels: &HostTensor) -> anyhow::Result<(HostTensor, HostTensor)> {
        let s = pixels.shape();
        let batch = graph_batch(s, self.runner.max_batch_size());
        self.replay_with(s, &with_batch(s, batch), |forward| {
            self.graphs
                .infer_padded(self.runner.backend(), pixels, batch, forward)
        })
    }

    /// Runs `infer` with the forward pass captured for an input of `graph_shape` and
    /// shapes its two outputs for an input of `shape` (NCHW).
    fn replay_with(
        &self,
        shape: &[usize],
        graph_shape: &[usize],
        infer: impl FnOnce(&Forward<'_>) -> aperture_engine::Result<Vec<HostTensor>>,
    ) -> anyhow::Result<(HostTensor, HostTensor)> {
        let model = self.runner.model();
        let forward: &Forward<'_> = &|b, x| {
            let o = model.forward(b, x)?;
            Ok(vec![o.logits, o.boxes])
        };
        let outs = self.on_graph(&self.graphs, graph_shape, forward, infer)?;
        let [logits, boxes] = <[HostTensor; 2]>::try_from(outs)
            .map_err(|_| anyhow::anyhow!("the captured forward pass gave other outputs"))?;
        let n = *shape
            .first()
            .ok_or_else(|| anyhow::anyhow!("empty input shape"))?;
        let (q, c) = (model.num_queries(), self.runner.config().num_labels);
        Ok((
            logits.reshape(vec![n, q, c])?,
            boxes.reshape(vec![n, q, 4])?,
        ))
    }
}

impl Runner for GraphDFine {
    fn architecture(&self) -> &str {
        self.runner.architecture()
    }

    fn device(&self) -> String {
        self.runner.device()
    }

    fn inputs(&self) -> Vec<TensorSpec> {
        self.runner.inputs()
    }

    fn outputs(&self) -> Vec<TensorSpec> {
        self.runner.outputs()
    }

    fn max_batch_size(&self) -> usize {
        self.runner.max_batch_size()
    }

    fn concurrency(&self) -> usize {
        MultiGraphCache::CONCURRENCY
    }

    fn infer(&self, inputs: &NamedTensors) -> aperture_engine::Result<NamedTensors> {
        let x = pixel_values_input(inputs)?;
        let (logits, boxes) = self
            .detect(x)
            .map_err(|e| EngineError::Device(format!("{e:#}")))?;
        Ok(vec![
            ("logits".to_string(), logits),
            ("pred_boxes".to_string(), boxes),
        ])
    }
}

/// Detection rows `[B, K, 6]` (the GPU's post-processing; at least `sizes.len()` images)
/// -> each image's detections above `threshold`, scaled to its (height, width).
pub fn detections_from_rows(
    rows: &[f32],
    sizes: &[(u32, u32)],
    threshold: f32,
) -> anyhow::Result<Vec<Vec<Detection>>> {
    let per = rows.len() / sizes.len().max(1);
    if sizes.is_empty() || per == 0 || !per.is_multiple_of(DETECTION_VALUES) {
        anyhow::bail!(
            "{} detection values do not split into {} images",
            rows.len(),
            sizes.len()
        );
    }
    rows.chunks_exact(per)
        .zip(sizes)
        .map(|(r, &size)| {
            Ok(scale_detections(r, threshold, size)?
                .into_iter()
                .map(|(score, label, bbox)| Detection { score, label, bbox })
                .collect())
        })
        .collect()
}

/// The NCHW input the preprocessed `images` form: the spec's size, else the first
/// image's.
fn input_shape(
    images: &[&aperture_vision::RgbImage],
    spec: &PreprocessSpec,
) -> anyhow::Result<[usize; 4]> {
    let first = images
        .first()
        .ok_or_else(|| anyhow::anyhow!("no images to detect in"))?;
    let (h, w) = spec
        .size
        .unwrap_or((first.height() as usize, first.width() as usize));
    Ok([images.len(), 3, h, w])
}

/// `shape` with its batch dimension set to `batch` (the graph that runs it).
fn with_batch(shape: &[usize], batch: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(n) = s.first_mut() {
        *n = batch;
    }
    s
}

/// The batch size of the graph that runs an input of `shape`: the next power of two,
/// capped at `max_batch` (never below the input's own batch).
fn graph_batch(shape: &[usize], max_batch: usize) -> usize {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    rows.next_power_of_two().min(max_batch).max(rows)
}

#[cfg(test)]
mod tests {
    use super::graph_batch;

    #[test]
    fn batches_pad_to_powers_of_two_within_the_maximum() {
        let picks: Vec<usize> = (1..=32).map(|n| graph_batch(&[n, 3, 8, 8], 32)).collect();
        let mut sizes = picks.clone();
        sizes.dedup();
        assert_eq!(sizes, vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(picks[16], 32, "17 rows run in the 32 graph");
        assert_eq!(graph_batch(&[17, 3, 8, 8], 24), 24, "capped at the maximum");
        assert_eq!(graph_batch(&[40, 3, 8, 8], 32), 40, "never below the input");
        assert_eq!(graph_batch(&[], 8), 1);
    }
}
