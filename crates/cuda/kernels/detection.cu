// Detection kernels (D-FINE): layout moves, element-wise maps, sequence attention,
// multi-scale deformable attention and box arithmetic. Compiled once per precision
// after the storage preamble (T, ldf, stf); arithmetic is fp32. Each kernel mirrors the
// CPU backend's twin in crates/engine/src/cpu/{spatial,sequence,deformable,detection}.rs,
// including its operation order where rounding could differ.

typedef long long i64;

// NVRTC has no math.h, so no INFINITY.
#define DET_NEG_INF __int_as_float(0xff800000)

#define DET_LOOP(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

__device__ __forceinline__ float det_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float det_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float det_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// F.pad with zeros: y is [N, OH, OW, C], x sits at (top, left).
extern "C" __global__ void det_pad(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W, int C, int top,
                                   int left, int OH, int OW) {
    DET_LOOP(i, (i64)N * OH * OW * C) {
        int c = (int)(i % C);
        i64 r = i / C;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        int iy = oy - top, ix = ox - left;
        y[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((n * H + iy) * W + ix) * C + c] : stf(0.0f);
    }
}

// nn.MaxPool2d(k, s), no padding; NaN propagates as in PyTorch.
extern "C" __global__ void det_max_pool(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W, int C,
                                        int OH, int OW, int k, int s) {
    DET_LOOP(i, (i64)N * OH * OW * C) {
        int c = (int)(i % C);
        i64 r = i / C;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        float m = DET_NEG_INF;
        for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
                float v = ldf(x[((n * H + oy * s + ky) * W + ox * s + kx) * C + c]);
                if (v > m || isnan(v)) m = v;
            }
        y[i] = stf(m);
    }
}

extern "C" __global__ void det_upsample(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W, int C,
                                        int f) {
    int OH = H * f, OW = W * f;
    DET_LOOP(i, (i64)N * OH * OW * C) {
        int c = (int)(i % C);
        i64 r = i / C;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        y[i] = x[((n * H + oy / f) * W + ox / f) * C + c];
    }
}

// op 0: a * v + b (affine); 1: sigmoid; 2: clamp to [a, b] (NaN stays NaN).
extern "C" __global__ void det_unary(const T* __restrict__ x, T* __restrict__ y, i64 n, int op, float a, float b) {
    DET_LOOP(i, n) {
        float v = ldf(x[i]);
        if (op == 0) {
            v = __fadd_rn(__fmul_rn(a, v), b);
        } else if (op == 1) {
            v = det_sigmoid(v);
        } else {
            v = v < a ? a : (v > b ? b : v);
        }
        y[i] = stf(v);
    }
}

// Copies `rows` blocks of `len` elements: dst[r * dst_stride + dst_off + j] =
// src[r * src_stride + src_off + j]. Serves channel slices, channel concatenation
// (rows = pixels) and sequence concatenation (rows = batch items).
extern "C" __global__ void det_copy_block(const T* __restrict__ src, T* __restrict__ dst, i64 rows, i64 len,
                                          i64 src_stride, i64 src_off, i64 dst_stride, i64 dst_off) {
    DET_LOOP(i, rows * len) {
        i64 r = i / len, j = i % len;
        dst[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j];
    }
}

// a * b with b of C channels or one channel broadcast.
extern "C" __global__ void det_mul(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, i64 P, int C,
                                   int b_channels) {
    DET_LOOP(i, P * C) {
        float s = b_channels == 1 ? ldf(b[i / C]) : ldf(b[i]);
        y[i] = stf(ldf(a[i]) * s);
    }
}

extern "C" __global__ void det_gated_sum(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ g,
                                         T* __restrict__ y, i64 P, int C) {
    DET_LOOP(i, P * C) {
        i64 p = i / C;
        int c = (int)(i % C);
        const T* gp = g + p * 2 * C;
        float v = det_sigmoid(ldf(gp[c])) * ldf(a[i]) + det_sigmoid(ldf(gp[C + c])) * ldf(b[i]);
        y[i] = stf(v);
    }
}

// Multi-head attention, one warp per (batch item, head, query row). Shared memory per
// warp: the query's d values, then Lk scores.
extern "C" __global__ void det_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         T* __restrict__ y, int B, int Lq, int Lk, int C, int heads, float scale) {
    extern __shared__ float det_smem[];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int d = C / heads;
    float* qs = det_smem + (i64)warp * (d + Lk);
    float* s = qs + d;
    i64 task = (i64)blockIdx.x * (blockDim.x >> 5) + warp;
    if (task >= (i64)B * heads * Lq) return;
    int i = (int)(task % Lq);
    int h = (int)((task / Lq) % heads);
    i64 b = task / ((i64)Lq * heads);
    const T* qrow = q + (b * Lq + i) * C + h * d;
    for (int t = lane; t < d; t += 32) qs[t] = ldf(qrow[t]);
    __syncwarp();
    float m = DET_NEG_INF;
    for (int j = lane; j < Lk; j += 32) {
        const T* krow = k + (b * Lk + j) * C + h * d;
        float acc = 0.0f;
        for (int t = 0; t < d; t++) acc += qs[t] * ldf(krow[t]);
        acc *= scale;
        s[j] = acc;
        m = fmaxf(m, acc);
    }
    m = det_warp_max(m);
    float z = 0.0f;
    for (int j = lane; j < Lk; j += 32) {
        float e = expf(s[j] - m);
        s[j] = e;
        z += e;
    }
    z = det_warp_sum(z);
    __syncwarp();
    float inv = 1.0f / z;
    for (int t = lane; t < d; t += 32) {
        float acc = 0.0f;
        for (int j = 0; j < Lk; j++) acc += s[j] * inv * ldf(v[(b * Lk + j) * C + h * d + t]);
        y[(b * Lq + i) * C + h * d + t] = stf(acc);
    }
}

// Multi-scale deformable attention: one warp per (query row, head), lanes over the
// head's channels (up to 128). Levels (at most 4) come as (height, width, first row,
// points) quadruples in `lv`.
struct DetLevels {
    int v[16];
};

extern "C" __global__ void det_deformable(const T* __restrict__ value, const T* __restrict__ off,
                                          const T* __restrict__ logits, const T* __restrict__ boxes,
                                          T* __restrict__ y, int B, int Q, int C, int heads, int S, int levels,
                                          float offset_scale, int discrete, DetLevels lv) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    i64 task = (i64)blockIdx.x * (blockDim.x >> 5) + warp;
    if (task >= (i64)B * Q * heads) return;
    int h = (int)(task % heads);
    i64 row = task / heads;
    i64 bi = row / Q;
    int d = C / heads;
    int P = 0;
    for (int l = 0; l < levels; l++) P += lv.v[l * 4 + 3];
    const T* lg = logits + row * heads * P + h * P;
    const T* of = off + (row * heads * P + (i64)h * P) * 2;
    float bx0 = ldf(boxes[row * 4 + 0]), bx1 = ldf(boxes[row * 4 + 1]);
    float bx2 = ldf(boxes[row * 4 + 2]), bx3 = ldf(boxes[row * 4 + 3]);
    float m = DET_NEG_INF;
    for (int p = 0; p < P; p++) m = fmaxf(m, ldf(lg[p]));
    float z = 0.0f;
    for (int p = 0; p < P; p++) z += expf(ldf(lg[p]) - m);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int p = 0;
    for (int l = 0; l < levels; l++) {
        int lh = lv.v[l * 4], lw = lv.v[l * 4 + 1], start = lv.v[l * 4 + 2], np = lv.v[l * 4 + 3];
        float sc = 1.0f / (float)np;
        const T* level = value + (bi * S + start) * C + h * d;
        for (int e = 0; e < np; e++, p++) {
            float w = expf(ldf(lg[p]) - m) / z;
            float ox = ldf(of[p * 2]), oy = ldf(of[p * 2 + 1]);
            // offset * (1/n) * wh * offset_scale, in PyTorch's order.
            float lx = __fadd_rn(bx0, __fmul_rn(__fmul_rn(__fmul_rn(ox, sc), bx2), offset_scale));
            float ly = __fadd_rn(bx1, __fmul_rn(__fmul_rn(__fmul_rn(oy, sc), bx3), offset_scale));
            int ys[4], xs[4];
            float ws[4];
            int taps;
            if (discrete) {
                long long xi = (long long)__fadd_rn(__fmul_rn(lx, (float)lw), 0.5f);
                long long yi = (long long)__fadd_rn(__fmul_rn(ly, (float)lh), 0.5f);
                xs[0] = (int)min(max(xi, 0LL), (long long)(lw - 1));
                ys[0] = (int)min(max(yi, 0LL), (long long)(lh - 1));
                ws[0] = w;
                taps = 1;
            } else {
                float gx = __fsub_rn(__fmul_rn(2.0f, lx), 1.0f);
                float gy = __fsub_rn(__fmul_rn(2.0f, ly), 1.0f);
                float ix = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(gx, 1.0f), (float)lw), 1.0f), 2.0f);
                float iy = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(gy, 1.0f), (float)lh), 1.0f), 2.0f);
                float x0 = floorf(ix), y0 = floorf(iy);
                float fx = ix - x0, fy = iy - y0;
                int x0i = (int)x0, y0i = (int)y0;
                xs[0] = x0i; ys[0] = y0i; ws[0] = w * (1.0f - fx) * (1.0f - fy);
                xs[1] = x0i + 1; ys[1] = y0i; ws[1] = w * fx * (1.0f - fy);
                xs[2] = x0i; ys[2] = y0i + 1; ws[2] = w * (1.0f - fx) * fy;
                xs[3] = x0i + 1; ys[3] = y0i + 1; ws[3] = w * fx * fy;
                taps = 4;
            }
            for (int t = 0; t < taps; t++) {
                if (ws[t] == 0.0f || xs[t] < 0 || ys[t] < 0 || xs[t] >= lw || ys[t] >= lh) continue;
                const T* src = level + ((i64)ys[t] * lw + xs[t]) * C;
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    int c = lane + 32 * u;
                    if (c < d) acc[u] += ws[t] * ldf(src[c]);
                }
            }
        }
    }
    T* out = y + row * C + h * d;
#pragma unroll
    for (int u = 0; u < 4; u++) {
        int c = lane + 32 * u;
        if (c < d) out[c] = stf(acc[u]);
    }
}

// Per row, the largest channel (NaN ignored, as Rust's f32::max), in fp32.
extern "C" __global__ void det_row_max(const T* __restrict__ x, float* __restrict__ y, i64 rows, int C) {
    DET_LOOP(r, rows) {
        float m = DET_NEG_INF;
        for (int c = 0; c < C; c++) m = fmaxf(m, ldf(x[r * C + c]));
        y[r] = m;
    }
}

// y[b, j, :] = x[b, idx[b, j], :].
extern "C" __global__ void det_gather(const T* __restrict__ x, const int* __restrict__ idx, T* __restrict__ y, int B,
                                      int L, int K, int C) {
    DET_LOOP(i, (i64)B * K * C) {
        int c = (int)(i % C);
        i64 r = i / C;
        i64 b = r / K;
        y[i] = x[(b * L + idx[r]) * C + c];
    }
}

// sigmoid(delta + inverse_sigmoid(box)), DETR's inverse sigmoid with eps 1e-5.
extern "C" __global__ void det_refine(const T* __restrict__ delta, const T* __restrict__ boxes, T* __restrict__ y,
                                      i64 n) {
    DET_LOOP(i, n) {
        float b = fminf(fmaxf(ldf(boxes[i]), 0.0f), 1.0f);
        float inv = logf(fmaxf(b, 1e-5f) / fmaxf(1.0f - b, 1e-5f));
        y[i] = stf(det_sigmoid(ldf(delta[i]) + inv));
    }
}

// Softmax over `bins` values, written to p (bins <= 128).
__device__ void det_softmax(const T* x, float* p, int bins) {
    float m = DET_NEG_INF;
    for (int j = 0; j < bins; j++) m = fmaxf(m, ldf(x[j]));
    float z = 0.0f;
    for (int j = 0; j < bins; j++) {
        p[j] = expf(ldf(x[j]) - m);
        z += p[j];
    }
    for (int j = 0; j < bins; j++) p[j] /= z;
}

// FDR: expected distance per side under `project`, then distance2bbox around the
// cxcywh reference. One thread per row.
extern "C" __global__ void det_distribution(const T* __restrict__ corners, const T* __restrict__ ref,
                                            const float* __restrict__ project, T* __restrict__ y, i64 rows, int bins,
                                            float reg_scale) {
    float p[128];
    float rs = fabsf(reg_scale);
    DET_LOOP(r, rows) {
        float dist[4];
        for (int side = 0; side < 4; side++) {
            det_softmax(corners + (r * 4 + side) * bins, p, bins);
            float s = 0.0f;
            for (int j = 0; j < bins; j++) s += p[j] * project[j];
            dist[side] = s;
        }
        float r0 = ldf(ref[r * 4]), r1 = ldf(ref[r * 4 + 1]), r2 = ldf(ref[r * 4 + 2]), r3 = ldf(ref[r * 4 + 3]);
        float x1 = r0 - (0.5f * rs + dist[0]) * (r2 / rs);
        float y1 = r1 - (0.5f * rs + dist[1]) * (r3 / rs);
        float x2 = r0 + (0.5f * rs + dist[2]) * (r2 / rs);
        float y2 = r1 + (0.5f * rs + dist[3]) * (r3 / rs);
        y[r * 4] = stf((x1 + x2) / 2.0f);
        y[r * 4 + 1] = stf((y1 + y2) / 2.0f);
        y[r * 4 + 2] = stf(x2 - x1);
        y[r * 4 + 3] = stf(y2 - y1);
    }
}

// LQE statistics: per (row, side) the top_k bin probabilities, largest first, then
// their mean. One thread per (row, side).
extern "C" __global__ void det_corner_stats(const T* __restrict__ corners, T* __restrict__ y, i64 rows, int bins,
                                            int top_k) {
    float p[128];
    int per = top_k + 1;
    DET_LOOP(i, rows * 4) {
        det_softmax(corners + i * bins, p, bins);
        T* out = y + i * per;
        float sum = 0.0f;
        for (int t = 0; t < top_k; t++) {
            int best = 0;
            for (int j = 1; j < bins; j++)
                if (p[j] > p[best]) best = j;
            out[t] = stf(p[best]);
            sum += p[best];
            p[best] = -1.0f;
        }
        out[top_k] = stf(sum / (float)top_k);
    }
}

// Storage type -> fp32 (downloads).
extern "C" __global__ void det_to_f32(const T* __restrict__ x, float* __restrict__ y, i64 n) {
    DET_LOOP(i, n) { y[i] = ldf(x[i]); }
}

// Whether score a (index ia) ranks before score b (index ib): larger first, NaN first,
// ties by lower index (the CPU backend's stable sort and torch.topk's order).
__device__ __forceinline__ bool det_before(float a, int ia, float b, int ib) {
    bool na = isnan(a), nb = isnan(b);
    if (na != nb) return na;
    if (!na && a != b) return a > b;
    return ia < ib;
}

// Top-k by ranking: each thread counts the rows ranked before its own; rows with rank
// below k write their index at that rank. grid (ceil(L / blockDim), B), the image's
// scores staged in shared memory (L floats).
extern "C" __global__ void det_topk_rank(const float* __restrict__ scores, int* __restrict__ idx, int L, int K) {
    extern __shared__ float det_scores[];
    const float* s = scores + (i64)blockIdx.y * L;
    for (int j = threadIdx.x; j < L; j += blockDim.x) det_scores[j] = s[j];
    __syncthreads();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= L) return;
    float v = det_scores[i];
    int rank = 0;
    for (int j = 0; j < L; j++) rank += det_before(det_scores[j], j, v, i);
    if (rank < K) idx[(i64)blockIdx.y * K + rank] = i;
}

// NCHW f32 (graph input staging) -> NHWC storage type.
extern "C" __global__ void det_from_nchw(const float* __restrict__ x, T* __restrict__ y, int N, int C, i64 HW) {
    DET_LOOP(i, (i64)N * C * HW) {
        int c = (int)(i % C);
        i64 p = (i / C) % HW;
        i64 n = i / ((i64)C * HW);
        y[i] = stf(x[(n * C + c) * HW + p]);
    }
}
