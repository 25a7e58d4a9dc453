//! Just enough multipart/form-data to take an image upload (`curl -F image=@cat.jpg`):
//! the part named `image` or `file`, else the first part. Zero-copy slices of the body.

use bytes::Bytes;

use crate::error::{Result, ServerError};

/// The image bytes of a request: the raw body, or the chosen part of a multipart body.
pub fn image_body(content_type: Option<&str>, body: Bytes) -> Result<Bytes> {
    let Some(ct) =
        content_type.filter(|c| c.to_ascii_lowercase().starts_with("multipart/form-data"))
    else {
        return Ok(body);
    };
    let boundary = ct
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or_else(|| ServerError::invalid("multipart body without a boundary in Content-Type"))?;
    let delim = format!("--{boundary}");
    let parts = split_parts(&body, delim.as_bytes())?;
    let named = |want: &str| parts.iter().find(|(name, _)| name.as_deref() == Some(want));
    let (_, range) = named("image")
        .or_else(|| named("file"))
        .or_else(|| parts.first())
        .ok_or_else(|| ServerError::invalid("multipart body has no parts"))?;
    Ok(body.slice(range.clone()))
}

type Part = (Option<String>, std::ops::Range<usize>);

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// (form field name, byte range of the content) of each part.
fn split_parts(body: &[u8], delim: &[u8]) -> Result<Vec<Part>> {
    let bad = |m: &str| ServerError::invalid(format!("malformed multipart body: {m}"));
    let mut parts = Vec::new();
    let mut pos = find(body, delim, 0).ok_or_else(|| bad("boundary not found"))? + delim.len();
    loop {
        if body.get(pos..pos + 2) == Some(b"--") {
            return Ok(parts);
        }
        let head_start = find(body, b"\r\n", pos).ok_or_else(|| bad("truncated part"))? + 2;
        let head_end =
            find(body, b"\r\n\r\n", head_start).ok_or_else(|| bad("part without headers end"))?;
        let headers = String::from_utf8_lossy(&body[head_start..head_end]);
        let name = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .and_then(|l| l.split(';').find_map(|p| p.trim().strip_prefix("name=")))
            .map(|n| n.trim_matches('"').to_string());
        let content_start = head_end + 4;
        let next = find(body, delim, content_start).ok_or_else(|| bad("part not terminated"))?;
        // The content ends with the CRLF that precedes the next boundary.
        let content_end = next
            .checked_sub(2)
            .filter(|&e| e >= content_start)
            .ok_or_else(|| bad("part too short"))?;
        parts.push((name, content_start..content_end));
        pos = next + delim.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, data) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"a.png\"\r\n")
                    .as_bytes(),
            );
            b.extend_from_slice(b"Content-Type: image/png\r\n\r\n");
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn picks_the_image_part() {
        let body = Bytes::from(form(&[("meta", b"{}"), ("image", b"\x89PNG\r\n--x")]));
        let got = image_body(Some("multipart/form-data; boundary=XyZ"), body).unwrap();
        assert_eq!(&got[..], b"\x89PNG\r\n--x");
        let body = Bytes::from(form(&[("other", b"abc")]));
        assert_eq!(
            &image_body(Some("multipart/form-data; boundary=\"XyZ\""), body).unwrap()[..],
            b"abc"
        );
    }

    #[test]
    fn raw_bodies_pass_through_and_broken_forms_are_400() {
        let raw = Bytes::from_static(b"\xff\xd8jpeg");
        assert_eq!(image_body(Some("image/jpeg"), raw.clone()).unwrap(), raw);
        assert_eq!(image_body(None, raw.clone()).unwrap(), raw);
        let e = image_body(Some("multipart/form-data"), raw.clone()).unwrap_err();
        assert_eq!(e.http_status(), 400);
        let cut = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
        );
        let e = image_body(Some("multipart/form-data; boundary=XyZ"), cut).unwrap_err();
        assert!(e.to_string().contains("malformed multipart"), "{e}");
    }
}
