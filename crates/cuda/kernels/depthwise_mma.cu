// Depthwise k x k convolution (stride 1, padding k/2) on tensor cores: 16-bit storage,
// fp32 accumulation, bias + activation + residual in the epilogue (appended to conv.cu's
// translation unit: ig_ldsm4, ig_mma, ig_activate).
//
// The idea: the fp32 FMA kernels (dws5, dwk*) spend ~1.7 warp instructions per output (a
// multiply-add per tap plus the loads and the half -> float conversions) and are
// issue-bound at a third of the memory bandwidth; tensor cores take the products off the
// issue slots. Measured on the H100 it does not pay (opt-in, APERTURE_DEPTHWISE_MMA=1):
// the zeros below cost mma.sync throughput after all (a 5x5 over 40x40x256 at batch 64:
// ~15 GFLOP issued for 1.3 useful, 0.100 ms against dws5's 0.088).
// Here one mma.sync m16n8k16 computes 16 pixels x 8 channels over two taps of one row:
// A row = one pixel, K = (tap kx: 8 channels | tap kx + 1: 8 channels), straight from the
// staged NHWC input by ldmatrix (a row is 16 contiguous bytes: 8 channels of one pixel);
// B = the two taps' weights on the diagonal (B[k][j] = w[tap][j] where k % 8 == j, else
// 0). Seven of every eight products are zeros.
// A row's last tap (k odd) pairs with a zero tap. Each step computes two output rows, so
// every A fragment loaded from an input row serves both (with the taps of two kernel
// rows), and the two rows' accumulators are independent chains of products.
//
// Block: NW warps, each one 8-channel group (CB = 8 NW channels), of one image, a strip
// of `rows` output rows and a tile of `bw` output columns starting at blockIdx.z * bw.
// Input rows stream through a ring of NR shared slots with cp.async, two per commit
// group, DWM_AHEAD_ROWS rows beyond what a step reads; one barrier per step. A slot
// holds bw + K - 1 staged pixels of CB channels, pixel-major, each pixel 16 bytes wider
// than its channels so the eight row addresses of an ldmatrix (eight consecutive pixels)
// fall in eight different 16-byte bank groups (NW even). Channels past C and pixels
// outside the image are staged as zeros.
// Host guarantees: C % 8 == 0, x 16-byte aligned, y / res 4-byte aligned with even ldo,
// (bw + K - 1) * CB / 8 <= 4 * 32 * NW, sm_80+, per-image element counts below 2^31.
#define DWM_AHEAD_ROWS 2
// 16-byte pieces of a staged row one thread copies at most.
#define DWM_PIECES 4

// Two storage-type values as one 32-bit mma operand (lo in the low half).
__device__ __forceinline__ unsigned dwm_pack(float lo, float hi) {
    union {
        T h[2];
        unsigned u;
    } v;
    v.h[0] = stf(lo);
    v.h[1] = stf(hi);
    return v.u;
}

// Bias, activation and residual of two channels of one output pixel, then stored.
__device__ __forceinline__ void dwm_store(T* y, const T* res, float v0, float v1, int act) {
    v0 = ig_activate(v0, act);
    v1 = ig_activate(v1, act);
    if (res) {
        const float2 r = ld2(res);
        v0 += r.x;
        v1 += r.y;
    }
    st2(y, make_float2(v0, v1));
}

template <int K, int NW>
__device__ __forceinline__ void dwm_conv(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                         const float* __restrict__ bias, const T* __restrict__ res, int H, int W,
                                         int C, int rows, int bw, int act, int ldo) {
    extern __shared__ __align__(16) unsigned char dwm_smem[];
    constexpr int P = K / 2;
    constexpr int G0 = (K + 1) / 2 + DWM_AHEAD_ROWS / 2;  // row pairs staged before step 0
    constexpr int NR = 2 * G0 + 2;                        // ring slots (rows)
    constexpr int CB = 8 * NW;
    constexpr int PIX = 2 * CB + 16;   // bytes per staged pixel
    constexpr int PER_PIXEL = CB / 8;  // 16-byte pieces per pixel
    constexpr int QP = (K + 1) / 2;    // tap pairs per kernel row (the last one padded)
    const int row_bytes = (bw + K - 1) * PIX;
    const int c0 = blockIdx.x * CB;
    const int x0 = blockIdx.z * bw;
    const int strips = (H + rows - 1) / rows;
    const int n = blockIdx.y / strips;
    const int oy0 = (blockIdx.y - n * strips) * rows;
    const int out_rows = min(oy0 + rows, H) - oy0;
    const int in_rows = out_rows + K - 1;
    const int valid_w = min(bw, W - x0);
    const T* img = x + (ig_i64)n * H * W * C;
    const unsigned ring = smem_addr(dwm_smem);
    // This thread's pieces of a staged row: shared offset and the offset from the row's
    // first element (-1: zeros), the same for every row.
    unsigned piece_dst[DWM_PIECES];
    int piece_src[DWM_PIECES];
    {
        const int pieces = (valid_w + K - 1) * PER_PIXEL;
#pragma unroll
        for (int j = 0; j < DWM_PIECES; j++) {
            const int i = threadIdx.x + j * NW * 32;
            const int px = i / PER_PIXEL;
            const int part = i - px * PER_PIXEL;
            const int ix = x0 - P + px;
            const bool ok = i < pieces && ix >= 0 && ix < W && c0 + part * 8 < C;
            piece_dst[j] = i < pieces ? (unsigned)(px * PIX + part * 16) : 0xffffffffu;
            piece_src[j] = ok ? ix * C + c0 + part * 8 : -1;
        }
    }
    // Strip-relative input rows 2g and 2g + 1 (image rows oy0 - P + ...) into their slots;
    // one commit group per call, empty past the strip, so the wait count holds to the end.
    auto stage = [&](int g) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = 2 * g + h;
            const int iy = oy0 - P + r;
            if (r < in_rows) {
                const bool row_ok = iy >= 0 && iy < H;
                const unsigned slot = ring + (unsigned)((r % NR) * row_bytes);
                const T* src_row = img + (ig_i64)iy * W * C;
#pragma unroll
                for (int j = 0; j < DWM_PIECES; j++) {
                    if (piece_dst[j] != 0xffffffffu) {
                        const bool ok = row_ok && piece_src[j] >= 0;
                        cp_async16(slot + piece_dst[j], ok ? src_row + piece_src[j] : img, ok);
                    }
                }
            }
        }
        cp_async_commit();
    };
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int cg = c0 + warp * 8;  // this warp's 8 channels
    const bool active = cg < C;
    // B fragments of kernel row ky, pair q (taps kx = 2q, 2q + 1; none past K - 1): lane
    // holds B[k][j] for j = lane / 4 and k = 2 (lane % 4) + {0, 1} (first tap) and 8 + the
    // same (second tap); only k % 8 == j is non-zero.
    unsigned bf[K][QP][2];
    {
        const int j = lane >> 2;
        const bool holds = active && (j >> 1) == (lane & 3);
        const bool upper = j & 1;
#pragma unroll
        for (int ky = 0; ky < K; ky++)
#pragma unroll
            for (int q = 0; q < QP; q++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int kx = 2 * q + h;
                    const float v = holds && kx < K ? w[(ky * K + kx) * C + cg + j] : 0.0f;
                    bf[ky][q][h] = upper ? dwm_pack(0.0f, v) : dwm_pack(v, 0.0f);
                }
    }
    const int ch = cg + 2 * (lane & 3);  // this lane's output channel pair
    float b0 = 0.0f, b1 = 0.0f;
    if (bias && active) {
        b0 = bias[ch];
        b1 = bias[ch + 1];
    }
    const unsigned second = lane >= 16 ? PIX : 0;  // this lane addresses a pair's second tap
    const int mtiles = (valid_w + 15) / 16;
    const int steps = (out_rows + 1) / 2;
    T* y_img = y + (ig_i64)n * H * W * ldo + (ig_i64)x0 * ldo + ch;
    const T* r_img = res ? res + (ig_i64)n * H * W * C + (ig_i64)x0 * C + ch : res;
#pragma unroll 1
    for (int g = 0; g < G0; g++) stage(g);
#pragma unroll 1
    for (int s = 0; s < steps; s++) {
        // Step s reads input rows 2s .. 2s + K (row pairs up to s + (K - 1) / 2); committed:
        // pairs up to s + G0 - 1.
        cp_async_wait<G0 - 1 - (K - 1) / 2>();
        __syncthreads();  // everyone's copies, and step s - 1 is done with its slots
        stage(s + G0);
        if (!active) continue;
        unsigned slot[K + 1];
#pragma unroll
        for (int r = 0; r <= K; r++) slot[r] = ring + (unsigned)(((2 * s + r) % NR) * row_bytes) + warp * 16;
        const int oy = oy0 + 2 * s;
        const bool two = 2 * s + 1 < out_rows;
        T* y_row = y_img + ((ig_i64)oy * W) * ldo;
        const T* r_row = res ? r_img + ((ig_i64)oy * W) * C : res;
#pragma unroll 1
        for (int t = 0; t < mtiles; t++) {
            // ldmatrix row of this lane: pixel t*16 + lane % 8 (+8 for matrices 1 and 3),
            // clamped to the tile so that rows past it read staged data (results dropped).
            const int p = min(t * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, valid_w - 1);
            const unsigned px = (unsigned)(p * PIX);
            float acc0[4] = {b0, b1, b0, b1};
            float acc1[4] = {b0, b1, b0, b1};
            unsigned a[4];
#pragma unroll
            for (int r = 0; r <= K; r++) {
                const unsigned base = slot[r] + px;
#pragma unroll
                for (int q = 0; q < QP; q++) {
                    // The padded last pair reads its first tap twice (zero weights).
                    ig_ldsm4(base + 2 * q * PIX + (2 * q + 1 < K ? second : 0), a[0], a[1], a[2], a[3]);
                    if (r < K) ig_mma(acc0, a, bf[r][q][0], bf[r][q][1]);
                    if (r > 0) ig_mma(acc1, a, bf[r - 1][q][0], bf[r - 1][q][1]);
                }
            }
            // Accumulators: pixel t*16 + lane/4 (0, 1) and + 8 (2, 3), channels ch, ch + 1.
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int ox = t * 16 + (lane >> 2) + 8 * h;
                if (ox < valid_w) {
                    dwm_store(y_row + ox * ldo, res ? r_row + ox * C : res, acc0[2 * h], acc0[2 * h + 1], act);
                    if (two)
                        dwm_store(y_row + (W + ox) * ldo, res ? r_row + (W + ox) * C : res, acc1[2 * h],
                                  acc1[2 * h + 1], act);
                }
            }
        }
    }
    cp_async_wait<0>();
}

#define DWM_PARAMS                                                                                          \
    const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ w, const float *__restrict__ bias, \
        const T *__restrict__ res, int H, int W, int C, int rows, int bw, int act, int ldo
#define DWM_KERNEL(NAME, K, NW)                                                            \
    extern "C" __global__ void NAME(DWM_PARAMS);                                           \
    extern "C" __global__ void __launch_bounds__(NW * 32, 3) NAME(DWM_PARAMS) {            \
        dwm_conv<K, NW>(x, y, w, bias, res, H, W, C, rows, bw, act, ldo);                  \
    }

// 3x3 and 5x5 with 4, 6 or 8 channel groups per block (32, 48, 64 channels): the host
// takes the widest that divides C into whole blocks.
DWM_KERNEL(dwm3_w4, 3, 4)
DWM_KERNEL(dwm3_w6, 3, 6)
DWM_KERNEL(dwm3_w8, 3, 8)
DWM_KERNEL(dwm5_w4, 5, 4)
DWM_KERNEL(dwm5_w6, 5, 6)
DWM_KERNEL(dwm5_w8, 5, 8)
