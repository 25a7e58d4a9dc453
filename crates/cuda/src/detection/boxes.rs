//! Query selection and box arithmetic (CPU twins: `cpu::detection`).

use std::cmp::Ordering;

use aperture_engine::{EngineError, Result};

use super::postprocess::pick_select_kernel;
use super::Arg;
use crate::backend::{CudaBackend, CudaTensor};

/// Largest bin count the distribution kernels hold per thread.
const MAX_BINS: usize = 128;
/// Shared memory for the rows one image's device top-k keeps (a key and an index each;
/// more: host path).
const SELECT_SMEM: usize = 48 * 1024;
/// Threads per image in the device top-k (fewer if the kernel's registers do not allow).
const SELECT_BLOCK: usize = 1024;
/// Scores each thread holds in registers (`DET_SELECT_ITEMS` in detection.cu); more rows
/// per image take the kernel that re-reads them.
const SELECT_ITEMS: usize = 16;

fn check_seq(x: &CudaTensor, what: &str) -> Result<()> {
    if x.dims[1] != 1 {
        return Err(EngineError::Shape(format!(
            "{what} expects a sequence [B, 1, L, C], got {:?}",
            x.dims
        )));
    }
    Ok(())
}

/// Indices of the `k` largest scores, best first; NaN ranks first and ties keep index
/// order (the CPU backend's and `torch.topk`'s order).
pub(crate) fn rank(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&i, &j| match (scores[i].is_nan(), scores[j].is_nan()) {
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => scores[j]
            .partial_cmp(&scores[i])
            .unwrap_or(Ordering::Equal)
            .then(i.cmp(&j)),
    });
    idx.truncate(k);
    idx
}

impl CudaBackend {
    /// Row maxima on the device, ranking on the host (a synchronisation point).
    pub(crate) fn det_top_k_rows(&self, x: &CudaTensor, k: usize) -> Result<Vec<Vec<usize>>> {
        check_seq(x, "top-k")?;
        let [n, _, l, c] = x.dims;
        if k > l || c == 0 {
            return Err(EngineError::Shape(format!(
                "cannot pick {k} of {l} rows with {c} channels"
            )));
        }
        let rows = n * l;
        let best = self.pool.alloc(rows.max(1) * 4)?;
        self.det_launch_1d(
            "det_row_max",
            rows,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(best.ptr()),
                Arg::I64(rows as i64),
                Arg::I32(c as i32),
            ],
        )?;
        let scores = self.det_read_f32(best.ptr(), rows)?;
        Ok(scores
            .chunks(l.max(1))
            .take(n)
            .map(|s| rank(s, k))
            .collect())
    }

    /// Top-k on the device (a radix select over the row maxima) and gathers by the
    /// device indices: no synchronisation, so a forward pass stays capturable.
    pub(crate) fn det_select_rows(
        &self,
        scores: &CudaTensor,
        k: usize,
        sources: &[&CudaTensor],
    ) -> Result<Vec<CudaTensor>> {
        check_seq(scores, "top-k")?;
        let [n, _, l, c] = scores.dims;
        if k > l || c == 0 {
            return Err(EngineError::Shape(format!(
                "cannot pick {k} of {l} rows with {c} channels"
            )));
        }
        if let Some(s) = sources
            .iter()
            .find(|s| s.dims[0] != n || s.dims[1] != 1 || s.dims[2] != l)
        {
            return Err(EngineError::Shape(format!(
                "cannot gather rows of {:?} by scores {:?}",
                s.dims, scores.dims
            )));
        }
        if k * 8 > SELECT_SMEM {
            let top = self.det_top_k_rows(scores, k)?;
            return sources
                .iter()
                .map(|s| self.det_gather_rows(s, &top))
                .collect();
        }
        let rows = n * l;
        let idx = self.profiler.op(
            self,
            "top_k",
            (4 * rows) as f64,
            (scores.numel() * self.esize()) as f64,
            || {
                let best = self.pool.alloc(rows.max(1) * 4)?;
                self.det_launch_1d(
                    "det_row_max",
                    rows,
                    &[
                        Arg::Ptr(scores.ptr()),
                        Arg::Ptr(best.ptr()),
                        Arg::I64(rows as i64),
                        Arg::I32(c as i32),
                    ],
                )?;
                let idx = self.pool.alloc((n * k).max(1) * 4)?;
                let args = [
                    Arg::Ptr(best.ptr()),
                    Arg::Ptr(idx.ptr()),
                    Arg::I32(l as i32),
                    Arg::I32(k as i32),
                ];
                let (kernel, threads) = pick_select_kernel(
                    l,
                    SELECT_ITEMS,
                    SELECT_BLOCK,
                    (
                        self.det_max_threads("det_topk_select")?,
                        self.det_max_threads("det_topk_select_wide")?,
                    ),
                    ("det_topk_select", "det_topk_select_wide"),
                )?;
                let grid = u32::try_from(n).map_err(|_| {
                    EngineError::Invalid(format!("top-k: {n} images in one launch"))
                })?;
                self.det_launch_grid(kernel, (grid, 1), threads, (k * 8) as u32, &args)?;
                Ok(idx)
            },
        )?;
        sources
            .iter()
            .map(|s| self.det_gather_device(s, idx.ptr(), k))
            .collect()
    }

    /// `x[b, idx[b, j], :]` with `k` device indices per batch item.
    fn det_gather_device(&self, x: &CudaTensor, idx: u64, k: usize) -> Result<CudaTensor> {
        let [n, _, l, c] = x.dims;
        self.profiler.op(
            self,
            "gather_rows",
            0.0,
            ((2 * n * k * c) * self.esize()) as f64,
            || {
                let out = self.alloc_tensor([n, 1, k, c])?;
                let args = [
                    Arg::Ptr(x.ptr()),
                    Arg::Ptr(idx),
                    Arg::Ptr(out.ptr()),
                    Arg::I32(n as i32),
                    Arg::I32(l as i32),
                    Arg::I32(k as i32),
                    Arg::I32(c as i32),
                ];
                self.det_launch_1d("det_gather", n * k * c, &args)?;
                Ok(out)
            },
        )
    }

    pub(crate) fn det_gather_rows(
        &self,
        x: &CudaTensor,
        rows: &[Vec<usize>],
    ) -> Result<CudaTensor> {
        check_seq(x, "gather")?;
        let [n, _, l, c] = x.dims;
        let k = rows.first().map_or(0, Vec::len);
        if rows.len() != n
            || rows
                .iter()
                .any(|r| r.len() != k || r.iter().any(|&i| i >= l))
        {
            return Err(EngineError::Shape(format!(
                "row indices do not fit a {:?} tensor",
                x.dims
            )));
        }
        let idx: Vec<i32> = rows.iter().flatten().map(|&i| i as i32).collect();
        let idx_buf = self.upload_bytes(&idx)?;
        self.profiler.op(
            self,
            "gather_rows",
            0.0,
            ((2 * n * k * c) * self.esize()) as f64,
            || {
                let out = self.alloc_tensor([n, 1, k, c])?;
                let args = [
                    Arg::Ptr(x.ptr()),
                    Arg::Ptr(idx_buf.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I32(n as i32),
                    Arg::I32(l as i32),
                    Arg::I32(k as i32),
                    Arg::I32(c as i32),
                ];
                self.det_launch_1d("det_gather", n * k * c, &args)?;
                Ok(out)
            },
        )
    }

    pub(crate) fn det_refine_boxes(
        &self,
        delta: &CudaTensor,
        boxes: &CudaTensor,
    ) -> Result<CudaTensor> {
        if delta.dims != boxes.dims {
            return Err(EngineError::Shape(format!(
                "box deltas {:?} vs boxes {:?}",
                delta.dims, boxes.dims
            )));
        }
        let n = boxes.numel();
        self.profiler.op(
            self,
            "refine_boxes",
            8.0 * n as f64,
            ((3 * n) * self.esize()) as f64,
            || {
                let out = self.alloc_tensor(boxes.dims)?;
                let args = [
                    Arg::Ptr(delta.ptr()),
                    Arg::Ptr(boxes.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(n as i64),
                ];
                self.det_launch_1d("det_refine", n, &args)?;
                Ok(out)
            },
        )
    }

    pub(crate) fn det_distribution_boxes(
        &self,
        corners: &CudaTensor,
        reference: &CudaTensor,
        project: &[f32],
        reg_scale: f32,
    ) -> Result<CudaTensor> {
        let bins = project.len();
        check_seq(corners, "distribution boxes")?;
        let [n, _, l, c] = corners.dims;
        if bins == 0 || c != 4 * bins || reference.dims != [n, 1, l, 4] {
            return Err(EngineError::Shape(format!(
                "distribution boxes: corners {:?} with {bins} bins, reference {:?}",
                corners.dims, reference.dims
            )));
        }
        if bins > MAX_BINS {
            return Err(EngineError::Unsupported(format!(
                "the CUDA distribution kernel takes up to {MAX_BINS} bins, got {bins}"
            )));
        }
        let proj = self.det_constant(project, true)?;
        let rows = n * l;
        self.profiler.op(
            self,
            "distribution_boxes",
            (rows * 4 * bins * 4) as f64,
            ((corners.numel() + 8 * rows) * self.esize()) as f64,
            || {
                let out = self.alloc_tensor(reference.dims)?;
                let args = [
                    Arg::Ptr(corners.ptr()),
                    Arg::Ptr(reference.ptr()),
                    Arg::Ptr(proj.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(rows as i64),
                    Arg::I32(bins as i32),
                    Arg::F32(reg_scale),
                ];
                self.det_launch("det_distribution", rows, 128, 0, &args)?;
                Ok(out)
            },
        )
    }

    pub(crate) fn det_corner_stats(
        &self,
        corners: &CudaTensor,
        bins: usize,
        top_k: usize,
    ) -> Result<CudaTensor> {
        check_seq(corners, "corner statistics")?;
        let [n, _, l, c] = corners.dims;
        if bins == 0 || top_k == 0 || top_k > bins || c != 4 * bins {
            return Err(EngineError::Shape(format!(
                "corner statistics: {c} channels for 4 x {bins} bins, top {top_k}"
            )));
        }
        if bins > MAX_BINS {
            return Err(EngineError::Unsupported(format!(
                "the CUDA corner statistics take up to {MAX_BINS} bins, got {bins}"
            )));
        }
        let rows = n * l;
        let per = top_k + 1;
        self.profiler.op(
            self,
            "corner_stats",
            (rows * 4 * bins * (4 + top_k)) as f64,
            ((corners.numel() + rows * 4 * per) * self.esize()) as f64,
            || {
                let out = self.alloc_tensor([n, 1, l, 4 * per])?;
                let args = [
                    Arg::Ptr(corners.ptr()),
                    Arg::Ptr(out.ptr()),
                    Arg::I64(rows as i64),
                    Arg::I32(bins as i32),
                    Arg::I32(top_k as i32),
                ];
                self.det_launch("det_corner_stats", rows * 4, 128, 0, &args)?;
                Ok(out)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_puts_nan_first_and_keeps_ties_in_index_order() {
        assert_eq!(rank(&[0.2, 0.9, 0.5, 0.9], 3), vec![1, 3, 2]);
        assert_eq!(rank(&[0.2, f32::NAN, 0.5], 2), vec![1, 2]);
        assert_eq!(rank(&[1.0, 2.0], 0), Vec::<usize>::new());
    }
}
