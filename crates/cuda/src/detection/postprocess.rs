//! D-FINE's post-processing on the GPU, capturable in a CUDA graph (no host
//! synchronisation, buffers from the pool): per image the top K of sigmoid(logits) over
//! queries x classes in the CPU's order (score descending, ties by lower flat index), as
//! rows of (score, label, x0, y0, x1, y1) with normalised corners. The host keeps the
//! threshold and the image size ([`scale_detections`]), so images of any size share one
//! graph. CPU twin: `aperture_models::dfine::post_process`.
//!
//! Two kernels: `det_score_keys` computes every score as the CPU does (its f32 bits are
//! the rank key) over the whole batch; `det_topk_detections` selects per image in one
//! block (radix select on the keys, an ordered compaction, a rank among the K winners).

use aperture_engine::{EngineError, HostTensor, Result};
use cudarc::driver::{result, sys};

use super::Arg;
use crate::backend::{CudaBackend, CudaTensor};
use crate::error::CudaError;
use crate::pool::DeviceBuffer;

/// Values per detection row: score, label, x0, y0, x1, y1.
pub const DETECTION_VALUES: usize = 6;
/// Threads of the selection block (fewer if the kernel's registers do not allow them).
const TOPK_THREADS: usize = 1024;
/// Keys each thread holds in registers (`DET_TOPK_ITEMS` in detection.cu); more keys
/// per image take the kernel that re-reads them from memory.
const TOPK_ITEMS: usize = 24;
/// Most detections per image: the winners' keys and indices sit in shared memory.
pub(crate) const MAX_DETECTIONS: usize = 4096;

/// The top-K detections of a batch on the device: f32 `[B, 1, K, 6]` rows of
/// [`DETECTION_VALUES`], best first per image.
pub struct TopDetections {
    pub(crate) buf: DeviceBuffer,
    pub(crate) dims: [usize; 4],
}

impl TopDetections {
    /// `[B, 1, K, 6]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Copies the rows out as a `[B, K, 6]` host tensor (synchronises the stream).
    pub fn download(&self, be: &CudaBackend) -> Result<HostTensor> {
        let [b, _, k, v] = self.dims;
        let host = be.det_read_f32(self.buf.ptr(), b * k * v)?;
        HostTensor::from_f32(vec![b, k, v], host)
    }
}

/// Which selection kernel runs and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TopkLaunch {
    pub kernel: &'static str,
    pub threads: u32,
    /// Dynamic shared memory: K keys and K indices.
    pub smem: u32,
}

/// The launch for `queries * classes` scores per image and `k` detections, given the
/// most threads per block each kernel allows (its register use decides):
/// `(det_topk_detections, det_topk_detections_wide)`.
pub(crate) fn topk_launch(
    queries: usize,
    classes: usize,
    k: usize,
    max_threads: (usize, usize),
) -> Result<TopkLaunch> {
    let n = queries
        .checked_mul(classes)
        .filter(|&n| n > 0 && n <= i32::MAX as usize)
        .ok_or_else(|| {
            EngineError::Shape(format!(
                "top-k detections: {queries} queries x {classes} classes is not a valid score count"
            ))
        })?;
    if k == 0 || k > n {
        return Err(EngineError::Shape(format!(
            "top-k detections: cannot keep {k} of {n} scores"
        )));
    }
    if k > MAX_DETECTIONS {
        return Err(EngineError::Unsupported(format!(
            "top-k detections on the GPU keep at most {MAX_DETECTIONS} per image, asked for {k}"
        )));
    }
    let (kernel, threads) = pick_select_kernel(
        n,
        TOPK_ITEMS,
        TOPK_THREADS,
        max_threads,
        ("det_topk_detections", "det_topk_detections_wide"),
    )?;
    Ok(TopkLaunch {
        kernel,
        threads,
        smem: (8 * k) as u32,
    })
}

/// Of a one-block-per-image selection kernel pair `(registers, wide)`: the one holding
/// `items` keys per thread in registers when `n` keys fit, else the one re-reading them,
/// and its block size: `threads`, or fewer as the kernel's registers allow, in whole
/// warps (the kernels' ballots take every lane).
pub(crate) fn pick_select_kernel(
    n: usize,
    items: usize,
    threads: usize,
    max_threads: (usize, usize),
    kernels: (&'static str, &'static str),
) -> Result<(&'static str, u32)> {
    let warps = |max: usize| threads.min(max).min(1024) / 32 * 32;
    let (regs, wide) = (warps(max_threads.0), warps(max_threads.1));
    if regs > 0 && n <= items * regs {
        Ok((kernels.0, regs as u32))
    } else if wide > 0 {
        Ok((kernels.1, wide as u32))
    } else {
        Err(EngineError::Device(format!(
            "the selection kernels {} / {} cannot launch a single warp",
            kernels.0, kernels.1
        )))
    }
}

impl CudaBackend {
    /// Most threads per block `name` can launch with.
    pub(crate) fn det_max_threads(&self, name: &str) -> Result<usize> {
        let kernels = self.det_kernels()?;
        let f = kernels.function(name)?;
        self.ctx.bind()?;
        // SAFETY: `f` is a function of the loaded module; the query writes one integer.
        let v = unsafe {
            result::function::get_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            )
        }
        .map_err(CudaError::from)?;
        Ok(v.max(0) as usize)
    }

    /// D-FINE's post-processing before the threshold: `logits` `[B, 1, Q, C]` and
    /// cxcywh `boxes` `[B, 1, Q, 4]` -> the top `k` of sigmoid(logits) per image over
    /// all `Q * C` scores, as the CPU's `post_process` orders them, with label
    /// `index % C` and the box of query `index / C` as normalised corners. Only enqueues
    /// device work, so it can run inside a captured graph.
    pub fn top_k_detections(
        &self,
        logits: &CudaTensor,
        boxes: &CudaTensor,
        k: usize,
    ) -> Result<TopDetections> {
        let [b, _, _, c] = logits.dims;
        let q = logits
            .numel()
            .checked_div(b)
            .and_then(|per_image| per_image.checked_div(c))
            .unwrap_or(0);
        if b == 0
            || logits.numel() != b * q * c
            || boxes.dims[0] != b
            || boxes.dims[3] != 4
            || boxes.numel() != b * q * 4
        {
            return Err(EngineError::Shape(format!(
                "top-k detections: logits {:?} do not go with boxes {:?}",
                logits.dims, boxes.dims
            )));
        }
        let max_threads = (
            self.det_max_threads("det_topk_detections")?,
            self.det_max_threads("det_topk_detections_wide")?,
        );
        let launch = topk_launch(q, c, k, max_threads)?;
        let n = q * c;
        self.profiler.op(
            self,
            "top_k_detections",
            // Sigmoid in double, four histogram passes, compaction, K^2 ranking.
            (b * (n * 30 + k * k)) as f64,
            (b * n * (self.esize() + 4 * 6) + b * k * DETECTION_VALUES * 4) as f64,
            || {
                let keys = self.pool.alloc(b * n * 4)?;
                self.det_launch_1d(
                    "det_score_keys",
                    b * n,
                    &[
                        Arg::Ptr(logits.ptr()),
                        Arg::Ptr(keys.ptr()),
                        Arg::I64((b * n) as i64),
                    ],
                )?;
                let out = self.pool.alloc(b * k * DETECTION_VALUES * 4)?;
                let grid = u32::try_from(b).map_err(|_| {
                    EngineError::Invalid(format!("top-k detections: {b} images in one launch"))
                })?;
                self.det_launch_grid(
                    launch.kernel,
                    (grid, 1),
                    launch.threads,
                    launch.smem,
                    &[
                        Arg::Ptr(keys.ptr()),
                        Arg::Ptr(boxes.ptr()),
                        Arg::Ptr(out.ptr()),
                        Arg::I32(n as i32),
                        Arg::I32(c as i32),
                        Arg::I32(k as i32),
                    ],
                )?;
                Ok(TopDetections {
                    buf: out,
                    dims: [b, 1, k, DETECTION_VALUES],
                })
            },
        )
    }
}

/// One image's detection rows (`K * 6` values of [`TopDetections`]) -> `(score, label,
/// [x0, y0, x1, y1])` scoring above `threshold`, corners scaled to `(height, width)`
/// exactly as the CPU's `post_process` scales them. Order is kept.
pub fn scale_detections(
    rows: &[f32],
    threshold: f32,
    (height, width): (u32, u32),
) -> Result<Vec<(f32, usize, [f32; 4])>> {
    if !rows.len().is_multiple_of(DETECTION_VALUES) {
        return Err(EngineError::Shape(format!(
            "{} values are not rows of {DETECTION_VALUES} detection values",
            rows.len()
        )));
    }
    let (h, w) = (height as f32, width as f32);
    rows.chunks_exact(DETECTION_VALUES)
        .filter(|r| r[0] > threshold)
        .map(|r| {
            let l = r[1];
            if !(l >= 0.0 && l.fract() == 0.0 && l < (1u32 << 24) as f32) {
                return Err(EngineError::Invalid(format!(
                    "detection label {l} is not a class index"
                )));
            }
            Ok((r[0], l as usize, [r[2] * w, r[3] * h, r[4] * w, r[5] * h]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::select_sim::simulate;
    use super::*;

    /// The CPU's score (`post_process`'s sigmoid) as a rank key, NaN first.
    fn key(x: f32) -> u32 {
        if x.is_nan() {
            return u32::MAX;
        }
        (1.0 / (1.0 + (-x).exp())).to_bits()
    }

    /// The CPU's order: score descending, ties by lower index (NaN keys first).
    fn reference(keys: &[u32], k: usize) -> Vec<(u32, usize)> {
        let mut idx: Vec<usize> = (0..keys.len()).collect();
        idx.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        idx.into_iter().take(k).map(|i| (keys[i], i)).collect()
    }

    fn logits(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    #[test]
    fn keys_order_as_the_cpu_scores() {
        let xs = [
            -120.0f32,
            -8.0,
            -0.5,
            0.0,
            0.25,
            3.0,
            16.0,
            40.0,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            let (a, b) = (key(w[0]), key(w[1]));
            let (sa, sb) = (f32::from_bits(a), f32::from_bits(b));
            assert!(a <= b && sa <= sb, "{w:?}");
            assert_eq!(a.cmp(&b), sa.partial_cmp(&sb).unwrap(), "{w:?}");
        }
        // Large logits saturate to 1.0: equal keys, so the index decides (not the logit).
        assert_eq!(key(17.0), key(30.0));
        assert_eq!(f32::from_bits(key(30.0)), 1.0);
        assert!(key(f32::NAN) > key(f32::INFINITY));
    }

    #[test]
    fn the_selection_algorithm_gives_the_cpu_order() {
        let cases: Vec<(Vec<f32>, usize, usize)> = vec![
            // D-FINE's 300 queries x 80 classes, 512 threads.
            (logits(1, 24_000, -8.0, 8.0), 300, TOPK_THREADS),
            // Many equal logits: ties decided by index.
            (
                logits(2, 24_000, -3.0, 3.0)
                    .into_iter()
                    .map(|v| (v * 2.0).round() / 2.0)
                    .collect(),
                300,
                TOPK_THREADS,
            ),
            // Every score equal, and saturated scores (distinct logits, equal keys).
            (vec![0.7; 2_400], 30, TOPK_THREADS),
            (logits(3, 6_000, 14.0, 40.0), 100, TOPK_THREADS),
            // Fewer scores than threads, chunks that do not divide evenly, K = N.
            (logits(4, 10, -1.0, 1.0), 10, TOPK_THREADS),
            (logits(5, 1_001, -5.0, 5.0), 77, 64),
            (logits(6, 3_000, -2.0, 2.0), 3_000, 96),
        ];
        for (i, (xs, k, threads)) in cases.into_iter().enumerate() {
            let keys: Vec<u32> = xs.iter().map(|&x| key(x)).collect();
            assert_eq!(simulate(&keys, k, threads), reference(&keys, k), "case {i}");
        }
        // NaN ranks first.
        let mut keys: Vec<u32> = logits(7, 500, -1.0, 1.0).iter().map(|&x| key(x)).collect();
        keys[321] = key(f32::NAN);
        let got = simulate(&keys, 5, 64);
        assert_eq!(got[0].1, 321);
        assert_eq!(got, reference(&keys, 5));
    }

    #[test]
    fn launch_picks_the_register_kernel_when_the_keys_fit() {
        let all = (1024, 1024);
        let l = topk_launch(300, 80, 300, all).unwrap();
        assert_eq!(l.kernel, "det_topk_detections");
        assert_eq!((l.threads, l.smem), (1024, 2400));
        let fit = topk_launch(TOPK_ITEMS * TOPK_THREADS, 1, 10, all).unwrap();
        assert_eq!(fit.kernel, "det_topk_detections");
        let wide = topk_launch(300, 365, 300, all).unwrap();
        assert_eq!(wide.kernel, "det_topk_detections_wide");
        // Registers allowing fewer threads: whole warps, and the wide kernel when the
        // keys no longer fit.
        let few = topk_launch(30, 80, 300, (300, 1024)).unwrap();
        assert_eq!((few.kernel, few.threads), ("det_topk_detections", 288));
        let spill = topk_launch(300, 80, 300, (256, 1000)).unwrap();
        assert_eq!(
            (spill.kernel, spill.threads),
            ("det_topk_detections_wide", 992)
        );
        // The query selection: D-FINE's 8,400 encoder rows at 640x640 fit the registers.
        let names = ("det_topk_select", "det_topk_select_wide");
        assert_eq!(
            pick_select_kernel(8400, 16, 1024, all, names).unwrap(),
            ("det_topk_select", 1024)
        );
        assert_eq!(
            pick_select_kernel(16 * 1024 + 1, 16, 1024, all, names).unwrap(),
            ("det_topk_select_wide", 1024)
        );
        assert!(topk_launch(300, 80, 300, (0, 16)).is_err());
        assert!(topk_launch(300, 80, 0, all).is_err());
        assert!(topk_launch(3, 2, 7, all).is_err());
        assert!(topk_launch(300, 0, 1, all).is_err());
        assert!(topk_launch(10_000, 80, MAX_DETECTIONS + 1, all).is_err());
        assert!(topk_launch(usize::MAX, 2, 1, all).is_err());
        // The winners' keys and indices fit the default 48 KiB with the kernel's own.
        const { assert!(8 * MAX_DETECTIONS + 256 * 4 + 64 * 4 + 8 <= 48 * 1024) };
    }

    #[test]
    fn scaling_keeps_order_filters_and_matches_the_cpu_arithmetic() {
        let (cx, cy, bw, bh) = (0.3f32, 0.6f32, 0.25f32, 0.1f32);
        let rows = [
            0.9,
            3.0,
            cx - 0.5 * bw,
            cy - 0.5 * bh,
            cx + 0.5 * bw,
            cy + 0.5 * bh,
            0.4,
            0.0,
            0.0,
            0.0,
            1.0,
            1.0,
        ];
        let d = scale_detections(&rows, 0.5, (480, 640)).unwrap();
        assert_eq!(d.len(), 1);
        let (score, label, bbox) = d[0];
        assert_eq!((score, label), (0.9, 3));
        // post_process: (cx - 0.5 * bw) * w with w = 640 (width), h = 480.
        assert_eq!(
            bbox,
            [
                (cx - 0.5 * bw) * 640.0,
                (cy - 0.5 * bh) * 480.0,
                (cx + 0.5 * bw) * 640.0,
                (cy + 0.5 * bh) * 480.0
            ]
        );
        assert_eq!(scale_detections(&rows, 0.0, (1, 1)).unwrap().len(), 2);
        assert!(scale_detections(&rows[..5], 0.0, (1, 1)).is_err());
        let mut bad = rows;
        bad[1] = 2.5;
        assert!(scale_detections(&bad, 0.0, (1, 1)).is_err());
        bad[1] = f32::NAN;
        assert!(scale_detections(&bad, 0.0, (1, 1)).is_err());
    }
}
