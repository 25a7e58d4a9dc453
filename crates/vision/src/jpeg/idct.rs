//! libjpeg's "islow" integer inverse DCT (`jidctint.c`), the method PIL uses,
//! with the same fixed-point constants, rounding and range limiting, so the
//! output samples are identical to libjpeg-turbo's.

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

#[inline]
fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// libjpeg's post-IDCT range limit: `x + 128` clamped to 0..=255 for sane values,
/// with the same wrap-around (`& 1023`) as libjpeg's table for wild ones.
#[inline]
fn range_limit(x: i64) -> u8 {
    RANGE_LIMIT[(x & 1023) as usize]
}

const fn range_limit_table() -> [u8; 1024] {
    let mut t = [0u8; 1024];
    let mut i = 0;
    while i < 1024 {
        t[i] = match i {
            0..=127 => (i + 128) as u8,
            128..=511 => 255,
            512..=895 => 0,
            _ => (i - 896) as u8,
        };
        i += 1;
    }
    t
}

static RANGE_LIMIT: [u8; 1024] = range_limit_table();

/// One 1-D pass of the islow butterfly on 8 inputs; returns the 8 outputs before
/// the final descale (`tmp10 + tmp3`, ...), in output order.
#[inline(always)]
fn butterfly(v: [i64; 8]) -> [i64; 8] {
    // Even part.
    let (z2, z3) = (v[2], v[6]);
    let z1 = (z2 + z3) * FIX_0_541196100;
    let tmp2 = z1 + z3 * -FIX_1_847759065;
    let tmp3 = z1 + z2 * FIX_0_765366865;
    let tmp0 = (v[0] + v[4]) << CONST_BITS;
    let tmp1 = (v[0] - v[4]) << CONST_BITS;
    let tmp10 = tmp0 + tmp3;
    let tmp13 = tmp0 - tmp3;
    let tmp11 = tmp1 + tmp2;
    let tmp12 = tmp1 - tmp2;

    // Odd part.
    let (t0, t1, t2, t3) = (v[7], v[5], v[3], v[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let t0 = t0 * FIX_0_298631336;
    let t1 = t1 * FIX_2_053119869;
    let t2 = t2 * FIX_3_072711026;
    let t3 = t3 * FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    let t0 = t0 + z1 + z3;
    let t1 = t1 + z2 + z4;
    let t2 = t2 + z2 + z3;
    let t3 = t3 + z1 + z4;

    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

/// Inverse DCT of one block of coefficients (natural order) with its
/// quantisation table (natural order), writing 8x8 samples at `out[y * stride + x]`.
pub(crate) fn idct_islow(coef: &[i16; 64], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    if coef[1..].iter().fold(0, |acc, &c| acc | c) == 0 {
        // DC only: both passes below reduce to this constant (including the
        // i32 truncation of the workspace).
        let dc = ((i64::from(coef[0]) * i64::from(quant[0])) << PASS1_BITS) as i32;
        let v = range_limit(descale(i64::from(dc), PASS1_BITS + 3));
        for row in 0..8 {
            out[row * stride..row * stride + 8].fill(v);
        }
        return;
    }
    // Nonzero coefficients only in the top-left 4x4 (common: quantisation zeroes
    // high frequencies): the same butterflies with the zero inputs folded away.
    let high_rows = coef[32..].iter().fold(0, |acc, &c| acc | c);
    let high_cols = coef[..32]
        .chunks_exact(8)
        .fold(0, |acc, row| row[4..].iter().fold(acc, |a, &c| a | c));
    if high_rows | high_cols == 0 {
        idct_n::<4>(coef, quant, out, stride);
    } else {
        idct_n::<8>(coef, quant, out, stride);
    }
}

/// The islow IDCT for blocks whose coefficients outside the top-left `N`x`N`
/// are zero. Skipping a zero column or row is exact: a butterfly with only its
/// first input nonzero returns that input scaled, which is what the shortcuts
/// write.
#[inline(always)]
fn idct_n<const N: usize>(coef: &[i16; 64], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i32; 64];
    // Sparse blocks are cheaper column by column, skipping zero columns.
    if N == 8 {
        // Dequantised coefficients fit i32 (|i16 * u16| < 2^31).
        let deq: [i32; 64] = std::array::from_fn(|i| i32::from(coef[i]) * i32::from(quant[i]));
        if deq.iter().all(|&d| d.unsigned_abs() < PASS1_I16_LIMIT) {
            pass1_narrow::<N>(&deq, &mut ws);
            pass2::<N>(&ws, out, stride);
            return;
        }
    }
    pass1_wide::<N>(coef, quant, &mut ws);
    pass2::<N>(&ws, out, stride);
}

/// Below this magnitude of every dequantised coefficient, all multiplicands of
/// pass 1 (sums of up to 4 inputs) fit i16 and all its intermediates fit i32
/// (each is below 178219 * |input| < 2^31), so `pass1_narrow` is exact.
const PASS1_I16_LIMIT: u32 = 8192;

/// Pass 1 over all 8 columns at once in i16/i32 arithmetic, which the compiler
/// turns into SIMD multiply-adds. Only for inputs below `PASS1_I16_LIMIT`.
#[inline(always)]
fn pass1_narrow<const N: usize>(deq: &[i32; 64], ws: &mut [i32; 64]) {
    let v = |row: usize, col: usize| -> i16 {
        if row < N {
            deq[row * 8 + col] as i16
        } else {
            0
        }
    };
    let m = |x: i16, c: i64| i32::from(x) * c as i32;
    for col in 0..8 {
        // Even part.
        let (z2, z3) = (v(2, col), v(6, col));
        let z1 = m(z2.wrapping_add(z3), FIX_0_541196100);
        let tmp2 = z1 + m(z3, -FIX_1_847759065);
        let tmp3 = z1 + m(z2, FIX_0_765366865);
        let tmp0 = (i32::from(v(0, col)) + i32::from(v(4, col))) << CONST_BITS;
        let tmp1 = (i32::from(v(0, col)) - i32::from(v(4, col))) << CONST_BITS;
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        // Odd part.
        let (t0, t1, t2, t3) = (v(7, col), v(5, col), v(3, col), v(1, col));
        let z1 = t0.wrapping_add(t3);
        let z2 = t1.wrapping_add(t2);
        let z3 = t0.wrapping_add(t2);
        let z4 = t1.wrapping_add(t3);
        let z5 = m(z3.wrapping_add(z4), FIX_1_175875602);
        let t0 = m(t0, FIX_0_298631336);
        let t1 = m(t1, FIX_2_053119869);
        let t2 = m(t2, FIX_3_072711026);
        let t3 = m(t3, FIX_1_501321110);
        let z1 = m(z1, -FIX_0_899976223);
        let z2 = m(z2, -FIX_2_562915447);
        let z3 = m(z3, -FIX_1_961570560) + z5;
        let z4 = m(z4, -FIX_0_390180644) + z5;
        let t0 = t0 + z1 + z3;
        let t1 = t1 + z2 + z4;
        let t2 = t2 + z2 + z3;
        let t3 = t3 + z1 + z4;
        let d = |x: i32| (x + (1 << (CONST_BITS - PASS1_BITS - 1))) >> (CONST_BITS - PASS1_BITS);
        ws[col] = d(tmp10 + t3);
        ws[8 + col] = d(tmp11 + t2);
        ws[16 + col] = d(tmp12 + t1);
        ws[24 + col] = d(tmp13 + t0);
        ws[32 + col] = d(tmp13 - t0);
        ws[40 + col] = d(tmp12 - t1);
        ws[48 + col] = d(tmp11 - t2);
        ws[56 + col] = d(tmp10 - t3);
    }
}

/// Pass 1 column by column in i64, for any input.
#[inline(always)]
fn pass1_wide<const N: usize>(coef: &[i16; 64], quant: &[u16; 64], ws: &mut [i32; 64]) {
    for col in 0..N {
        let deq = |row: usize| {
            if row < N {
                i64::from(coef[row * 8 + col]) * i64::from(quant[row * 8 + col])
            } else {
                0
            }
        };
        if (1..N).all(|row| coef[row * 8 + col] == 0) {
            let dc = (deq(0) << PASS1_BITS) as i32;
            for row in 0..8 {
                ws[row * 8 + col] = dc;
            }
            continue;
        }
        let r = butterfly(std::array::from_fn(deq));
        for (row, v) in r.iter().enumerate() {
            ws[row * 8 + col] = descale(*v, CONST_BITS - PASS1_BITS) as i32;
        }
    }
}

/// Pass 2: rows, with the final descale and range limit.
#[inline(always)]
fn pass2<const N: usize>(ws: &[i32; 64], out: &mut [u8], stride: usize) {
    for (row, w) in ws.chunks_exact(8).enumerate() {
        let line = &mut out[row * stride..row * stride + 8];
        if w[1..N].iter().all(|&v| v == 0) {
            let v = range_limit(descale(i64::from(w[0]), PASS1_BITS + 3));
            line.fill(v);
            continue;
        }
        let r = butterfly(std::array::from_fn(
            |i| {
                if i < N {
                    i64::from(w[i])
                } else {
                    0
                }
            },
        ));
        for (o, v) in line.iter_mut().zip(r) {
            *o = range_limit(descale(v, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dc_only_block_is_flat() {
        let mut coef = [0i16; 64];
        coef[0] = 10; // DC 10 * quant 8 = 80 -> 80 / 8 = 10 above mid-gray
        let quant = [8u16; 64];
        let mut out = [0u8; 64];
        idct_islow(&coef, &quant, &mut out, 8);
        assert!(out.iter().all(|&v| v == 138));
    }

    fn both_pass1(coef: &[i16; 64]) -> ([i32; 64], [i32; 64]) {
        let quant = [1u16; 64];
        let deq: [i32; 64] = std::array::from_fn(|i| i32::from(coef[i]));
        let (mut narrow, mut wide) = ([0i32; 64], [0i32; 64]);
        pass1_narrow::<8>(&deq, &mut narrow);
        pass1_wide::<8>(coef, &quant, &mut wide);
        (narrow, wide)
    }

    #[test]
    fn narrow_pass1_is_exact_up_to_its_limit() {
        // Every intermediate is linear in the inputs, so its extremes over the box
        // |input| <= limit - 1 are at the corners: all 256 sign patterns of a
        // column at full magnitude. (Test builds check i32 overflow.)
        let m = (PASS1_I16_LIMIT - 1) as i16;
        for signs in 0..256u32 {
            let coef: [i16; 64] =
                std::array::from_fn(|i| if signs >> (i / 8) & 1 == 1 { -m } else { m });
            let (narrow, wide) = both_pass1(&coef);
            assert_eq!(narrow, wide, "sign pattern {signs:08b}");
        }
        // And pseudo-random blocks inside the limit.
        let mut x = 0x2545_F491u32;
        for _ in 0..2000 {
            let coef: [i16; 64] = std::array::from_fn(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % (2 * PASS1_I16_LIMIT - 1)) as i16 - m
            });
            let (narrow, wide) = both_pass1(&coef);
            assert_eq!(narrow, wide);
        }
    }

    #[test]
    fn range_limit_clamps() {
        assert_eq!(range_limit(0), 128);
        assert_eq!(range_limit(127), 255);
        assert_eq!(range_limit(300), 255);
        assert_eq!(range_limit(-128), 0);
        assert_eq!(range_limit(-300), 0);
        assert_eq!(range_limit(-1), 127);
    }
}
