// Dense convolution with few taps per output (K = KH * KW * C <= 32: the 3-channel stems)
// on tensor cores, 16-bit storage, fp32 accumulation (appended to conv.cu's translation
// unit: ig_mma, ig_activate). The FMA kernel (conv_small_taps*, ops.cu) multiplies every
// tap into every output channel on the CUDA cores and is issue-bound (~44 warp
// instructions per pixel of D-FINE's 3 -> 32 stem, 75 % of the issue slots busy). Here
// the product y[p][co] = sum_k A[p][k] W[co][k] runs as mma.sync m16n8k16: each lane
// gathers its A fragment (two pixels x eight K positions) straight from the NHWC input
// into registers, K in at most two 16-wide steps, and holds the weights' B fragments for
// the whole kernel.
// Warp: 16 consecutive output columns of one output row per step (A rows g = lane / 4 and
// g + 8), every output channel (NT tiles of 8); the tile's image, row and bounds are the
// warp's, so a lane only tests its own columns (and each tap only at the image's edges).
// The output grid may be padded at the bottom and right (OHp x OWp, at least OH x OW):
// padding pixels get zeros, as in conv_small_taps.
// w is the product layout [c_out][Kp] with K ordered (ky, kx, c); res (optional) is
// [P, c_out]. Host guarantees: c_out <= 8 NT, c_out % 8 == 0, y and res 4-byte aligned,
// N * OHp * OWp and each input row's element count below 2^31.
typedef unsigned short small_u16;

// The weights' B fragments of output-channel tile j, K step s: W[8 j + g][k],
// k = 16 s + 2 q + {0, 1} (first register) and + 8 (second); the bias of channels
// 8 j + 2 q and + 1.
template <int NT>
__device__ __forceinline__ void small_weights(const T* __restrict__ w, const T* __restrict__ bias, int K, int Kp,
                                              int c_out, unsigned (&bf)[NT][2][2], float (&bias0)[NT],
                                              float (&bias1)[NT]) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const small_u16* ws = reinterpret_cast<const small_u16*>(w);
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int co = 8 * j + g;
#pragma unroll
        for (int s = 0; s < 2; s++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int k = 16 * s + 8 * e + 2 * q;
                const bool ok = co < c_out;
                const unsigned lo = ok && k < K ? ws[co * Kp + k] : 0u;
                const unsigned hi = ok && k + 1 < K ? ws[co * Kp + k + 1] : 0u;
                bf[j][s][e] = lo | (hi << 16);
            }
        const int cp = 8 * j + 2 * q;
        bias0[j] = bias && cp < c_out ? ldf(bias[cp]) : 0.0f;
        bias1[j] = bias && cp < c_out ? ldf(bias[cp + 1]) : 0.0f;
    }
}

// K position i (0..7) of this lane: 16 s + 8 e + 2 q + b for step s = i / 4, half
// e = (i / 2) % 2, element b = i % 2.
__device__ __forceinline__ int small_k(int i, int q) { return 16 * (i >> 2) + 8 * ((i >> 1) & 1) + 2 * q + (i & 1); }

// The product of one 16-pixel tile from its A fragments (a[s][h]: pixel g + 8h, K half
// 0; a[s][2 + h]: half 1), then bias, activation and residual, stored for pixels
// (row, ox0 + g + 8h) of the padded output grid (zeros where not `inside`, nothing past
// OWp).
template <int NT>
__device__ __forceinline__ void small_product_store(const unsigned (&a)[2][4], const unsigned (&bf)[NT][2][2],
                                                    const float (&bias0)[NT], const float (&bias1)[NT],
                                                    bool two_steps, const bool (&inside)[2],
                                                    const T* __restrict__ res, T* __restrict__ y, int row, int ox0,
                                                    int OWp, int c_out, int act) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        acc[j][0] = acc[j][2] = bias0[j];
        acc[j][1] = acc[j][3] = bias1[j];
        ig_mma(acc[j], a[0], bf[j][0][0], bf[j][0][1]);
        if (two_steps) ig_mma(acc[j], a[1], bf[j][1][0], bf[j][1][1]);
    }
    T* y_row = y + (ig_i64)row * OWp * c_out;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int ox = ox0 + g + 8 * h;
        if (ox >= OWp) continue;
        T* yp = y_row + ox * c_out + 2 * q;
        const T* rp = res ? res + ((ig_i64)row * OWp + ox) * c_out + 2 * q : res;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (8 * j >= c_out) break;
            float v0 = 0.0f, v1 = 0.0f;
            if (inside[h]) {
                v0 = ig_activate(acc[j][2 * h], act);
                v1 = ig_activate(acc[j][2 * h + 1], act);
                if (res) {
                    const float2 r = ld2(rp + 8 * j);
                    v0 += r.x;
                    v1 += r.y;
                }
            }
            st2(yp + 8 * j, make_float2(v0, v1));
        }
    }
}

template <int NT>
__device__ __forceinline__ void small_taps_mma(const T* __restrict__ x, const T* __restrict__ w,
                                               const T* __restrict__ bias, const T* __restrict__ res,
                                               T* __restrict__ y, int N, int H, int W, int C, int OH, int OW,
                                               int KH, int KW, int stride, int pad, int Kp, int c_out, int act,
                                               int OHp, int OWp) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int K = KH * KW * C;
    const small_u16* xs = reinterpret_cast<const small_u16*>(x);
    // This lane's eight K positions as offsets from the window's first input element
    // (-1: past K), with their tap row and column (kdy | kdx << 16) for the bounds test
    // at the image's edges.
    int koff[8], kyx[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int k = small_k(i, q);
        const int tap = k / C;
        const int dy = tap / KW, dx = tap - (tap / KW) * KW;
        kyx[i] = dy | (dx << 16);
        koff[i] = k < K ? (dy * W + dx) * C + (k - tap * C) : -1;
    }
    unsigned bf[NT][2][2];
    float bias0[NT], bias1[NT];
    small_weights<NT>(w, bias, K, Kp, c_out, bf, bias0, bias1);
    // A tile: 16 consecutive output columns of one output row (of the padded grid).
    const int per_row = (OWp + 15) / 16;
    const int tiles = N * OHp * per_row;
    const int warps = blockDim.x / 32;
#pragma unroll 1
    for (int tile = blockIdx.x * warps + warp; tile < tiles; tile += gridDim.x * warps) {
        const int row = tile / per_row;  // n * OHp + oy
        const int ox0 = (tile - row * per_row) * 16;
        const int n = row / OHp;
        const int oy = row - n * OHp;
        const int iy0 = oy * stride - pad;
        const bool rows_inside = iy0 >= 0 && iy0 + KH <= H;
        const small_u16* img_row = xs + ((ig_i64)n * H + iy0) * W * C;
        unsigned a[2][4];
        bool inside[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int ox = ox0 + g + 8 * h;
            inside[h] = oy < OH && ox < OW;
            const int ix0 = ox * stride - pad;
            const bool interior = rows_inside && ix0 >= 0 && ix0 + KW <= W;
            const small_u16* win = img_row + ix0 * C;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                bool ok = inside[h] && koff[i] >= 0;
                if (!interior) {
                    const int iy = iy0 + (kyx[i] & 0xffff), ix = ix0 + (kyx[i] >> 16);
                    ok = ok && iy >= 0 && iy < H && ix >= 0 && ix < W;
                }
                const unsigned v = ok ? __ldg(win + koff[i]) : 0u;
                unsigned& r = a[i >> 2][2 * ((i >> 1) & 1) + h];
                r = (i & 1) ? (r | (v << 16)) : v;
            }
        }
        small_product_store<NT>(a, bf, bias0, bias1, K > 16, inside, res, y, row, ox0, OWp, c_out, act);
    }
}

// The staged variant (APERTURE_SMALL_TAPS=staged, to be measured): a block of SMALL_WARPS
// warps takes SMALL_WARPS * 16 consecutive output columns of one output row; it first
// copies the KH input rows under them (zeros outside the image) into shared memory, so
// that each lane's gather is one shared load per K position with no bounds test.
// Dynamic shared memory: KH * ((SMALL_WARPS * 16 - 1) * stride + KW) * C elements.
#define SMALL_WARPS 8
template <int NT>
__device__ __forceinline__ void small_taps_mma_staged(const T* __restrict__ x, const T* __restrict__ w,
                                                      const T* __restrict__ bias, const T* __restrict__ res,
                                                      T* __restrict__ y, int N, int H, int W, int C, int OH,
                                                      int OW, int KH, int KW, int stride, int pad, int Kp,
                                                      int c_out, int act, int OHp, int OWp) {
    extern __shared__ __align__(16) small_u16 small_rows[];
    constexpr int BW = SMALL_WARPS * 16;  // output columns per block
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int K = KH * KW * C;
    const int span = ((BW - 1) * stride + KW) * C;  // staged elements per input row
    const small_u16* xs = reinterpret_cast<const small_u16*>(x);
    // This lane's eight K positions as offsets into the staged rows (-1: past K).
    int koff[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int k = small_k(i, q);
        const int tap = k / C;
        const int dy = tap / KW, dx = tap - (tap / KW) * KW;
        koff[i] = k < K ? dy * span + dx * C + (k - tap * C) : -1;
    }
    unsigned bf[NT][2][2];
    float bias0[NT], bias1[NT];
    small_weights<NT>(w, bias, K, Kp, c_out, bf, bias0, bias1);
    const int per_row = (OWp + BW - 1) / BW;
    const int tiles = N * OHp * per_row;
#pragma unroll 1
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int row = tile / per_row;  // n * OHp + oy
        const int bx0 = (tile - row * per_row) * BW;
        const int n = row / OHp;
        const int oy = row - n * OHp;
        const int iy0 = oy * stride - pad;
        const int first = (bx0 * stride - pad) * C;  // the span's first element within its row
        __syncthreads();  // the previous tile is done with the staged rows
        for (int r = 0; r < KH; r++) {
            const int iy = iy0 + r;
            const bool row_ok = iy >= 0 && iy < H;
            const small_u16* src = xs + ((ig_i64)n * H + iy) * W * C;
            for (int e = threadIdx.x; e < span; e += blockDim.x) {
                const int at = first + e;
                small_rows[r * span + e] = row_ok && at >= 0 && at < W * C ? src[at] : (small_u16)0;
            }
        }
        __syncthreads();
        const int ox0 = bx0 + warp * 16;
        unsigned a[2][4];
        bool inside[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int p = warp * 16 + g + 8 * h;  // column within the block
            inside[h] = oy < OH && bx0 + p < OW;
            const int base = p * stride * C;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const unsigned v = inside[h] && koff[i] >= 0 ? small_rows[base + koff[i]] : 0u;
                unsigned& r = a[i >> 2][2 * ((i >> 1) & 1) + h];
                r = (i & 1) ? (r | (v << 16)) : v;
            }
        }
        small_product_store<NT>(a, bf, bias0, bias1, K > 16, inside, res, y, row, ox0, OWp, c_out, act);
    }
}

#define SMALL_MMA_PARAMS                                                                                         \
    const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ bias, const T *__restrict__ res,      \
        T *__restrict__ y, int N, int H, int W, int C, int OH, int OW, int KH, int KW, int stride, int pad, int Kp, \
        int c_out, int act, int OHp, int OWp
#define SMALL_MMA_KERNEL(NAME, IMPL, NT)                                                              \
    extern "C" __global__ void NAME(SMALL_MMA_PARAMS);                                                \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME(SMALL_MMA_PARAMS) {                     \
        IMPL<NT>(x, w, bias, res, y, N, H, W, C, OH, OW, KH, KW, stride, pad, Kp, c_out, act, OHp, OWp); \
    }

// Up to 32 and up to 64 output channels (the argument list is conv_small_taps'); the
// staged variants need blocks of SMALL_WARPS warps.
SMALL_MMA_KERNEL(small_taps_mma32, small_taps_mma, 4)
SMALL_MMA_KERNEL(small_taps_mma64, small_taps_mma, 8)
#ifdef SMALL_TAPS_STAGED  // built on request only (APERTURE_SMALL_TAPS=staged)
SMALL_MMA_KERNEL(small_taps_mma_staged32, small_taps_mma_staged, 4)
SMALL_MMA_KERNEL(small_taps_mma_staged64, small_taps_mma_staged, 8)
#endif
