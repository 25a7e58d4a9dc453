// Implicit-GEMM dense convolution on tensor cores (sm_80 and later: mma.sync m16n8k16,
// ldmatrix, cp.async), NHWC, 16-bit storage (T from the preamble; IGEMM_BF16 selects the
// bf16 instruction), fp32 accumulation, bias + activation + residual in the epilogue.
//
// As a product: y[m][co] = sum_k A[m][k] * B[co][k], with
//   m = (n*OH + oy)*OW + ox           (output pixel, NHWC row of y)
//   k = (ky*KW + kx)*C + ci           (the layout conv.rs gives the dense weights)
//   A[m][k] = x[n, oy*stride + ky - pad, ox*stride + kx - pad, ci], zero outside the image
//   B[co][k] = w[co*Kp + k]           (weights [Cout][Kp], K contiguous)
// A is never written to memory: each K chunk is gathered from x straight into shared
// memory. Three tile shapes: 128 pixels x 64 channels (4 warps, conv_igemm), 128 x 128
// (8 warps, conv_igemm_n128, for wide outputs: half the input traffic per product) and
// 64 x 64 (4 warps, conv_igemm_m64: twice the blocks where the others would leave
// multiprocessors idle, e.g. at batch 1). Two warps along the pixels, each 16*MI pixels x
// 32 channels.
// Rows of x are ldx elements apart and rows of y ldy apart (C and Cout for whole tensors;
// more when x is, or y goes to, a channel slice of a wider tensor such as a concatenation;
// the residual is always whole). The host guarantees: C % 8 == 0 and ldx % 8 == 0 (so an
// 8-channel, 16-byte segment of K lies in one tap and is 16-byte aligned; then
// Kp == KH*KW*C and weight rows are aligned too), 16-byte aligned pointers, N*H*W, M and
// the block count below 2^31. Cout and ldy are free (pairs are stored when both are even).

typedef unsigned short ig_u16;
typedef long long ig_i64;

#define IG_BM 128     // output pixels per block of the two large tiles
#define IG_BM_SMALL 64  // and of conv_igemm_m64
#define IG_BK 32      // K elements per pipeline stage
#define IG_STAGES 3   // cp.async pipeline depth
// Shared row stride in elements: 80 bytes, so the 8 row addresses of one ldmatrix fall
// in 8 different 16-byte bank groups (a 64-byte stride would conflict 2-way).
#define IG_LD 40
// Block shapes: WN warps along the channels (2 or 4), two along the pixels.
#define IG_BN_SMALL 64
#define IG_BN_WIDE 128
// Dynamic shared memory of a block of BM pixels and WN warps along the channels (bytes).
#define IG_SMEM_BYTES(BM, WN) (IG_STAGES * ((BM) + 32 * (WN)) * IG_LD * 2)

#ifdef IGEMM_BF16
#define IG_MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#else
#define IG_MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#endif

__device__ __forceinline__ float ig_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// act: 0 identity, 1 gelu (erf), 2 relu, 3 silu (conv.rs::act_code, ops.cu::activate).
__device__ __forceinline__ float ig_activate(float y, int act) {
    if (act == 1) return ig_gelu(y);
    if (act == 2) return fmaxf(y, 0.0f);
    if (act == 3) return y / (1.0f + expf(-y));
    return y;
}

// Output channels co and co + 1 (the second only when `second`) of one pixel row:
// bias, activation, residual (row rrow of res, when there is one), rounded once and stored; with `pairs` (even
// Cout and ldy) as one 4-byte load/store, else element by element.
__device__ __forceinline__ void ig_store_pair(T* yrow, const T* res, const T* rrow, const T* __restrict__ bias, int co,
                                              bool second, bool pairs, float v0, float v1, int act) {
    if (bias) {
        v0 += ldf(bias[co]);
        if (second) v1 += ldf(bias[co + 1]);
    }
    v0 = ig_activate(v0, act);
    v1 = ig_activate(v1, act);
    if (pairs) {
        if (res) {
            float2 r = ld2(rrow + co);
            v0 += r.x;
            v1 += r.y;
        }
        st2(yrow + co, make_float2(v0, v1));
    } else {
        if (res) v0 += ldf(rrow[co]);
        yrow[co] = stf(v0);
        if (second) {
            if (res) v1 += ldf(rrow[co + 1]);
            yrow[co + 1] = stf(v1);
        }
    }
}

// Shared-space byte address of a generic pointer to shared memory (taken once per block;
// the loops add byte offsets to it).
// smem_addr, cp_async16, cp_async_commit, cp_async_wait: math.cu.

__device__ __forceinline__ void ig_ldsm4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// c += a (16x16, row-major) . b (16x8, column-major), fp32 accumulators.
__device__ __forceinline__ void ig_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(IG_MMA " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Moves a position (ci, kx, ky) in K forward by d elements.
__device__ __forceinline__ void ig_advance(int& ci, int& kx, int& ky, int d, int C, int KW) {
    ci += d;
    while (ci >= C) {
        ci -= C;
        if (++kx == KW) {
            kx = 0;
            ++ky;
        }
    }
}

// A loader's rows: A row i is output pixel m0 + lrow + STEP*i (the input row and column
// of its tap (0, 0) and its image's first pixel; rows past M get taps outside the image,
// so zeros), B row j is output channel n0 + lrow + STEP*j (its weights, none past Cout).
// Shared by the mma.sync loader (IgLoader) and the wgmma one (WgLoader).
template <int AR, int BR, int STEP>
__device__ __forceinline__ void ig_loader_rows(int (&iy0)[AR], int (&ix0)[AR], int (&pix)[AR],
                                               const T* (&wrow)[BR], bool (&wok)[BR], int lrow, int m0, int n0,
                                               const T* __restrict__ w, int H, int W, int OH, int OW, int Cout,
                                               int stride, int pad, int M, int Kp) {
    const int ohw = OH * OW;
#pragma unroll
    for (int i = 0; i < AR; i++) {
        int m = m0 + lrow + STEP * i;
        if (m < M) {
            int n = m / ohw;
            int r = m - n * ohw;
            int oy = r / OW;
            int ox = r - oy * OW;
            iy0[i] = oy * stride - pad;
            ix0[i] = ox * stride - pad;
            pix[i] = n * H * W;
        } else {
            iy0[i] = -(1 << 30);
            ix0[i] = 0;
            pix[i] = 0;
        }
    }
#pragma unroll
    for (int j = 0; j < BR; j++) {
        int co = n0 + lrow + STEP * j;
        wok[j] = co < Cout;
        wrow[j] = wok[j] ? w + (ig_i64)co * Kp : w;
    }
}

// The gather state of one thread: its A rows (input pixel of tap (0, 0), or far outside
// the image for rows past M), its 2 B rows, and where in K its segment of the next chunk
// lies. AR = A rows per thread (4 with 128 threads, 2 with 256).
template <int AR>
struct IgLoader {
    int iy0[AR], ix0[AR], pix[AR];
    const T* wrow[2];
    bool wok[2];
    int kb, ci, kx, ky;
};

// Issues the cp.async copies of the next K chunk into one pipeline stage and moves the
// loader on by one chunk. as, bs: shared addresses of that stage's A [BM][IG_LD] and
// B [BN][IG_LD]; this thread fills rows lrow + step*i of both.
template <int AR>
__device__ __forceinline__ void ig_load_chunk(IgLoader<AR>& L, unsigned as, unsigned bs, int lrow, int step, int seg,
                                              const T* __restrict__ x, const T* __restrict__ w, int H, int W,
                                              int C, int KW, int K, int ldx) {
    const bool kin = L.kb < K;
#pragma unroll
    for (int i = 0; i < AR; i++) {
        int iy = L.iy0[i] + L.ky;
        int ix = L.ix0[i] + L.kx;
        bool ok = kin && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
        const T* src = ok ? x + ((ig_i64)(L.pix[i] + iy * W + ix) * ldx + L.ci) : x;
        cp_async16(as + ((lrow + step * i) * IG_LD + seg * 8) * 2, src, ok);
    }
#pragma unroll
    for (int j = 0; j < 2; j++) {
        bool ok = kin && L.wok[j];
        const T* src = ok ? L.wrow[j] + L.kb : w;
        cp_async16(bs + ((lrow + step * j) * IG_LD + seg * 8) * 2, src, ok);
    }
    L.kb += IG_BK;
    ig_advance(L.ci, L.kx, L.ky, IG_BK, C, KW);
}

extern __shared__ __align__(16) ig_u16 ig_shared[];

// One block per (BM-pixel tile, BN-channel tile); the grid is 1-D with the channel tile
// fastest so that the blocks sharing an input tile run together (L2 reuse). MI: 16-row
// product tiles per warp along the pixels (BM = 2 * 16 * MI).
template <int WN, int MI>
__device__ __forceinline__ void ig_conv(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                        const T* __restrict__ res, T* __restrict__ y, int H, int W, int C, int OH,
                                        int OW, int Cout, int KW, int stride, int pad, int M, int K, int Kp,
                                        int n_tiles, int act, int ldx, int ldy) {
    constexpr int THREADS = 64 * WN;
    constexpr int BN = 32 * WN;
    constexpr int BM = 32 * MI;
    constexpr int STEP = THREADS / 4;     // rows between one thread's A (and B) rows
    constexpr int AR = BM / STEP;         // A rows per thread
    static_assert(BN / STEP == 2, "two B rows per thread");
    // Shared memory: A [IG_STAGES][BM][IG_LD], then B [IG_STAGES][BN][IG_LD], 2 bytes
    // per element; As and Bs are their shared-space byte addresses.
    const unsigned As = smem_addr(ig_shared);
    const unsigned Bs = As + IG_STAGES * BM * IG_LD * 2;
    constexpr unsigned A_STAGE = BM * IG_LD * 2;
    constexpr unsigned B_STAGE = BN * IG_LD * 2;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int m0 = (int)(blockIdx.x / n_tiles) * BM;
    const int n0 = (int)(blockIdx.x % n_tiles) * BN;

    // Loader role: this thread copies the 8-element segment `seg` of each K chunk for
    // tile rows lrow + STEP*i.
    const int seg = tid & 3;
    const int lrow = tid >> 2;
    IgLoader<AR> L;
    ig_loader_rows<AR, 2, STEP>(L.iy0, L.ix0, L.pix, L.wrow, L.wok, lrow, m0, n0, w, H, W, OH, OW, Cout, stride,
                                pad, M, Kp);
    // Position in K of this thread's segment in the first chunk.
    L.kb = seg * 8;
    L.ci = 0;
    L.kx = 0;
    L.ky = 0;
    ig_advance(L.ci, L.kx, L.ky, L.kb, C, KW);

    float acc[MI][4][4];
#pragma unroll
    for (int a = 0; a < MI; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;

    const int KT = (K + IG_BK - 1) / IG_BK;
#pragma unroll
    for (int s = 0; s < IG_STAGES - 1; s++) {
        if (s < KT)
            ig_load_chunk<AR>(L, As + s * A_STAGE, Bs + s * B_STAGE, lrow, STEP, seg, x, w, H, W, C, KW, K, ldx);
        // Always commit (possibly an empty group) so that group i is chunk i.
        cp_async_commit();
    }

    const int wm = (warp & 1) * 16 * MI;  // warp's first pixel row in the tile
    const int wn = (warp >> 1) * 32;  // warp's first channel in the tile
    for (int kt = 0; kt < KT; kt++) {
        // Chunk kt has landed (at most STAGES-2 younger groups pending) and every warp
        // is done with the stage the next load overwrites (it held chunk kt-1).
        cp_async_wait<IG_STAGES - 2>();
        __syncthreads();
        if (kt + IG_STAGES - 1 < KT) {
            const int ls = (kt + IG_STAGES - 1) % IG_STAGES;
            ig_load_chunk<AR>(L, As + ls * A_STAGE, Bs + ls * B_STAGE, lrow, STEP, seg, x, w, H, W, C, KW, K, ldx);
        }
        cp_async_commit();

        // A warp whose 32 channels all lie past Cout (small Cout, or the last channel
        // tile) has nothing to compute; the condition is uniform across the warp.
        if (n0 + wn >= Cout) continue;
        const unsigned as = As + (kt % IG_STAGES) * A_STAGE;
        const unsigned bs = Bs + (kt % IG_STAGES) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < IG_BK; kk += 16) {
            unsigned af[MI][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                // Lanes 0-15 give rows 0-15 at k 0-7, lanes 16-31 rows 0-15 at k 8-15:
                // the four 8x8 matrices come back as the mma A fragment a0..a3.
                int row = wm + mi * 16 + (lane & 15);
                int col = kk + (lane >> 4) * 8;
                ig_ldsm4(as + (row * IG_LD + col) * 2, af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
            }
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                // = b0, b1 of channel tile 2nj, then b0, b1 of tile 2nj+1.
                int row = wn + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
                int col = kk + ((lane >> 3) & 1) * 8;
                ig_ldsm4(bs + (row * IG_LD + col) * 2, bf[2 * nj][0], bf[2 * nj][1], bf[2 * nj + 1][0],
                         bf[2 * nj + 1][1]);
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) ig_mma(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: accumulator (mi, ni) holds rows g and g+8, channels 2*t4 and 2*t4+1 of its
    // 16x8 tile. With an even Cout both channels exist and the pair is 4-byte aligned
    // (one 2-element load/store); an odd Cout (e.g. a 3-channel image output) goes element
    // by element.
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const bool pairs = (Cout & 1) == 0 && (ldy & 1) == 0;
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int m = m0 + wm + mi * 16 + g + h * 8;
            if (m >= M) continue;
            T* yrow = y + (ig_i64)m * ldy;
            const T* rrow = res ? res + (ig_i64)m * Cout : res;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                int co = n0 + wn + ni * 8 + t4 * 2;
                if (co >= Cout) continue;
                ig_store_pair(yrow, res, rrow, bias, co, co + 1 < Cout, pairs, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1],
                              act);
            }
        }
    }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define IG_ARCH_OK 1
#endif

// The three entry points share one parameter list (conv_igemm passes the same
// arguments to each); shared memory is dynamic: IG_SMEM_BYTES(BM, WN) at launch.
extern "C" __global__ void __launch_bounds__(128, 4)
conv_igemm(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
           const T* __restrict__ res, T* __restrict__ y, int H, int W, int C, int OH, int OW, int Cout, int KW,
           int stride, int pad, int M, int K, int Kp, int n_tiles, int act, int ldx, int ldy) {
#ifdef IG_ARCH_OK
    ig_conv<2, 4>(x, w, bias, res, y, H, W, C, OH, OW, Cout, KW, stride, pad, M, K, Kp, n_tiles, act, ldx, ldy);
#endif
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_igemm_n128(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                const T* __restrict__ res, T* __restrict__ y, int H, int W, int C, int OH, int OW, int Cout, int KW,
                int stride, int pad, int M, int K, int Kp, int n_tiles, int act, int ldx, int ldy) {
#ifdef IG_ARCH_OK
    ig_conv<4, 4>(x, w, bias, res, y, H, W, C, OH, OW, Cout, KW, stride, pad, M, K, Kp, n_tiles, act, ldx, ldy);
#endif
}

extern "C" __global__ void __launch_bounds__(128, 4)
conv_igemm_m64(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
               const T* __restrict__ res, T* __restrict__ y, int H, int W, int C, int OH, int OW, int Cout, int KW,
               int stride, int pad, int M, int K, int Kp, int n_tiles, int act, int ldx, int ldy) {
#ifdef IG_ARCH_OK
    ig_conv<2, 2>(x, w, bias, res, y, H, W, C, OH, OW, Cout, KW, stride, pad, M, K, Kp, n_tiles, act, ldx, ldy);
#endif
}

// Row copies of 16-bit tensors in 16-byte vectors (channel slices in and out of
// concatenations): `rows` rows of `vecs` vectors, rows src_ld and dst_ld vectors apart.
// The host guarantees 16-byte aligned pointers and rows * vecs below 2^31.
extern "C" __global__ void __launch_bounds__(256)
copy_rows16(const uint4* __restrict__ src, uint4* __restrict__ dst, int rows, int vecs, int src_ld, int dst_ld) {
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (unsigned)rows * (unsigned)vecs) return;
    const unsigned r = t / (unsigned)vecs;
    const unsigned v = t - r * (unsigned)vecs;
    dst[(ig_i64)r * dst_ld + v] = src[(ig_i64)r * src_ld + v];
}
