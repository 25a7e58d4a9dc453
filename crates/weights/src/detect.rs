//! Telling weight formats apart by their first bytes (never by file extension).

use std::io::Read;
use std::path::Path;

use crate::error::{Result, WeightsError};
use crate::safetensors::looks_like_safetensors;
use crate::torch_legacy::is_legacy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Safetensors,
    TorchZip,
    TorchLegacy,
}

pub(crate) fn detect(path: &Path) -> Result<Format> {
    let io = |e| WeightsError::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut head = Vec::with_capacity(32);
    file.by_ref().take(32).read_to_end(&mut head).map_err(io)?;

    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(Format::TorchZip);
    }
    if is_legacy(&head) {
        return Ok(Format::TorchLegacy);
    }
    // A '{' after the length field is safetensors even when the length is wrong: the
    // parser then reports the truncation precisely.
    if looks_like_safetensors(&head, len) || head.get(8) == Some(&b'{') {
        return Ok(Format::Safetensors);
    }
    Err(WeightsError::UnknownFormat {
        path: path.to_path_buf(),
        what: describe(&head, len),
    })
}

/// Names what the file seems to be instead, so the user sees the mix-up at once.
fn describe(head: &[u8], len: u64) -> String {
    let what = if head.starts_with(b"\x89PNG") {
        "it is a PNG image".to_string()
    } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
        "it is a JPEG image".to_string()
    } else if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        "it is a WebP image".to_string()
    } else if head.starts_with(b"GIF8") {
        "it is a GIF image".to_string()
    } else if head.first() == Some(&0x80) && head.get(1).is_some_and(|&p| p <= 5) {
        "it is a plain Python pickle, not a torch.save archive".to_string()
    } else if head.starts_with(b"\x1f\x8b") {
        "it is gzip-compressed; decompress it first".to_string()
    } else if head
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        format!(
            "it looks like a text file (starts with {:?})",
            String::from_utf8_lossy(head)
        )
    } else if len < 9 {
        format!("it is only {len} bytes long")
    } else {
        format!(
            "unrecognised leading bytes {:02x?}",
            &head[..head.len().min(8)]
        )
    };
    format!("{what}; expected a safetensors file or a torch.save (zip) checkpoint")
}
