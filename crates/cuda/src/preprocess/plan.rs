//! The host side of GPU preprocessing: what each kernel launch reads and writes, as
//! data. The device executor (`super::GpuPreprocessor`) and the CPU emulation in the
//! tests below run the same steps, so the offsets, sizes and pass order checked here
//! on the CPU are the ones the GPU uses.

use aperture_engine::{EngineError, Result};
use aperture_vision::{resize_plan, AxisTaps};

use super::{PreprocessSpec, TensorLayout};

/// Alignment of each image's bytes inside the input buffer.
const ALIGN: usize = 256;

/// Where a step reads or writes: a byte offset into the uploaded input buffer (tap
/// tables, then the images), or one of the two scratch buffers every image reuses in
/// turn (the work of one stream runs in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Region {
    Input(usize),
    Tmp,
    Resized,
}

/// One kernel launch. `taps` is the byte offset of its packed tap table in the input
/// buffer (`start[n]`, `count[n]`, `coeffs[n * ksize]` as i32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// `pre_resize_h`: `rows` rows of `in_w` pixels -> `out_w` pixels.
    Horizontal {
        src: Region,
        dst: Region,
        rows: usize,
        in_w: usize,
        out_w: usize,
        taps: usize,
        ksize: usize,
    },
    /// `pre_resize_v`: rows of `w` pixels starting at source row `first_row` ->
    /// `out_h` rows.
    Vertical {
        src: Region,
        dst: Region,
        w: usize,
        first_row: usize,
        out_h: usize,
        taps: usize,
        ksize: usize,
    },
    /// `pre_to_float`: one image's `pixels` HWC bytes -> f32 at element `out` of the
    /// output (its batch slot).
    ToFloat {
        src: Region,
        pixels: usize,
        out: usize,
    },
}

/// Everything one batch needs: the input buffer's layout, scratch sizes, the launches.
#[derive(Clone, Debug)]
pub(crate) struct BatchPlan {
    /// Packed tap tables of every pass, at the start of the input buffer.
    pub tables: Vec<i32>,
    /// Byte offset of each image in the input buffer.
    pub image_at: Vec<usize>,
    /// Bytes of the input buffer (tables and images).
    pub input_bytes: usize,
    pub tmp_bytes: usize,
    pub resized_bytes: usize,
    /// Output size of every image.
    pub out_h: usize,
    pub out_w: usize,
    /// Launches in order; per image its passes, then its `ToFloat`.
    pub steps: Vec<Step>,
    /// Where each image's resized bytes end up (before `ToFloat`).
    pub result: Vec<Region>,
}

impl BatchPlan {
    /// f32 values per image in the output.
    pub fn image_elems(&self) -> usize {
        3 * self.out_h * self.out_w
    }

    /// The output tensor's shape for `n` images in `layout`.
    pub fn out_shape(&self, n: usize, layout: TensorLayout) -> Vec<usize> {
        match layout {
            TensorLayout::Nchw => vec![n, 3, self.out_h, self.out_w],
            TensorLayout::Nhwc => vec![n, self.out_h, self.out_w, 3],
        }
    }

    /// Writes the tables and the images' bytes into `buf` (at least `input_bytes`).
    pub fn fill_input(&self, images: &[&[u8]], buf: &mut [u8]) -> Result<()> {
        let table_bytes = self.tables.len() * 4;
        let dst = buf
            .get_mut(..table_bytes)
            .ok_or_else(|| EngineError::Device("preprocessing input buffer too small".into()))?;
        for (d, v) in dst.chunks_exact_mut(4).zip(&self.tables) {
            d.copy_from_slice(&v.to_ne_bytes());
        }
        for (img, &at) in images.iter().zip(&self.image_at) {
            buf.get_mut(at..at + img.len())
                .ok_or_else(|| EngineError::Device("preprocessing input buffer too small".into()))?
                .copy_from_slice(img);
        }
        Ok(())
    }
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        EngineError::Invalid(format!(
            "{what} {v} is too large for GPU preprocessing (at most {})",
            i32::MAX
        ))
    })
}

/// Appends `t` packed to `tables`; returns its byte offset.
fn push_table(tables: &mut Vec<i32>, t: &AxisTaps) -> Result<usize> {
    let at = tables.len() * 4;
    for &s in &t.start {
        tables.push(to_i32(s, "tap start")?);
    }
    for &c in &t.count {
        tables.push(to_i32(c, "tap count")?);
    }
    tables.extend_from_slice(&t.coeffs);
    to_i32(t.ksize, "filter size")?;
    Ok(at)
}

/// Plans a batch of images given as `(width, height)` under `spec`. With no target
/// size every image must have the same size (the batch's).
pub(crate) fn plan_batch(sizes: &[(usize, usize)], spec: &PreprocessSpec) -> Result<BatchPlan> {
    spec.validate()?;
    let &(w0, h0) = sizes
        .first()
        .ok_or_else(|| EngineError::Invalid("no images to preprocess".into()))?;
    let (out_h, out_w) = spec.size.unwrap_or((h0, w0));
    if spec.size.is_none() && sizes.iter().any(|&s| s != (w0, h0)) {
        return Err(EngineError::Invalid(
            "images of different sizes need a target size to share a batch".into(),
        ));
    }
    to_i32(out_w.saturating_mul(3), "output row length")?;
    let resized_bytes = out_w
        .checked_mul(out_h)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(|| EngineError::Invalid(format!("output size {out_w}x{out_h} overflows")))?;
    let mut tables = Vec::new();
    let mut passes = Vec::with_capacity(sizes.len());
    let mut tmp_bytes = 0usize;
    for &(in_w, in_h) in sizes {
        to_i32(in_w.saturating_mul(3), "image row length")?;
        to_i32(in_h, "image height")?;
        let plan = resize_plan(in_w, in_h, out_w, out_h)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let h_at = plan
            .horizontal
            .as_ref()
            .map(|t| push_table(&mut tables, t))
            .transpose()?;
        let v_at = plan
            .vertical
            .as_ref()
            .map(|t| push_table(&mut tables, t))
            .transpose()?;
        // The scratch holds the first pass's output when there are two passes.
        if plan.horizontal.is_some() && plan.vertical.is_some() {
            let first_out = if plan.horizontal_first {
                (plan.rows.1 - plan.rows.0) * out_w * 3
            } else {
                out_h * in_w * 3
            };
            tmp_bytes = tmp_bytes.max(first_out);
        }
        passes.push((in_w, in_h, plan, h_at, v_at));
    }
    let mut at = (tables.len() * 4).next_multiple_of(ALIGN);
    let mut image_at = Vec::with_capacity(sizes.len());
    for &(w, h) in sizes {
        image_at.push(at);
        let bytes = w
            .checked_mul(h)
            .and_then(|p| p.checked_mul(3))
            .ok_or_else(|| EngineError::Invalid(format!("image size {w}x{h} overflows")))?;
        at = at
            .checked_add(bytes)
            .map(|a| a.next_multiple_of(ALIGN))
            .ok_or_else(|| EngineError::Invalid("batch too large".into()))?;
    }
    let mut steps = Vec::new();
    let mut result = Vec::with_capacity(sizes.len());
    let image_elems = resized_bytes;
    for (i, ((in_w, in_h, plan, h_at, v_at), &img_at)) in passes.iter().zip(&image_at).enumerate() {
        let (in_w, in_h) = (*in_w, *in_h);
        let src = Region::Input(img_at);
        let h_step = |src, dst, rows, t: &AxisTaps, at: usize| Step::Horizontal {
            src,
            dst,
            rows,
            in_w,
            out_w,
            taps: at,
            ksize: t.ksize,
        };
        let v_step = |src, dst, w, first_row, t: &AxisTaps, at: usize| Step::Vertical {
            src,
            dst,
            w,
            first_row,
            out_h,
            taps: at,
            ksize: t.ksize,
        };
        let done = match (&plan.horizontal, &plan.vertical, h_at, v_at) {
            (None, None, _, _) => src,
            (Some(h), None, Some(ha), _) => {
                steps.push(h_step(src, Region::Resized, in_h, h, *ha));
                Region::Resized
            }
            (None, Some(v), _, Some(va)) => {
                steps.push(v_step(src, Region::Resized, in_w, 0, v, *va));
                Region::Resized
            }
            (Some(h), Some(v), Some(ha), Some(va)) if plan.horizontal_first => {
                let (first, last) = plan.rows;
                let rows_src = Region::Input(img_at + first * in_w * 3);
                steps.push(h_step(rows_src, Region::Tmp, last - first, h, *ha));
                steps.push(v_step(Region::Tmp, Region::Resized, out_w, first, v, *va));
                Region::Resized
            }
            (Some(h), Some(v), Some(ha), Some(va)) => {
                steps.push(v_step(src, Region::Tmp, in_w, 0, v, *va));
                steps.push(h_step(Region::Tmp, Region::Resized, out_h, h, *ha));
                Region::Resized
            }
            _ => return Err(EngineError::Device("resize plan without its tables".into())),
        };
        steps.push(Step::ToFloat {
            src: done,
            pixels: out_h * out_w,
            out: i * image_elems,
        });
        result.push(done);
    }
    Ok(BatchPlan {
        tables,
        image_at,
        input_bytes: at,
        tmp_bytes,
        resized_bytes,
        out_h,
        out_w,
        steps,
        result,
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
