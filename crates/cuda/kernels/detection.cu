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

// 16-byte vector twins of det_pad / det_max_pool / det_upsample, for channel counts
// whose rows are whole vectors (CV vectors of 16 / sizeof(T) channels per pixel): same
// values, one vector per thread instead of one element.
extern "C" __global__ void det_pad_vec(const uint4* __restrict__ x, uint4* __restrict__ y, int N, int H, int W,
                                       int CV, int top, int left, int OH, int OW) {
    DET_LOOP(i, (i64)N * OH * OW * CV) {
        int c = (int)(i % CV);
        i64 r = i / CV;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        int iy = oy - top, ix = ox - left;
        y[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((n * H + iy) * W + ix) * CV + c]
                                                          : make_uint4(0, 0, 0, 0);
    }
}

// Output rows LDV vectors apart (CV for a whole tensor, more for channels of a
// concatenation).
extern "C" __global__ void det_max_pool_vec(const uint4* __restrict__ x, uint4* __restrict__ y, int N, int H,
                                            int W, int CV, int OH, int OW, int k, int s, int LDV) {
    const int V = 16 / sizeof(T);
    DET_LOOP(i, (i64)N * OH * OW * CV) {
        int c = (int)(i % CV);
        i64 r = i / CV;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        float m[16 / sizeof(T)];
#pragma unroll
        for (int e = 0; e < V; e++) m[e] = DET_NEG_INF;
        for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
                uint4 v = x[((n * H + oy * s + ky) * W + ox * s + kx) * CV + c];
                const T* ve = reinterpret_cast<const T*>(&v);
#pragma unroll
                for (int e = 0; e < V; e++) {
                    float f = ldf(ve[e]);
                    if (f > m[e] || isnan(f)) m[e] = f;
                }
            }
        uint4 out;
        T* oe = reinterpret_cast<T*>(&out);
#pragma unroll
        for (int e = 0; e < V; e++) oe[e] = stf(m[e]);
        y[r * LDV + c] = out;
    }
}

extern "C" __global__ void det_upsample_vec(const uint4* __restrict__ x, uint4* __restrict__ y, int N, int H,
                                            int W, int CV, int f) {
    int OH = H * f, OW = W * f;
    DET_LOOP(i, (i64)N * OH * OW * CV) {
        int c = (int)(i % CV);
        i64 r = i / CV;
        int ox = (int)(r % OW);
        int oy = (int)((r / OW) % OH);
        i64 n = r / ((i64)OW * OH);
        y[i] = x[((n * H + oy / f) * W + ox / f) * CV + c];
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

// Tensor-core multi-head attention for 16-bit storage (sm_80+; the host dispatches it
// for fp16/bf16 with a head size D in 16..128, D % 16 == 0, and 16-byte aligned
// pointers; anything else takes det_attention). Flash-attention style: one block of 4
// warps per (image, head, tile of 64 query rows), blocks flattened as
// ((b * heads + h) * q_tiles + tile); each warp owns 16 query rows and holds their Q
// fragments in registers. Key/value tiles of KT rows stream through shared memory
// (cp.async, two stages; rows past Lk are zero-filled). Per tile: S = Q K^T (mma
// m16n8k16, fp32 accumulators), times `scale` in fp32, keys past Lk masked to -inf,
// online softmax in fp32 (running row max, per-thread partial row sums, O rescaled by
// exp(m_old - m_new)), P rounded to T, O += P V with O in fp32 registers. The output is
// O / sum, written for rows < Lq only. Fragment layouts (g = lane / 4, t = lane % 4):
// A (16x16) a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
// B (16x8) b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C (16x8) c0,c1 = (g, 2t..2t+1),
// c2,c3 = (g+8, 2t..). So two adjacent 8-key tiles of S are one A fragment of P.

#define DET_TC_ROWS 64  // query rows per block (16 per warp)
#define DET_TC_THREADS 128

// The storage type's 16-bit pair packing and mma instruction; fp32 has none (the fp32
// module compiles the kernels but the host never launches them there).
template <typename X>
struct DetTc {
    static constexpr bool ok = false;
    static __device__ __forceinline__ unsigned pack(float, float) { return 0u; }
    static __device__ __forceinline__ void mma(float*, const unsigned*, unsigned, unsigned) {}
};

#ifdef __CUDA_FP16_H__
template <>
struct DetTc<__half> {
    static constexpr bool ok = true;
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 p = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&p);
    }
    static __device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};
#endif

#ifdef __CUDA_BF16_H__
template <>
struct DetTc<__nv_bfloat16> {
    static constexpr bool ok = true;
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&p);
    }
    static __device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};
#endif

// smem_addr, cp_async16, cp_async_commit, cp_async_wait: math.cu.

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void det_tc_ldsm4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
#endif
}

// The same, each matrix transposed: lane (g, t) gets rows 2t and 2t+1 of column g.
__device__ __forceinline__ void det_tc_ldsm4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                               unsigned& r3) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
#endif
}

// One block of the tensor-core attention, head size D, KT keys per tile.
template <int D, int KT>
__device__ __forceinline__ void det_attention_tc(const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v, T* __restrict__ y, int Lq, int Lk,
                                                 int C, int heads, float scale) {
#if __CUDA_ARCH__ >= 800
    if (!DetTc<T>::ok) return;
    constexpr int LD = D + 8;  // shared row stride (elements): 8 rows of a ldmatrix hit 8 bank groups
    constexpr int KS = D / 16;  // k-steps of Q K^T
    constexpr int NT = KT / 8;  // 8-key tiles of S
    constexpr int ND = D / 8;   // 8-column tiles of O
    constexpr int CH = D / 8;   // 16-byte chunks per K/V row
    __shared__ __align__(16) unsigned short kv[2][2][KT * LD];  // [stage][K, V][row * LD + col]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int q_tiles = (Lq + DET_TC_ROWS - 1) / DET_TC_ROWS;
    const int tile = (int)(blockIdx.x % q_tiles);
    const int bh = (int)(blockIdx.x / q_tiles);
    const int h = bh % heads;
    const i64 b = bh / heads;
    const T* kb = k + b * Lk * (i64)C + h * D;
    const T* vb = v + b * Lk * (i64)C + h * D;

    // Q fragments of the warp's 16 rows (zeros past Lq).
    const int r0 = tile * DET_TC_ROWS + warp * 16 + g, r1 = r0 + 8;
    unsigned qf[KS][4];
    {
        const T* q0 = q + (b * Lq + (r0 < Lq ? r0 : 0)) * (i64)C + h * D + 2 * t;
        const T* q1 = q + (b * Lq + (r1 < Lq ? r1 : 0)) * (i64)C + h * D + 2 * t;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            qf[kk][0] = r0 < Lq ? *reinterpret_cast<const unsigned*>(q0 + kk * 16) : 0u;
            qf[kk][1] = r1 < Lq ? *reinterpret_cast<const unsigned*>(q1 + kk * 16) : 0u;
            qf[kk][2] = r0 < Lq ? *reinterpret_cast<const unsigned*>(q0 + kk * 16 + 8) : 0u;
            qf[kk][3] = r1 < Lq ? *reinterpret_cast<const unsigned*>(q1 + kk * 16 + 8) : 0u;
        }
    }

    // Issues the copies of key tile `it` into stage `st` (one commit group).
    auto load = [&](int it, int st) {
        const unsigned ks = smem_addr(&kv[st][0][0]), vs = smem_addr(&kv[st][1][0]);
        for (int i = threadIdx.x; i < KT * CH; i += DET_TC_THREADS) {
            const int r = i / CH, c = (i % CH) * 8;
            const int key = it * KT + r;
            const bool in = key < Lk;
            const i64 off = (i64)(in ? key : 0) * C + c;
            const unsigned dst = (unsigned)((r * LD + c) * 2);
            cp_async16(ks + dst, kb + off, in);
            cp_async16(vs + dst, vb + off, in);
        }
        cp_async_commit();
    };

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = DET_NEG_INF, m1 = DET_NEG_INF;  // running max of rows r0, r1
    float l0 = 0.0f, l1 = 0.0f;                // this thread's part of their sums
    // ldmatrix row addresses: lane = 8 * mat + row.
    const int mat = lane >> 3, mrow = lane & 7;
    const int tiles = (Lk + KT - 1) / KT;
    load(0, 0);
    for (int it = 0; it < tiles; it++) {
        const int st = it & 1;
        if (it + 1 < tiles) {
            load(it + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const unsigned ks = smem_addr(&kv[st][0][0]), vs = smem_addr(&kv[st][1][0]);

        // S = Q K^T: matrices (keys +0, d +0), (keys +0, d +8), (keys +8, d +0), (keys +8,
        // d +8) are b0, b1 of one 8-key tile and b0, b1 of the next.
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                const int row = np * 16 + (mat >> 1) * 8 + mrow, col = kk * 16 + (mat & 1) * 8;
                unsigned b0, b1, b2, b3;
                det_tc_ldsm4(ks + (unsigned)((row * LD + col) * 2), b0, b1, b2, b3);
                DetTc<T>::mma(s[2 * np], qf[kk], b0, b1);
                DetTc<T>::mma(s[2 * np + 1], qf[kk], b2, b3);
            }
        }

        // Scale, mask, online softmax (rows r0: s[.][0..1], r1: s[.][2..3]).
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool in = it * KT + n * 8 + 2 * t + e < Lk;
                s[n][e] = in ? s[n][e] * scale : DET_NEG_INF;
                s[n][2 + e] = in ? s[n][2 + e] * scale : DET_NEG_INF;
                mx0 = fmaxf(mx0, s[n][e]);
                mx1 = fmaxf(mx1, s[n][2 + e]);
            }
        }
#pragma unroll
        for (int o2 = 1; o2 < 4; o2 <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
        }
        // Every tile holds a key < Lk, so the maxima are finite for finite inputs; the
        // guard keeps -inf - -inf (NaN) out otherwise.
        const float base0 = mx0 == DET_NEG_INF ? 0.0f : mx0;
        const float base1 = mx1 == DET_NEG_INF ? 0.0f : mx1;
        const float a0 = expf(m0 - base0), a1 = expf(m1 - base1);
        m0 = mx0;
        m1 = mx1;
        l0 *= a0;
        l1 *= a1;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            o[n][0] *= a0;
            o[n][1] *= a0;
            o[n][2] *= a1;
            o[n][3] *= a1;
        }
        unsigned pf[NT / 2][4];
#pragma unroll
        for (int n = 0; n < NT; n++) {
            const float p0 = expf(s[n][0] - base0), p1 = expf(s[n][1] - base0);
            const float p2 = expf(s[n][2] - base1), p3 = expf(s[n][3] - base1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pf[n / 2][(n & 1) * 2] = DetTc<T>::pack(p0, p1);
            pf[n / 2][(n & 1) * 2 + 1] = DetTc<T>::pack(p2, p3);
        }

        // O += P V: matrices (keys +0, d +0), (keys +8, d +0), (keys +0, d +8), (keys +8,
        // d +8), transposed, are b0, b1 of one 8-column tile and b0, b1 of the next.
#pragma unroll
        for (int j = 0; j < KT / 16; j++) {
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                const int row = j * 16 + (mat & 1) * 8 + mrow, col = dp * 16 + (mat >> 1) * 8;
                unsigned b0, b1, b2, b3;
                det_tc_ldsm4_t(vs + (unsigned)((row * LD + col) * 2), b0, b1, b2, b3);
                DetTc<T>::mma(o[2 * dp], pf[j], b0, b1);
                DetTc<T>::mma(o[2 * dp + 1], pf[j], b2, b3);
            }
        }
        __syncthreads();  // the next iteration refills this stage
    }

#pragma unroll
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, o2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o2);
    }
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    T* y0 = y + (b * Lq + r0) * (i64)C + h * D + 2 * t;
    T* y1 = y + (b * Lq + r1) * (i64)C + h * D + 2 * t;
#pragma unroll
    for (int n = 0; n < ND; n++) {
        if (r0 < Lq) *reinterpret_cast<unsigned*>(y0 + n * 8) = DetTc<T>::pack(o[n][0] * inv0, o[n][1] * inv0);
        if (r1 < Lq) *reinterpret_cast<unsigned*>(y1 + n * 8) = DetTc<T>::pack(o[n][2] * inv1, o[n][3] * inv1);
    }
#endif
}

// Entry points per head size (KT = 64 keys per tile up to D = 64, else 32: shared memory
// stays under 48 KiB). Arguments: q [B, Lq, C], k and v [B, Lk, C], y [B, Lq, C].
extern "C" __global__ void det_attention_tc16(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              T* __restrict__ y, int Lq, int Lk, int C, int heads, float scale) {
    det_attention_tc<16, 64>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc32(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              T* __restrict__ y, int Lq, int Lk, int C, int heads, float scale) {
    det_attention_tc<32, 64>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc48(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              T* __restrict__ y, int Lq, int Lk, int C, int heads, float scale) {
    det_attention_tc<48, 64>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc64(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              T* __restrict__ y, int Lq, int Lk, int C, int heads, float scale) {
    det_attention_tc<64, 64>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc80(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              T* __restrict__ y, int Lq, int Lk, int C, int heads, float scale) {
    det_attention_tc<80, 32>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc96(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              T* __restrict__ y, int Lq, int Lk, int C, int heads, float scale) {
    det_attention_tc<96, 32>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc112(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, T* __restrict__ y, int Lq, int Lk, int C,
                                               int heads, float scale) {
    det_attention_tc<112, 32>(q, k, v, y, Lq, Lk, C, heads, scale);
}
extern "C" __global__ void det_attention_tc128(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, T* __restrict__ y, int Lq, int Lk, int C,
                                               int heads, float scale) {
    det_attention_tc<128, 32>(q, k, v, y, Lq, Lk, C, heads, scale);
}

// Multi-scale deformable attention: one warp per (query row, head), lanes over the
// head's channels (up to 128). Levels (at most 4) come as (height, width, first row,
// points) quadruples in `lv`.
#define DET_MAX_LEVELS 4
struct DetLevels {
    int v[4 * DET_MAX_LEVELS];
};

// One (query row, head) task of the deformable attention: its attention logits and
// offsets, the reference box, and the softmax's max and sum over the P points.
struct DetDeformTask {
    i64 row, bi;
    int h, d, P;
    const T* lg;
    const T* of;
    float bx0, bx1, bx2, bx3, m, z;
};

__device__ __forceinline__ DetDeformTask det_deform_task(i64 task, const T* __restrict__ off,
                                                         const T* __restrict__ logits,
                                                         const T* __restrict__ boxes, int Q, int C, int heads,
                                                         int levels, const DetLevels& lv,
                                                         bool lane_points = false) {
    // B * Q * heads < 2^31 (checked on the host): 32-bit division is a few
    // instructions where a 64-bit one is a long call.
    DetDeformTask t;
    const int task32 = (int)task;
    t.h = task32 % heads;
    t.row = task32 / heads;
    t.bi = (int)t.row / Q;
    t.d = C / heads;
    t.P = 0;
#pragma unroll
    for (int l = 0; l < DET_MAX_LEVELS; l++)
        if (l < levels) t.P += lv.v[l * 4 + 3];
    t.lg = logits + t.row * heads * t.P + t.h * t.P;
    t.of = off + (t.row * heads * t.P + (i64)t.h * t.P) * 2;
    t.bx0 = ldf(boxes[t.row * 4 + 0]);
    t.bx1 = ldf(boxes[t.row * 4 + 1]);
    t.bx2 = ldf(boxes[t.row * 4 + 2]);
    t.bx3 = ldf(boxes[t.row * 4 + 3]);
    t.m = DET_NEG_INF;
    t.z = 0.0f;
    // With at most 32 points the vector kernel's lanes do the softmax together
    // (det_deform_lane_point); otherwise each lane walks the points.
    if (!lane_points) {
        for (int p = 0; p < t.P; p++) t.m = fmaxf(t.m, ldf(t.lg[p]));
        for (int p = 0; p < t.P; p++) t.z += expf(ldf(t.lg[p]) - t.m);
    }
    return t;
}

// Point p's attention weight and where it samples, in [0, 1] units: offset * (1/n) *
// wh * offset_scale added to the box centre, in PyTorch's order.
__device__ __forceinline__ float det_deform_point(const DetDeformTask& t, int p, float sc, float offset_scale,
                                                  float* lx, float* ly) {
    const float ox = ldf(t.of[p * 2]), oy = ldf(t.of[p * 2 + 1]);
    *lx = __fadd_rn(t.bx0, __fmul_rn(__fmul_rn(__fmul_rn(ox, sc), t.bx2), offset_scale));
    *ly = __fadd_rn(t.bx1, __fmul_rn(__fmul_rn(__fmul_rn(oy, sc), t.bx3), offset_scale));
    return expf(ldf(t.lg[p]) - t.m) / t.z;
}

// Calls f(level, lw, lh, w, lx, ly) for every sampling point of task t, level by level:
// the level's first value row for this head, its width and height, the point's
// attention weight and where it samples.
template <class F>
__device__ __forceinline__ void det_deform_points(const DetDeformTask& t, const T* __restrict__ value, int S,
                                                  int C, int levels, const DetLevels& lv, float offset_scale,
                                                  F f) {
    int p = 0;
    // Constant level indices keep `lv` in parameter space (no local copy).
#pragma unroll
    for (int l = 0; l < DET_MAX_LEVELS; l++) {
        if (l >= levels) break;
        int lh = lv.v[l * 4], lw = lv.v[l * 4 + 1], start = lv.v[l * 4 + 2], np = lv.v[l * 4 + 3];
        float sc = 1.0f / (float)np;
        const T* level = value + (t.bi * S + start) * C + t.h * t.d;
        for (int e = 0; e < np; e++, p++) {
            float lx, ly;
            const float w = det_deform_point(t, p, sc, offset_scale, &lx, &ly);
            f(level, lw, lh, w, lx, ly);
        }
    }
}

// The discrete sample's pixel: the nearest one, clamped to the map.
__device__ __forceinline__ void det_deform_nearest(float lx, float ly, int lw, int lh, int* x, int* y) {
    const long long xi = (long long)__fadd_rn(__fmul_rn(lx, (float)lw), 0.5f);
    const long long yi = (long long)__fadd_rn(__fmul_rn(ly, (float)lh), 0.5f);
    *x = (int)min(max(xi, 0LL), (long long)(lw - 1));
    *y = (int)min(max(yi, 0LL), (long long)(lh - 1));
}

// The bilinear sample's top-left pixel and fractions (grid_sample, align_corners=False).
__device__ __forceinline__ void det_deform_bilinear(float lx, float ly, int lw, int lh, int* x0, int* y0,
                                                    float* fx, float* fy) {
    const float gx = __fsub_rn(__fmul_rn(2.0f, lx), 1.0f);
    const float gy = __fsub_rn(__fmul_rn(2.0f, ly), 1.0f);
    const float ix = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(gx, 1.0f), (float)lw), 1.0f), 2.0f);
    const float iy = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(gy, 1.0f), (float)lh), 1.0f), 2.0f);
    const float xf = floorf(ix), yf = floorf(iy);
    *fx = ix - xf;
    *fy = iy - yf;
    *x0 = (int)xf;
    *y0 = (int)yf;
}

extern "C" __global__ void det_deformable(const T* __restrict__ value, const T* __restrict__ off,
                                          const T* __restrict__ logits, const T* __restrict__ boxes,
                                          T* __restrict__ y, int B, int Q, int C, int heads, int S, int levels,
                                          float offset_scale, int discrete, DetLevels lv) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    i64 task = (i64)blockIdx.x * (blockDim.x >> 5) + warp;
    if (task >= (i64)B * Q * heads) return;
    const DetDeformTask t = det_deform_task(task, off, logits, boxes, Q, C, heads, levels, lv);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    det_deform_points(t, value, S, C, levels, lv, offset_scale,
                      [&](const T* level, int lw, int lh, float w, float lx, float ly) {
        int ys[4], xs[4];
        float ws[4];
        int taps;
        if (discrete) {
            det_deform_nearest(lx, ly, lw, lh, &xs[0], &ys[0]);
            ws[0] = w;
            taps = 1;
        } else {
            int x0i, y0i;
            float fx, fy;
            det_deform_bilinear(lx, ly, lw, lh, &x0i, &y0i, &fx, &fy);
            xs[0] = x0i; ys[0] = y0i; ws[0] = w * (1.0f - fx) * (1.0f - fy);
            xs[1] = x0i + 1; ys[1] = y0i; ws[1] = w * fx * (1.0f - fy);
            xs[2] = x0i; ys[2] = y0i + 1; ws[2] = w * (1.0f - fx) * fy;
            xs[3] = x0i + 1; ys[3] = y0i + 1; ws[3] = w * fx * fy;
            taps = 4;
        }
        for (int k = 0; k < taps; k++) {
            if (ws[k] == 0.0f || xs[k] < 0 || ys[k] < 0 || xs[k] >= lw || ys[k] >= lh) continue;
            const T* src = level + ((i64)ys[k] * lw + xs[k]) * C;
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int c = lane + 32 * u;
                if (c < t.d) acc[u] += ws[k] * ldf(src[c]);
            }
        }
    });
    T* out = y + t.row * C + t.h * t.d;
#pragma unroll
    for (int u = 0; u < 4; u++) {
        int c = lane + 32 * u;
        if (c < t.d) out[c] = stf(acc[u]);
    }
}

// Four consecutive channels of T as floats (8- or 16-byte load; p aligned to it).
__device__ __forceinline__ void det_load4(const T* p, float* v) {
    if (sizeof(T) == 2) {
        const uint2 r = *reinterpret_cast<const uint2*>(p);
        const T* t = reinterpret_cast<const T*>(&r);
        for (int j = 0; j < 4; j++) v[j] = ldf(t[j]);
    } else {
        const float4 r = *reinterpret_cast<const float4*>(p);
        v[0] = r.x;
        v[1] = r.y;
        v[2] = r.z;
        v[3] = r.w;
    }
}

// det_deformable with the warp's lanes in four groups of eight: group g takes tap g of
// every bilinear sample (x0 + (g & 1), y0 + (g >> 1): the sample's four taps in one load
// instruction), each lane four consecutive channels per 32-channel chunk; the groups'
// sums meet by shuffles at the end. The sampling arithmetic and each tap's weight are
// det_deformable's; only the order of the final additions differs. Heads of d % 4 == 0
// channels (up to 128) with C % 4 == 0.
// Where a point samples in pixels of its level: the nearest pixel (a, b) when discrete,
// else the bilinear top-left pixel (a, b) and fractions (fx, fy).
struct DetSample {
    int a, b;
    float fx, fy;
};

__device__ __forceinline__ DetSample det_deform_sample(float lx, float ly, int lw, int lh, int discrete) {
    DetSample q;
    q.fx = 0.0f;
    q.fy = 0.0f;
    if (discrete)
        det_deform_nearest(lx, ly, lw, lh, &q.a, &q.b);
    else
        det_deform_bilinear(lx, ly, lw, lh, &q.a, &q.b, &q.fx, &q.fy);
    return q;
}

// Lane p (< P <= 32) of the task's warp loads point p's logit and offsets, the softmax
// over the points runs as warp reductions, and the lane ends with its point's attention
// weight and sample (det_deform_point's and det_deform_sample's arithmetic): one round
// trip to memory and one pass of the arithmetic per point instead of per lane and point.
__device__ __forceinline__ DetSample det_deform_lane_point(const DetDeformTask& t, int lane, int levels,
                                                           const DetLevels& lv, float offset_scale, int discrete,
                                                           float* w) {
    const bool valid = lane < t.P;
    const float lg = valid ? ldf(t.lg[lane]) : DET_NEG_INF;
    const float ox = valid ? ldf(t.of[lane * 2]) : 0.0f;
    const float oy = valid ? ldf(t.of[lane * 2 + 1]) : 0.0f;
    const float m = det_warp_max(lg);
    const float e = valid ? expf(lg - m) : 0.0f;
    const float z = det_warp_sum(e);
    float sc = 1.0f;
    int lw = 1, lh = 1;
    int first = 0;
#pragma unroll
    for (int l = 0; l < DET_MAX_LEVELS; l++) {
        if (l >= levels) break;
        const int np = lv.v[l * 4 + 3];
        if (lane >= first && lane < first + np) {
            sc = 1.0f / (float)np;
            lh = lv.v[l * 4];
            lw = lv.v[l * 4 + 1];
        }
        first += np;
    }
    const float lx = __fadd_rn(t.bx0, __fmul_rn(__fmul_rn(__fmul_rn(ox, sc), t.bx2), offset_scale));
    const float ly = __fadd_rn(t.bx1, __fmul_rn(__fmul_rn(__fmul_rn(oy, sc), t.bx3), offset_scale));
    *w = e / z;
    return det_deform_sample(lx, ly, lw, lh, discrete);
}

// Tap g (0..3) of a sample with attention weight w: its pixel and weight (the nearest
// pixel counts once, as tap 0).
__device__ __forceinline__ void det_deform_tap(const DetSample& q, float w, int discrete, int g, int* xt, int* yt,
                                               float* wt) {
    if (discrete) {
        *xt = q.a;
        *yt = q.b;
        *wt = g == 0 ? w : 0.0f;
    } else {
        *xt = q.a + (g & 1);
        *yt = q.b + (g >> 1);
        *wt = w * ((g & 1) ? q.fx : 1.0f - q.fx) * ((g >> 1) ? q.fy : 1.0f - q.fy);
    }
}

// Adds wt x pixel (xt, yt) of a level, four channels per lane for up to four 32-channel
// groups. Every load is issued, from an address clamped into the map and into the head
// (channels past d re-read the head's last four), whether or not it counts, so that
// consecutive points' loads can be in flight together; a tap outside the map or with
// zero weight, and channels past d, add nothing (as if skipped). Offsets within an
// image's values fit 32 bits (S * C < 2^31, checked on the host).
template <int G>
__device__ __forceinline__ void det_deform_tap4(const T* __restrict__ level, int lw, int lh, int xt, int yt,
                                                float wt, int sub, int d, int C, float acc[G][4]) {
    const bool counts = wt != 0.0f && xt >= 0 && yt >= 0 && xt < lw && yt < lh;
    const T* src = level + (min(max(yt, 0), lh - 1) * lw + min(max(xt, 0), lw - 1)) * C;
#pragma unroll
    for (int u = 0; u < G; u++) {
        const int c = 32 * u + 4 * sub;
        float v[4];
        det_load4(src + min(c, d - 4), v);
        if (counts && c < d) {
#pragma unroll
            for (int j = 0; j < 4; j++) acc[u][j] += wt * v[j];
        }
    }
}

// The vector kernel for heads of up to 32 G channels (G = 1 for D-FINE's 32-channel
// heads: one accumulator group, no idle group loops).
template <int G>
__device__ __forceinline__ void det_deformable_vec_body(const T* __restrict__ value, const T* __restrict__ off,
                                                        const T* __restrict__ logits, const T* __restrict__ boxes,
                                                        T* __restrict__ y, int B, int Q, int C, int heads, int S,
                                                        int levels, float offset_scale, int discrete,
                                                        const DetLevels& lv) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    i64 task = (i64)blockIdx.x * (blockDim.x >> 5) + warp;
    if (task >= (i64)B * Q * heads) return;
    const int g = lane >> 3, sub = lane & 7;
    int P = 0;
#pragma unroll
    for (int l = 0; l < DET_MAX_LEVELS; l++)
        if (l < levels) P += lv.v[l * 4 + 3];
    const bool lane_points = P <= 32;
    const DetDeformTask t = det_deform_task(task, off, logits, boxes, Q, C, heads, levels, lv, lane_points);
    float acc[G][4];
#pragma unroll
    for (int u = 0; u < G; u++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[u][j] = 0.0f;
    int xt, yt;
    float wt;
    if (lane_points) {
        float pw;
        const DetSample mine = det_deform_lane_point(t, lane, levels, lv, offset_scale, discrete, &pw);
        int p = 0;
        // Constant level indices keep `lv` in parameter space (no local copy).
#pragma unroll
        for (int l = 0; l < DET_MAX_LEVELS; l++) {
            if (l >= levels) break;
            const int lh = lv.v[l * 4], lw = lv.v[l * 4 + 1], start = lv.v[l * 4 + 2], np = lv.v[l * 4 + 3];
            const T* level = value + (t.bi * S + start) * C + t.h * t.d;
#pragma unroll 4
            for (int e = 0; e < np; e++) {
                DetSample q;
                q.a = __shfl_sync(0xffffffffu, mine.a, p + e);
                q.b = __shfl_sync(0xffffffffu, mine.b, p + e);
                q.fx = __shfl_sync(0xffffffffu, mine.fx, p + e);
                q.fy = __shfl_sync(0xffffffffu, mine.fy, p + e);
                const float w = __shfl_sync(0xffffffffu, pw, p + e);
                det_deform_tap(q, w, discrete, g, &xt, &yt, &wt);
                det_deform_tap4<G>(level, lw, lh, xt, yt, wt, sub, t.d, C, acc);
            }
            p += np;
        }
    } else {
        det_deform_points(t, value, S, C, levels, lv, offset_scale,
                          [&](const T* level, int lw, int lh, float w, float lx, float ly) {
            det_deform_tap(det_deform_sample(lx, ly, lw, lh, discrete), w, discrete, g, &xt, &yt, &wt);
            det_deform_tap4<G>(level, lw, lh, xt, yt, wt, sub, t.d, C, acc);
        });
    }
#pragma unroll
    for (int u = 0; u < G; u++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc[u][j] += __shfl_xor_sync(0xffffffffu, acc[u][j], 8);
            acc[u][j] += __shfl_xor_sync(0xffffffffu, acc[u][j], 16);
        }
    if (g != 0) return;
    T* out = y + t.row * C + t.h * t.d;
#pragma unroll
    for (int u = 0; u < G; u++) {
        const int c = 32 * u + 4 * sub;
        if (c < t.d)
#pragma unroll
            for (int j = 0; j < 4; j++) out[c + j] = stf(acc[u][j]);
    }
}

extern "C" __global__ void det_deformable_vec(const T* __restrict__ value, const T* __restrict__ off,
                                              const T* __restrict__ logits, const T* __restrict__ boxes,
                                              T* __restrict__ y, int B, int Q, int C, int heads, int S, int levels,
                                              float offset_scale, int discrete, DetLevels lv) {
    det_deformable_vec_body<4>(value, off, logits, boxes, y, B, Q, C, heads, S, levels, offset_scale, discrete,
                               lv);
}

extern "C" __global__ void det_deformable_vec32(const T* __restrict__ value, const T* __restrict__ off,
                                                const T* __restrict__ logits, const T* __restrict__ boxes,
                                                T* __restrict__ y, int B, int Q, int C, int heads, int S,
                                                int levels, float offset_scale, int discrete, DetLevels lv) {
    det_deformable_vec_body<1>(value, off, logits, boxes, y, B, Q, C, heads, S, levels, offset_scale, discrete,
                               lv);
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

// One image's resized HWC bytes -> the NHWC model input in the storage type: v * scale,
// then (v - mean) / std when `normalize`, with pre_to_float's roundings (preprocess.cu),
// then stored as det_from_nchw stores the f32 staging values.
extern "C" __global__ void det_pixels_to_input(const unsigned char* __restrict__ src, T* __restrict__ dst, i64 n,
                                               float scale, int normalize, float m0, float m1, float m2, float s0,
                                               float s1, float s2) {
    DET_LOOP(i, n) {
        const int c = (int)(i % 3);
        float v = __fmul_rn((float)src[i], scale);
        if (normalize) {
            const float m = c == 0 ? m0 : (c == 1 ? m1 : m2);
            const float s = c == 0 ? s0 : (c == 1 ? s1 : s2);
            v = __fdiv_rn(__fsub_rn(v, m), s);
        }
        dst[i] = stf(v);
    }
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

// The same for 3-channel images with HW % 8 == 0, 8 pixels per thread: two 16-byte loads
// from each channel plane, 24 values stored as whole 16-byte vectors (the element-wise
// kernel above moves 2-byte values and ran at ~1.4 TB/s on D-FINE's input).
extern "C" __global__ void det_from_nchw3x8(const float* __restrict__ x, T* __restrict__ y, int N, i64 HW) {
    const i64 per_image = HW / 8;
    DET_LOOP(g, (i64)N * per_image) {
        const i64 n = g / per_image;
        const i64 p = (g - n * per_image) * 8;
        union {
            T v[24];
            uint4 q[24 * sizeof(T) / 16];
        } out;
#pragma unroll
        for (int c = 0; c < 3; c++) {
            const float4* src = reinterpret_cast<const float4*>(x + (n * 3 + c) * HW + p);
            const float4 a = src[0], b = src[1];
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int j = 0; j < 8; j++) out.v[3 * j + c] = stf(v[j]);
        }
        uint4* dst = reinterpret_cast<uint4*>(y + (n * HW + p) * 3);
#pragma unroll
        for (int i = 0; i < (int)(24 * sizeof(T) / 16); i++) dst[i] = out.q[i];
    }
}

// Output pixels `rows` (flat positions within an image, as f32 values, the same in every
// image) of a 1x1 product set to its bias: the product of a zeroed input pixel
// (crate::detection::masked). y is [images][hw][c].
extern "C" __global__ void det_fill_rows(T* __restrict__ y, const float* __restrict__ rows,
                                         const T* __restrict__ bias, int images, int count, i64 hw, int c) {
    DET_LOOP(i, (i64)images * count * c) {
        const int ch = (int)(i % c);
        const i64 rc = i / c;
        const i64 n = rc / count;
        const int r = (int)(rc - n * count);
        y[(n * hw + (i64)rows[r]) * c + ch] = bias[ch];
    }
}

// ---- Post-processing: per image, the top K of sigmoid(logits) over Q*C ----
// CPU twin: aperture_models::dfine::post_process (scores sorted descending, ties by
// lower flat index, label = index % C, box of query index / C as corners). Scores are
// ranked by key: the f32 score's bits (non-negative floats order as unsigned integers),
// NaN as the largest key (first, as torch.topk).

#define DET_TOPK_ITEMS 24  // keys per thread held in registers (det_topk_detections)
#define DET_TOPK_NAN_KEY 0xffffffffu

// The CPU's 1 / (1 + exp(-x)), each step rounded to f32. The exponential is computed in
// double and rounded once: the correctly rounded expf, as glibc's gives but in rare cases.
__device__ __forceinline__ float det_cpu_sigmoid(float x) {
    const float e = __double2float_rn(exp(-(double)x));
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

// keys[i] = the rank key of sigmoid(logits[i]), over all images.
extern "C" __global__ void det_score_keys(const T* __restrict__ logits, unsigned* __restrict__ keys, i64 n) {
    DET_LOOP(i, n) {
        const float x = ldf(logits[i]);
        keys[i] = isnan(x) ? DET_TOPK_NAN_KEY : __float_as_uint(det_cpu_sigmoid(x));
    }
}

__device__ __forceinline__ int det_warp_scan(int v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

// hist[digit] += 1 for each lane in `active`, one atomic per distinct digit (the scores
// of an image crowd into a few bins, so plain atomics would serialise).
__device__ __forceinline__ void det_hist_add(unsigned* hist, unsigned digit, unsigned active, int lane) {
#if __CUDA_ARCH__ >= 700
    const unsigned peers = __match_any_sync(active, digit);
    if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (unsigned)__popc(peers));
#else
    atomicAdd(&hist[digit], 1u);
#endif
}

// Warp 0: counting from bin 255 down, the bin that holds the need-th largest key and how
// many of its keys are still needed. Lane l sums bins 255 - 8l .. 248 - 8l.
__device__ __forceinline__ void det_pick_bin(const unsigned* hist, int need, int lane, unsigned* digit, int* left) {
    int c[8];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        c[j] = (int)hist[255 - 8 * lane - j];
        sum += c[j];
    }
    const int incl = det_warp_scan(sum, lane);
    int above = incl - sum;
    if (above < need && need <= incl) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (above + c[j] >= need) {
                *digit = 255u - 8u * lane - j;
                *left = need - above;
                break;
            }
            above += c[j];
        }
    }
}

// Shared memory of one selection block besides the winners.
struct DetSelectShared {
    unsigned hist[256];
    int scan[64];
    unsigned pick_digit;
    int pick_need;
};

// The K largest of N keys per block, in any order, into cand_key/cand_idx (shared):
// thread t owns keys t * chunk to (t + 1) * chunk - 1 (`key_at(i)`, held in registers
// when ITEMS > 0, else re-read each pass). Radix select, four passes of 8-bit digits
// from the top, finds the K-th largest key `kth` and how many keys equal to it are taken
// (`need`: those of lowest index). An ordered compaction (a block scan of the per-thread
// counts) puts keys above kth in slots 0 to K - need - 1 and the first `need` keys equal
// to it in the rest. Ends with a barrier.
template <int ITEMS, class KeyAt>
__device__ __forceinline__ void det_select_winners(KeyAt key_at, int N, int K, unsigned* cand_key,
                                                   unsigned* cand_idx, DetSelectShared& sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = (int)(blockDim.x >> 5);
    const int chunk = (N + (int)blockDim.x - 1) / (int)blockDim.x;
    const int first = tid * chunk;
    unsigned reg[ITEMS > 0 ? ITEMS : 1];
    if constexpr (ITEMS > 0) {
#pragma unroll
        for (int t = 0; t < ITEMS; t++) {
            const int i = first + t;
            reg[t] = (t < chunk && i < N) ? key_at(i) : 0u;
        }
    }
    auto key_of = [&](int t, int i) -> unsigned {
        if constexpr (ITEMS > 0) {
            return reg[t];
        } else {
            return i < N ? key_at(i) : 0u;
        }
    };

    // 1. Radix select.
    unsigned prefix = 0u, mask = 0u;
    int need = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = tid; j < 256; j += blockDim.x) sh.hist[j] = 0u;
        __syncthreads();
#pragma unroll
        for (int t = 0; t < (ITEMS > 0 ? ITEMS : chunk); t++) {
            if (t >= chunk) break;  // uniform: every lane takes the same steps
            const int i = first + t;
            const unsigned key = key_of(t, i);
            const bool act = i < N && (key & mask) == prefix;
            const unsigned am = __ballot_sync(0xffffffffu, act);
            if (act) det_hist_add(sh.hist, (key >> shift) & 0xffu, am, lane);
        }
        __syncthreads();
        if (warp == 0) det_pick_bin(sh.hist, need, lane, &sh.pick_digit, &sh.pick_need);
        __syncthreads();
        // Read before the next pass's second barrier, after which warp 0 rewrites them.
        prefix |= sh.pick_digit << shift;
        mask |= 0xffu << shift;
        need = sh.pick_need;
    }
    const unsigned kth = prefix;
    const int gt_total = K - need;

    // 2. Ordered compaction.
    int n_gt = 0, n_eq = 0;
#pragma unroll
    for (int t = 0; t < (ITEMS > 0 ? ITEMS : chunk); t++) {
        if (t >= chunk) break;
        const int i = first + t;
        const unsigned key = key_of(t, i);
        n_gt += (i < N && key > kth) ? 1 : 0;
        n_eq += (i < N && key == kth) ? 1 : 0;
    }
    const int ig = det_warp_scan(n_gt, lane), ie = det_warp_scan(n_eq, lane);
    if (lane == 31) {
        sh.scan[warp] = ig;
        sh.scan[32 + warp] = ie;
    }
    __syncthreads();
    if (warp == 0) {
        const int a = lane < nwarps ? sh.scan[lane] : 0, b = lane < nwarps ? sh.scan[32 + lane] : 0;
        const int sa = det_warp_scan(a, lane), sb = det_warp_scan(b, lane);
        if (lane < nwarps) {
            sh.scan[lane] = sa - a;
            sh.scan[32 + lane] = sb - b;
        }
    }
    __syncthreads();
    int g = sh.scan[warp] + ig - n_gt, e = sh.scan[32 + warp] + ie - n_eq;
#pragma unroll
    for (int t = 0; t < (ITEMS > 0 ? ITEMS : chunk); t++) {
        if (t >= chunk) break;
        const int i = first + t;
        if (i >= N) break;
        const unsigned key = key_of(t, i);
        // The bounds hold by construction; they only keep a broken count in bounds.
        if (key > kth) {
            if (g < gt_total) {
                cand_key[g] = key;
                cand_idx[g] = (unsigned)i;
            }
            g++;
        } else if (key == kth) {
            if (e < need && gt_total + e < K) {
                cand_key[gt_total + e] = key;
                cand_idx[gt_total + e] = (unsigned)i;
            }
            e++;
        }
    }
    __syncthreads();
}

// Rank of winner j among the K: larger key first, ties by lower index.
__device__ __forceinline__ int det_winner_rank(const unsigned* cand_key, const unsigned* cand_idx, int K, int j) {
    const unsigned kj = cand_key[j], ij = cand_idx[j];
    int rank = 0;
    for (int m = 0; m < K; m++) {
        const unsigned km = cand_key[m];
        rank += (km > kj || (km == kj && cand_idx[m] < ij)) ? 1 : 0;
    }
    return rank;
}

// Detection rows of one image's winners: (score, label, x0, y0, x1, y1) with the corners
// normalised, rounded as the CPU's (cx - 0.5 * w) before scaling.
__device__ __forceinline__ void det_write_detections(const unsigned* cand_key, const unsigned* cand_idx,
                                                     const T* __restrict__ boxes, float* __restrict__ out, int N,
                                                     int C, int K) {
    const int Q = N / C;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
        const int rank = det_winner_rank(cand_key, cand_idx, K, j);
        const unsigned kj = cand_key[j], ij = cand_idx[j];
        const int q = (int)(ij / (unsigned)C), label = (int)(ij % (unsigned)C);
        const T* bx = boxes + ((i64)blockIdx.x * Q + q) * 4;
        const float cx = ldf(bx[0]), cy = ldf(bx[1]);
        const float hw = __fmul_rn(0.5f, ldf(bx[2])), hh = __fmul_rn(0.5f, ldf(bx[3]));
        float* o = out + ((i64)blockIdx.x * K + rank) * 6;
        o[0] = __uint_as_float(kj);
        o[1] = (float)label;
        o[2] = __fsub_rn(cx, hw);
        o[3] = __fsub_rn(cy, hh);
        o[4] = __fadd_rn(cx, hw);
        o[5] = __fadd_rn(cy, hh);
    }
}

// keys [B, N] (det_score_keys), boxes [B, N / C, 4] cxcywh, out [B, K, 6]; grid B,
// blockDim a multiple of 32 (at most 1024) with N <= DET_TOPK_ITEMS * blockDim; dynamic
// shared memory 8 * K bytes.
extern "C" __global__ void __launch_bounds__(1024) det_topk_detections(const unsigned* __restrict__ keys, const T* __restrict__ boxes,
                                               float* __restrict__ out, int N, int C, int K) {
    extern __shared__ unsigned det_topk_cand[];
    __shared__ DetSelectShared sh;
    const unsigned* k = keys + (i64)blockIdx.x * N;
    det_select_winners<DET_TOPK_ITEMS>([=](int i) { return k[i]; }, N, K, det_topk_cand, det_topk_cand + K, sh);
    det_write_detections(det_topk_cand, det_topk_cand + K, boxes, out, N, C, K);
}

// The same for any N: keys re-read from global memory (L2) in every pass.
extern "C" __global__ void det_topk_detections_wide(const unsigned* __restrict__ keys, const T* __restrict__ boxes,
                                                    float* __restrict__ out, int N, int C, int K) {
    extern __shared__ unsigned det_topk_cand[];
    __shared__ DetSelectShared sh;
    const unsigned* k = keys + (i64)blockIdx.x * N;
    det_select_winners<0>([=](int i) { return k[i]; }, N, K, det_topk_cand, det_topk_cand + K, sh);
    det_write_detections(det_topk_cand, det_topk_cand + K, boxes, out, N, C, K);
}

// ---- Query selection: per image the K of L rows with the largest score ----
// Keys are det_order_key(score); rows come back in key order, ties by lower index (the
// CPU backend's stable sort and torch.topk's order). scores [B, L] f32, idx [B, K];
// grid B, dynamic shared memory 8 * K bytes.

#define DET_SELECT_ITEMS 16  // scores per thread held in registers (det_topk_select)

// Order key of a score: a larger score has a larger key, every NaN the largest key, and
// -0 the key of +0. Rows rank by key, ties by lower index: NaN first, then larger
// scores (the CPU backend's stable sort and torch.topk's order).
__device__ __forceinline__ unsigned det_order_key(float v) {
    if (isnan(v)) return 0xffffffffu;
    if (v == 0.0f) v = 0.0f;
    const unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ void det_write_indices(const unsigned* cand_key, const unsigned* cand_idx,
                                                  int* __restrict__ idx, int K) {
    for (int j = threadIdx.x; j < K; j += blockDim.x)
        idx[(i64)blockIdx.x * K + det_winner_rank(cand_key, cand_idx, K, j)] = (int)cand_idx[j];
}

// blockDim a multiple of 32 (at most 1024) with L <= DET_SELECT_ITEMS * blockDim.
extern "C" __global__ void __launch_bounds__(1024) det_topk_select(const float* __restrict__ scores, int* __restrict__ idx, int L, int K) {
    extern __shared__ unsigned det_select_cand[];
    __shared__ DetSelectShared sh;
    const float* s = scores + (i64)blockIdx.x * L;
    det_select_winners<DET_SELECT_ITEMS>([=](int i) { return det_order_key(s[i]); }, L, K, det_select_cand,
                                         det_select_cand + K, sh);
    det_write_indices(det_select_cand, det_select_cand + K, idx, K);
}

// The same for any L: scores re-read in every pass.
extern "C" __global__ void det_topk_select_wide(const float* __restrict__ scores, int* __restrict__ idx, int L,
                                                int K) {
    extern __shared__ unsigned det_select_cand[];
    __shared__ DetSelectShared sh;
    const float* s = scores + (i64)blockIdx.x * L;
    det_select_winners<0>([=](int i) { return det_order_key(s[i]); }, L, K, det_select_cand, det_select_cand + K,
                          sh);
    det_write_indices(det_select_cand, det_select_cand + K, idx, K);
}
