//! Reads an HTTP infer body frame by frame: the JSON header is collected, then the
//! binary section goes straight into each input's tensor storage, so a large request
//! is copied once (socket buffer -> tensor) instead of into a whole-body buffer first.
//! The body limit is enforced here (the Content-Length up front, then while reading).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use http_body_util::BodyExt;

use super::codec::{
    decode_request_with_shm, header_beyond_body, BinaryLen, DecodedRequest, PendingRequest,
    HEADER_LENGTH,
};
use super::compression::{decompress, request_coding, Coding};
use crate::error::{Result, ServerError};
use crate::shm::ShmRegistry;

/// Reads and decodes an infer request body of at most `limit` bytes.
pub async fn read_infer_request(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<DecodedRequest> {
    read_infer_request_with_shm(body, headers, limit, None).await
}

/// [`read_infer_request`] where tensors may name regions of `shm` (Triton's system
/// shared-memory extension).
pub async fn read_infer_request_with_shm(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    shm: Option<&ShmRegistry>,
) -> Result<DecodedRequest> {
    let coding = match request_coding(headers) {
        Ok(c) => c,
        Err(e) => {
            drain_body(body, limit).await;
            return Err(e);
        }
    };
    if coding != Coding::Identity {
        return read_compressed(body, headers, limit, shm, coding).await;
    }
    let mut reader = Reader::new(body, limit);
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    // Over the limit by its own declaration: read no more than the limit (as much as a
    // legitimate request), then refuse.
    if content_length.is_some_and(|n| n > limit) {
        reader.drain().await;
        return Err(too_large(limit));
    }
    let result = match header_length(headers) {
        Ok(header_len) => decode_stream(&mut reader, header_len, content_length, shm).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        // Read what is left (bounded by the limit) so the client, still sending, gets
        // the error answer rather than a reset connection.
        reader.drain().await;
    }
    result
}

async fn decode_stream(
    reader: &mut Reader,
    header_len: Option<usize>,
    content_length: Option<usize>,
    shm: Option<&ShmRegistry>,
) -> Result<DecodedRequest> {
    let limit = reader.limit;
    let Some(head_len) = header_len else {
        // Plain JSON: the whole body is the header.
        let all = reader.read_all(content_length.unwrap_or(0)).await?;
        return decode_request_with_shm(&all, None, shm);
    };
    if let Some(n) = content_length.filter(|&n| head_len > n) {
        return Err(header_beyond_body(head_len, n));
    }
    let mut head = Vec::with_capacity(head_len.min(limit));
    let mut rest = bytes::Bytes::new();
    while head.len() < head_len {
        let Some(mut chunk) = reader.next().await? else {
            return Err(header_beyond_body(head_len, head.len()));
        };
        let take = chunk.len().min(head_len - head.len());
        head.extend_from_slice(&chunk.split_to(take));
        rest = chunk;
    }
    let binary = match content_length {
        Some(n) => BinaryLen::Exact(n - head_len),
        None => BinaryLen::AtMost(limit.saturating_sub(head_len)),
    };
    let mut pending = PendingRequest::parse_with_shm(&head, binary, shm)?;
    drop(head);
    pending.feed(&rest)?;
    while let Some(chunk) = reader.next().await? {
        pending.feed(&chunk)?;
    }
    pending.finish()
}

/// A gzip or deflate body: read whole (at most `limit` bytes), inflated off the async
/// threads (at most `limit` bytes out), then decoded as an uncompressed one.
async fn read_compressed(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    shm: Option<&ShmRegistry>,
    coding: Coding,
) -> Result<DecodedRequest> {
    let mut reader = Reader::new(body, limit);
    let packed = match reader.read_all(0).await {
        Ok(p) => p,
        Err(e) => {
            reader.drain().await;
            return Err(e);
        }
    };
    let plain = tokio::task::spawn_blocking(move || decompress(&packed, coding, limit))
        .await
        .map_err(|e| ServerError::Internal(format!("decompressing the request body: {e}")))??;
    let mut plain_headers = headers.clone();
    plain_headers.remove(header::CONTENT_ENCODING);
    plain_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(plain.len()));
    Box::pin(read_infer_request_with_shm(
        Body::from(plain),
        &plain_headers,
        limit,
        shm,
    ))
    .await
}

/// Reads (and drops) up to `limit` bytes of a body that will not be used, so a client
/// still sending it receives the error answer rather than a reset connection.
pub async fn drain_body(body: Body, limit: usize) {
    Reader::new(body, limit).drain().await;
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>> {
    match headers.get(HEADER_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| {
                ServerError::invalid(
                    "Inference-Header-Content-Length must be a non-negative integer",
                )
            }),
    }
}

fn too_large(limit: usize) -> ServerError {
    ServerError::PayloadTooLarge(format!(
        "request body exceeds the limit of {limit} bytes (--max-body-mb)"
    ))
}

/// Data frames of a body, counted against the limit.
struct Reader {
    body: Body,
    read: usize,
    limit: usize,
}

impl Reader {
    fn new(body: Body, limit: usize) -> Self {
        Self {
            body,
            read: 0,
            limit,
        }
    }

    /// The rest of the body in one buffer (`capacity` reserved up front).
    async fn read_all(&mut self, capacity: usize) -> Result<Vec<u8>> {
        let mut all = Vec::with_capacity(capacity.min(self.limit));
        while let Some(chunk) = self.next().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// Discards the rest of the body, stopping at the limit or a read error.
    async fn drain(&mut self) {
        while let Ok(Some(_)) = self.next().await {}
    }

    async fn next(&mut self) -> Result<Option<bytes::Bytes>> {
        loop {
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| {
                ServerError::invalid(format!("failed to read the request body: {e}"))
            })?;
            // Trailers carry nothing for us.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.read = self.read.saturating_add(data.len());
            if self.read > self.limit {
                return Err(too_large(self.limit));
            }
            return Ok(Some(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A body that arrives in `piece`-byte frames, without a Content-Length unless given.
    fn body_in_pieces(bytes: &[u8], piece: usize) -> Body {
        let frames: Vec<std::result::Result<bytes::Bytes, std::io::Error>> = bytes
            .chunks(piece)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(tokio_stream::iter(frames))
    }

    fn headers(header_len: usize, content_length: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_LENGTH, HeaderValue::from(header_len));
        if let Some(n) = content_length {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        h
    }

    fn two_input_body() -> (Vec<u8>, usize, Vec<f32>, Vec<f32>) {
        let a: Vec<f32> = (0..7).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b: Vec<f32> = (0..5).map(|i| 100.0 + i as f32).collect();
        let head = br#"{"inputs":[{"name":"A","shape":[1,7],"datatype":"FP32","parameters":{"binary_data_size":28}},{"name":"C","shape":[1],"datatype":"FP32","data":[9]},{"name":"B","shape":[5],"datatype":"FP32","parameters":{"binary_data_size":20}}]}"#;
        let mut body = head.to_vec();
        body.extend(f32_bytes(&a));
        body.extend(f32_bytes(&b));
        (body, head.len(), a, b)
    }

    #[tokio::test]
    async fn frames_split_anywhere_decode_to_the_same_tensors() {
        let (body, n, a, b) = two_input_body();
        // Frame sizes that split the header, the inputs and single elements.
        for piece in [1, 3, 7, n, n + 5, body.len()] {
            for cl in [None, Some(body.len())] {
                let d = read_infer_request(body_in_pieces(&body, piece), &headers(n, cl), 1 << 20)
                    .await
                    .unwrap_or_else(|e| panic!("piece {piece}: {e}"));
                let inputs = &d.request.inputs;
                assert_eq!(inputs[0].0, "A");
                assert_eq!(inputs[0].1.as_f32(), Some(a.as_slice()));
                assert_eq!(inputs[1].1.as_f32(), Some(&[9.0f32][..]));
                assert_eq!(inputs[2].0, "B");
                assert_eq!(inputs[2].1.shape(), &[5]);
                assert_eq!(inputs[2].1.as_f32(), Some(b.as_slice()));
            }
        }
    }

    async fn err_of(body: &[u8], h: HeaderMap, limit: usize) -> (u16, String) {
        match read_infer_request(body_in_pieces(body, 4), &h, limit).await {
            Ok(_) => panic!("accepted a bad body"),
            Err(e) => (e.http_status(), e.to_string()),
        }
    }

    #[tokio::test]
    async fn truncated_extra_and_oversized_bodies_are_refused() {
        let (body, n, _, _) = two_input_body();
        // Truncated stream without a Content-Length: found at the end.
        let (code, msg) = err_of(&body[..body.len() - 3], headers(n, None), 1 << 20).await;
        assert_eq!(code, 400);
        assert!(
            msg.contains("unexpected end of binary data for input 'B'"),
            "{msg}"
        );
        // Declared Content-Length shorter than the inputs declare: found before reading.
        let (code, msg) = err_of(&body, headers(n, Some(body.len() - 3)), 1 << 20).await;
        assert_eq!(code, 400);
        assert!(msg.contains("unexpected end of binary data"), "{msg}");
        // Bytes nobody claims.
        let mut extra = body.clone();
        extra.extend([0u8; 8]);
        let (code, msg) = err_of(&extra, headers(n, None), 1 << 20).await;
        assert_eq!(code, 400);
        assert!(msg.contains("no input claims"), "{msg}");
        // Header length beyond the body.
        let (code, msg) = err_of(&body[..n - 2], headers(n, None), 1 << 20).await;
        assert_eq!(code, 400);
        assert!(msg.contains("Inference-Header-Content-Length"), "{msg}");
        // Over the limit: by Content-Length at once, by declared sizes, and while streaming.
        let (code, _) = err_of(&body, headers(n, Some(body.len())), body.len() - 1).await;
        assert_eq!(code, 413);
        let (code, msg) = err_of(&body, headers(n, None), n + 30).await;
        assert_eq!(code, 413, "{msg}");
        let json = br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let (code, _) = err_of(json, h, json.len() - 1).await;
        assert_eq!(code, 413);
    }

    #[tokio::test]
    async fn plain_json_body_decodes() {
        let json = br#"{"inputs":[{"name":"A","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#;
        let d = read_infer_request(body_in_pieces(json, 5), &HeaderMap::new(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(d.request.inputs[0].1.to_f32_vec(), vec![1.0, 2.0]);
    }
}
