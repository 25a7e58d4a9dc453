//! Huffman entropy decoding of baseline and progressive JPEG blocks, following
//! the logic of libjpeg's `jdhuff.c` / `jdphuff.c` (the coefficients a valid
//! file encodes are unique, so any correct decoder gets the same ones).

/// Zigzag index -> natural index, padded with 63s as libjpeg does so that a
/// corrupt run length cannot index out of the block.
pub(crate) const NATURAL_ORDER: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

const LOOKUP_BITS: u32 = 10;

/// `fast_ac` run marking an end-of-block symbol.
const EOB: u8 = 0xFF;

/// A decoding table built from a DHT segment.
#[derive(Clone)]
pub(crate) struct Huffman {
    /// For every `LOOKUP_BITS`-bit prefix: (code length, symbol), length 0 = longer code.
    lookup: Vec<(u8, u8)>,
    /// For AC tables: for every `LOOKUP_BITS`-bit prefix holding a whole code and
    /// its extra bits, (value, run, code length + size); value 0 with run 15 is
    /// ZRL, run `EOB` ends the block; length 0 = decode the slow way.
    fast_ac: Vec<(i16, u8, u8)>,
    /// Canonical decoding for longer codes: largest code of each length (-1: none).
    maxcode: [i32; 18],
    /// Index into `values` of the first code of each length, minus that code.
    valoffset: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    /// `counts[i]`: number of codes of length i + 1.
    pub(crate) fn new(counts: &[u8; 16], values: &[u8]) -> Result<Huffman, String> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total != values.len() || total > 256 {
            return Err("invalid Huffman table".into());
        }
        let mut lookup = vec![(0u8, 0u8); 1 << LOOKUP_BITS];
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 17];
        let mut code = 0i32;
        let mut k = 0usize;
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            valoffset[len] = k as i32 - code;
            for _ in 0..n {
                if code >= (1 << len) {
                    return Err("invalid Huffman table (code space overflow)".into());
                }
                if len as u32 <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - len as u32;
                    let base = (code as usize) << shift;
                    for e in &mut lookup[base..base + (1 << shift)] {
                        *e = (len as u8, values[k]);
                    }
                }
                code += 1;
                k += 1;
            }
            if n > 0 {
                maxcode[len] = code - 1;
            }
            code <<= 1;
        }
        maxcode[17] = i32::MAX; // sentinel: codes longer than 16 bits are corrupt
        let fast_ac = lookup
            .iter()
            .enumerate()
            .map(|(p, &(len, sym))| {
                let (run, size) = (sym >> 4, u32::from(sym & 15));
                let total = u32::from(len) + size;
                if len == 0 || total > LOOKUP_BITS {
                    return (0, 0, 0);
                }
                if size == 0 {
                    // Sequential scans treat every r/0 symbol but ZRL as end of block.
                    return (0, if run == 15 { 15 } else { EOB }, len);
                }
                let bits = (p as u32 >> (LOOKUP_BITS - total)) & ((1 << size) - 1);
                (extend(bits, size) as i16, run, total as u8)
            })
            .collect();
        Ok(Huffman {
            lookup,
            fast_ac,
            maxcode,
            valoffset,
            values: values.to_vec(),
        })
    }
}

/// Reads entropy-coded bits, removing `FF 00` stuffing. At a marker it stops
/// consuming input and returns zero bits, as libjpeg does.
pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    pub pos: usize,
    acc: u64,
    nbits: u32,
    /// A marker (the byte after 0xFF) was reached at `pos`.
    pub marker: Option<u8>,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            acc: 0,
            nbits: 0,
            marker: None,
        }
    }

    /// Top up the accumulator to at least 57 bits.
    #[inline]
    fn fill(&mut self) {
        if self.marker.is_none() && self.fill_fast() {
            return;
        }
        self.fill_bytes();
    }

    /// Byte by byte, unstuffing `FF 00` and stopping at a marker.
    #[inline(never)]
    fn fill_bytes(&mut self) {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            if self.marker.is_none() {
                match self.data.get(self.pos) {
                    Some(&0xFF) => match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            byte = 0xFF;
                            self.pos += 2;
                        }
                        Some(&m) => self.marker = Some(m),
                        None => self.marker = Some(0xD9),
                    },
                    Some(&b) => {
                        byte = b;
                        self.pos += 1;
                    }
                    None => self.marker = Some(0xD9),
                }
            }
            self.acc |= u64::from(byte) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    /// Whole bytes at once when the next 8 contain no 0xFF (no stuffing, no
    /// marker): the same bytes the byte loop would take. False: use that loop.
    #[inline]
    fn fill_fast(&mut self) -> bool {
        let Some(Ok(chunk)) = self
            .data
            .get(self.pos..self.pos + 8)
            .map(<[u8; 8]>::try_from)
        else {
            return false;
        };
        let word = u64::from_be_bytes(chunk);
        // Classic "has a zero byte" test on the complement: finds 0xFF bytes.
        let inv = !word;
        if inv.wrapping_sub(0x0101_0101_0101_0101) & !inv & 0x8080_8080_8080_8080 != 0 {
            return false;
        }
        if self.nbits > 56 {
            return true;
        }
        let k = (64 - self.nbits) / 8;
        let taken = if k == 8 {
            word
        } else {
            word & !(u64::MAX >> (8 * k))
        };
        self.acc |= taken >> self.nbits;
        self.nbits += 8 * k;
        self.pos += k as usize;
        true
    }

    #[inline]
    fn peek(&mut self, n: u32) -> u32 {
        if self.nbits < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.nbits -= n;
    }

    /// `n` bits (0..=16) as an unsigned number.
    #[inline]
    pub(crate) fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }

    #[inline]
    pub(crate) fn bit(&mut self) -> bool {
        self.bits(1) == 1
    }

    /// `n` bits, sign-extended as JPEG magnitude categories are (`HUFF_EXTEND`).
    #[inline]
    pub(crate) fn receive_extend(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        extend(self.bits(n), n)
    }

    pub(crate) fn decode(&mut self, h: &Huffman) -> Result<u8, String> {
        if self.nbits < 16 {
            self.fill();
        }
        let p = (self.acc >> (64 - LOOKUP_BITS)) as usize;
        let (len, sym) = h.lookup[p];
        if len > 0 {
            self.consume(u32::from(len));
            return Ok(sym);
        }
        let mut code = self.peek(16) as i32;
        let mut len = 16usize;
        // Find the shortest length whose max code covers this prefix.
        for l in (LOOKUP_BITS as usize + 1)..=16 {
            let prefix = code >> (16 - l);
            if prefix <= h.maxcode[l] {
                len = l;
                code = prefix;
                break;
            }
            if l == 16 {
                return Err("corrupt JPEG data: bad Huffman code".into());
            }
        }
        self.consume(len as u32);
        let idx = code + h.valoffset[len];
        h.values
            .get(idx as usize)
            .copied()
            .ok_or_else(|| "corrupt JPEG data: bad Huffman code".to_string())
    }

    /// Drop buffered bits and step over the expected restart marker `RST(n)`.
    pub(crate) fn restart(&mut self, n: u8) -> Result<(), String> {
        self.acc = 0;
        self.nbits = 0;
        if self.marker.is_none() {
            // Skip to the next marker (libjpeg's next_marker).
            while self.pos + 1 < self.data.len() && !is_marker(self.data, self.pos) {
                self.pos += 1;
            }
            self.marker = self.data.get(self.pos + 1).copied();
        }
        match self.marker {
            Some(m) if m == 0xD0 + (n & 7) => {
                self.pos += 2;
                self.marker = None;
                Ok(())
            }
            _ => Err("missing JPEG restart marker".into()),
        }
    }
}

/// `v`, `n` (1..=16) bits, sign-extended as JPEG magnitude categories are (`HUFF_EXTEND`).
#[inline]
fn extend(v: u32, n: u32) -> i32 {
    let v = v as i32;
    if v < (1 << (n - 1)) {
        v - (1 << n) + 1
    } else {
        v
    }
}

/// Whether a marker (0xFF then neither a stuffed 0x00 nor a fill 0xFF) starts at `i`.
pub(crate) fn is_marker(b: &[u8], i: usize) -> bool {
    b.get(i) == Some(&0xFF) && b.get(i + 1).is_some_and(|&m| m != 0x00 && m != 0xFF)
}

/// A DC difference: a magnitude category, then that many bits.
fn dc_diff(r: &mut BitReader, dc: &Huffman) -> Result<i32, String> {
    let t = r.decode(dc)?;
    if t > 16 {
        return Err("corrupt JPEG data: bad DC difference".into());
    }
    Ok(r.receive_extend(u32::from(t)))
}

/// Sequential (baseline/extended) block: DC difference then run-length ACs.
pub(crate) fn decode_block_baseline(
    r: &mut BitReader,
    block: &mut [i16; 64],
    pred: &mut i32,
    dc: &Huffman,
    ac: &Huffman,
) -> Result<(), String> {
    let diff = dc_diff(r, dc)?;
    *pred = pred.wrapping_add(diff);
    block[0] = *pred as i16;
    let mut k = 1usize;
    while k < 64 {
        if r.nbits < LOOKUP_BITS {
            r.fill();
        }
        // Short code and its extra bits together: one table look-up.
        let (value, run, len) = ac.fast_ac[(r.acc >> (64 - LOOKUP_BITS)) as usize];
        if len != 0 {
            r.consume(u32::from(len));
            if run == EOB {
                break;
            }
            k += usize::from(run);
            if value != 0 {
                let pos = *NATURAL_ORDER
                    .get(k)
                    .ok_or("corrupt JPEG data: AC run past block")?;
                block[pos] = value;
            }
            k += 1;
            continue;
        }
        let rs = r.decode(ac)?;
        let (run, size) = (usize::from(rs >> 4), u32::from(rs & 15));
        if size != 0 {
            k += run;
            let pos = *NATURAL_ORDER
                .get(k)
                .ok_or("corrupt JPEG data: AC run past block")?;
            block[pos] = r.receive_extend(size) as i16;
            k += 1;
        } else if run == 15 {
            k += 16;
        } else {
            break;
        }
    }
    Ok(())
}

/// Progressive DC scan, first pass (`Ah == 0`).
pub(crate) fn decode_dc_first(
    r: &mut BitReader,
    block: &mut [i16; 64],
    pred: &mut i32,
    dc: &Huffman,
    al: u32,
) -> Result<(), String> {
    let diff = dc_diff(r, dc)?;
    *pred = pred.wrapping_add(diff);
    block[0] = pred.wrapping_shl(al) as i16;
    Ok(())
}

/// Progressive DC refinement: one more bit of precision.
pub(crate) fn decode_dc_refine(r: &mut BitReader, block: &mut [i16; 64], al: u32) {
    if r.bit() {
        block[0] |= (1i32 << al) as i16;
    }
}

/// Progressive AC scan, first pass, over zigzag band `ss..=se`.
pub(crate) fn decode_ac_first(
    r: &mut BitReader,
    block: &mut [i16; 64],
    eobrun: &mut u32,
    ac: &Huffman,
    (ss, se, al): (usize, usize, u32),
) -> Result<(), String> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = ss;
    while k <= se {
        let rs = r.decode(ac)?;
        let (run, size) = (u32::from(rs >> 4), u32::from(rs & 15));
        if size != 0 {
            k += run as usize;
            let pos = *NATURAL_ORDER
                .get(k)
                .ok_or("corrupt JPEG data: AC run past block")?;
            block[pos] = (r.receive_extend(size) << al) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            *eobrun = (1 << run) + r.bits(run) - 1;
            break;
        }
        k += 1;
    }
    Ok(())
}

/// Progressive AC refinement over zigzag band `ss..=se` (libjpeg's
/// `decode_mcu_AC_refine`).
pub(crate) fn decode_ac_refine(
    r: &mut BitReader,
    block: &mut [i16; 64],
    eobrun: &mut u32,
    ac: &Huffman,
    (ss, se, al): (usize, usize, u32),
) -> Result<(), String> {
    let p1 = 1i32 << al;
    let m1 = -1i32 << al;
    let refine = |r: &mut BitReader, c: &mut i16| {
        if *c != 0 && r.bit() && i32::from(*c) & p1 == 0 {
            *c = if *c >= 0 {
                (i32::from(*c) + p1) as i16
            } else {
                (i32::from(*c) + m1) as i16
            };
        }
    };
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = r.decode(ac)?;
            let mut run = i32::from(rs >> 4);
            let size = rs & 15;
            let mut value = 0i32;
            if size != 0 {
                value = if r.bit() { p1 } else { m1 };
            } else if run != 15 {
                *eobrun = (1 << run) + r.bits(run as u32);
                break;
            }
            // Skip already-nonzero coefficients (refining them) and `run` zeros.
            while k <= se {
                let pos = NATURAL_ORDER[k];
                if block[pos] != 0 {
                    refine(r, &mut block[pos]);
                } else {
                    run -= 1;
                    if run < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 {
                let pos = *NATURAL_ORDER
                    .get(k)
                    .ok_or("corrupt JPEG data: AC run past block")?;
                block[pos] = value as i16;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= se {
            let pos = NATURAL_ORDER[k];
            refine(r, &mut block[pos]);
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huffman_decodes_canonical_codes() {
        // Lengths: two 2-bit codes (00 -> 'a', 01 -> 'b'), one 3-bit (100 -> 'c'),
        // and a 12-bit code past the lookup table (101000000000 -> 'd').
        let mut counts = [0u8; 16];
        counts[1] = 2;
        counts[2] = 1;
        counts[11] = 1;
        let h = Huffman::new(&counts, b"abcd").unwrap();
        // Bits: 01 100 00 101000000000 then padding ones.
        let data = [0b0110_0001, 0b0100_0000, 0b0000_0111, 0xFF, 0x00];
        let mut r = BitReader::new(&data, 0);
        let got: Vec<u8> = (0..4).map(|_| r.decode(&h).unwrap()).collect();
        assert_eq!(got, b"bcad");
        assert!(Huffman::new(&counts, b"abc").is_err());
    }

    #[test]
    fn bit_reader_unstuffs_and_stops_at_markers() {
        let data = [0xFF, 0x00, 0x80, 0xFF, 0xD0, 0xAA];
        let mut r = BitReader::new(&data, 0);
        assert_eq!(r.bits(8), 0xFF);
        assert_eq!(r.bits(8), 0x80);
        assert_eq!(r.bits(8), 0); // marker reached: zeros
        assert_eq!(r.marker, Some(0xD0));
        r.restart(0).unwrap();
        assert_eq!(r.bits(8), 0xAA);
        assert_eq!(r.receive_extend(0), 0);
    }

    #[test]
    fn extend_matches_jpeg_categories() {
        // Category 3: 000..011 -> -7..-4, 100..111 -> 4..7.
        let data = [0b0001_0000, 0];
        let mut r = BitReader::new(&data, 0);
        assert_eq!(r.receive_extend(3), -7);
        assert_eq!(r.receive_extend(3), 4);
    }
}
