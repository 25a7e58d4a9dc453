// Element-wise, layout and normalisation kernels. Compiled once per precision: the
// host prepends a preamble that defines the storage type T with ldf()/stf() converters.
// Activations are NHWC; every index is 64-bit; all loops are grid-stride.

typedef long long i64;

#define GRID_LOOP(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// act: 0 identity, 1 gelu (erf), 2 relu, 3 silu.
__device__ __forceinline__ float activate(float y, int act) {
    if (act == 1) return gelu_f(y);
    if (act == 2) return fmaxf(y, 0.0f);
    if (act == 3) return y / (1.0f + expf(-y));
    return y;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void nchw_to_nhwc(const float* __restrict__ x, T* __restrict__ y, int N, int C, i64 HW) {
    GRID_LOOP(i, (i64)N * C * HW) {
        int c = (int)(i % C);
        i64 p = (i / C) % HW;
        i64 n = i / ((i64)C * HW);
        y[i] = stf(x[(n * C + c) * HW + p]);
    }
}

// f32 <-> storage type, elementwise: host transfers of 16-bit models cross PCIe in the
// storage type (rounded on the host exactly as stf rounds) and are widened here.
extern "C" __global__ void widen_to_f32(const T* __restrict__ x, float* __restrict__ y, i64 n) {
    GRID_LOOP(i, n) y[i] = ldf(x[i]);
}

extern "C" __global__ void narrow_from_f32(const float* __restrict__ x, T* __restrict__ y, i64 n) {
    GRID_LOOP(i, n) y[i] = stf(x[i]);
}

extern "C" __global__ void nhwc_to_nchw(const T* __restrict__ x, float* __restrict__ y, int N, int C, i64 HW) {
    GRID_LOOP(i, (i64)N * C * HW) {
        i64 p = i % HW;
        int c = (int)((i / HW) % C);
        i64 n = i / ((i64)C * HW);
        y[i] = ldf(x[(n * HW + p) * C + c]);
    }
}

// One warp per pixel. Two passes over the pixel's channels (mean, then variance about
// it) so that large means do not cancel. Without a bias the mean is not subtracted
// (Restormer's BiasFree LayerNorm), but the variance is still about the mean.
extern "C" __global__ void layer_norm(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                      const float* __restrict__ b, i64 P, int C, float eps, int has_bias) {
    i64 pix = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (pix >= P) return;
    const T* px = x + pix * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += ldf(px[c]);
    float mean = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = ldf(px[c]) - mean;
        v += d * d;
    }
    float inv = 1.0f / sqrtf(warp_sum(v) / C + eps);
    T* out = y + pix * C;
    for (int c = lane; c < C; c += 32) {
        float val = has_bias ? (ldf(px[c]) - mean) * inv * w[c] + b[c] : ldf(px[c]) * inv * w[c];
        out[c] = stf(val);
    }
}

// Depthwise k x k convolution (groups == channels), weights [kh][kw][C] in fp32.
extern "C" __global__ void dwconv(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                  const float* __restrict__ bias, const T* __restrict__ res, int N, int H, int W,
                                  int C, int OH, int OW, int KH, int KW, int stride, int pad, int act) {
    GRID_LOOP(i, (i64)N * OH * OW * C) {
        int c = (int)(i % C);
        i64 r = i / C;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        float acc = bias ? bias[c] : 0.0f;
        for (int ky = 0; ky < KH; ky++) {
            int iy = oy * stride + ky - pad;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < KW; kx++) {
                int ix = ox * stride + kx - pad;
                if (ix < 0 || ix >= W) continue;
                acc += ldf(x[((n * H + iy) * W + ix) * C + c]) * w[(ky * KW + kx) * C + c];
            }
        }
        acc = activate(acc, act);
        if (res) acc += ldf(res[i]);
        y[i] = stf(acc);
    }
}

// Patches for a dense convolution: col[p][k], k = (ky*KW + kx)*C + c, zero-padded to Kp.
extern "C" __global__ void im2col(const T* __restrict__ x, T* __restrict__ col, int N, int H, int W, int C, int OH,
                                  int OW, int KH, int KW, int stride, int pad, int Kp) {
    GRID_LOOP(i, (i64)N * OH * OW * Kp) {
        int k = (int)(i % Kp);
        i64 p = i / Kp;
        float v = 0.0f;
        if (k < KH * KW * C) {
            int c = k % C;
            int kx = (k / C) % KW;
            int ky = k / (C * KW);
            int ox = (int)(p % OW);
            int oy = (int)((p / OW) % OH);
            i64 n = p / ((i64)OW * OH);
            int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = ldf(x[((n * H + iy) * W + ix) * C + c]);
        }
        col[i] = stf(v);
    }
}

// y = act(y) (+ res), in place; used after matrix products whose epilogue cannot do it.
extern "C" __global__ void act_residual(T* __restrict__ y, const T* __restrict__ res, i64 n, int act) {
    GRID_LOOP(i, n) {
        float v = activate(ldf(y[i]), act);
        if (res) v += ldf(res[i]);
        y[i] = stf(v);
    }
}

// act_residual in 16-byte vectors: n / (16 / sizeof(T)) vectors, both tensors aligned.
extern "C" __global__ void act_residual_vec(T* __restrict__ y, const T* __restrict__ res, i64 vectors, int act) {
    const int V = 16 / sizeof(T);
    GRID_LOOP(i, vectors) {
        uint4 yv = reinterpret_cast<const uint4*>(y)[i];
        uint4 rv = res ? reinterpret_cast<const uint4*>(res)[i] : make_uint4(0, 0, 0, 0);
        T* ye = reinterpret_cast<T*>(&yv);
        const T* re = reinterpret_cast<const T*>(&rv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float v = activate(ldf(ye[k]), act);
            if (res) v += ldf(re[k]);
            ye[k] = stf(v);
        }
        reinterpret_cast<uint4*>(y)[i] = yv;
    }
}

// After a convolution computed by cuDNN: y = act(src + bias) + res, 16-byte vectors of
// channels. src's pixel rows are lds apart, y's ldy apart (a channel slice of a wider
// tensor; src == y in place, or a packed buffer moved into the slice); res is dense.
extern "C" __global__ void conv_epilogue_vec(const T* src, i64 lds, T* y, i64 ldy,
                                             const T* __restrict__ bias,
                                             const T* __restrict__ res, i64 pixels, int c,
                                             int act) {
    const int V = 16 / sizeof(T);
    const int cv = c / V;
    GRID_LOOP(i, pixels * cv) {
        const i64 p = i / cv;
        const int j = (int)(i - p * cv) * V;
        uint4 yv = *reinterpret_cast<const uint4*>(src + p * lds + j);
        uint4 bv = make_uint4(0, 0, 0, 0), rv = make_uint4(0, 0, 0, 0);
        if (bias) bv = *reinterpret_cast<const uint4*>(bias + j);
        if (res) rv = *reinterpret_cast<const uint4*>(res + p * c + j);
        T* ye = reinterpret_cast<T*>(&yv);
        const T* be = reinterpret_cast<const T*>(&bv);
        const T* re = reinterpret_cast<const T*>(&rv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float v = ldf(ye[k]);
            if (bias) v += ldf(be[k]);
            v = activate(v, act);
            if (res) v += ldf(re[k]);
            ye[k] = stf(v);
        }
        *reinterpret_cast<uint4*>(y + p * ldy + j) = yv;
    }
}

extern "C" __global__ void gelu_gate(const T* __restrict__ x, T* __restrict__ y, i64 P, int half) {
    GRID_LOOP(i, P * half) {
        i64 p = i / half;
        int c = (int)(i % half);
        const T* px = x + p * 2 * half;
        y[i] = stf(gelu_f(ldf(px[c])) * ldf(px[half + c]));
    }
}

extern "C" __global__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, i64 n) {
    GRID_LOOP(i, n) { y[i] = stf(ldf(a[i]) + ldf(b[i])); }
}

extern "C" __global__ void concat_channels(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                           i64 P, int Ca, int Cb) {
    int C = Ca + Cb;
    GRID_LOOP(i, P * C) {
        i64 p = i / C;
        int c = (int)(i % C);
        y[i] = c < Ca ? a[p * Ca + c] : b[p * Cb + (c - Ca)];
    }
}

// out[n, y*r+i, x*r+j, c] = in[n, y, x, c*r*r + i*r + j]   (PyTorch PixelShuffle)
extern "C" __global__ void pixel_shuffle(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W, int C,
                                         int r) {
    int Co = C / (r * r), OH = H * r, OW = W * r;
    GRID_LOOP(i, (i64)N * OH * OW * Co) {
        int c = (int)(i % Co);
        i64 q = i / Co;
        int X = (int)(q % OW);
        int Y = (int)((q / OW) % OH);
        i64 n = q / ((i64)OW * OH);
        y[i] = x[((n * H + Y / r) * W + X / r) * C + c * r * r + (Y % r) * r + (X % r)];
    }
}

// out[n, y, x, c*r*r + i*r + j] = in[n, y*r+i, x*r+j, c]   (PyTorch PixelUnshuffle)
extern "C" __global__ void pixel_unshuffle(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W, int C,
                                           int r) {
    int OH = H / r, OW = W / r, Co = C * r * r;
    GRID_LOOP(i, (i64)N * OH * OW * Co) {
        int oc = (int)(i % Co);
        i64 q = i / Co;
        int ox = (int)(q % OW);
        int oy = (int)((q / OW) % OH);
        i64 n = q / ((i64)OW * OH);
        int c = oc / (r * r), ij = oc % (r * r);
        y[i] = x[((n * H + oy * r + ij / r) * W + ox * r + ij % r) * C + c];
    }
}

// Depthwise 3x3, stride 1, padding 1: each thread computes two channels at four
// consecutive columns, so each input value and weight it loads serves several outputs.
// Grid: x over (column group, channel pair) of one output row, y over rows (n*H + y).
// 32-bit index math except for the final offsets: 64-bit division made the generic
// kernel slow. Requires even C.
#define DW_XT 4
extern "C" __global__ void dwconv3x3(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                     const float* __restrict__ bias, const T* __restrict__ res, int H, int W,
                                     int C, int act) {
    int row = blockIdx.y;
    int oy = row % H;
    int C2 = C >> 1;
    int groups = (W + DW_XT - 1) / DW_XT;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= groups * C2) return;
    int g = t / C2;
    int c = (t - g * C2) * 2;
    int x0 = g * DW_XT;
    const T* img = x + (i64)(row - oy) * W * C;
    float2 b = bias ? make_float2(bias[c], bias[c + 1]) : make_float2(0.0f, 0.0f);
    float2 acc[DW_XT];
#pragma unroll
    for (int j = 0; j < DW_XT; j++) acc[j] = b;
#pragma unroll
    for (int ky = 0; ky < 3; ky++) {
        int iy = oy + ky - 1;
        if (iy < 0 || iy >= H) continue;
        const T* xr = img + (i64)iy * W * C + c;
        float2 in[DW_XT + 2];
#pragma unroll
        for (int k = 0; k < DW_XT + 2; k++) {
            int ix = x0 - 1 + k;
            in[k] = (ix >= 0 && ix < W) ? ld2(xr + ix * C) : make_float2(0.0f, 0.0f);
        }
#pragma unroll
        for (int kx = 0; kx < 3; kx++) {
            float2 wv = *reinterpret_cast<const float2*>(w + (ky * 3 + kx) * C + c);
#pragma unroll
            for (int j = 0; j < DW_XT; j++) {
                acc[j].x += in[j + kx].x * wv.x;
                acc[j].y += in[j + kx].y * wv.y;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < DW_XT; j++) {
        if (x0 + j >= W) break;
        float2 a = acc[j];
        a.x = activate(a.x, act);
        a.y = activate(a.y, act);
        i64 o = ((i64)row * W + x0 + j) * C + c;
        if (res) {
            float2 r = ld2(res + o);
            a.x += r.x;
            a.y += r.y;
        }
        st2(y + o, a);
    }
}

// Depthwise 3x3 (stride 1, pad 1) on C = 2*Ch channels fused with the GELU gate:
// out[..., i] = gelu(dw(x)[i]) * dw(x)[Ch + i]. Each thread holds two channel pairs (one
// in each half) over DW_XT columns, so the C-wide convolution output never reaches
// memory. Requires Ch even.
extern "C" __global__ void dwconv3x3_gate(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                          const float* __restrict__ bias, int H, int W, int C) {
    int row = blockIdx.y;
    int oy = row % H;
    int Ch = C >> 1;
    int pairs = Ch >> 1;
    int groups = (W + DW_XT - 1) / DW_XT;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= groups * pairs) return;
    int g = t / pairs;
    int c = (t - g * pairs) * 2;
    int x0 = g * DW_XT;
    const T* img = x + (i64)(row - oy) * W * C;
    float2 ba = bias ? make_float2(bias[c], bias[c + 1]) : make_float2(0.0f, 0.0f);
    float2 bb = bias ? make_float2(bias[Ch + c], bias[Ch + c + 1]) : make_float2(0.0f, 0.0f);
    float2 acc_a[DW_XT], acc_b[DW_XT];
#pragma unroll
    for (int j = 0; j < DW_XT; j++) {
        acc_a[j] = ba;
        acc_b[j] = bb;
    }
#pragma unroll
    for (int ky = 0; ky < 3; ky++) {
        int iy = oy + ky - 1;
        if (iy < 0 || iy >= H) continue;
        const T* xr = img + (i64)iy * W * C + c;
        float2 in_a[DW_XT + 2], in_b[DW_XT + 2];
#pragma unroll
        for (int k = 0; k < DW_XT + 2; k++) {
            int ix = x0 - 1 + k;
            bool inside = ix >= 0 && ix < W;
            in_a[k] = inside ? ld2(xr + ix * C) : make_float2(0.0f, 0.0f);
            in_b[k] = inside ? ld2(xr + ix * C + Ch) : make_float2(0.0f, 0.0f);
        }
#pragma unroll
        for (int kx = 0; kx < 3; kx++) {
            float2 wa = *reinterpret_cast<const float2*>(w + (ky * 3 + kx) * C + c);
            float2 wb = *reinterpret_cast<const float2*>(w + (ky * 3 + kx) * C + Ch + c);
#pragma unroll
            for (int j = 0; j < DW_XT; j++) {
                acc_a[j].x += in_a[j + kx].x * wa.x;
                acc_a[j].y += in_a[j + kx].y * wa.y;
                acc_b[j].x += in_b[j + kx].x * wb.x;
                acc_b[j].y += in_b[j + kx].y * wb.y;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < DW_XT; j++) {
        if (x0 + j >= W) break;
        float2 o = make_float2(gelu_f(acc_a[j].x) * acc_b[j].x, gelu_f(acc_a[j].y) * acc_b[j].y);
        st2(y + ((i64)row * W + x0 + j) * Ch + c, o);
    }
}

// im2col with one output row per blockIdx.y (n*OH + oy) and 32-bit index math.
extern "C" __global__ void im2col_rows(const T* __restrict__ x, T* __restrict__ col, int H, int W, int C, int OH,
                                       int OW, int KH, int KW, int stride, int pad, int Kp) {
    int row = blockIdx.y;
    int oy = row % OH;
    const T* img = x + (i64)(row / OH) * H * W * C;
    T* dst = col + (i64)row * OW * Kp;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < OW * Kp; t += gridDim.x * blockDim.x) {
        int ox = t / Kp;
        int k = t - ox * Kp;
        float v = 0.0f;
        if (k < KH * KW * C) {
            int c = k % C;
            int kk = k / C;
            int kx = kk % KW, ky = kk / KW;
            int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = ldf(img[(iy * W + ix) * C + c]);
        }
        dst[t] = stf(v);
    }
}

// LayerNorm for even C <= 512: one warp per pixel, two channels per lane, the pixel
// held in registers so global memory is read once.
extern "C" __global__ void layer_norm2(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                       const float* __restrict__ b, i64 P, int C, float eps, int has_bias) {
    i64 pix = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (pix >= P) return;
    const T* px = x + pix * C;
    float2 v[8];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int c = (lane + 32 * k) * 2;
        v[k] = c < C ? ld2(px + c) : make_float2(0.0f, 0.0f);
        s += v[k].x + v[k].y;
    }
    float mean = warp_sum(s) / C;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int c = (lane + 32 * k) * 2;
        if (c < C) q += (v[k].x - mean) * (v[k].x - mean) + (v[k].y - mean) * (v[k].y - mean);
    }
    float inv = 1.0f / sqrtf(warp_sum(q) / C + eps);
    T* out = y + pix * C;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int c = (lane + 32 * k) * 2;
        if (c < C) {
            float2 r;
            if (has_bias) {
                r.x = (v[k].x - mean) * inv * w[c] + b[c];
                r.y = (v[k].y - mean) * inv * w[c + 1] + b[c + 1];
            } else {
                r.x = v[k].x * inv * w[c];
                r.y = v[k].y * inv * w[c + 1];
            }
            st2(out + c, r);
        }
    }
}

#define SMALL_MAX_TAPS 32
#define SMALL_MAX_OUT 64

// conv_small_taps' pixels with OUT accumulators (c_out <= OUT): the loops over channels
// unroll to OUT, so a narrow output does not pay for the widest one. The output grid may
// be padded at the bottom and right (OHp x OWp, at least OH x OW): the padding pixels
// get zeros, so a following zero pad is not a pass of its own (HGNetV2's stem).
template <int OUT>
__device__ __forceinline__ void conv_small_pixels(const T* __restrict__ x, const float* sw, const float* sb,
                                                  const int* s_dy, const int* s_dx, const int* s_c,
                                                  const T* __restrict__ res, T* __restrict__ y, int N, int H,
                                                  int W, int C, int OH, int OW, int OHp, int OWp, int stride, int K,
                                                  int c_out, int act) {
    const i64 P = (i64)N * OHp * OWp;
    GRID_LOOP(p, P) {
        const int ox = (int)(p % OWp), oy = (int)((p / OWp) % OHp);
        const i64 n = p / ((i64)OWp * OHp);
        const bool inside = oy < OH && ox < OW;
        const T* img = x + n * H * W * C;
        float acc[OUT];
#pragma unroll
        for (int j = 0; j < OUT; ++j) acc[j] = 0.0f;
        // Each tap once, into every output channel (four per 16-byte weight load).
#pragma unroll 3
        for (int k = 0; k < K; ++k) {
            const int iy = oy * stride + s_dy[k], ix = ox * stride + s_dx[k];
            const bool ok = inside && iy >= 0 && iy < H && ix >= 0 && ix < W;
            const float t = ok ? ldf(img[((i64)iy * W + ix) * C + s_c[k]]) : 0.0f;
            const float4* wk = reinterpret_cast<const float4*>(sw + k * c_out);
#pragma unroll
            for (int q = 0; q < OUT / 4; ++q) {
                if (4 * q < c_out) {
                    const float4 w4 = wk[q];
                    acc[4 * q] += t * w4.x;
                    acc[4 * q + 1] += t * w4.y;
                    acc[4 * q + 2] += t * w4.z;
                    acc[4 * q + 3] += t * w4.w;
                }
            }
        }
#pragma unroll
        for (int g = 0; g < OUT / 8; ++g) {
            const int co = 8 * g;
            if (co < c_out) {
                uint4 packed[sizeof(T) * 8 / 16];
                T* o = reinterpret_cast<T*>(packed);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    float v = activate(acc[co + j] + sb[co + j], act);
                    if (res) v += ldf(res[p * c_out + co + j]);
                    o[j] = stf(inside ? v : 0.0f);
                }
                uint4* dst = reinterpret_cast<uint4*>(y + p * c_out + co);
#pragma unroll
                for (int v = 0; v < (int)(sizeof(T) * 8 / 16); ++v) dst[v] = packed[v];
            }
        }
    }
}

// Dense k x k convolution with few taps per output (K = KH * KW * C <= 32: the 3-channel
// stem), where im2col would write a K-wide copy of the whole output grid before the
// product reads it back: one thread per output pixel computes every output channel from
// each of the pixel's K taps read once and multiplied into every channel's accumulator.
// Weights sit in shared memory as fp32 [k][c_out] (four channels of one tap per 16-byte
// load, read by the whole warp at once); eight channels per 16-byte store. w is the
// product layout [c_out, Kp] with K ordered (ky, kx, c) as im2col's; res (optional) is [P, c_out]. act(sum + bias) + res, as the product's
// epilogue and act_residual give it. c_out a multiple of 8, at most SMALL_MAX_OUT. The
// output is OHp x OWp per image (zeros below and right of OH x OW; no residual then).
// (Kernels conv_small_taps32 / conv_small_taps64 below.)
// The weights (transposed to [k][c_out], fp32), the bias and each tap's offsets into
// shared memory.
__device__ __forceinline__ void conv_small_stage(const T* __restrict__ w, const T* __restrict__ bias, float* sw,
                                                 float* sb, int* s_dy, int* s_dx, int* s_c, int C, int KH,
                                                 int KW, int pad, int Kp, int c_out) {
    const int K = KH * KW * C;
    for (int i = threadIdx.x; i < c_out * K; i += blockDim.x) {
        const int co = i / K, k = i - co * K;
        sw[k * c_out + co] = ldf(w[co * Kp + k]);
    }
    for (int i = threadIdx.x; i < c_out; i += blockDim.x) sb[i] = bias ? ldf(bias[i]) : 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        s_c[k] = k % C;
        s_dx[k] = (k / C) % KW - pad;
        s_dy[k] = k / (C * KW) - pad;
    }
    __syncthreads();
}

#define CONV_SMALL_KERNEL(NAME, OUT, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINB) NAME(                                                \
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, const T* __restrict__ res, \
        T* __restrict__ y, int N, int H, int W, int C, int OH, int OW, int KH, int KW, int stride, int pad,       \
        int Kp, int c_out, int act, int OHp, int OWp) {                                                         \
        __shared__ __align__(16) float sw[SMALL_MAX_TAPS * OUT];                                                  \
        __shared__ float sb[OUT];                                                                                 \
        __shared__ int s_dy[SMALL_MAX_TAPS], s_dx[SMALL_MAX_TAPS], s_c[SMALL_MAX_TAPS];                           \
        conv_small_stage(w, bias, sw, sb, s_dy, s_dx, s_c, C, KH, KW, pad, Kp, c_out);                            \
        conv_small_pixels<OUT>(x, sw, sb, s_dy, s_dx, s_c, res, y, N, H, W, C, OH, OW, OHp, OWp, stride,          \
                               KH * KW * C, c_out, act);                                                          \
    }

// Up to 32 output channels (three blocks per multiprocessor) and up to 64 (two).
CONV_SMALL_KERNEL(conv_small_taps32, 32, 3)
CONV_SMALL_KERNEL(conv_small_taps64, SMALL_MAX_OUT, 2)
