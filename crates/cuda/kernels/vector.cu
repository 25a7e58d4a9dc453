// Memory-bound kernels that move eight channels per load and store (16 bytes in fp16 and
// bf16, two 16-byte accesses in fp32). They need C % 8 == 0 and 16-byte aligned tensors;
// the host falls back to the scalar kernels otherwise.

__device__ __forceinline__ void ld8(const T* __restrict__ p, float* v) {
    if (sizeof(T) == 4) {
        float4 a = reinterpret_cast<const float4*>(p)[0];
        float4 b = reinterpret_cast<const float4*>(p)[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = ldf(h[j]);
    }
}

__device__ __forceinline__ void st8(T* __restrict__ p, const float* v) {
    if (sizeof(T) == 4) {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        __align__(16) T h[8];
#pragma unroll
        for (int j = 0; j < 8; j++) h[j] = stf(v[j]);
        *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
    }
}

__device__ __forceinline__ void ld8f(const float* __restrict__ p, float* v) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ float sum8(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}

// Channel LayerNorm with eight threads per pixel, each holding up to LN8_CHUNKS groups
// of eight channels in registers (C <= 8 * 8 * LN8_CHUNKS). Every lane takes part in the
// shuffles; lanes past the last pixel only skip the store.
#define LN8_CHUNKS 6
extern "C" __global__ void layer_norm8(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                       const float* __restrict__ b, i64 P, int C, float eps, int has_bias) {
    i64 pix = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 3;
    int sub = threadIdx.x & 7;
    bool live = pix < P;
    const T* px = x + (live ? pix : 0) * C;
    int groups = C >> 3;
    float v[LN8_CHUNKS][8];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < LN8_CHUNKS; k++) {
        int g = sub + 8 * k;
        if (g < groups) {
            ld8(px + g * 8, v[k]);
#pragma unroll
            for (int j = 0; j < 8; j++) s += v[k][j];
        }
    }
    float mean = sum8(s) / C;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < LN8_CHUNKS; k++) {
        if (sub + 8 * k < groups) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float d = v[k][j] - mean;
                q += d * d;
            }
        }
    }
    float inv = 1.0f / sqrtf(sum8(q) / C + eps);
    if (!live) return;
    T* out = y + pix * C;
#pragma unroll
    for (int k = 0; k < LN8_CHUNKS; k++) {
        int g = sub + 8 * k;
        if (g < groups) {
            float wv[8], r[8];
            ld8f(w + g * 8, wv);
            if (has_bias) {
                float bv[8];
                ld8f(b + g * 8, bv);
#pragma unroll
                for (int j = 0; j < 8; j++) r[j] = (v[k][j] - mean) * inv * wv[j] + bv[j];
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) r[j] = v[k][j] * inv * wv[j];
            }
            st8(out + g * 8, r);
        }
    }
}

// Depthwise 3x3 (stride 1, pad 1) down a strip of DW8_ROWS output rows: each thread owns
// eight channels of one column and streams the input rows once. Input row r feeds output
// rows r+1, r and r-1 (weights ky = 0, 1, 2); after it, row r-1 is complete. Rows are
// fetched DW8_AHEAD at a time, all loads issued before any arithmetic, so that each
// thread keeps several 16-byte loads in flight (a row-at-a-time loop waits a full
// memory latency per row).
#define DW8_ROWS 16
#define DW8_AHEAD 4

struct Dw8Taps {
    float w[9][8];
    float bias[8];
};

// Eight raw elements: 16 bytes in fp16/bf16, 32 in fp32 (hi unused for 2-byte types).
struct Raw8 {
    uint4 lo, hi;
};

__device__ __forceinline__ Raw8 raw8_zero() {
    Raw8 r;
    r.lo = make_uint4(0u, 0u, 0u, 0u);
    r.hi = r.lo;
    return r;
}

__device__ __forceinline__ Raw8 raw8_load(const T* __restrict__ p) {
    Raw8 r;
    r.lo = reinterpret_cast<const uint4*>(p)[0];
    r.hi = sizeof(T) == 4 ? reinterpret_cast<const uint4*>(p)[1] : make_uint4(0u, 0u, 0u, 0u);
    return r;
}

__device__ __forceinline__ void raw8_unpack(const Raw8& r, float* v) {
    if (sizeof(T) == 4) {
        v[0] = __uint_as_float(r.lo.x); v[1] = __uint_as_float(r.lo.y);
        v[2] = __uint_as_float(r.lo.z); v[3] = __uint_as_float(r.lo.w);
        v[4] = __uint_as_float(r.hi.x); v[5] = __uint_as_float(r.hi.y);
        v[6] = __uint_as_float(r.hi.z); v[7] = __uint_as_float(r.hi.w);
    } else {
        const T* h = reinterpret_cast<const T*>(&r.lo);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = ldf(h[j]);
    }
}

__device__ __forceinline__ void dw8_load_taps(Dw8Taps& t, const float* __restrict__ w,
                                              const float* __restrict__ bias, int C, int c) {
#pragma unroll
    for (int k = 0; k < 9; k++) ld8f(w + k * C + c, t.w[k]);
#pragma unroll
    for (int j = 0; j < 8; j++) t.bias[j] = 0.0f;
    if (bias) ld8f(bias + c, t.bias);
}

// Runs the strip for the thread's (column, channel group) and calls `emit(row, acc)` for
// each finished output row. Rows and columns outside the image read as zeros (padding).
template <typename Emit>
__device__ __forceinline__ void dw8_strip(const T* __restrict__ img, const Dw8Taps& t, int H, int W, int C,
                                          int col, int c, int y0, Emit emit) {
    int y1 = min(y0 + DW8_ROWS, H);
    float above[8], here[8], below[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        here[j] = t.bias[j];
        below[j] = t.bias[j];
    }
    for (int r0 = y0 - 1; r0 <= y1; r0 += DW8_AHEAD) {
        Raw8 raw[DW8_AHEAD][3];
#pragma unroll
        for (int i = 0; i < DW8_AHEAD; i++) {
            int r = r0 + i;
#pragma unroll
            for (int kx = 0; kx < 3; kx++) {
                int ix = col + kx - 1;
                bool inside = r >= 0 && r < H && r <= y1 && ix >= 0 && ix < W;
                raw[i][kx] = inside ? raw8_load(img + ((i64)r * W + ix) * C + c) : raw8_zero();
            }
        }
#pragma unroll
        for (int i = 0; i < DW8_AHEAD; i++) {
            int r = r0 + i;
            if (r > y1) break;
            // above: output r-1, here: output r, below: output r+1.
#pragma unroll
            for (int j = 0; j < 8; j++) {
                above[j] = here[j];
                here[j] = below[j];
                below[j] = t.bias[j];
            }
#pragma unroll
            for (int kx = 0; kx < 3; kx++) {
                float in[8];
                raw8_unpack(raw[i][kx], in);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    above[j] += in[j] * t.w[6 + kx][j];
                    here[j] += in[j] * t.w[3 + kx][j];
                    below[j] += in[j] * t.w[kx][j];
                }
            }
            if (r - 1 >= y0) emit(r - 1, above);
        }
    }
}

// Grid: x over (column, channel group) pairs of a row, y over strips (image, strip).
extern "C" __global__ void dwconv3x3_v8(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                        const float* __restrict__ bias, const T* __restrict__ res, int H, int W,
                                        int C, int act) {
    int groups = C >> 3;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= groups * W) return;
    int col = t / groups;
    int c = (t - col * groups) * 8;
    int strips = (H + DW8_ROWS - 1) / DW8_ROWS;
    int n = blockIdx.y / strips;
    int y0 = (blockIdx.y - n * strips) * DW8_ROWS;
    Dw8Taps taps;
    dw8_load_taps(taps, w, bias, C, c);
    const i64 base = (i64)n * H * W * C;
    dw8_strip(x + base, taps, H, W, C, col, c, y0, [&](int oy, float* acc) {
        i64 o = base + ((i64)oy * W + col) * C + c;
        float r[8];
        if (res) ld8(res + o, r);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            acc[j] = activate(acc[j], act);
            if (res) acc[j] += r[j];
        }
        st8(y + o, acc);
    });
}

// Depthwise 3x3 over C = 2*Ch channels fused with the GELU gate: out[i] = gelu(dw[i]) *
// dw[Ch + i]. In each warp, lanes 0-15 own sixteen channel groups of the first half and
// lanes 16-31 the matching groups of the second half; a shuffle brings each pair
// together. Needs Ch % 128 == 0 (sixteen groups of eight per warp).
extern "C" __global__ void dwconv3x3_gate_v8(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                             const float* __restrict__ bias, int H, int W, int C) {
    int Ch = C >> 1;
    int warps_per_col = Ch >> 7;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    int warp = t >> 5;
    int lane = t & 31;
    if (warp >= warps_per_col * W) return;
    int col = warp / warps_per_col;
    int g = (warp - col * warps_per_col) * 16 + (lane & 15);
    int c = (lane >> 4) * Ch + g * 8;
    int strips = (H + DW8_ROWS - 1) / DW8_ROWS;
    int n = blockIdx.y / strips;
    int y0 = (blockIdx.y - n * strips) * DW8_ROWS;
    Dw8Taps taps;
    dw8_load_taps(taps, w, bias, C, c);
    const i64 base = (i64)n * H * W * C;
    T* out = y + (i64)n * H * W * Ch;
    dw8_strip(x + base, taps, H, W, C, col, c, y0, [&](int oy, float* acc) {
        float r[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float other = __shfl_xor_sync(0xffffffffu, acc[j], 16);
            r[j] = gelu_f(acc[j]) * other;
        }
        if (lane < 16) st8(out + ((i64)oy * W + col) * Ch + g * 8, r);
    });
}
