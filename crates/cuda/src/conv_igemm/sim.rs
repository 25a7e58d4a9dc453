//! A lane-by-lane model of `kernels/conv.cu` on the CPU, for tests without a GPU: the
//! loader, the pipeline's stage indices, `ldmatrix` and `mma.sync m16n8k16` with their
//! fragment layouts as the PTX ISA documents them, and the epilogue, each written after
//! the kernel's own index expressions. Compared against a direct convolution, it checks
//! the index and fragment arithmetic; the CUDA source itself is checked on a GPU by the
//! self-test (`selftest::op_parity`).

#[cfg(test)]
use crate::conv_igemm::Tile;
use crate::conv_igemm::{DenseConv, Geometry};

const BK: usize = 32;
const STAGES: usize = 3;
const LD: usize = 40;

/// One thread's gather state (`IgLoader`).
#[derive(Clone, Copy, Default)]
struct Loader {
    iy0: [i64; 4],
    ix0: [i64; 4],
    pix: [i64; 4],
    wrow: [Option<usize>; 2],
    kb: usize,
    ci: usize,
    kx: usize,
    ky: usize,
}

fn advance(l: &mut Loader, d: usize, c: usize, kw: usize) {
    l.ci += d;
    while l.ci >= c {
        l.ci -= c;
        l.kx += 1;
        if l.kx == kw {
            l.kx = 0;
            l.ky += 1;
        }
    }
}

struct Inputs<'a> {
    g: &'a Geometry,
    x: &'a [f32],
    w: &'a [f32],
    /// Rows between one thread's tile rows (threads / 4) and A rows per thread.
    step: usize,
    a_rows: usize,
}

/// `ig_load_chunk`: 16-byte segments as 8 values, zeros where the copy reads nothing.
fn load_chunk(l: &mut Loader, inp: &Inputs, a: &mut [f32], b: &mut [f32], tid: usize) {
    let g = inp.g;
    let (seg, lrow, step) = (tid & 3, tid >> 2, inp.step);
    let kin = l.kb < g.k;
    for i in 0..inp.a_rows {
        let iy = l.iy0[i] + l.ky as i64;
        let ix = l.ix0[i] + l.kx as i64;
        let ok = kin && (0..g.h as i64).contains(&iy) && (0..g.w as i64).contains(&ix);
        let dst = (lrow + step * i) * LD + seg * 8;
        for e in 0..8 {
            a[dst + e] = if ok {
                let src = ((l.pix[i] + iy * g.w as i64 + ix) as usize) * g.c + l.ci;
                inp.x[src + e]
            } else {
                0.0
            };
        }
    }
    for j in 0..2 {
        let dst = (lrow + step * j) * LD + seg * 8;
        for e in 0..8 {
            b[dst + e] = match l.wrow[j] {
                Some(row) if kin => inp.w[row + l.kb + e],
                _ => 0.0,
            };
        }
    }
    l.kb += BK;
    advance(l, BK, g.c, g.kw);
}

/// `ldmatrix.x4`: lane `8j + r` gives the address of row r of matrix j; register j of
/// lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j.
fn ldmatrix_x4(smem: &[f32], addr: &[usize; 32]) -> [[[f32; 2]; 4]; 32] {
    let mut regs = [[[0f32; 2]; 4]; 32];
    for (lane, r) in regs.iter_mut().enumerate() {
        for (j, reg) in r.iter_mut().enumerate() {
            let row = addr[j * 8 + lane / 4];
            let col = 2 * (lane % 4);
            *reg = [smem[row + col], smem[row + col + 1]];
        }
    }
    regs
}

/// `mma.sync.m16n8k16.row.col`: rebuilds A (16x16), B (16x8) and C (16x8) from the lanes'
/// fragments (group g = lane/4, t = lane%4), multiplies, and hands C back the same way.
fn mma(c: &mut [[f32; 4]; 32], a: &[[[f32; 2]; 4]; 32], b0: &[[f32; 2]; 32], b1: &[[f32; 2]; 32]) {
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    let mut cm = [[0f32; 8]; 16];
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for e in 0..2 {
            am[g][2 * t + e] = a[lane][0][e];
            am[g + 8][2 * t + e] = a[lane][1][e];
            am[g][2 * t + 8 + e] = a[lane][2][e];
            am[g + 8][2 * t + 8 + e] = a[lane][3][e];
            bm[2 * t + e][g] = b0[lane][e];
            bm[2 * t + 8 + e][g] = b1[lane][e];
            cm[g][2 * t + e] = c[lane][e];
            cm[g + 8][2 * t + e] = c[lane][2 + e];
        }
    }
    for (i, row) in cm.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v += (0..16).map(|k| am[i][k] * bm[k][j]).sum::<f32>();
        }
    }
    for (lane, cl) in c.iter_mut().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        for e in 0..2 {
            cl[e] = cm[g][2 * t + e];
            cl[2 + e] = cm[g + 8][2 * t + e];
        }
    }
}

/// The kernel on the CPU: `y` starts as NaN so unwritten outputs show.
// Indexed loops on purpose: they spell out the kernel's lane and tile arithmetic.
#[allow(clippy::needless_range_loop)]
pub(crate) fn run(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![f32::NAN; g.m * g.c_out];
    let wn = g.tile.warps_n();
    let (threads, bn, bm) = (64 * wn, 32 * wn, g.tile.pixels());
    // 16-row product tiles per warp along the pixels (two warps share the pixels).
    let mi_count = bm / 32;
    let step = threads / 4;
    let inp = Inputs {
        g,
        x,
        w,
        step,
        a_rows: bm / step,
    };
    let kt_count = g.k.div_ceil(BK);
    for bid in 0..g.blocks {
        let (m0, n0) = ((bid / g.n_tiles) * bm, (bid % g.n_tiles) * bn);
        // Shared memory starts as NaN: reading a slot nobody wrote poisons the result.
        let mut a_s = vec![f32::NAN; STAGES * bm * LD];
        let mut b_s = vec![f32::NAN; STAGES * bn * LD];
        let mut loaders = vec![Loader::default(); threads];
        for (tid, l) in loaders.iter_mut().enumerate() {
            let lrow = tid >> 2;
            for i in 0..inp.a_rows {
                let m = m0 + lrow + step * i;
                if m < g.m {
                    let n = m / (g.oh * g.ow);
                    let r = m - n * g.oh * g.ow;
                    let (oy, ox) = (r / g.ow, r % g.ow);
                    l.iy0[i] = (oy * g.stride) as i64 - g.pad as i64;
                    l.ix0[i] = (ox * g.stride) as i64 - g.pad as i64;
                    l.pix[i] = (n * g.h * g.w) as i64;
                } else {
                    l.iy0[i] = -(1 << 30);
                }
            }
            for j in 0..2 {
                let co = n0 + lrow + step * j;
                l.wrow[j] = (co < g.c_out).then_some(co * g.kp);
            }
            l.kb = (tid & 3) * 8;
            let start = l.kb;
            advance(l, start, g.c, g.kw);
        }
        let load = |stage: usize, loaders: &mut [Loader], a_s: &mut [f32], b_s: &mut [f32]| {
            let a = &mut a_s[stage * bm * LD..(stage + 1) * bm * LD];
            let b = &mut b_s[stage * bn * LD..(stage + 1) * bn * LD];
            for (tid, l) in loaders.iter_mut().enumerate() {
                load_chunk(l, &inp, a, b, tid);
            }
        };
        for s in 0..STAGES - 1 {
            if s < kt_count {
                load(s, &mut loaders, &mut a_s, &mut b_s);
            }
        }
        let mut acc = vec![[[[0f32; 4]; 32]; 16]; 2 * wn]; // [warp][mi*4+ni][lane][reg]
        for kt in 0..kt_count {
            if kt + STAGES - 1 < kt_count {
                load((kt + STAGES - 1) % STAGES, &mut loaders, &mut a_s, &mut b_s);
            }
            let s = kt % STAGES;
            for (warp, acc_w) in acc.iter_mut().enumerate() {
                let (wm, wn) = ((warp & 1) * 16 * mi_count, (warp >> 1) * 32);
                if n0 + wn >= g.c_out {
                    continue;
                }
                for kk in [0, 16] {
                    let mut af = Vec::new();
                    for mi in 0..mi_count {
                        let addr: [usize; 32] = std::array::from_fn(|lane| {
                            let row = wm + mi * 16 + (lane & 15);
                            let col = kk + (lane >> 4) * 8;
                            (s * bm + row) * LD + col
                        });
                        af.push(ldmatrix_x4(&a_s, &addr));
                    }
                    // bf[ni][reg][lane]
                    let mut bf = vec![[[[0f32; 2]; 32]; 2]; 4];
                    for nj in 0..2 {
                        let addr: [usize; 32] = std::array::from_fn(|lane| {
                            let row = wn + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
                            let col = kk + ((lane >> 3) & 1) * 8;
                            (s * bn + row) * LD + col
                        });
                        let r = ldmatrix_x4(&b_s, &addr);
                        for lane in 0..32 {
                            bf[2 * nj][0][lane] = r[lane][0];
                            bf[2 * nj][1][lane] = r[lane][1];
                            bf[2 * nj + 1][0][lane] = r[lane][2];
                            bf[2 * nj + 1][1][lane] = r[lane][3];
                        }
                    }
                    for (mi, a) in af.iter().enumerate() {
                        for (ni, b) in bf.iter().enumerate() {
                            mma(&mut acc_w[mi * 4 + ni], a, &b[0], &b[1]);
                        }
                    }
                }
            }
        }
        for (warp, acc_w) in acc.iter().enumerate() {
            let (wm, wn) = ((warp & 1) * 16 * mi_count, (warp >> 1) * 32);
            for lane in 0..32 {
                let (gr, t4) = (lane >> 2, lane & 3);
                for mi in 0..mi_count {
                    for h in 0..2 {
                        let m = m0 + wm + mi * 16 + gr + h * 8;
                        if m >= g.m {
                            continue;
                        }
                        for ni in 0..4 {
                            let co = n0 + wn + ni * 8 + t4 * 2;
                            for e in 0..2 {
                                if co + e >= g.c_out {
                                    continue;
                                }
                                let mut v = acc_w[mi * 4 + ni][lane][2 * h + e];
                                v += bias.map_or(0.0, |b| b[co + e]);
                                v += res.map_or(0.0, |r| r[m * g.c_out + co + e]);
                                y[m * g.c_out + co + e] = v;
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test values in [-0.5, 0.5).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_uniform(n, seed)
            .into_iter()
            .map(|v| v - 0.5)
            .collect()
    }

    /// Direct NHWC convolution; weights `[co][ky][kx][ci]` as conv.rs lays them out.
    #[allow(clippy::too_many_arguments)]
    fn direct(
        dims: [usize; 4],
        cv: DenseConv,
        oh: usize,
        ow: usize,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        res: &[f32],
    ) -> Vec<f32> {
        let [n, h, wd, c] = dims;
        let mut y = vec![0f32; n * oh * ow * cv.c_out];
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let p = (b * oh + oy) * ow + ox;
                    for co in 0..cv.c_out {
                        let mut s = bias[co] + res[p * cv.c_out + co];
                        for ky in 0..cv.kh {
                            for kx in 0..cv.kw {
                                let iy = (oy * cv.stride + ky) as i64 - cv.pad as i64;
                                let ix = (ox * cv.stride + kx) as i64 - cv.pad as i64;
                                if iy < 0 || ix < 0 || iy >= h as i64 || ix >= wd as i64 {
                                    continue;
                                }
                                let xi = ((b * h + iy as usize) * wd + ix as usize) * c;
                                let wi = co * cv.kp + (ky * cv.kw + kx) * c;
                                s += (0..c).map(|ci| x[xi + ci] * w[wi + ci]).sum::<f32>();
                            }
                        }
                        y[p * cv.c_out + co] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn the_modelled_kernel_computes_the_convolution() {
        // [n, h, w, c_in, c_out, k, stride, pad]: K tails (8, 24 channels), taps spanning
        // chunks, partial pixel and channel tiles, two channel tiles, odd output counts,
        // strides, 5x5, 2x2, a strided 1x1, and 200 outputs (a partial second wide tile).
        let shapes = [
            [2, 9, 11, 8, 8, 3, 1, 1],
            [2, 13, 7, 24, 40, 3, 1, 1],
            [1, 17, 23, 64, 72, 3, 1, 1],
            [1, 19, 25, 32, 3, 3, 2, 1],
            [1, 11, 14, 16, 5, 5, 1, 2],
            [2, 10, 12, 32, 16, 2, 1, 0],
            [1, 16, 18, 16, 24, 1, 2, 0],
            [1, 21, 20, 48, 24, 3, 2, 0],
            [1, 12, 15, 16, 200, 3, 1, 1],
        ];
        for (i, [n, h, wd, c, co, k, stride, pad]) in shapes.into_iter().enumerate() {
            let cv = DenseConv {
                c_in: c,
                c_out: co,
                kh: k,
                kw: k,
                stride,
                pad,
                kp: k * k * c,
                depthwise: false,
            };
            let (oh, ow) = (
                (h + 2 * pad - k) / stride + 1,
                (wd + 2 * pad - k) / stride + 1,
            );
            let seed = 100 * i as u64;
            let x = values(n * h * wd * c, seed + 1);
            let w = values(co * cv.kp, seed + 2);
            let bias = values(co, seed + 3);
            let res = values(n * oh * ow * co, seed + 4);
            let want = direct([n, h, wd, c], cv, oh, ow, &x, &w, &bias, &res);
            for tile in Tile::ALL {
                let g =
                    Geometry::new([n, h, wd, c], (oh, ow), cv, tile).expect("the kernel takes it");
                let got = run(&g, &x, &w, Some(&bias), Some(&res));
                let err = aperture_engine::relative_l2(&got, &want);
                assert!(err < 1e-5, "shape {:?}, {tile:?}: rel L2 {err}", shapes[i]);
            }
        }
    }
}
