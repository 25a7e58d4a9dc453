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

// Depthwise 3x3 (stride 1, pad 1) down a strip of DW_ROWS output rows: each thread owns
// four channels of one column and streams the input rows once. Input row r feeds output
// rows r+1, r and r-1 (weights ky = 0, 1, 2); after it, row r-1 is complete. Rows are
// fetched DW_AHEAD at a time, all loads issued before any arithmetic, so that each thread
// keeps several loads in flight (a row-at-a-time loop waits a full memory latency per
// row). Four channels rather than eight keep the taps in ~40 registers: at eight, 190
// registers left one block per SM and the kernel ran slower than the scalar one.
#define DW_ROWS 16
#define DW_AHEAD 4

struct DwTaps {
    float w[9][4];
    float bias[4];
};

// Four raw elements: 8 bytes in fp16/bf16 (x, y), 16 in fp32.
__device__ __forceinline__ uint4 raw4_load(const T* __restrict__ p) {
    if (sizeof(T) == 4) return *reinterpret_cast<const uint4*>(p);
    uint2 v = *reinterpret_cast<const uint2*>(p);
    return make_uint4(v.x, v.y, 0u, 0u);
}

__device__ __forceinline__ void raw4_unpack(const uint4& r, float* v) {
    if (sizeof(T) == 4) {
        v[0] = __uint_as_float(r.x);
        v[1] = __uint_as_float(r.y);
        v[2] = __uint_as_float(r.z);
        v[3] = __uint_as_float(r.w);
    } else {
        const T* h = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = ldf(h[j]);
    }
}

__device__ __forceinline__ void ld4(const T* __restrict__ p, float* v) { raw4_unpack(raw4_load(p), v); }

__device__ __forceinline__ void st4(T* __restrict__ p, const float* v) {
    if (sizeof(T) == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        __align__(8) T h[4];
#pragma unroll
        for (int j = 0; j < 4; j++) h[j] = stf(v[j]);
        *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(h);
    }
}

// Taps and bias of four channels: the pairs at ca and cb (cb = ca + 2 for four adjacent
// channels; the gated kernel takes one pair from each half).
__device__ __forceinline__ void dw_load_taps(DwTaps& t, const float* __restrict__ w,
                                             const float* __restrict__ bias, int C, int ca, int cb) {
#pragma unroll
    for (int k = 0; k < 9; k++) {
        float2 a = *reinterpret_cast<const float2*>(w + k * C + ca);
        float2 b = *reinterpret_cast<const float2*>(w + k * C + cb);
        t.w[k][0] = a.x; t.w[k][1] = a.y; t.w[k][2] = b.x; t.w[k][3] = b.y;
    }
    float2 a = bias ? *reinterpret_cast<const float2*>(bias + ca) : make_float2(0.0f, 0.0f);
    float2 b = bias ? *reinterpret_cast<const float2*>(bias + cb) : make_float2(0.0f, 0.0f);
    t.bias[0] = a.x; t.bias[1] = a.y; t.bias[2] = b.x; t.bias[3] = b.y;
}

// Two raw elements in the low half of a uint4's worth of pair storage: 4 bytes in
// fp16/bf16, 8 in fp32.
__device__ __forceinline__ uint2 raw2_load(const T* __restrict__ p) {
    if (sizeof(T) == 4) return *reinterpret_cast<const uint2*>(p);
    return make_uint2(*reinterpret_cast<const unsigned int*>(p), 0u);
}

// The pairs at a and b packed as four elements in raw4 layout.
__device__ __forceinline__ uint4 raw_pairs(const T* __restrict__ a, const T* __restrict__ b) {
    uint2 x = raw2_load(a), y = raw2_load(b);
    if (sizeof(T) == 4) return make_uint4(x.x, x.y, y.x, y.y);
    return make_uint4(x.x, y.x, 0u, 0u);
}

// Runs the strip for the thread's column and calls `emit(row, acc)` for each finished
// output row; `load(row, column)` fetches the thread's four channels of one pixel. Rows
// and columns outside the image read as zeros (padding).
template <typename Load, typename Emit>
__device__ __forceinline__ void dw_strip(const DwTaps& t, int H, int W, int col, int y0, Load load, Emit emit) {
    int y1 = min(y0 + DW_ROWS, H);
    float above[4], here[4], below[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        here[j] = t.bias[j];
        below[j] = t.bias[j];
    }
    for (int r0 = y0 - 1; r0 <= y1; r0 += DW_AHEAD) {
        uint4 raw[DW_AHEAD][3];
#pragma unroll
        for (int i = 0; i < DW_AHEAD; i++) {
            int r = r0 + i;
#pragma unroll
            for (int kx = 0; kx < 3; kx++) {
                int ix = col + kx - 1;
                bool inside = r >= 0 && r < H && r <= y1 && ix >= 0 && ix < W;
                raw[i][kx] = inside ? load(r, ix) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int i = 0; i < DW_AHEAD; i++) {
            int r = r0 + i;
            if (r > y1) break;
            // above: output r-1, here: output r, below: output r+1.
#pragma unroll
            for (int j = 0; j < 4; j++) {
                above[j] = here[j];
                here[j] = below[j];
                below[j] = t.bias[j];
            }
#pragma unroll
            for (int kx = 0; kx < 3; kx++) {
                float in[4];
                raw4_unpack(raw[i][kx], in);
#pragma unroll
                for (int j = 0; j < 4; j++) {
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
// Needs C % 4 == 0 and 8-byte aligned tensors.
extern "C" __global__ void dwconv3x3_vec(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                         const float* __restrict__ bias, const T* __restrict__ res, int H, int W,
                                         int C, int act) {
    int groups = C >> 2;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= groups * W) return;
    int col = t / groups;
    int c = (t - col * groups) * 4;
    int strips = (H + DW_ROWS - 1) / DW_ROWS;
    int n = blockIdx.y / strips;
    int y0 = (blockIdx.y - n * strips) * DW_ROWS;
    DwTaps taps;
    dw_load_taps(taps, w, bias, C, c, c + 2);
    const i64 base = (i64)n * H * W * C;
    const T* img = x + base + c;
    auto load = [&](int r, int ix) { return raw4_load(img + ((i64)r * W + ix) * C); };
    dw_strip(taps, H, W, col, y0, load, [&](int oy, float* acc) {
        i64 o = base + ((i64)oy * W + col) * C + c;
        float r[4];
        if (res) ld4(res + o, r);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc[j] = activate(acc[j], act);
            if (res) acc[j] += r[j];
        }
        st4(y + o, acc);
    });
}

// Depthwise 3x3 over C = 2*Ch channels fused with the GELU gate: out[i] = gelu(dw[i]) *
// dw[Ch + i]. Each thread owns one channel pair of each half, so the 2*Ch-wide
// convolution output never reaches memory. Grid as dwconv3x3_vec with Ch / 2 groups per
// column. Needs Ch % 2 == 0 and 4-byte aligned tensors.
extern "C" __global__ void dwconv3x3_gate_vec(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                              const float* __restrict__ bias, int H, int W, int C) {
    int Ch = C >> 1;
    int pairs = Ch >> 1;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs * W) return;
    int col = t / pairs;
    int c = (t - col * pairs) * 2;
    int strips = (H + DW_ROWS - 1) / DW_ROWS;
    int n = blockIdx.y / strips;
    int y0 = (blockIdx.y - n * strips) * DW_ROWS;
    DwTaps taps;
    dw_load_taps(taps, w, bias, C, c, Ch + c);
    const T* img = x + (i64)n * H * W * C + c;
    T* out = y + (i64)n * H * W * Ch + c;
    auto load = [&](int r, int ix) {
        const T* p = img + ((i64)r * W + ix) * C;
        return raw_pairs(p, p + Ch);
    };
    dw_strip(taps, H, W, col, y0, load, [&](int oy, float* acc) {
        float2 g = make_float2(gelu_f(acc[0]) * acc[2], gelu_f(acc[1]) * acc[3]);
        st2(out + ((i64)oy * W + col) * Ch, g);
    });
}
