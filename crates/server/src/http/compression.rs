//! HTTP body compression as Triton speaks it: an infer request may arrive with
//! `Content-Encoding: gzip` or `deflate` (zlib-wrapped, as HTTP means it and as
//! tritonclient's `request_compression_algorithm` sends it), and an answer is compressed
//! when `Accept-Encoding` asks for one of the two (`response_compression_algorithm`).
//! `Inference-Header-Content-Length` always counts the uncompressed JSON header.
//!
//! A compressed body is read whole (bounded by `--max-body-mb`) and inflated with the
//! same bound on its decompressed size, so a small upload cannot expand past the limit.

use std::io::{Read, Write};

use axum::http::{header, HeaderMap, HeaderValue};
use flate2::read::{GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;

use crate::error::{Result, ServerError};

/// A body coding the server reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        match token.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Some(Coding::Identity),
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            _ => None,
        }
    }
}

/// The request body's coding from `Content-Encoding` (absent: identity).
pub fn request_coding(headers: &HeaderMap) -> Result<Coding> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Coding::Identity);
    };
    let text = value.to_str().unwrap_or("");
    Coding::parse(text).ok_or_else(|| {
        ServerError::Unsupported(format!(
            "Content-Encoding '{}' is not supported; send the body uncompressed, gzip or deflate",
            text.trim()
        ))
    })
}

/// The coding for the answer from `Accept-Encoding`: gzip, else deflate, where the
/// client accepts it (quality above zero, `*` included), else identity.
pub fn response_coding(headers: &HeaderMap) -> Coding {
    let Some(text) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return Coding::Identity;
    };
    let mut accepted = Vec::new();
    for item in text.split(',') {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if quality > 0.0 {
            accepted.push(token);
        }
    }
    let takes = |c: Coding| accepted.iter().any(|t| t == c.name() || t == "*");
    [Coding::Gzip, Coding::Deflate]
        .into_iter()
        .find(|&c| takes(c))
        .unwrap_or(Coding::Identity)
}

/// Inflates `compressed`; more than `limit` bytes out is refused (413), as is data that
/// is not valid for `coding` (400).
pub fn decompress(compressed: &[u8], coding: Coding, limit: usize) -> Result<Vec<u8>> {
    let reader: Box<dyn Read + '_> = match coding {
        Coding::Identity => return Ok(compressed.to_vec()),
        Coding::Gzip => Box::new(GzDecoder::new(compressed)),
        Coding::Deflate => Box::new(ZlibDecoder::new(compressed)),
    };
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit));
    // One byte past the limit tells "exactly the limit" from "more".
    let cap = (limit as u64).saturating_add(1);
    reader.take(cap).read_to_end(&mut out).map_err(|e| {
        ServerError::invalid(format!(
            "failed to decompress the {} request body: {e}",
            coding.name()
        ))
    })?;
    if out.len() > limit {
        return Err(ServerError::PayloadTooLarge(format!(
            "the decompressed request body exceeds the limit of {limit} bytes (--max-body-mb)"
        )));
    }
    Ok(out)
}

/// Compresses `body` for `coding` (identity: as is).
pub fn compress(body: &[u8], coding: Coding) -> Result<Vec<u8>> {
    let fail = |e: std::io::Error| ServerError::Internal(format!("compressing the answer: {e}"));
    // Level 1: an answer is compressed on the request's path; the fastest level keeps
    // most of the gain on tensor data.
    let level = Compression::fast();
    match coding {
        Coding::Identity => Ok(body.to_vec()),
        Coding::Gzip => {
            let mut e = GzEncoder::new(Vec::with_capacity(body.len() / 2), level);
            e.write_all(body).map_err(fail)?;
            e.finish().map_err(fail)
        }
        Coding::Deflate => {
            let mut e = ZlibEncoder::new(Vec::with_capacity(body.len() / 2), level);
            e.write_all(body).map_err(fail)?;
            e.finish().map_err(fail)
        }
    }
}

/// The `Content-Encoding` value of a compressed answer.
pub fn header_value(coding: Coding) -> HeaderValue {
    HeaderValue::from_static(coding.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).expect("header"));
        h
    }

    #[test]
    fn request_codings_named_by_content_encoding() {
        assert_eq!(
            request_coding(&HeaderMap::new()).ok(),
            Some(Coding::Identity)
        );
        for (v, c) in [
            ("identity", Coding::Identity),
            ("gzip", Coding::Gzip),
            ("GZip ", Coding::Gzip),
            ("deflate", Coding::Deflate),
        ] {
            assert_eq!(
                request_coding(&with(header::CONTENT_ENCODING, v)).ok(),
                Some(c)
            );
        }
        let err = request_coding(&with(header::CONTENT_ENCODING, "br")).expect_err("br");
        assert_eq!(err.http_status(), 400);
        assert!(err.to_string().contains("'br'"), "{err}");
    }

    #[test]
    fn answer_coding_follows_accept_encoding() {
        let take = |v: &str| response_coding(&with(header::ACCEPT_ENCODING, v));
        assert_eq!(response_coding(&HeaderMap::new()), Coding::Identity);
        assert_eq!(take("gzip"), Coding::Gzip);
        assert_eq!(take("deflate"), Coding::Deflate);
        assert_eq!(take("deflate, gzip;q=0.5"), Coding::Gzip);
        assert_eq!(take("gzip;q=0, deflate"), Coding::Deflate);
        assert_eq!(take("br, identity"), Coding::Identity);
        assert_eq!(take("*"), Coding::Gzip);
        assert_eq!(take("gzip;q=0"), Coding::Identity);
    }

    #[test]
    fn round_trips_both_codings() {
        let body: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Identity] {
            let packed = compress(&body, coding).expect("compress");
            if coding != Coding::Identity {
                assert!(
                    packed.len() < body.len() / 4,
                    "{coding:?}: {}",
                    packed.len()
                );
            }
            let back = decompress(&packed, coding, body.len()).expect("decompress");
            assert_eq!(back, body, "{coding:?}");
        }
    }

    #[test]
    fn inflating_past_the_limit_is_refused() {
        // 1 MiB of zeros packs into about a kilobyte.
        let bomb = compress(&vec![0u8; 1 << 20], Coding::Gzip).expect("compress");
        let err = decompress(&bomb, Coding::Gzip, (1 << 20) - 1).expect_err("over");
        assert_eq!(err.http_status(), 413);
        assert!(err.to_string().contains("--max-body-mb"), "{err}");
        assert_eq!(
            decompress(&bomb, Coding::Gzip, 1 << 20)
                .map(|v| v.len())
                .ok(),
            Some(1 << 20)
        );
    }

    #[test]
    fn corrupt_or_mislabelled_data_is_a_bad_request() {
        let gz = compress(b"{\"inputs\": []}", Coding::Gzip).expect("compress");
        for (data, coding) in [
            (&gz[..gz.len() - 5], Coding::Gzip),
            (&gz[..], Coding::Deflate),
            (&b"not compressed at all"[..], Coding::Gzip),
        ] {
            let err = decompress(data, coding, 1 << 20).expect_err("corrupt");
            assert_eq!(err.http_status(), 400, "{coding:?}");
            assert!(err.to_string().contains("decompress"), "{err}");
        }
    }
}
