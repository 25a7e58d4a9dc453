//! JPEG structure check: is the end-of-image marker there?
//!
//! zune-jpeg (like libjpeg) fills the missing part of a truncated file with gray
//! and reports success. PIL refuses such files ("image file is truncated"), and a
//! silently gray half-image would give wrong detections, so we walk the marker
//! structure and require the end-of-image marker.

const TRUNCATED: &str = "file ends before the JPEG end-of-image marker (truncated)";

/// Ok when the marker sequence reaches EOI; a description of the problem otherwise.
pub(crate) fn check_complete(b: &[u8]) -> Result<(), String> {
    if b.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err("missing JPEG start-of-image marker".into());
    }
    let mut i = 2usize;
    loop {
        // Tolerate stray bytes and fill bytes before a marker, as libjpeg does.
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i + 1 < b.len() && b[i + 1] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i + 1) else {
            return Err(TRUNCATED.into());
        };
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => i += 2,
            0xDA => {
                i += 2 + segment_len(b, i)?;
                i = skip_entropy_data(b, i)?;
            }
            _ => i += 2 + segment_len(b, i)?,
        }
    }
}

/// Length field of the segment whose marker starts at `i` (includes the 2 length bytes).
fn segment_len(b: &[u8], i: usize) -> Result<usize, String> {
    let hi = *b.get(i + 2).ok_or(TRUNCATED)?;
    let lo = *b.get(i + 3).ok_or(TRUNCATED)?;
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len < 2 {
        return Err(format!("invalid JPEG segment length {len} at byte {i}"));
    }
    Ok(len)
}

/// Skip entropy-coded data: stuffed `FF 00` and restart markers belong to it.
fn skip_entropy_data(b: &[u8], mut i: usize) -> Result<usize, String> {
    loop {
        let rest = b.get(i..).ok_or(TRUNCATED)?;
        i += rest.iter().position(|&x| x == 0xFF).ok_or(TRUNCATED)?;
        match b.get(i + 1) {
            None => return Err(TRUNCATED.into()),
            Some(0x00 | 0xD0..=0xD7 | 0xFF) => i += 1,
            Some(_) => return Ok(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_marker_sequences() {
        // SOI, a comment segment, SOS with one data byte and a stuffed FF00, EOI.
        let ok = [
            0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x03, b'x', 0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00,
            0xFF, 0xD0, 0x34, 0xFF, 0xD9,
        ];
        assert!(check_complete(&ok).is_ok());
        for cut in 2..ok.len() - 1 {
            let err = check_complete(&ok[..cut]).unwrap_err();
            assert!(err.contains("truncated"), "cut {cut}: {err}");
        }
        assert!(check_complete(&[0x89, b'P']).is_err());
        assert!(check_complete(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]).is_err());
    }
}
