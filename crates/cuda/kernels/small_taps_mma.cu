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
// warp's, so a lane only tests its own columns (and each tap only at the image's edges). The output grid may be padded at the bottom and right
// (OHp x OWp, at least OH x OW): padding pixels get zeros, as in conv_small_taps.
// w is the product layout [c_out][Kp] with K ordered (ky, kx, c); res (optional) is
// [P, c_out]. Host guarantees: c_out <= 8 NT, c_out % 8 == 0, y and res 4-byte aligned,
// N * OHp * OWp and each input row's element count below 2^31.
typedef unsigned short small_u16;

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
    const small_u16* ws = reinterpret_cast<const small_u16*>(w);
    // The eight K positions of this lane: 16 s + 8 e + 2 q + b for step s, half e, element
    // b; as an offset from the window's first input element (-1: past K), and its tap row
    // and column (kdy | kdx << 16) for the bounds test at the image's edges.
    int koff[8], kyx[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int k = 16 * (i >> 2) + 8 * ((i >> 1) & 1) + 2 * q + (i & 1);
        const int tap = k / C;
        const int dy = tap / KW, dx = tap - (tap / KW) * KW;
        kyx[i] = dy | (dx << 16);
        koff[i] = k < K ? (dy * W + dx) * C + (k - tap * C) : -1;
    }
    // B fragments of output-channel tile j, step s: W[8 j + g][k], k = 16 s + 2 q + {0, 1}
    // (first register) and + 8 (second).
    unsigned bf[NT][2][2];
    float bias0[NT], bias1[NT];
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
    const bool two_steps = K > 16;
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
        T* y_row = y + (ig_i64)row * OWp * c_out;
        // A fragments: a[s][h] = (pixel g + 8h, K half 0), a[s][2 + h] = (pixel g + 8h, half 1).
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
        float acc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            acc[j][0] = acc[j][2] = bias0[j];
            acc[j][1] = acc[j][3] = bias1[j];
            ig_mma(acc[j], a[0], bf[j][0][0], bf[j][0][1]);
            if (two_steps) ig_mma(acc[j], a[1], bf[j][1][0], bf[j][1][1]);
        }
        // Pixel g + 8h of the tile, channels 8 j + 2 q and + 1.
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
}

#define SMALL_MMA_PARAMS                                                                                         \
    const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ bias, const T *__restrict__ res,      \
        T *__restrict__ y, int N, int H, int W, int C, int OH, int OW, int KH, int KW, int stride, int pad, int Kp, \
        int c_out, int act, int OHp, int OWp
#define SMALL_MMA_KERNEL(NAME, NT)                                                                          \
    extern "C" __global__ void NAME(SMALL_MMA_PARAMS);                                                      \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME(SMALL_MMA_PARAMS) {                           \
        small_taps_mma<NT>(x, w, bias, res, y, N, H, W, C, OH, OW, KH, KW, stride, pad, Kp, c_out, act, OHp, \
                           OWp);                                                                            \
    }

// Up to 32 and up to 64 output channels (the argument list is conv_small_taps').
SMALL_MMA_KERNEL(small_taps_mma32, 4)
SMALL_MMA_KERNEL(small_taps_mma64, 8)
