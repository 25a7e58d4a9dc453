// Restormer's block front halves in one pass (compiled after conv.cu, whose ig_* helpers
// it uses): with products p = W1 . LN(x) + b1 (a 1x1 convolution, P channels) and
// d = depthwise3x3(p) + bd (zero padding of p),
//   gate == 0: y = d                         (attention: qkv then its depthwise, P = 3C)
//   gate == 1: y = gelu(d[:h]) * d[h:]       (feed-forward: project_in, depthwise, gate)
// The P-wide products never reach memory: each block normalises the pixels of one
// FR_TH x FR_TW output tile plus a one-pixel halo into shared memory once, then for each
// 64-product slice runs the product on tensor cores (mma.sync m16n8k16, fp32
// accumulation) into shared memory, rounded to T as the unfused path stores it, and the
// depthwise step (and gate) from there.
//
// Shared memory (dynamic, FR_SMEM_BYTES(C)), rows padded by 8 elements so that the 8 row
// addresses of an ldmatrix fall in different bank groups:
//   A  [FR_MROWS][C + 8]     normalised halo pixels (rows past the halo are zero)
//   B  [2][FR_NS][C + 8]     weight rows of the current and the next slice (cp.async)
//   Pm [FR_HALO][FR_PLD]     the slice's products at the halo pixels, zero outside the image
// Slice s, row r: product channel 64s + r (gate == 0), or (r < 32 ? 0 : h) + 32s + (r & 31)
// (gate == 1: the two halves' channels that gate each other side by side).
// The host guarantees: C % 16 == 0, C <= FR_CMAX, P (and h = P / 2 with the gate) even,
// W1 rows ldw elements apart with ldw % 8 == 0, 16-byte aligned x and W1, 4-byte aligned
// y, and every index below 2^31.

#define FR_TH 8
#define FR_TW 16
#define FR_HALO ((FR_TH + 2) * (FR_TW + 2))  // 180 halo pixels
#define FR_MROWS 192                          // padded to 12 product tiles of 16 rows
#define FR_NS 64                              // products per slice
#define FR_PLD 72                             // Pm row stride (elements)
#define FR_CMAX 192                           // channels held by the normalising lanes
#define FR_SMEM_BYTES(C) ((FR_MROWS * ((C) + 8) + 2 * FR_NS * ((C) + 8) + FR_HALO * FR_PLD) * 2)

// Eight 16-bit values at p (16-byte aligned) as floats.
__device__ __forceinline__ void fr_ld8(const T* p, float* v) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = ldf(h[j]);
}

__device__ __forceinline__ void fr_st8(T* p, const float* v) {
    uint4 u;
    T* h = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int j = 0; j < 8; j++) h[j] = stf(v[j]);
    *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ float fr_sum8(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    return v;
}

// LayerNorm of one pixel's C values at px (shared memory) in place, by the eight lanes
// of `sub` 0-7 (every lane of the warp calls it: the sums are shuffles), values in
// registers as layer_norm8 holds them (C <= FR_CMAX). With keep == false the statistics
// are still taken part in but the row is left as it is (zeros outside the image).
template <int CT>
__device__ __forceinline__ void fr_normalise_row(T* px, int sub, int c_rt, const float* __restrict__ ln_w,
                                                 const float* __restrict__ ln_b, float eps, bool keep) {
    const int C = CT ? CT : c_rt;
    const int groups = C >> 3;
    float v[FR_CMAX / 64][8];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < FR_CMAX / 64; k++) {
        int g = sub + 8 * k;
        if (g < groups) {
            fr_ld8(px + g * 8, v[k]);
#pragma unroll
            for (int j = 0; j < 8; j++) s += v[k][j];
        }
    }
    const float mean = fr_sum8(s) / C;
    float qs = 0.0f;
#pragma unroll
    for (int k = 0; k < FR_CMAX / 64; k++) {
        if (sub + 8 * k < groups) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float d = v[k][j] - mean;
                qs += d * d;
            }
        }
    }
    const float inv = 1.0f / sqrtf(fr_sum8(qs) / C + eps);
    if (!keep) return;
#pragma unroll
    for (int k = 0; k < FR_CMAX / 64; k++) {
        int g = sub + 8 * k;
        if (g < groups) {
            float r[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float wv = ln_w[g * 8 + j];
                r[j] = ln_b ? (v[k][j] - mean) * inv * wv + ln_b[g * 8 + j] : v[k][j] * inv * wv;
            }
            fr_st8(px + g * 8, r);
        }
    }
}

// One 16-wide K step of a warp's MI x 4 product tiles (16 pixels x 8 products each):
// rows wm.. of the normalised pixels at `as`, rows wn.. of the slice's weights at `bs`,
// both C + 8 elements apart (conv.cu's fragment layouts).
template <int MI>
__device__ __forceinline__ void fr_mma_k16(float (&acc)[MI][4][4], unsigned as, unsigned bs, int wm, int wn, int kk,
                                           int C, int lane) {
    unsigned af[MI][4], bf[4][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
        int row = wm + mi * 16 + (lane & 15);
        int col = kk + (lane >> 4) * 8;
        ig_ldsm4(as + (row * (C + 8) + col) * 2, af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
    }
#pragma unroll
    for (int nj = 0; nj < 2; nj++) {
        int row = wn + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
        int col = kk + ((lane >> 3) & 1) * 8;
        ig_ldsm4(bs + (row * (C + 8) + col) * 2, bf[2 * nj][0], bf[2 * nj][1], bf[2 * nj + 1][0], bf[2 * nj + 1][1]);
    }
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++) ig_mma(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
}

// Product channel of slice s, row r (see above); -1 past the last one.
__device__ __forceinline__ int fr_channel(int s, int r, int P, int gate) {
    if (gate) {
        int h = P >> 1;
        int j = 32 * s + (r & 31);
        return j < h ? j + (r < 32 ? 0 : h) : -1;
    }
    int c = 64 * s + r;
    return c < P ? c : -1;
}

// Copies slice s's weight rows into one B buffer (zeros for rows past the last product).
__device__ __forceinline__ void fr_load_slice(unsigned bs, const T* __restrict__ w1, int s, int C, int ldw, int P,
                                              int gate) {
    const int segs = C >> 3;
    for (int i = threadIdx.x; i < FR_NS * segs; i += blockDim.x) {
        int r = i / segs;
        int j = i - r * segs;
        int c = fr_channel(s, r, P, gate);
        const T* src = c >= 0 ? w1 + (ig_i64)c * ldw + j * 8 : w1;
        cp_async16(bs + (r * (C + 8) + j * 8) * 2, src, c >= 0);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
norm_pointwise_depthwise(const T* __restrict__ x, const float* __restrict__ ln_w, const float* __restrict__ ln_b,
                         const T* __restrict__ w1, const T* __restrict__ b1, const float* __restrict__ wd,
                         const float* __restrict__ bd, T* __restrict__ y, int H, int W, int C, int ldw, int P,
                         int gate, int tiles_y, int tiles_x, float eps) {
#ifdef IG_ARCH_OK
    T* A = reinterpret_cast<T*>(ig_shared);
    T* Pm = A + FR_MROWS * (C + 8) + 2 * FR_NS * (C + 8);
    const unsigned As = smem_addr(A);
    const unsigned Bs = As + FR_MROWS * (C + 8) * 2;
    const unsigned B_STAGE = FR_NS * (C + 8) * 2;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    int t = blockIdx.x;
    const int tx = t % tiles_x;
    t /= tiles_x;
    const int ty = t % tiles_y;
    const int n = t / tiles_y;
    const int y0 = ty * FR_TH - 1;  // image row of halo row 0
    const int x0 = tx * FR_TW - 1;
    const int slices = gate ? ((P >> 1) + 31) / 32 : (P + FR_NS - 1) / FR_NS;

    // The raw halo pixels into A (zeros outside the image and past the halo), all in
    // flight at once, together with slice 0's weights.
    {
        const int segs = C >> 3;
        for (int i = tid; i < FR_MROWS * segs; i += blockDim.x) {
            const int q = i / segs;
            const int j = i - q * segs;
            const int hy = q / (FR_TW + 2);
            const int iy = y0 + hy;
            const int ix = x0 + (q - hy * (FR_TW + 2));
            const bool inside = q < FR_HALO && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
            const T* src = inside ? x + ((ig_i64)(n * H + iy) * W + ix) * C + j * 8 : x;
            cp_async16(As + (q * (C + 8) + j * 8) * 2, src, inside);
        }
    }
    fr_load_slice(Bs, w1, 0, C, ldw, P, gate);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // Normalise them in place, eight lanes per pixel; pixels outside the image stay zero.
    {
        const int sub = tid & 7;
        for (int q = tid >> 3; q < FR_MROWS; q += 32) {
            const int hy = q / (FR_TW + 2);
            const int iy = y0 + hy;
            const int ix = x0 + (q - hy * (FR_TW + 2));
            const bool inside = q < FR_HALO && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
            fr_normalise_row<0>(A + q * (C + 8), sub, C, ln_w, ln_b, eps, inside);
        }
    }

    // Product warps: 4 along the halo pixels (48 rows each), 2 along the slice (32 each).
    const int wm = (warp & 3) * 48;
    const int wn = (warp >> 2) * 32;
    const int g8 = lane >> 2;
    const int t4 = lane & 3;
    for (int s = 0; s < slices; s++) {
        if (s + 1 < slices) fr_load_slice(Bs + ((s + 1) & 1) * B_STAGE, w1, s + 1, C, ldw, P, gate);
        cp_async_commit();
        cp_async_wait<1>();
        // Slice s's weights and (first time) the normalised A are visible; the previous
        // slice's depthwise step is done with Pm.
        __syncthreads();

        float acc[3][4][4];
#pragma unroll
        for (int a = 0; a < 3; a++)
#pragma unroll
            for (int b = 0; b < 4; b++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
        const unsigned bs = Bs + (s & 1) * B_STAGE;
        for (int kk = 0; kk < C; kk += 16) {
            fr_mma_k16<3>(acc, As, bs, wm, wn, kk, C, lane);
        }
        // Products (+ bias) into Pm as T; zero at halo pixels outside the image (the
        // depthwise step's padding).
        float2 pb[4];
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            const int c = fr_channel(s, wn + ni * 8 + t4 * 2, P, gate);
            pb[ni] = b1 && c >= 0 ? make_float2(ldf(b1[c]), ldf(b1[c + 1])) : make_float2(0.0f, 0.0f);
        }
#pragma unroll
        for (int mi = 0; mi < 3; mi++) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int q = wm + mi * 16 + g8 + hh * 8;
                if (q >= FR_HALO) continue;
                const int hy = q / (FR_TW + 2);
                const int iy = y0 + hy;
                const int ix = x0 + (q - hy * (FR_TW + 2));
                const bool inside = (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
#pragma unroll
                for (int ni = 0; ni < 4; ni++) {
                    // Rounded to T, as the unfused path stores the products.
                    float2 p = inside ? make_float2(acc[mi][ni][2 * hh] + pb[ni].x, acc[mi][ni][2 * hh + 1] + pb[ni].y)
                                      : make_float2(0.0f, 0.0f);
                    st2(Pm + q * FR_PLD + wn + ni * 8 + t4 * 2, p);
                }
            }
        }
        __syncthreads();

        // Depthwise step: lane l takes slice rows 2l, 2l+1 (a channel pair), warp w the
        // output columns 2w, 2w+1 of every tile row. Each halo row is read once (four
        // columns) and added into the three output rows it touches (a ring of three).
        const int r0 = 2 * lane;
        const int c0 = fr_channel(s, r0, P, gate);
        float2 k[9];
#pragma unroll
        for (int tp = 0; tp < 9; tp++)
            k[tp] = c0 >= 0 ? make_float2(wd[tp * P + c0], wd[tp * P + c0 + 1]) : make_float2(0.0f, 0.0f);
        const float2 bias2 = bd && c0 >= 0 ? make_float2(bd[c0], bd[c0 + 1]) : make_float2(0.0f, 0.0f);
        const int cx = 2 * warp;
        const int ox = tx * FR_TW + cx;
        const int out_c = gate ? P >> 1 : P;
        float2 acc0[3], acc1[3];
#pragma unroll
        for (int i = 0; i < 3; i++) acc0[i] = acc1[i] = bias2;
#pragma unroll
        for (int hy = 0; hy < FR_TH + 2; hy++) {
            float2 v[4];
#pragma unroll
            for (int hx = 0; hx < 4; hx++) v[hx] = ld2(Pm + (hy * (FR_TW + 2) + cx + hx) * FR_PLD + r0);
#pragma unroll
            for (int ky = 0; ky < 3; ky++) {
                const int oy = hy - ky;
                if (oy < 0 || oy >= FR_TH) continue;
                float2& a0 = acc0[oy % 3];
                float2& a1 = acc1[oy % 3];
#pragma unroll
                for (int kx = 0; kx < 3; kx++) {
                    a0.x = fmaf(v[kx].x, k[ky * 3 + kx].x, a0.x);
                    a0.y = fmaf(v[kx].y, k[ky * 3 + kx].y, a0.y);
                    a1.x = fmaf(v[kx + 1].x, k[ky * 3 + kx].x, a1.x);
                    a1.y = fmaf(v[kx + 1].y, k[ky * 3 + kx].y, a1.y);
                }
            }
            if (hy < 2) continue;
            // Output row hy - 2 is complete.
            const int oy = hy - 2;
            const float2 d0 = acc0[oy % 3], d1 = acc1[oy % 3];
            acc0[oy % 3] = acc1[oy % 3] = bias2;
            const int iy = ty * FR_TH + oy;
            T* row = y + ((ig_i64)(n * H + (iy < H ? iy : 0)) * W) * out_c;
            if (gate) {
                // Lanes 0-15 hold the first half's channels, 16-31 the second's: the first
                // half gates column cx (taking the second half's value), the second half
                // column cx + 1 (taking the first half's), one GELU pair per lane.
                const bool first = lane < 16;
                const float2 send = first ? d1 : d0;
                float2 got;
                got.x = __shfl_xor_sync(0xffffffffu, send.x, 16);
                got.y = __shfl_xor_sync(0xffffffffu, send.y, 16);
                const float2 a = first ? d0 : got;   // first half (through the GELU)
                const float2 b = first ? got : d1;   // second half
                const int col = first ? ox : ox + 1;
                const int oc = first ? c0 : c0 - (P >> 1);
                if (c0 >= 0 && iy < H && col < W)
                    st2(row + (ig_i64)col * out_c + oc, make_float2(gelu_as(a.x) * b.x, gelu_as(a.y) * b.y));
            } else if (c0 >= 0 && iy < H) {
                if (ox < W) st2(row + (ig_i64)ox * out_c + c0, d0);
                if (ox + 1 < W) st2(row + (ig_i64)(ox + 1) * out_c + c0, d1);
            }
        }
    }
    cp_async_wait<0>();
#endif
}

// LayerNorm then a 1x1 product, y = W1 . LN(x) + b1, with the normalised pixels only in
// shared memory (the attention and feed-forward halves' first two steps; the depthwise
// step stays separate). One block per 128 pixels: the raw rows land by cp.async, are
// normalised in place, then each 64-product slice runs on tensor cores into a staging
// tile that leaves in 16-byte stores. The host guarantees: C % 16 == 0, C <= FR_CMAX,
// P % 8 == 0, ldw % 8 == 0, 16-byte aligned x, W1 and y, M * max(C, P) below 2^31.
#define NP_BM 128
#define NP_SMEM_BYTES(C) ((NP_BM * ((C) + 8) + 2 * FR_NS * ((C) + 8) + NP_BM * FR_PLD) * 2)

// fr_load_slice without the gate's channel order, the channel count folded when CT > 0.
template <int CT>
__device__ __forceinline__ void np_load_slice(unsigned bs, const T* __restrict__ w1, int s, int c_rt, int ldw, int P) {
    const int C = CT ? CT : c_rt;
    const int segs = C >> 3;
#pragma unroll
    for (int i = threadIdx.x; i < FR_NS * segs; i += 256) {
        int r = i / segs;
        int j = i - r * segs;
        int c = FR_NS * s + r;
        const bool ok = c < P;
        cp_async16(bs + (r * (C + 8) + j * 8) * 2, ok ? w1 + (ig_i64)c * ldw + j * 8 : w1, ok);
    }
}

// CT: the channel count when known at compile time (index arithmetic folds, loops
// unroll), 0 to read it from c_rt.
template <int CT>
__device__ __forceinline__ void np_body(const T* __restrict__ x, const float* __restrict__ ln_w,
                                        const float* __restrict__ ln_b, const T* __restrict__ w1,
                                        const T* __restrict__ b1, T* __restrict__ y, int M, int c_rt, int ldw, int P,
                                        float eps) {
    const int C = CT ? CT : c_rt;
    T* A = reinterpret_cast<T*>(ig_shared);
    T* S = A + NP_BM * (C + 8) + 2 * FR_NS * (C + 8);
    const unsigned As = smem_addr(A);
    const unsigned Bs = As + NP_BM * (C + 8) * 2;
    const unsigned B_STAGE = FR_NS * (C + 8) * 2;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int m0 = blockIdx.x * NP_BM;
    const int slices = (P + FR_NS - 1) / FR_NS;
    const int segs = C >> 3;

    for (int i = tid; i < NP_BM * segs; i += blockDim.x) {
        const int q = i / segs;
        const int j = i - q * segs;
        const bool live = m0 + q < M;
        cp_async16(As + (q * (C + 8) + j * 8) * 2, live ? x + (ig_i64)(m0 + q) * C + j * 8 : x, live);
    }
    np_load_slice<CT>(Bs, w1, 0, C, ldw, P);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // Normalise in place: eight lanes per pixel, values in registers (as layer_norm8).
    {
        const int sub = tid & 7;
        for (int q = tid >> 3; q < NP_BM; q += 32) {
            fr_normalise_row<CT>(A + q * (C + 8), sub, C, ln_w, ln_b, eps, true);
        }
    }

    // Product warps: 4 along the pixels (32 rows each), 2 along the slice (32 each).
    const int wm = (warp & 3) * 32;
    const int wn = (warp >> 2) * 32;
    const int g8 = lane >> 2;
    const int t4 = lane & 3;
    for (int s = 0; s < slices; s++) {
        if (s + 1 < slices) np_load_slice<CT>(Bs + ((s + 1) & 1) * B_STAGE, w1, s + 1, C, ldw, P);
        cp_async_commit();
        cp_async_wait<1>();
        // Slice s's weights and (first time) the normalised rows are visible; the
        // previous slice's stores are done with S.
        __syncthreads();
        float acc[2][4][4];
#pragma unroll
        for (int a = 0; a < 2; a++)
#pragma unroll
            for (int b = 0; b < 4; b++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
        const unsigned bs = Bs + (s & 1) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < C; kk += 16) {
            fr_mma_k16<2>(acc, As, bs, wm, wn, kk, C, lane);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            const int r = wn + ni * 8 + t4 * 2;
            const int c = FR_NS * s + r;
            const float2 pb = b1 && c < P ? make_float2(ldf(b1[c]), ldf(b1[c + 1])) : make_float2(0.0f, 0.0f);
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int hh = 0; hh < 2; hh++)
                    st2(S + (wm + mi * 16 + g8 + hh * 8) * FR_PLD + r,
                        make_float2(acc[mi][ni][2 * hh] + pb.x, acc[mi][ni][2 * hh + 1] + pb.y));
        }
        __syncthreads();
        // The slice's 128 x 64 products out in 16-byte vectors (8 per pixel).
        for (int i = tid; i < NP_BM * (FR_NS / 8); i += blockDim.x) {
            const int q = i >> 3;
            const int c = FR_NS * s + (i & 7) * 8;
            if (m0 + q < M && c < P)
                *reinterpret_cast<uint4*>(y + (ig_i64)(m0 + q) * P + c) =
                    *reinterpret_cast<const uint4*>(S + q * FR_PLD + (i & 7) * 8);
        }
    }
    cp_async_wait<0>();
}

// One parameter list for every entry point (front.rs passes the same arguments); the
// specialisations cover Restormer-base's widths.
#define NP_PARAMS                                                                                            \
    const T *__restrict__ x, const float *__restrict__ ln_w, const float *__restrict__ ln_b,                  \
        const T *__restrict__ w1, const T *__restrict__ b1, T *__restrict__ y, int M, int C, int ldw, int P, \
        float eps
#define NP_ARGS x, ln_w, ln_b, w1, b1, y, M, C, ldw, P, eps
// MINB: blocks per multiprocessor the registers are budgeted for (three where the
// shared memory allows three: C <= 96).
#ifdef IG_ARCH_OK
#define NP_ENTRY(name, CT, MINB) \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(NP_PARAMS) { np_body<CT>(NP_ARGS); }
#else
#define NP_ENTRY(name, CT, MINB) \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(NP_PARAMS) {}
#endif
NP_ENTRY(norm_pointwise, 0, 2)
NP_ENTRY(norm_pointwise_c48, 48, 3)
NP_ENTRY(norm_pointwise_c96, 96, 3)
NP_ENTRY(norm_pointwise_c192, 192, 2)
