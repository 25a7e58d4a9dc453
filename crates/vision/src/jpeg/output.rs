//! From decoded component planes to RGB, as libjpeg-turbo does it with PIL's
//! settings: "fancy" (triangle-filter) chroma upsampling (`jdsample.c`), the
//! table-driven YCbCr -> RGB conversion (`jdcolor.c`), and PIL's CMYK -> RGB.

/// One component's samples at its own (downsampled) resolution.
pub(crate) struct Plane {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Plane {
    #[inline]
    fn at(&self, x: usize, y: usize) -> i32 {
        i32::from(self.data[y * self.width + x])
    }
}

/// Upsample `p` by integer factors (`fx`, `fy`) to at least `out_w` x `out_h`
/// and crop to exactly that.
pub(crate) fn upsample(p: &Plane, fx: usize, fy: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let full = match (fx, fy) {
        (1, 1) => return crop(&p.data, p.width, out_w, out_h),
        (2, 1) if p.width > 2 => h2v1_fancy(p),
        (1, 2) => h1v2_fancy(p),
        (2, 2) if p.width > 2 => h2v2_fancy(p),
        _ => replicate(p, fx, fy),
    };
    crop(&full, p.width * fx, out_w, out_h)
}

fn crop(data: &[u8], width: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    if width == out_w && data.len() == out_w * out_h {
        return data.to_vec();
    }
    data.chunks_exact(width)
        .take(out_h)
        .flat_map(|row| &row[..out_w])
        .copied()
        .collect()
}

fn replicate(p: &Plane, fx: usize, fy: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.width * fx * p.height * fy);
    for row in p.data.chunks_exact(p.width) {
        let wide: Vec<u8> = row
            .iter()
            .flat_map(|&v| std::iter::repeat_n(v, fx))
            .collect();
        for _ in 0..fy {
            out.extend_from_slice(&wide);
        }
    }
    out
}

/// Horizontal 2x: each output is 3/4 of the nearer input plus 1/4 of the next
/// nearer, rounding biases 1 and 2 alternating; edges use the edge sample.
fn h2v1_fancy(p: &Plane) -> Vec<u8> {
    let w = p.width;
    let mut out = Vec::with_capacity(2 * w * p.height);
    for y in 0..p.height {
        for x in 0..w {
            let v = p.at(x, y) * 3;
            let left = p.at(x.saturating_sub(1), y);
            let right = p.at((x + 1).min(w - 1), y);
            out.push(((v + left + 1) >> 2) as u8);
            out.push(((v + right + 2) >> 2) as u8);
        }
    }
    out
}

/// Vertical 2x with the rows above/below (edge rows repeated), biases 1 and 2.
fn h1v2_fancy(p: &Plane) -> Vec<u8> {
    let (w, h) = (p.width, p.height);
    let mut out = Vec::with_capacity(w * 2 * h);
    for y in 0..h {
        let above = y.saturating_sub(1);
        let below = (y + 1).min(h - 1);
        for (other, bias) in [(above, 1), (below, 2)] {
            for x in 0..w {
                out.push(((p.at(x, y) * 3 + p.at(x, other) + bias) >> 2) as u8);
            }
        }
    }
    out
}

/// 2x in both directions: vertical 3:1 column sums, then horizontal 3:1 with
/// biases 8 and 7 over 16.
fn h2v2_fancy(p: &Plane) -> Vec<u8> {
    let (w, h) = (p.width, p.height);
    let mut out = Vec::with_capacity(4 * w * h);
    let mut sums = vec![0i32; w];
    for y in 0..h {
        for other in [y.saturating_sub(1), (y + 1).min(h - 1)] {
            for (x, s) in sums.iter_mut().enumerate() {
                *s = p.at(x, y) * 3 + p.at(x, other);
            }
            for x in 0..w {
                let this = sums[x] * 3;
                let last = sums[x.saturating_sub(1)];
                let next = sums[(x + 1).min(w - 1)];
                out.push(((this + last + 8) >> 4) as u8);
                out.push(((this + next + 7) >> 4) as u8);
            }
        }
    }
    out
}

const SCALEBITS: u32 = 16;
const ONE_HALF: i32 = 1 << (SCALEBITS - 1);
const FIX_1_40200: i32 = 91881;
const FIX_1_77200: i32 = 116130;
const FIX_0_71414: i32 = 46802;
const FIX_0_34414: i32 = 22554;

/// libjpeg's `build_ycc_rgb_table` entries for one chroma value.
#[inline]
fn ycc_terms(cb: u8, cr: u8) -> (i32, i32, i32) {
    let cb = i32::from(cb) - 128;
    let cr = i32::from(cr) - 128;
    let r = (FIX_1_40200 * cr + ONE_HALF) >> SCALEBITS;
    let b = (FIX_1_77200 * cb + ONE_HALF) >> SCALEBITS;
    let g = ((-FIX_0_34414) * cb + ONE_HALF + (-FIX_0_71414) * cr) >> SCALEBITS;
    (r, g, b)
}

#[inline]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// YCbCr planes (same size) to interleaved RGB.
pub(crate) fn ycc_to_rgb(y: &[u8], cb: &[u8], cr: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(y.len() * 3);
    for ((&y, &cb), &cr) in y.iter().zip(cb).zip(cr) {
        let (r, g, b) = ycc_terms(cb, cr);
        let y = i32::from(y);
        out.extend_from_slice(&[clamp8(y + r), clamp8(y + g), clamp8(y + b)]);
    }
    out
}

/// libjpeg's YCCK -> CMYK for the first three planes (K is unchanged).
pub(crate) fn ycck_to_cmy(y: &[u8], cb: &[u8], cr: &[u8]) -> [Vec<u8>; 3] {
    let mut c = Vec::with_capacity(y.len());
    let mut m = Vec::with_capacity(y.len());
    let mut yy = Vec::with_capacity(y.len());
    for ((&y, &cb), &cr) in y.iter().zip(cb).zip(cr) {
        let (r, g, b) = ycc_terms(cb, cr);
        let y = i32::from(y);
        c.push(clamp8(255 - (y + r)));
        m.push(clamp8(255 - (y + g)));
        yy.push(clamp8(255 - (y + b)));
    }
    [c, m, yy]
}

/// PIL's CMYK JPEG handling: samples are read as Adobe-inverted ("CMYK;I") and
/// then `convert('RGB')` computes `nk - nk * c / 255` with `MULDIV255` rounding.
pub(crate) fn pil_cmyk_to_rgb(c: &[u8], m: &[u8], y: &[u8], k: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(c.len() * 3);
    for i in 0..c.len() {
        // After inversion: C' = 255 - c, K' = 255 - k, so nk = 255 - K' = k.
        let nk = i32::from(k[i]);
        for v in [c[i], m[i], y[i]] {
            let inv = 255 - i32::from(v);
            out.push(clamp8(nk - muldiv255(inv, nk)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_chroma_is_gray() {
        assert_eq!(
            ycc_to_rgb(&[0, 77, 255], &[128; 3], &[128; 3]),
            [0, 0, 0, 77, 77, 77, 255, 255, 255]
        );
    }

    #[test]
    fn fancy_upsampling_of_a_step() {
        // One row 0, 100, 200 -> 2x: edges copy, inner samples 3:1 blends.
        let p = Plane {
            width: 3,
            height: 1,
            data: vec![0, 100, 200],
        };
        assert_eq!(h2v1_fancy(&p), [0, 25, 75, 125, 175, 200]);
        let v = Plane {
            width: 1,
            height: 2,
            data: vec![0, 100],
        };
        assert_eq!(h1v2_fancy(&v), [0, 25, 75, 100]);
        // Constant planes stay constant in every mode.
        let c = Plane {
            width: 5,
            height: 3,
            data: vec![77; 15],
        };
        for (fx, fy) in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (2, 4)] {
            let out = upsample(&c, fx, fy, 5 * fx - 1, 3 * fy - 1);
            assert_eq!(out.len(), (5 * fx - 1) * (3 * fy - 1));
            assert!(out.iter().all(|&v| v == 77));
        }
    }

    #[test]
    fn cmyk_white_and_black() {
        // Stored (Adobe-inverted) samples: 255 = no ink.
        assert_eq!(
            pil_cmyk_to_rgb(&[255], &[255], &[255], &[255]),
            [255, 255, 255]
        );
        assert_eq!(pil_cmyk_to_rgb(&[255], &[255], &[255], &[0]), [0, 0, 0]);
        assert_eq!(pil_cmyk_to_rgb(&[0], &[255], &[255], &[255]), [0, 255, 255]);
    }
}
