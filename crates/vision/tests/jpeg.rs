//! The JPEG decoder on a progressive file with restart markers: exact pixels
//! (checked against values Pillow 13 / libjpeg-turbo decoded from the same
//! bytes), and no panic on thousands of corrupted variants.

use aperture_vision::{decode_bytes, DecodeLimits};

/// 24x16 RGB noise over a gradient, written by Pillow with
/// `save(quality=80, progressive=True, restart_marker_blocks=2, optimize=True)`.
const PROGRESSIVE_HEX: [&str; 17] = [
    "ffd8ffe000104a46494600010100000100010000ffdb00430006040506050406060506070706080a100a0a09",
    "090a140e0f0c1017141818171416161a1d251f1a1b231c1616202c20232627292a29191f2d302d2830252829",
    "28ffdb0043010707070a080a130a0a13281a161a282828282828282828282828282828282828282828282828",
    "2828282828282828282828282828282828282828282828282828ffc200110800100018030122000211010311",
    "01ffc400160001010100000000000000000000000000060002ffc40015010101000000000000000000000000",
    "00000001ffdd00040002ffda000c0301000210031000000106f81ba471623fffc4001a100100020301000000",
    "000000000000000004003101112232ffda0008010100010502267a2cffd01d17d7ffd11ee12bffc400161101",
    "010100000000000000000000000000003101ffda0008010301013f01d4afffc4001511010100000000000000",
    "000000000000000011ffda0008010201013f018affc4001c1001000104030000000000000000000000000102",
    "1121325161c1ffda0008010100063f0261ffd0f5c3ffd1a6fac3a87fffc4001d100002020203010000000000",
    "00000000000111002131415161b1c1ffda0008010100013f21005343553058fbd4ffd0d411298e5199530a7f",
    "ffd1412616224877e422808ec39e7ecfffda000c0301000200030000001063cfffc4001a1101000203010000",
    "00000000000000000001002191c1f0a1ffda0008010301013f10035d882574dbdecfffc40019110002030100",
    "00000000000000000000000011012131a1ffda0008010201013f10c34525c5f4ffc4001e1001000202020301",
    "000000000000000000011121314100516181a1b1ffda0008010100013f1016820310e1ed98b324c4eb9290e4",
    "a603a5a82d637d32bcffd0509e4e82cb43d0ceaff4b413a54d96a177725d5ad473ffd134521a4d6ee24c67ce",
    "e9e774d024928fa47d52bfffd9",
];

fn progressive_jpeg() -> Vec<u8> {
    let hex: String = PROGRESSIVE_HEX.concat();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn progressive_with_restarts_matches_libjpeg_turbo() {
    let img = decode_bytes(&progressive_jpeg(), &DecodeLimits::default())
        .unwrap()
        .into_rgb8();
    assert_eq!((img.width(), img.height()), (24, 16));
    // From `np.asarray(Image.open(f).convert("RGB"))` on the same bytes.
    let sum: u64 = img.as_raw().iter().map(|&v| u64::from(v)).sum();
    assert_eq!(sum, 145_584);
    assert_eq!(img.get_pixel(0, 0).0, [0, 8, 0]);
    assert_eq!(img.get_pixel(23, 15).0, [212, 230, 216]);
}

/// xorshift64*: deterministic pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn corrupted_jpegs_never_panic() {
    let good = progressive_jpeg();
    let baseline = aperture_vision::encode_rgb8(
        &image::RgbImage::from_fn(19, 13, |x, y| {
            image::Rgb([(x * 13) as u8, (y * 19) as u8, 77])
        }),
        aperture_vision::OutputFormat::Jpeg,
        &aperture_vision::EncodeOptions::default(),
    )
    .unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let limits = DecodeLimits::default();
    for source in [&good, &baseline] {
        for _ in 0..1500 {
            let mut bad = source.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bad.len());
                bad[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                // Cut the data but keep an end-of-image marker, so the structure
                // check passes and the entropy decoder meets the damage.
                let cut = 2 + rng.below(bad.len() - 2);
                bad.truncate(cut);
                bad.extend_from_slice(&[0xFF, 0xD9]);
            }
            // Ok or a clear error are both fine; a panic fails the test.
            let _ = decode_bytes(&bad, &limits);
        }
    }
}
