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

// ---------------------------------------------------------------------------------------
// Depthwise k x k, stride s, padding k/2, as strips of output rows (the generalisation of
// dwconv3x3_vec). Input rows are grouped in "super rows" of s rows: super row m holds
// input rows m*s - pad + q (q < s) and feeds output rows m - a (a < NA = ceil(k/s)) with
// tap row ky = s*a + q, so output row o is complete after super row o + NA - 1. A thread
// owns V channels of X adjacent output columns and keeps NA rows of accumulators. The
// super-row loop is unrolled by G (a multiple of NA) so the accumulator ring rotates at
// compile time: output o = m - a lives in slot (i - a) mod NA at step i (no moves).
// Rows are fetched LB super rows at a time, all loads issued before any arithmetic.
// Column bounds are tested once per thread, row bounds once per row.

template <int BYTES> struct DwRaw;
template <> struct DwRaw<2> { typedef unsigned short type; };
template <> struct DwRaw<4> { typedef unsigned int type; };
template <> struct DwRaw<8> { typedef uint2 type; };
template <> struct DwRaw<16> { typedef uint4 type; };

// Two channel pairs, one from each half of the gated convolution's input; laid out as
// four consecutive elements, like a four-channel load.
struct DwGateRaw {
    typename DwRaw<2 * sizeof(T)>::type lo, hi;
};

template <typename Raw, int V>
__device__ __forceinline__ void dwk_unpack(const Raw& r, float* v) {
    static_assert(sizeof(Raw) == V * sizeof(T), "raw size");
    const T* h = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int j = 0; j < V; j++) v[j] = ldf(h[j]);
}

// Taps [K*K][V] and bias of V channels: one (V = 1), the pair at ca (V = 2), or the pairs
// at ca and cb (V = 4).
template <int KK, int V>
__device__ __forceinline__ void dwk_taps(float (&tw)[KK][V], float (&tb)[V], const float* __restrict__ w,
                                         const float* __restrict__ bias, int C, int ca, int cb) {
#pragma unroll
    for (int k = 0; k < KK; k++) {
        if constexpr (V == 1) {
            tw[k][0] = w[k * C + ca];
        } else {
            float2 a = *reinterpret_cast<const float2*>(w + k * C + ca);
            tw[k][0] = a.x;
            tw[k][1] = a.y;
            if constexpr (V == 4) {
                float2 b = *reinterpret_cast<const float2*>(w + k * C + cb);
                tw[k][2] = b.x;
                tw[k][3] = b.y;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < V; j++) tb[j] = 0.0f;
    if (!bias) return;
    if constexpr (V == 1) {
        tb[0] = bias[ca];
    } else {
        float2 a = *reinterpret_cast<const float2*>(bias + ca);
        tb[0] = a.x;
        tb[1] = a.y;
        if constexpr (V == 4) {
            float2 b = *reinterpret_cast<const float2*>(bias + cb);
            tb[2] = b.x;
            tb[3] = b.y;
        }
    }
}

// Zeroes a raw value word by word (a select per register, never a branch).
template <typename Raw>
__device__ __forceinline__ Raw dwk_keep(Raw r, bool keep) {
    static_assert(sizeof(Raw) % 2 == 0, "raw size");
    if constexpr (sizeof(Raw) == 2) {
        return keep ? r : (Raw)0;
    } else {
        unsigned int* u = reinterpret_cast<unsigned int*>(&r);
#pragma unroll
        for (int k = 0; k < (int)(sizeof(Raw) / 4); k++) u[k] = keep ? u[k] : 0u;
        return r;
    }
}

// One strip of output rows y0 .. y1 - 1 for the thread's X columns starting at ox0. `img`
// points at the thread's first channel of the image (row stride W*C elements);
// `fetch(p)` loads the thread's V channels at pixel pointer p (through __ldg: the base
// pointer below is opaque to the compiler, which would otherwise emit generic loads);
// `emit(oy, acc)` stores a finished row of X x V sums. Every load is issued (addresses clamped into the image)
// and padding is zeroed by a select afterwards: a conditional load of a two-part value
// compiles to a branch per load, which serialises them.
template <int K, int S, int V, int X, int G, int LB, typename Fetch, typename Emit>
__device__ __forceinline__ void dwk_strip(const float (&tw)[K * K][V], const float (&tb)[V], const T* img, int H,
                                          int W, int C, int ox0, int y0, int y1, Fetch fetch, Emit emit) {
    constexpr int NA = (K + S - 1) / S;
    constexpr int IW = (X - 1) * S + K;
    constexpr int P = K / 2;
    static_assert(G % NA == 0 && G % LB == 0, "G must be a multiple of NA and of LB");
    typedef decltype(fetch(img)) Raw;
    const int ix0 = ox0 * S - P;
    bool col_ok[IW];
    // Offsets within one image in 32 bits (the host checks H*W*C < 2^32): an address is
    // then one add and one wide multiply-add instead of 64-bit index arithmetic.
    unsigned col_off[IW];
#pragma unroll
    for (int j = 0; j < IW; j++) {
        col_ok[j] = ix0 + j >= 0 && ix0 + j < W;
        col_off[j] = (unsigned)(min(max(ix0 + j, 0), W - 1) * C);
    }
    const unsigned row_stride = (unsigned)W * C;
    // Opaque copy of the base pointer: otherwise the compiler folds it back into 64-bit
    // index arithmetic (two adds and two shifts per address instead of one multiply-add).
    const T* base;
    asm("mov.b64 %0, %1;" : "=l"(base) : "l"(img));
    // Slots of rows above the strip collect partial sums that are never emitted; zero
    // them so that nothing reads an uninitialised value.
    float acc[NA][X][V];
#pragma unroll
    for (int a = 0; a < NA; a++)
#pragma unroll
        for (int xo = 0; xo < X; xo++)
#pragma unroll
            for (int v = 0; v < V; v++) acc[a][xo][v] = 0.0f;
    const int mend = y1 + NA - 1;
    for (int m0 = y0; m0 < mend; m0 += G) {
#pragma unroll
        for (int b0 = 0; b0 < G; b0 += LB) {
            Raw raw[LB][S][IW];
#pragma unroll
            for (int i = 0; i < LB; i++) {
#pragma unroll
                for (int q = 0; q < S; q++) {
                    const int iy = (m0 + b0 + i) * S - P + q;
                    const bool row_ok = m0 + b0 + i < mend && iy >= 0 && iy < H;
                    const unsigned ro = (unsigned)min(max(iy, 0), H - 1) * row_stride;
#pragma unroll
                    for (int j = 0; j < IW; j++) raw[i][q][j] = dwk_keep(fetch(base + (ro + col_off[j])), row_ok && col_ok[j]);
                }
            }
#pragma unroll
            for (int i = 0; i < LB; i++) {
                const int step = b0 + i;
                const int m = m0 + step;
                if (m >= mend) break;
#pragma unroll
                for (int q = 0; q < S; q++) {
#pragma unroll
                    for (int j = 0; j < IW; j++) {
                        float in[V];
                        dwk_unpack<Raw, V>(raw[i][q][j], in);
#pragma unroll
                        for (int a = 0; a < NA; a++) {
                            const int ky = S * a + q;
                            if (ky >= K) continue;
                            const int slot = ((step - a) % NA + NA) % NA;
#pragma unroll
                            for (int xo = 0; xo < X; xo++) {
                                const int kx = j - xo * S;
                                if (kx < 0 || kx >= K) continue;
                                // The first tap of a new output row (a = 0, ky = kx = 0)
                                // starts from the bias instead of a reset accumulator.
                                const bool first = a == 0 && q == 0 && kx == 0;
#pragma unroll
                                for (int v = 0; v < V; v++)
                                    acc[slot][xo][v] = fmaf(in[v], tw[ky * K + kx][v], first ? tb[v] : acc[slot][xo][v]);
                            }
                        }
                    }
                }
                // Output m - (NA - 1) is complete.
                if (m - (NA - 1) >= y0) emit(m - (NA - 1), acc[(step + 1) % NA]);
            }
        }
    }
}

// Grid: x over (column group of X, channel group of V) pairs of an output row, y over
// (image, strip of `rows` output rows). Needs C % V == 0 and V-element aligned tensors.
// Output pixels are ldo elements apart (C, or the width of a concatenation whose channel
// slice y points at; ldo % V == 0); the residual is always whole.
template <int K, int S, int V, int X, int G, int LB>
__device__ __forceinline__ void dwk_plain(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                          const float* __restrict__ bias, const T* __restrict__ res, int H, int W,
                                          int C, int OH, int OW, int rows, int act, int ldo) {
    typedef typename DwRaw<V * sizeof(T)>::type Raw;
    const int groups = C / V;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= groups * ((OW + X - 1) / X)) return;
    const int cg = t / groups;
    const int c = (t - cg * groups) * V;
    const int ox0 = cg * X;
    const int strips = (OH + rows - 1) / rows;
    const int n = blockIdx.y / strips;
    const int y0 = (blockIdx.y - n * strips) * rows;
    const int y1 = min(y0 + rows, OH);
    float tw[K * K][V], tb[V];
    dwk_taps<K * K, V>(tw, tb, w, bias, C, c, c + 2);
    const T* img = x + (i64)n * H * W * C + c;
    T* out = y + (i64)n * OH * OW * ldo + c;
    const T* rimg = res ? res + (i64)n * OH * OW * C + c : res;
    auto fetch = [](const T* p) { return __ldg(reinterpret_cast<const Raw*>(p)); };
    dwk_strip<K, S, V, X, G, LB>(tw, tb, img, H, W, C, ox0, y0, y1, fetch, [&](int oy, float (&acc)[X][V]) {
#pragma unroll
        for (int xo = 0; xo < X; xo++) {
            if (ox0 + xo >= OW) break;
            const unsigned px = (unsigned)oy * OW + ox0 + xo;
            const unsigned o = px * C;
            float r[V];
            if (res) dwk_unpack<Raw, V>(*reinterpret_cast<const Raw*>(rimg + o), r);
            __align__(16) T h[V];
#pragma unroll
            for (int v = 0; v < V; v++) {
                float s = activate(acc[xo][v], act);
                if (res) s += r[v];
                h[v] = stf(s);
            }
            *reinterpret_cast<Raw*>(out + px * ldo) = *reinterpret_cast<const Raw*>(h);
        }
    });
}

// (K, S) -> channels per thread V, columns per thread X, unroll G, load batch LB (the
// host mirrors V and X in conv.rs). Taps take K*K*V registers: four channels at 3x3, two
// at 5x5, one at 7x7. Two columns per thread share the loads of overlapping windows (a
// 5x5 row costs 6 loads per 2 outputs instead of 10). Chosen from the SASS instruction
// count per output of the main loop (ReLU, no residual, fp16) among the configurations
// that ptxas keeps spill-free under __launch_bounds__(256, 2) (128 registers, two blocks
// of 256 per SM) in fp16, bf16 and fp32:
//   3x3/1 X=1 G=6 LB=6 (3 in fp32): 25.0 instructions per output (X=2: 20.6, but spills
//         in fp32; this one is bandwidth-bound at ~6 instructions per byte anyway)
//   3x3/2 X=2 LB=1: 27.4 (X=1: 32.9)    5x5/1 X=2 LB=5 (1 in fp32): 46.4 (X=1: 57.8)
//   5x5/2 X=2 LB=1: 68.7 (X=1: 88.2)    7x7: one channel, X=1 (two channels spill)
// Each entry point is declared once plainly, then defined with its launch bounds.
#define DWK_PARAMS                                                                                           \
    const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ w, const float *__restrict__ bias,  \
        const T *__restrict__ res, int H, int W, int C, int OH, int OW, int rows, int act, int ldo
#define DWK_ARGS x, y, w, bias, res, H, W, C, OH, OW, rows, act, ldo
extern "C" __global__ void dwk3s1(DWK_PARAMS);
extern "C" __global__ void dwk3s2(DWK_PARAMS);
extern "C" __global__ void dwk5s1(DWK_PARAMS);
extern "C" __global__ void dwk5s2(DWK_PARAMS);
extern "C" __global__ void dwk7s1(DWK_PARAMS);
extern "C" __global__ void dwk7s2(DWK_PARAMS);
extern "C" __global__ void __launch_bounds__(256, 2) dwk3s1(DWK_PARAMS) {
    dwk_plain<3, 1, 4, 1, 6, (sizeof(T) == 2 ? 6 : 3)>(DWK_ARGS);
}
extern "C" __global__ void __launch_bounds__(256, 2) dwk3s2(DWK_PARAMS) { dwk_plain<3, 2, 4, 2, 4, 1>(DWK_ARGS); }
extern "C" __global__ void __launch_bounds__(256, 2) dwk5s1(DWK_PARAMS) {
    dwk_plain<5, 1, 2, 2, 5, (sizeof(T) == 2 ? 5 : 1)>(DWK_ARGS);
}
extern "C" __global__ void __launch_bounds__(256, 2) dwk5s2(DWK_PARAMS) { dwk_plain<5, 2, 2, 2, 3, 1>(DWK_ARGS); }
extern "C" __global__ void __launch_bounds__(256, 2) dwk7s1(DWK_PARAMS) { dwk_plain<7, 1, 1, 1, 7, 1>(DWK_ARGS); }
extern "C" __global__ void __launch_bounds__(256, 2) dwk7s2(DWK_PARAMS) { dwk_plain<7, 2, 1, 1, 4, 1>(DWK_ARGS); }

// ---------------------------------------------------------------------------------------
// Depthwise k x k, stride 1, padding k/2, with the input staged in shared memory (dws{k}).
// The register-window kernels above wait on their own global loads (latency-bound at
// two blocks of 256 per multiprocessor: ~0.4 instructions issued per cycle per
// scheduler on D-FINE's 5x5 maps); here a block streams input rows into a ring of DWS_NR
// shared rows with cp.async, DWS_NR - K rows ahead of the row it computes, so the
// arithmetic never waits on memory.
// Block: CB channels (64 or 128, one entry point each) of one image, a strip of `rows`
// output rows, all W columns. Lane -> channel pair within a 64-channel half, warp ->
// (half, column group of X columns); one output row per step. Staged rows hold W + K - 1
// columns (zero padding included) of CB channels, pixel-major, so a warp reads 128
// contiguous bytes; a row's slot is sized for whole column groups (groups * X + K - 1
// columns, the columns past W + K - 1 never written nor stored from), so no load is
// clamped, and with CB fixed every load of a row is one base address plus a constant.
// Host guarantees: C % cb == 0, 16-byte aligned x, C * sizeof(T) % 16 == 0, y and res
// 2-element aligned, ldo even, sm_80+.
#define DWS_NR 7

// cp_async16, cp_async_commit, cp_async_wait, smem_addr: math.cu.

template <int K, int X, int CB>
__device__ __forceinline__ void dws_conv(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                         const float* __restrict__ bias, const T* __restrict__ res, int H, int W,
                                         int C, int rows, int act, int ldo) {
    extern __shared__ __align__(16) unsigned char dws_smem[];
    T* ring = reinterpret_cast<T*>(dws_smem);
    constexpr int P = K / 2;
    constexpr int PIECE = 16 / sizeof(T);  // elements per 16-byte copy
    constexpr int HALVES = CB / 64;
    const int groups = (W + X - 1) / X;
    const int row_elems = (groups * X + K - 1) * CB;
    const int c0 = blockIdx.x * CB;
    const int strips = (H + rows - 1) / rows;
    const int n = blockIdx.y / strips;
    const int oy0 = (blockIdx.y - n * strips) * rows;
    const int steps = min(oy0 + rows, H) - oy0;
    const int in_rows = steps + K - 1;
    const T* img = x + (i64)n * H * W * C + c0;
    constexpr int per_pixel = CB / PIECE;
    const int pieces = (W + K - 1) * per_pixel;
    const unsigned ring_addr = smem_addr(ring);
    // Strip-relative input row r (image row oy0 - P + r) into slot r % DWS_NR; one commit
    // group per call, empty past the strip, so the wait counts below hold at the end.
    auto stage = [&](int r) {
        if (r < in_rows) {
            const int iy = oy0 - P + r;
            const bool row_ok = iy >= 0 && iy < H;
            const unsigned slot = ring_addr + (unsigned)((r % DWS_NR) * row_elems * (int)sizeof(T));
            for (int i = threadIdx.x; i < pieces; i += blockDim.x) {
                const int px = i / per_pixel;
                const int part = i - px * per_pixel;
                const int ix = px - P;
                const bool ok = row_ok && ix >= 0 && ix < W;
                const T* src = ok ? img + ((i64)iy * W + ix) * C + part * PIECE : img;
                cp_async16(slot + (unsigned)((px * CB + part * PIECE) * (int)sizeof(T)), src, ok);
            }
        }
        cp_async_commit();
    };
    const int warp = threadIdx.x / 32;
    const int c_local = (warp % HALVES) * 64 + 2 * (threadIdx.x & 31);
    const int c = c0 + c_local;
    float tw[K * K][2], tb[2];
    dwk_taps<K * K, 2>(tw, tb, w, bias, C, c, c);
    const int warps_per_row = (int)(blockDim.x / 32) / HALVES;
#pragma unroll 1
    for (int r = 0; r < DWS_NR - 1; r++) stage(r);
#pragma unroll 1
    for (int s = 0; s < steps; s++) {
        __syncthreads();  // step s - 1 has finished reading slot (s - 1) % DWS_NR
        stage(s + DWS_NR - 1);
        cp_async_wait<DWS_NR - K>();  // rows up to s + K - 1 have landed (this thread's copies)
        __syncthreads();         // ... and everyone's
        const int oy = oy0 + s;
        // This step's K input rows, at this thread's channel pair.
        const T* in_row[K];
#pragma unroll
        for (int ky = 0; ky < K; ky++) in_row[ky] = ring + ((s + ky) % DWS_NR) * row_elems + c_local;
#pragma unroll 1
        for (int g = warp / HALVES; g < groups; g += warps_per_row) {
            const int ox0 = g * X;
            float acc[X][2];
#pragma unroll
            for (int xo = 0; xo < X; xo++) {
                acc[xo][0] = tb[0];
                acc[xo][1] = tb[1];
            }
#pragma unroll
            for (int ky = 0; ky < K; ky++) {
                const T* row = in_row[ky] + ox0 * CB;
                float2 in[X + K - 1];
#pragma unroll
                for (int j = 0; j < X + K - 1; j++) in[j] = ld2(row + j * CB);
#pragma unroll
                for (int xo = 0; xo < X; xo++)
#pragma unroll
                    for (int kx = 0; kx < K; kx++) {
                        acc[xo][0] = fmaf(in[xo + kx].x, tw[ky * K + kx][0], acc[xo][0]);
                        acc[xo][1] = fmaf(in[xo + kx].y, tw[ky * K + kx][1], acc[xo][1]);
                    }
            }
#pragma unroll
            for (int xo = 0; xo < X; xo++) {
                if (ox0 + xo >= W) break;
                const i64 px = ((i64)n * H + oy) * W + ox0 + xo;
                float2 v = make_float2(activate(acc[xo][0], act), activate(acc[xo][1], act));
                if (res) {
                    const float2 r = ld2(res + px * C + c);
                    v.x += r.x;
                    v.y += r.y;
                }
                st2(y + px * ldo + c, v);
            }
        }
    }
}

// X = 5 columns per thread: D-FINE's 40- and 20-wide maps split into 8 and 4 groups.
// dws5: 64 channels per block; dws5_128: 128.
#define DWS_PARAMS                                                                                          \
    const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ w, const float *__restrict__ bias, \
        const T *__restrict__ res, int H, int W, int C, int rows, int act, int ldo
extern "C" __global__ void dws5(DWS_PARAMS);
extern "C" __global__ void __launch_bounds__(256, 2) dws5(DWS_PARAMS) {
    dws_conv<5, 5, 64>(x, y, w, bias, res, H, W, C, rows, act, ldo);
}
extern "C" __global__ void dws5_128(DWS_PARAMS);
extern "C" __global__ void __launch_bounds__(256, 2) dws5_128(DWS_PARAMS) {
    dws_conv<5, 5, 128>(x, y, w, bias, res, H, W, C, rows, act, ldo);
}

// gelu_as: math.cu.

// Depthwise 3x3 over C = 2*Ch channels fused with the GELU gate, on the strip scheme
// above: a thread owns one channel pair of each half (four accumulators per column) and
// X = 2 adjacent columns, so a row costs four loads per two outputs instead of six.
// Grid: x over (column pair, channel pair), y over (image, strip of `rows`). Needs
// Ch % 2 == 0 and 4-byte aligned tensors.
#define DWK_GATE_PARAMS                                                                                      \
    const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ w, const float *__restrict__ bias,  \
        int H, int W, int C, int rows
extern "C" __global__ void dwk3_gate(DWK_GATE_PARAMS);
extern "C" __global__ void __launch_bounds__(256, 2) dwk3_gate(DWK_GATE_PARAMS) {
    constexpr int X = 2;
    typedef typename DwRaw<2 * sizeof(T)>::type Pair;
    const int Ch = C >> 1;
    const int pairs = Ch >> 1;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs * ((W + X - 1) / X)) return;
    const int cg = t / pairs;
    const int c = (t - cg * pairs) * 2;
    const int ox0 = cg * X;
    const int strips = (H + rows - 1) / rows;
    const int n = blockIdx.y / strips;
    const int y0 = (blockIdx.y - n * strips) * rows;
    const int y1 = min(y0 + rows, H);
    float tw[9][4], tb[4];
    dwk_taps<9, 4>(tw, tb, w, bias, C, c, Ch + c);
    const T* img = x + (i64)n * H * W * C + c;
    T* out = y + (i64)n * H * W * Ch + c;
    auto fetch = [&](const T* p) {
        DwGateRaw r;
        r.lo = __ldg(reinterpret_cast<const Pair*>(p));
        r.hi = __ldg(reinterpret_cast<const Pair*>(p + Ch));
        return r;
    };
    dwk_strip<3, 1, 4, X, 3, 3>(tw, tb, img, H, W, C, ox0, y0, y1, fetch, [&](int oy, float (&acc)[X][4]) {
#pragma unroll
        for (int xo = 0; xo < X; xo++) {
            if (ox0 + xo >= W) break;
            float2 g = make_float2(gelu_as(acc[xo][0]) * acc[xo][2], gelu_as(acc[xo][1]) * acc[xo][3]);
            st2(out + ((unsigned)oy * W + ox0 + xo) * Ch, g);
        }
    });
}
