//! Triton-compatible KServe v2 inference server with dynamic batching.
