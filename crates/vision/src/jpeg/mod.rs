//! A JPEG decoder whose output matches libjpeg-turbo's, and so PIL's, exactly.
//!
//! General-purpose Rust decoders round differently from libjpeg (IDCT, chroma
//! upsampling, colour conversion) and differ from PIL by up to ~4 levels on
//! colour JPEGs, which is more than the 1/255 preprocessing budget. This decoder
//! covers the JPEGs photos use: 8-bit Huffman-coded baseline, extended and
//! progressive, 1, 3 or 4 components, integer sampling factors, restart
//! intervals. For anything else it returns `Ok(None)` and the caller falls back
//! to the general decoder.

mod entropy;
mod idct;
mod output;
mod structure;
mod upsample;

pub(crate) use structure::check_complete;

use entropy::{BitReader, Huffman};
use upsample::{Plane, RowUpsampler};

/// Progressive files use ~10 scans; a cap stops files crafted to make the decoder
/// walk the whole image thousands of times.
const MAX_SCANS: usize = 1000;

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Quantisation table latched at the component's first scan (natural order).
    quant: Option<[u16; 64]>,
    /// Blocks per row / column in the coefficient buffer (MCU-padded).
    bw: usize,
    bh: usize,
    /// Progressive frames: every block's coefficients, complete after the last scan.
    coefs: Vec<[i16; 64]>,
    /// Sequential frames: the samples, each block inverse-transformed as soon as
    /// it is decoded (no coefficient buffer).
    plane: Option<Plane>,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
}

/// Colour interpretation, decided as libjpeg's `default_decompress_parms` does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ColorModel {
    Gray,
    YCbCr,
    Rgb,
    Cmyk,
    Ycck,
}

#[derive(Default)]
struct Tables {
    quant: [Option<[u16; 64]>; 4],
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
}

fn be16(b: &[u8], i: usize) -> Result<usize, String> {
    match (b.get(i), b.get(i + 1)) {
        (Some(&hi), Some(&lo)) => Ok(usize::from(u16::from_be_bytes([hi, lo]))),
        _ => Err("unexpected end of JPEG data".into()),
    }
}

/// Decode to interleaved 8-bit RGB exactly as PIL's `Image.open(..).convert('RGB')`.
/// `Ok(None)`: a JPEG variant this decoder does not handle.
pub(crate) fn decode_pil_exact(b: &[u8]) -> Result<Option<(usize, usize, Vec<u8>)>, String> {
    if b.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err("missing JPEG start-of-image marker".into());
    }
    let mut t = Tables::default();
    let mut frame: Option<Frame> = None;
    let mut scans = 0usize;
    let mut i = 2usize;
    loop {
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i + 1 < b.len() && b[i + 1] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i + 1) else {
            return Err("unexpected end of JPEG data".into());
        };
        match marker {
            0xD9 => break,
            0x01 | 0xD0..=0xD8 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let len = be16(b, i + 2)?;
        let seg = b
            .get(i + 4..i + 2 + len)
            .ok_or("unexpected end of JPEG data")?;
        match marker {
            0xC0..=0xC2 => {
                if frame.is_some() {
                    return Err("more than one JPEG frame".into());
                }
                match parse_frame(seg, marker == 0xC2)? {
                    Some(f) => frame = Some(f),
                    None => return Ok(None),
                }
            }
            // Lossless, hierarchical and arithmetic-coded frames.
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return Ok(None),
            0xC4 => parse_dht(seg, &mut t)?,
            0xDB => parse_dqt(seg, &mut t)?,
            0xDD => t.restart_interval = be16(seg, 0)?,
            0xE0 if seg.starts_with(b"JFIF\0") => t.jfif = true,
            0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                t.adobe_transform = Some(seg[11])
            }
            0xDA => {
                scans += 1;
                if scans > MAX_SCANS {
                    return Err(format!("more than {MAX_SCANS} scans"));
                }
                let f = frame.as_mut().ok_or("JPEG scan before frame header")?;
                i = decode_scan(b, i + 2 + len, seg, f, &t)?;
                continue;
            }
            _ => {}
        }
        i += 2 + len;
    }
    let Some(f) = frame else {
        return Err("JPEG has no frame header".into());
    };
    let model = match (f.comps.len(), t.jfif, t.adobe_transform) {
        (1, _, _) => ColorModel::Gray,
        (3, true, _) => ColorModel::YCbCr,
        (3, false, Some(0)) => ColorModel::Rgb,
        (3, false, Some(_)) => ColorModel::YCbCr,
        (3, false, None) => {
            let ids: Vec<u8> = f.comps.iter().map(|c| c.id).collect();
            if ids == b"RGB" {
                ColorModel::Rgb
            } else {
                ColorModel::YCbCr
            }
        }
        (4, _, Some(0)) | (4, _, None) => ColorModel::Cmyk,
        (4, _, Some(_)) => ColorModel::Ycck,
        _ => return Ok(None),
    };
    Ok(Some((f.width, f.height, to_rgb(f, model)?)))
}

fn parse_frame(seg: &[u8], progressive: bool) -> Result<Option<Frame>, String> {
    let precision = *seg.first().ok_or("short frame header")?;
    let height = be16(seg, 1)?;
    let width = be16(seg, 3)?;
    let n = usize::from(*seg.get(5).ok_or("short frame header")?);
    if precision != 8 || height == 0 || width == 0 || !matches!(n, 1 | 3 | 4) {
        return Ok(None);
    }
    let mut comps = Vec::with_capacity(n);
    for c in 0..n {
        let d = seg.get(6 + 3 * c..9 + 3 * c).ok_or("short frame header")?;
        let (h, v) = (usize::from(d[1] >> 4), usize::from(d[1] & 15));
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || d[2] > 3 {
            return Err("invalid JPEG sampling factors or table index".into());
        }
        comps.push(Component {
            id: d[0],
            h,
            v,
            tq: usize::from(d[2]),
            quant: None,
            bw: 0,
            bh: 0,
            coefs: Vec::new(),
            plane: None,
        });
    }
    let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
    if comps.iter().any(|c| hmax % c.h != 0 || vmax % c.v != 0) {
        return Ok(None); // fractional upsampling: libjpeg refuses it too
    }
    let mcux = width.div_ceil(8 * hmax);
    let mcuy = height.div_ceil(8 * vmax);
    for c in &mut comps {
        c.bw = mcux * c.h;
        c.bh = mcuy * c.v;
        if progressive {
            c.coefs = vec![[0i16; 64]; c.bw * c.bh];
        } else {
            c.plane = Some(empty_plane(width, height, c.h, c.v, hmax, vmax));
        }
    }
    Ok(Some(Frame {
        width,
        height,
        progressive,
        comps,
        hmax,
        vmax,
        mcux,
        mcuy,
    }))
}

fn parse_dht(mut seg: &[u8], t: &mut Tables) -> Result<(), String> {
    while !seg.is_empty() {
        let tc_th = seg[0];
        let counts: [u8; 16] = seg
            .get(1..17)
            .ok_or("short Huffman table")?
            .try_into()
            .map_err(|_| "short Huffman table")?;
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let values = seg.get(17..17 + total).ok_or("short Huffman table")?;
        let table = Huffman::new(&counts, values)?;
        let slot = usize::from(tc_th & 15);
        if slot > 3 {
            return Err("invalid Huffman table index".into());
        }
        match tc_th >> 4 {
            0 => t.dc[slot] = Some(table),
            1 => t.ac[slot] = Some(table),
            _ => return Err("invalid Huffman table class".into()),
        }
        seg = &seg[17 + total..];
    }
    Ok(())
}

fn parse_dqt(mut seg: &[u8], t: &mut Tables) -> Result<(), String> {
    while !seg.is_empty() {
        let pq_tq = seg[0];
        let sixteen = pq_tq >> 4 != 0;
        let n = if sixteen { 128 } else { 64 };
        let body = seg.get(1..1 + n).ok_or("short quantisation table")?;
        let mut q = [0u16; 64];
        for k in 0..64 {
            let v = if sixteen {
                u16::from_be_bytes([body[2 * k], body[2 * k + 1]])
            } else {
                u16::from(body[k])
            };
            q[entropy::NATURAL_ORDER[k]] = v;
        }
        let slot = usize::from(pq_tq & 15);
        *t.quant
            .get_mut(slot)
            .ok_or("invalid quantisation table index")? = Some(q);
        seg = &seg[1 + n..];
    }
    Ok(())
}

/// Decode one scan whose entropy data starts at `start`; returns the index of
/// the marker that ends it.
fn decode_scan(
    b: &[u8],
    start: usize,
    seg: &[u8],
    f: &mut Frame,
    t: &Tables,
) -> Result<usize, String> {
    let ns = usize::from(*seg.first().ok_or("short scan header")?);
    let mut sel = Vec::with_capacity(ns);
    for k in 0..ns {
        let d = seg.get(1 + 2 * k..3 + 2 * k).ok_or("short scan header")?;
        let ci = f
            .comps
            .iter()
            .position(|c| c.id == d[0])
            .ok_or("scan names an unknown component")?;
        sel.push((ci, usize::from(d[1] >> 4), usize::from(d[1] & 15)));
    }
    let p = seg.get(1 + 2 * ns..4 + 2 * ns).ok_or("short scan header")?;
    let (ss, se, ah, al) = (
        usize::from(p[0]),
        usize::from(p[1]),
        p[2] >> 4,
        u32::from(p[2] & 15),
    );
    if ns == 0 || ns > 4 || se > 63 || ss > se || (!f.progressive && (ss != 0 || se != 63)) {
        return Err("invalid JPEG scan parameters".into());
    }
    if f.progressive && ss > 0 && ns != 1 {
        return Err("progressive AC scan with several components".into());
    }
    for &(ci, _, _) in &sel {
        let c = &mut f.comps[ci];
        if c.quant.is_none() {
            c.quant = Some(t.quant[c.tq].ok_or("missing quantisation table")?);
        }
    }
    let table = |tabs: &[Option<Huffman>; 4], k: usize| -> Result<Huffman, String> {
        tabs.get(k)
            .and_then(|x| x.clone())
            .ok_or_else(|| "missing Huffman table".to_string())
    };
    let needs_dc = ss == 0 && ah == 0;
    let needs_ac = se > 0;
    let mut dcs = Vec::new();
    let mut acs = Vec::new();
    for &(_, td, ta) in &sel {
        dcs.push(if needs_dc {
            Some(table(&t.dc, td)?)
        } else {
            None
        });
        acs.push(if needs_ac {
            Some(table(&t.ac, ta)?)
        } else {
            None
        });
    }

    let mut r = BitReader::new(b, start);
    let mut preds = vec![0i32; ns];
    let mut eobrun = 0u32;
    // Block coordinates of every MCU: all components' blocks for interleaved
    // scans, one block in component raster order otherwise.
    let (mcus_x, mcus_y) = if ns == 1 {
        let c = &f.comps[sel[0].0];
        let cw = (f.width * c.h).div_ceil(f.hmax);
        let ch = (f.height * c.v).div_ceil(f.vmax);
        (cw.div_ceil(8), ch.div_ceil(8))
    } else {
        (f.mcux, f.mcuy)
    };
    let total = mcus_x * mcus_y;
    let mut rst = 0u8;
    for m in 0..total {
        if t.restart_interval > 0 && m > 0 && m % t.restart_interval == 0 {
            r.restart(rst)?;
            rst = rst.wrapping_add(1);
            preds.iter_mut().for_each(|p| *p = 0);
            eobrun = 0;
        }
        let (mx, my) = (m % mcus_x, m / mcus_x);
        for (k, &(ci, _, _)) in sel.iter().enumerate() {
            let c = &mut f.comps[ci];
            let (nh, nv) = if ns == 1 { (1, 1) } else { (c.h, c.v) };
            for v in 0..nv {
                for h in 0..nh {
                    let (bx, by) = (mx * nh + h, my * nv + v);
                    let (dc, ac) = (dcs[k].as_ref(), acs[k].as_ref());
                    if !f.progressive {
                        let mut block = [0i16; 64];
                        entropy::decode_block_baseline(
                            &mut r,
                            &mut block,
                            &mut preds[k],
                            dc.ok_or("missing DC table")?,
                            ac.ok_or("missing AC table")?,
                        )?;
                        if let (Some(plane), Some(quant)) = (c.plane.as_mut(), c.quant.as_ref()) {
                            plane.put_block(bx, by, &block, quant);
                        }
                        continue;
                    }
                    let block = &mut c.coefs[by * c.bw + bx];
                    if ss == 0 && ah == 0 {
                        let dc = dc.ok_or("missing DC table")?;
                        entropy::decode_dc_first(&mut r, block, &mut preds[k], dc, al)?;
                    } else if ss == 0 {
                        entropy::decode_dc_refine(&mut r, block, al);
                    } else if ah == 0 {
                        let ac = ac.ok_or("missing AC table")?;
                        entropy::decode_ac_first(&mut r, block, &mut eobrun, ac, (ss, se, al))?;
                    } else {
                        let ac = ac.ok_or("missing AC table")?;
                        entropy::decode_ac_refine(&mut r, block, &mut eobrun, ac, (ss, se, al))?;
                    }
                }
            }
        }
    }
    // Resume marker parsing at the marker that ends the scan.
    let mut i = r.pos;
    let ends_scan = |i: usize| entropy::is_marker(b, i) && !matches!(b[i + 1], 0xD0..=0xD7);
    while i + 1 < b.len() && !ends_scan(i) {
        i += 1;
    }
    Ok(i)
}

/// Inverse DCT of every block, then upsampling and colour conversion row by row
/// straight into the output buffer.
fn to_rgb(mut f: Frame, model: ColorModel) -> Result<Vec<u8>, String> {
    let (w, h) = (f.width, f.height);
    let mut ups = Vec::with_capacity(f.comps.len());
    for c in &mut f.comps {
        if c.quant.is_none() {
            return Err("component without any scan".into());
        }
        let plane = match c.plane.take() {
            Some(p) => p,
            None => idct_plane(f.width, f.height, f.hmax, f.vmax, c)?,
        };
        ups.push(RowUpsampler::new(plane, f.hmax / c.h, f.vmax / c.v));
    }
    let convert: fn(&[RowUpsampler], &mut [u8]) -> bool = match model {
        ColorModel::Gray => |u, out| match u {
            [g] => {
                output::gray_to_rgb(g.row(), out);
                true
            }
            _ => false,
        },
        ColorModel::YCbCr => |u, out| match u {
            [y, cb, cr] => {
                output::ycc_to_rgb(y.row(), cb.row(), cr.row(), out);
                true
            }
            _ => false,
        },
        ColorModel::Rgb => |u, out| match u {
            [r, g, b] => {
                output::planes_to_rgb(r.row(), g.row(), b.row(), out);
                true
            }
            _ => false,
        },
        ColorModel::Cmyk => |u, out| match u {
            [c, m, y, k] => {
                output::cmyk_to_rgb(c.row(), m.row(), y.row(), k.row(), out);
                true
            }
            _ => false,
        },
        ColorModel::Ycck => |u, out| match u {
            [y, cb, cr, k] => {
                output::ycck_to_rgb(y.row(), cb.row(), cr.row(), k.row(), out);
                true
            }
            _ => false,
        },
    };
    let mut rgb = vec![0u8; w * h * 3];
    for (y, out) in rgb.chunks_exact_mut(w * 3).enumerate() {
        ups.iter_mut().for_each(|u| u.prepare(y));
        if !convert(&ups, out) {
            return Err("JPEG colour model does not match its component count".into());
        }
    }
    Ok(rgb)
}

/// A zeroed sample buffer for a component with sampling factors `h` x `v`,
/// padded to whole blocks.
fn empty_plane(width: usize, height: usize, h: usize, v: usize, hmax: usize, vmax: usize) -> Plane {
    let cw = (width * h).div_ceil(hmax);
    let ch = (height * v).div_ceil(vmax);
    let stride = cw.div_ceil(8) * 8;
    Plane {
        width: cw,
        height: ch,
        stride,
        data: vec![0u8; stride * ch.div_ceil(8) * 8],
    }
}

/// A progressive component's samples: the inverse DCT of all its blocks.
fn idct_plane(
    width: usize,
    height: usize,
    hmax: usize,
    vmax: usize,
    c: &Component,
) -> Result<Plane, String> {
    let quant = c.quant.ok_or("component without any scan")?;
    let mut plane = empty_plane(width, height, c.h, c.v, hmax, vmax);
    let bw = plane.stride / 8;
    for (by, row) in c.coefs.chunks_exact(c.bw).enumerate() {
        for (bx, block) in row[..bw].iter().enumerate() {
            plane.put_block(bx, by, block, &quant);
        }
    }
    Ok(plane)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline_jpeg() -> Vec<u8> {
        let img = image::RgbImage::from_fn(40, 24, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 9) as u8, 90])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    /// Index of the first entropy-coded byte and of the EOI marker.
    fn entropy_span(b: &[u8]) -> (usize, usize) {
        let sos = b.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let len = usize::from(u16::from_be_bytes([b[sos + 2], b[sos + 3]]));
        (sos + 2 + len, b.len() - 2)
    }

    #[test]
    fn corrupt_huffman_stream_is_a_clear_error() {
        let good = baseline_jpeg();
        let (w, h, rgb) = decode_pil_exact(&good).unwrap().unwrap();
        assert_eq!((w, h, rgb.len()), (40, 24, 40 * 24 * 3));
        // All ones (stuffed FF 00 pairs): no code of the standard tables is 16 ones.
        let (start, end) = entropy_span(&good);
        let mut bad = good.clone();
        for (i, b) in bad[start..end].iter_mut().enumerate() {
            *b = if i % 2 == 0 { 0xFF } else { 0x00 };
        }
        let err = decode_pil_exact(&bad).unwrap_err();
        assert!(err.contains("bad Huffman code"), "{err}");
        // The public entry point reports an error or falls back; it never panics.
        let _ = crate::decode_bytes(&bad, &crate::DecodeLimits::default());
    }

    #[test]
    fn entropy_data_cut_short_decodes_without_panic() {
        // Data replaced by zeros and cut to a few bytes: libjpeg pads with zero
        // bits, so this decodes (to garbage) rather than failing or panicking.
        let good = baseline_jpeg();
        let (start, _) = entropy_span(&good);
        let mut short = good[..start + 3].to_vec();
        short.extend_from_slice(&[0xFF, 0xD9]);
        let (w, h, rgb) = decode_pil_exact(&short).unwrap().unwrap();
        assert_eq!((w, h, rgb.len()), (40, 24, 40 * 24 * 3));
    }
}
