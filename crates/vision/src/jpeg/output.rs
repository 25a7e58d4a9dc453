//! From upsampled component rows to RGB, as libjpeg-turbo does it with PIL's
//! settings: the table-driven YCbCr -> RGB conversion (`jdcolor.c`) and PIL's
//! CMYK -> RGB. Every function converts one row of `n` pixels into `out`
//! (`3 * n` bytes).

const SCALEBITS: u32 = 16;
const ONE_HALF: i32 = 1 << (SCALEBITS - 1);
const FIX_1_40200: i32 = 91881;
const FIX_1_77200: i32 = 116130;
const FIX_0_71414: i32 = 46802;
const FIX_0_34414: i32 = 22554;

/// libjpeg's `build_ycc_rgb_table`: per chroma value, the R and B offsets and the
/// two unshifted G terms (`ONE_HALF` folded into the Cb one).
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

const fn ycc_tables() -> YccTables {
    let mut t = YccTables {
        cr_r: [0; 256],
        cb_b: [0; 256],
        cr_g: [0; 256],
        cb_g: [0; 256],
    };
    let mut i = 0;
    while i < 256 {
        let x = i as i32 - 128;
        t.cr_r[i] = (FIX_1_40200 * x + ONE_HALF) >> SCALEBITS;
        t.cb_b[i] = (FIX_1_77200 * x + ONE_HALF) >> SCALEBITS;
        t.cr_g[i] = -FIX_0_71414 * x;
        t.cb_g[i] = -FIX_0_34414 * x + ONE_HALF;
        i += 1;
    }
    t
}

static YCC: YccTables = ycc_tables();

/// R, G and B offsets from luma for one chroma pair.
#[inline]
fn ycc_terms(cb: u8, cr: u8) -> (i32, i32, i32) {
    let (cb, cr) = (usize::from(cb), usize::from(cr));
    (
        YCC.cr_r[cr],
        (YCC.cb_g[cb] + YCC.cr_g[cr]) >> SCALEBITS,
        YCC.cb_b[cb],
    )
}

#[inline]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// YCbCr rows to interleaved RGB: the table lookups of `ycc_terms` written as
/// arithmetic the compiler can vectorise. Splitting the multiples of 2^16 off
/// the constants (91881 = 2^16 + 26345, 116130 = 2^17 - 14942,
/// -46802 = -2^16 + 18734) is exact under the arithmetic shift and keeps every
/// multiplier within 16 bits.
pub(crate) fn ycc_to_rgb(y: &[u8], cb: &[u8], cr: &[u8], out: &mut [u8]) {
    for (((px, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(y).zip(cb).zip(cr) {
        let y = i32::from(y);
        let cb = i32::from(cb) - 128;
        let cr = i32::from(cr) - 128;
        let r = y + cr + ((26345 * cr + ONE_HALF) >> SCALEBITS);
        let g = y - cr + ((-22554 * cb + 18734 * cr + ONE_HALF) >> SCALEBITS);
        let b = y + 2 * cb + ((-14942 * cb + ONE_HALF) >> SCALEBITS);
        px.copy_from_slice(&[clamp8(r), clamp8(g), clamp8(b)]);
    }
}

/// A gray row replicated to R, G and B.
pub(crate) fn gray_to_rgb(g: &[u8], out: &mut [u8]) {
    for (px, &v) in out.chunks_exact_mut(3).zip(g) {
        px.copy_from_slice(&[v, v, v]);
    }
}

/// Separate R, G and B rows interleaved.
pub(crate) fn planes_to_rgb(r: &[u8], g: &[u8], b: &[u8], out: &mut [u8]) {
    for (((px, &r), &g), &b) in out.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
        px.copy_from_slice(&[r, g, b]);
    }
}

/// libjpeg's YCCK -> CMYK on the first three channels (K is unchanged), then
/// PIL's CMYK -> RGB.
pub(crate) fn ycck_to_rgb(y: &[u8], cb: &[u8], cr: &[u8], k: &[u8], out: &mut [u8]) {
    let rows = out.chunks_exact_mut(3).zip(y).zip(cb).zip(cr).zip(k);
    for ((((px, &y), &cb), &cr), &k) in rows {
        let (r, g, b) = ycc_terms(cb, cr);
        let y = i32::from(y);
        let cmy = [r, g, b].map(|t| clamp8(255 - (y + t)));
        px.copy_from_slice(&pil_cmyk_px(cmy, k));
    }
}

/// PIL's CMYK JPEG handling: samples are read as Adobe-inverted ("CMYK;I") and
/// then `convert('RGB')` computes `nk - nk * c / 255` with `MULDIV255` rounding.
pub(crate) fn cmyk_to_rgb(c: &[u8], m: &[u8], y: &[u8], k: &[u8], out: &mut [u8]) {
    let rows = out.chunks_exact_mut(3).zip(c).zip(m).zip(y).zip(k);
    for ((((px, &c), &m), &y), &k) in rows {
        px.copy_from_slice(&pil_cmyk_px([c, m, y], k));
    }
}

#[inline]
fn pil_cmyk_px(cmy: [u8; 3], k: u8) -> [u8; 3] {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    // After inversion: C' = 255 - c, K' = 255 - k, so nk = 255 - K' = k.
    let nk = i32::from(k);
    cmy.map(|v| clamp8(nk - muldiv255(255 - i32::from(v), nk)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_chroma_is_gray() {
        let mut out = [0u8; 9];
        ycc_to_rgb(&[0, 77, 255], &[128; 3], &[128; 3], &mut out);
        assert_eq!(out, [0, 0, 0, 77, 77, 77, 255, 255, 255]);
    }

    #[test]
    fn ycc_arithmetic_equals_libjpeg_tables() {
        let mut out = [0u8; 3 * 256];
        for y in [0u8, 1, 77, 128, 200, 254, 255] {
            for cb in 0..=255u8 {
                let crs: Vec<u8> = (0..=255).collect();
                ycc_to_rgb(&[y; 256], &[cb; 256], &crs, &mut out);
                for (px, &cr) in out.chunks_exact(3).zip(&crs) {
                    let (r, g, b) = ycc_terms(cb, cr);
                    let y = i32::from(y);
                    assert_eq!(px, [clamp8(y + r), clamp8(y + g), clamp8(y + b)]);
                }
            }
        }
    }

    #[test]
    fn ycc_matches_the_jfif_formula() {
        // R = Y + 1.402 (Cr - 128), G = Y - 0.34414 (Cb - 128) - 0.71414 (Cr - 128),
        // B = Y + 1.772 (Cb - 128), rounded; clamped to 0..=255.
        let mut out = [0u8; 3];
        for (y, cb, cr) in [(100u8, 60u8, 200u8), (30, 250, 10), (200, 128, 255)] {
            ycc_to_rgb(&[y], &[cb], &[cr], &mut out);
            let (y, cb, cr) = (f64::from(y), f64::from(cb) - 128.0, f64::from(cr) - 128.0);
            let want = [
                y + 1.402 * cr,
                y - 0.34414 * cb - 0.71414 * cr,
                y + 1.772 * cb,
            ]
            .map(|v| v.round().clamp(0.0, 255.0) as u8);
            for (g, w) in out.iter().zip(want) {
                assert!(g.abs_diff(w) <= 1, "{out:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn cmyk_white_and_black() {
        // Stored (Adobe-inverted) samples: 255 = no ink.
        let mut out = [0u8; 3];
        cmyk_to_rgb(&[255], &[255], &[255], &[255], &mut out);
        assert_eq!(out, [255, 255, 255]);
        cmyk_to_rgb(&[255], &[255], &[255], &[0], &mut out);
        assert_eq!(out, [0, 0, 0]);
        cmyk_to_rgb(&[0], &[255], &[255], &[255], &mut out);
        assert_eq!(out, [0, 255, 255]);
    }
}
