// Implicit-GEMM dense convolution on Hopper's warpgroup tensor-core instruction (wgmma,
// sm_90a only: the kernels are empty elsewhere and the host never launches them). The
// same product as conv.cu's conv_igemm (see there for m, k, A and B and for the host's
// guarantees: C % 8 == 0, ldx % 8 == 0, 16-byte aligned pointers), the same parameter
// list, the same epilogue; appended to conv.cu's translation unit and using its helpers.
//
// A block computes 128 output pixels x BN channels (BN = 192, 128 or 64) with two warpgroups,
// each 64 pixels x BN. K advances in chunks of 64 elements (128 bytes per row): each
// chunk's A rows are gathered from x by cp.async, 16 bytes per copy, straight into the
// layout wgmma reads (K-major, 128-byte swizzle: 16-byte piece j of row r sits at piece
// j ^ (r % 8); 8-row groups 1024 bytes apart), B rows likewise from the weights. STAGES
// chunks are in flight; wgmma of chunk kt runs while chunk kt + STAGES - 2 loads.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_ARCH_OK 1
#endif

#define WG_BM 128  // output pixels per block
#define WG_BK 64   // K elements per chunk: one 128-byte swizzled row
// Dynamic shared memory (bytes) of a block: STAGES chunks of A [128][64] and B [BN][64],
// 2 bytes each, and 1 KB to align the first stage to the swizzle's 1,024-byte period.
#define WG_SMEM_BYTES(BN, STAGES) ((STAGES) * (WG_BM + (BN)) * WG_BK * 2 + 1024)

#ifdef IGEMM_BF16
#define WG_TYPE "bf16"
#else
#define WG_TYPE "f16"
#endif

#ifdef WG_ARCH_OK
// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle whose rows are
// 128 bytes apart: start address, leading offset (unused by this layout: 1), stride
// between 8-row groups (1,024 bytes), swizzle mode 1 (128 bytes) in bits 62-63.
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr) {
    unsigned long long d = (unsigned long long)((addr & 0x3FFFF) >> 4);
    d |= 1ull << 16;
    d |= (unsigned long long)(1024 >> 4) << 32;
    d |= 1ull << 62;
    return d;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes reach the tensor cores' (async proxy) view of shared memory only
// after this fence in each writing thread.
__device__ __forceinline__ void wg_fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous
// wgmma window.
template <int R>
__device__ __forceinline__ void wg_pin(float* d) {
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A . B^T for one k16 step: A {64 x 16} and B {128 x 16} K-major in shared memory
// (128-byte swizzle), 64 fp32 accumulators per thread; scale_d 0 overwrites d.
__device__ __forceinline__ void wg_mma_n128(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." WG_TYPE "." WG_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}

// The same with B {192 x 16}, 96 accumulators.
__device__ __forceinline__ void wg_mma_n192(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32." WG_TYPE "." WG_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(da), "l"(db), "r"(scale_d));
}

// d (+)= A . B^T for one k16 step: A {64 x 16} and B {64 x 16} K-major in shared memory
// (128-byte swizzle), 32 fp32 accumulators per thread; scale_d 0 overwrites d.
__device__ __forceinline__ void wg_mma_n64(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." WG_TYPE "." WG_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}

template <int BN>
__device__ __forceinline__ void wg_mma(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    if constexpr (BN == 192)
        wg_mma_n192(d, da, db, scale_d);
    else if constexpr (BN == 128)
        wg_mma_n128(d, da, db, scale_d);
    else
        wg_mma_n64(d, da, db, scale_d);
}

// 16 bytes global -> shared through L1 (cp.async.ca): the input rows a block gathers
// again for the neighbouring taps (see WgLoader) are then served from L1.
__device__ __forceinline__ void wg_cp16_l1(unsigned dst, const void* src, bool full) {
    int n = full ? 16 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

// The gather state of one thread: AR A rows and BR B rows (STEP rows apart: the copying
// threads / 8), the 16-byte piece `seg` of each, and where in K that piece of the next
// chunk lies.
// Chunk order: with C % 64 == 0 (TAP_INNER) a chunk is 64 channels of one tap and the
// taps run innermost (ci0 = 0: taps 0..KH*KW-1, then ci0 = 64, ...): consecutive chunks
// read the same input pixels shifted by one tap, so A is gathered through L1 and most of
// it is read from L2 once instead of KH*KW times. Otherwise K runs in its stored order
// ((ky, kx, ci), a chunk may span taps) and A bypasses L1 as in conv.cu.
template <int AR, int BR>
struct WgLoader {
    int iy0[AR], ix0[AR], pix[AR];
    const T* wrow[BR];
    bool wok[BR];
    int kb, ci, kx, ky;
};

template <int AR, int BR, int STEP, bool TAP_INNER>
__device__ __forceinline__ void wg_load_chunk(WgLoader<AR, BR>& L, unsigned as, unsigned bs, int lrow, int seg,
                                              const T* __restrict__ x, const T* __restrict__ w, int H, int W,
                                              int C, int KW, int K, int ldx) {
    const bool kin = TAP_INNER ? L.ci < C : L.kb < K;
#pragma unroll
    for (int i = 0; i < AR; i++) {
        int r = lrow + STEP * i;
        int iy = L.iy0[i] + L.ky;
        int ix = L.ix0[i] + L.kx;
        bool ok = kin && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
        const T* src = ok ? x + ((ig_i64)(L.pix[i] + iy * W + ix) * ldx + L.ci) : x;
        if (TAP_INNER)
            wg_cp16_l1(as + r * 128 + ((seg ^ (r & 7)) << 4), src, ok);
        else
            cp_async16(as + r * 128 + ((seg ^ (r & 7)) << 4), src, ok);
    }
#pragma unroll
    for (int j = 0; j < BR; j++) {
        int r = lrow + STEP * j;
        bool ok = kin && L.wok[j];
        const T* src = ok ? L.wrow[j] + L.kb : w;
        cp_async16(bs + r * 128 + ((seg ^ (r & 7)) << 4), src, ok);
    }
    if (TAP_INNER) {
        // Next tap; after the last, the first tap of the next 64 channels.
        L.kb += C;
        if (++L.kx == KW) {
            L.kx = 0;
            ++L.ky;
        }
        if (L.kb >= K) {
            L.kx = 0;
            L.ky = 0;
            L.ci += WG_BK;
            L.kb = L.ci;
        }
    } else {
        L.kb += WG_BK;
        ig_advance(L.ci, L.kx, L.ky, WG_BK, C, KW);
    }
}

// Sets up a loader: this thread's A rows are output pixels m0 + lrow + STEP*i, its B
// rows output channels n0 + lrow + STEP*j, and its piece `seg` starts at K position 0.
template <int AR, int BR, int STEP, bool TAP_INNER>
__device__ __forceinline__ void wg_loader_init(WgLoader<AR, BR>& L, int lrow, int seg, int m0, int n0,
                                               const T* __restrict__ w, int H, int W, int C, int OH, int OW,
                                               int Cout, int KW, int stride, int pad, int M, int Kp) {
    ig_loader_rows<AR, BR, STEP>(L.iy0, L.ix0, L.pix, L.wrow, L.wok, lrow, m0, n0, w, H, W, OH, OW, Cout, stride,
                                 pad, M, Kp);
    L.kb = seg * 8;
    L.ci = seg * 8;
    L.kx = 0;
    L.ky = 0;
    if (!TAP_INNER) {
        L.ci = 0;
        ig_advance(L.ci, L.kx, L.ky, L.kb, C, KW);
    }

}

// The k16 steps of one K chunk for the calling warpgroup: its 64 A rows at a_tile, the
// BN B rows at b_tile (shared addresses of swizzled stages), committed as one group.
template <int BN>
__device__ __forceinline__ void wg_chunk_mma(float* acc, unsigned a_tile, unsigned b_tile, int accumulate = 1) {
    wg_pin<BN / 2>(acc);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < WG_BK / 16; kk++) {
        // 16 elements = 32 bytes further along the swizzled rows.
        wg_mma<BN>(acc, wg_desc(a_tile + kk * 32), wg_desc(b_tile + kk * 32), kk == 0 ? accumulate : 1);
    }
    wg_commit();
}

// Bias, activation, residual and the store of one warpgroup's 64 x BN accumulators for
// output pixels m_first .. m_first + 63 and channels n0 .. n0 + BN - 1.
template <int BN>
__device__ __forceinline__ void wg_epilogue(const float* acc, int m_first, int n0, const T* __restrict__ bias,
                                            const T* __restrict__ res, T* __restrict__ y, int M, int Cout, int act,
                                            int ldy) {
    const int tid = threadIdx.x;
    // Epilogue: warp w of the warpgroup holds rows 16w + g and 16w + g + 8 of its 64, and
    // in each 8-channel group j channels 8j + 2*t4 and 8j + 2*t4 + 1 (acc[4j .. 4j+3]:
    // (g, 2t4), (g, 2t4+1), (g+8, 2t4), (g+8, 2t4+1)), as mma.sync's 16x8 tiles.
    const int lane = tid & 31;
    const int warp = (tid >> 5) & 3;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const bool pairs = (Cout & 1) == 0 && (ldy & 1) == 0;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int m = m_first + warp * 16 + g + h * 8;
        if (m >= M) continue;
        T* yrow = y + (ig_i64)m * ldy;
        const T* rrow = res ? res + (ig_i64)m * Cout : res;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            int co = n0 + j * 8 + t4 * 2;
            if (co >= Cout) continue;
            ig_store_pair(yrow, res, rrow, bias, co, co + 1 < Cout, pairs, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], act);
        }
    }
}

// The K loop of a block (wg_conv here, src_product in conv_sources.cu): STAGES - 2 chunks
// loading while one is multiplied. `load(chunk, a_stage, b_stage)` issues chunk's copies
// into the stage at those shared addresses. Each warpgroup multiplies its 64 A rows of
// a stage.
template <int BN, int STAGES, typename Load>
__device__ __forceinline__ void wg_k_loop(float* acc, unsigned As, unsigned Bs, int KT, Load&& load) {
    constexpr int ACC = BN / 2;
    constexpr unsigned A_STAGE = WG_BM * 128;
    constexpr unsigned B_STAGE = BN * 128;
    constexpr int AHEAD = STAGES - 2;  // chunks loading while one is multiplied
#pragma unroll
    for (int s = 0; s < AHEAD; s++) {
        if (s < KT) load(s, As + s * A_STAGE, Bs + s * B_STAGE);
        cp_async_commit();  // always (possibly empty): group i is chunk i
    }
    const int wg = (int)threadIdx.x >> 7;
    for (int kt = 0; kt < KT; kt++) {
        // Chunk kt has landed (AHEAD-1 younger groups may be pending) and, after the
        // barrier, every warpgroup has retired its wgmma of chunk kt-2, whose stage the
        // load below overwrites.
        cp_async_wait<AHEAD - 1>();
        wg_fence_async_smem();
        __syncthreads();
        if (kt + AHEAD < KT) {
            const int ls = (kt + AHEAD) % STAGES;
            load(kt + AHEAD, As + ls * A_STAGE, Bs + ls * B_STAGE);
        }
        cp_async_commit();

        const int st = kt % STAGES;
        wg_chunk_mma<BN>(acc, As + st * A_STAGE + wg * 64 * 128, Bs + st * B_STAGE);
        wg_wait<1>();
        wg_pin<ACC>(acc);
    }
    wg_wait<0>();
    wg_pin<ACC>(acc);
    cp_async_wait<0>();
}

template <int BN, int STAGES, bool TAP_INNER>
__device__ __forceinline__ void wg_conv(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                        const T* __restrict__ res, T* __restrict__ y, int H, int W, int C, int OH,
                                        int OW, int Cout, int KW, int stride, int pad, int M, int K, int Kp,
                                        int n_tiles, int act, int ldx, int ldy) {
    constexpr int AR = WG_BM / 32;  // 256 threads: 8 pieces per row, 32 rows per pass
    constexpr int BR = BN / 32;
    constexpr int ACC = BN / 2;      // accumulators per thread (64 x BN per warpgroup)
    const unsigned base = (smem_addr(ig_shared) + 1023u) & ~1023u;
    const unsigned As = base;
    const unsigned Bs = base + STAGES * WG_BM * 128;

    const int tid = threadIdx.x;
    const int m0 = (int)(blockIdx.x / n_tiles) * WG_BM;
    const int n0 = (int)(blockIdx.x % n_tiles) * BN;
    const int seg = tid & 7;
    const int lrow = tid >> 3;

    WgLoader<AR, BR> L;
    wg_loader_init<AR, BR, 32, TAP_INNER>(L, lrow, seg, m0, n0, w, H, W, C, OH, OW, Cout, KW, stride, pad, M, Kp);

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.0f;

    const int KT = (K + WG_BK - 1) / WG_BK;
    // The loader advances through K itself, chunk after chunk.
    wg_k_loop<BN, STAGES>(acc, As, Bs, KT, [&](int, unsigned a, unsigned b) {
        wg_load_chunk<AR, BR, 32, TAP_INNER>(L, a, b, lrow, seg, x, w, H, W, C, KW, K, ldx);
    });
    const int wg = tid >> 7;  // warpgroup: pixels 64*wg .. 64*wg+63 of the tile

    wg_epilogue<BN>(acc, m0 + wg * 64, n0, bias, res, y, M, Cout, act, ldy);
}

// ---- Warp-specialised variant (`conv_wgmma_ws_*`, opt-in: APERTURE_WGMMA=ws) ----
// Three warpgroups: the first only gathers (128 threads, STEP 16), the other two only
// multiply, each 64 pixels x BN as above. Stages pass between them through mbarriers
// instead of one block barrier per chunk: full[s] completes when the copying threads'
// cp.async writes of the chunk in stage s have landed (each copier waits for its own
// copies, fences them for the tensor cores and arrives: 128 arrivals), empty[s] when the
// eight math warps have each seen their wgmma reading stage s retire (one arrival each). The
// copiers keep WS_AHEAD chunks of copies in flight and may run up to STAGES chunks ahead.

#define WG_WS_AHEAD 2

__device__ __forceinline__ void wg_mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void wg_mbar_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Waits for the completion of phase `parity` (0, 1, 0, ...: the barrier's uses).
__device__ __forceinline__ void wg_mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred p;\nWG_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WG_WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

template <int BN, int STAGES, bool TAP_INNER>
__device__ __forceinline__ void wg_conv_ws(const T* __restrict__ x, const T* __restrict__ w,
                                           const T* __restrict__ bias, const T* __restrict__ res, T* __restrict__ y,
                                           int H, int W, int C, int OH, int OW, int Cout, int KW, int stride, int pad,
                                           int M, int K, int Kp, int n_tiles, int act, int ldx, int ldy) {
    static_assert(WG_WS_AHEAD < STAGES, "the copiers must not wait for stages they still hold");
    constexpr int ACC = BN / 2;
    constexpr unsigned A_STAGE = WG_BM * 128;
    constexpr unsigned B_STAGE = BN * 128;
    const unsigned base = (smem_addr(ig_shared) + 1023u) & ~1023u;
    const unsigned As = base;
    const unsigned Bs = base + STAGES * A_STAGE;
    const unsigned full = Bs + STAGES * B_STAGE;  // STAGES mbarriers of 8 bytes
    const unsigned empty = full + STAGES * 8;

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int m0 = (int)(blockIdx.x / n_tiles) * WG_BM;
    const int n0 = (int)(blockIdx.x % n_tiles) * BN;
    const int KT = (K + WG_BK - 1) / WG_BK;
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            wg_mbar_init(full + 8 * s, 128);
            wg_mbar_init(empty + 8 * s, 8);
        }
    }
    __syncthreads();

    if (wg == 0) {
        // Copier: chunk c goes to stage c % STAGES once the math warpgroups have released
        // that stage's previous chunk (c - STAGES).
        constexpr int AR = WG_BM / 16;
        constexpr int BR = BN / 16;
        const int seg = tid & 7;
        const int lrow = tid >> 3;
        WgLoader<AR, BR> L;
        wg_loader_init<AR, BR, 16, TAP_INNER>(L, lrow, seg, m0, n0, w, H, W, C, OH, OW, Cout, KW, stride, pad, M,
                                              Kp);
        for (int c = 0; c < KT; c++) {
            const int s = c % STAGES;
            if (c >= STAGES) wg_mbar_wait(empty + 8 * s, ((c / STAGES) - 1) & 1);
            wg_load_chunk<AR, BR, 16, TAP_INNER>(L, As + s * A_STAGE, Bs + s * B_STAGE, lrow, seg, x, w, H, W, C, KW,
                                                  K, ldx);
            cp_async_commit();
            if (c >= WG_WS_AHEAD) {
                // Chunk c - AHEAD has landed for this thread: hand it over.
                cp_async_wait<WG_WS_AHEAD>();
                wg_fence_async_smem();
                wg_mbar_arrive(full + 8 * ((c - WG_WS_AHEAD) % STAGES));
            }
        }
        cp_async_wait<0>();
        wg_fence_async_smem();
        for (int c = KT > WG_WS_AHEAD ? KT - WG_WS_AHEAD : 0; c < KT; c++) wg_mbar_arrive(full + 8 * (c % STAGES));
        return;
    }

    float acc[ACC];
    const int mw = wg - 1;  // math warpgroup: pixels 64*mw .. 64*mw+63 of the tile
    for (int kt = 0; kt < KT; kt++) {
        const int s = kt % STAGES;
        wg_mbar_wait(full + 8 * s, (kt / STAGES) & 1);
        wg_chunk_mma<BN>(acc, As + s * A_STAGE + mw * 64 * 128, Bs + s * B_STAGE, kt > 0);
        wg_wait<1>();
        // The wgmma of chunk kt - 1 has retired for this warp: its stage may be refilled
        // once all eight have said so.
        if (kt > 0 && (tid & 31) == 0) wg_mbar_arrive(empty + 8 * ((kt - 1) % STAGES));
    }
    wg_wait<0>();
    wg_pin<ACC>(acc);
    wg_epilogue<BN>(acc, m0 + mw * 64, n0, bias, res, y, M, Cout, act, ldy);
}
#endif  // WG_ARCH_OK

// 128 x 192 (four stages, 161 KB) and 128 x 128 (five stages, 161 KB): one block per
// multiprocessor; 128 x 64 (four stages, 97 KB): two blocks. The parameter list is
// conv_igemm's.
#define WG_STAGES_N192 4
#define WG_STAGES_N128 5
#define WG_STAGES_N64 4

// Every entry point has conv_igemm's parameter list: NAME runs FN (wg_conv or the
// warp-specialised wg_conv_ws) on a BN-wide tile with STAGES chunks, taps innermost where
// C % 64 == 0. The warp-specialised ones: 384 threads, one block per multiprocessor, the
// same stages plus 2 * STAGES mbarriers (WG_SMEM_BYTES + 256 bytes at launch).
#define WG_ENTRY(NAME, FN, THREADS, BLOCKS, BN, STAGES)                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS)                                                  \
        NAME(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,                         \
             const T* __restrict__ res, T* __restrict__ y, int H, int W, int C, int OH, int OW, int Cout, int KW,   \
             int stride, int pad, int M, int K, int Kp, int n_tiles, int act, int ldx, int ldy) {                 \
        WG_BODY(FN, BN, STAGES)                                                                                    \
    }
#ifdef WG_ARCH_OK
#define WG_BODY(FN, BN, STAGES)                                                                                    \
    if (C % WG_BK == 0)                                                                                            \
        FN<BN, STAGES, true>(x, w, bias, res, y, H, W, C, OH, OW, Cout, KW, stride, pad, M, K, Kp, n_tiles, act,   \
                             ldx, ldy);                                                                            \
    else                                                                                                           \
        FN<BN, STAGES, false>(x, w, bias, res, y, H, W, C, OH, OW, Cout, KW, stride, pad, M, K, Kp, n_tiles, act,  \
                              ldx, ldy);
#else
#define WG_BODY(FN, BN, STAGES)
#endif
WG_ENTRY(conv_wgmma_n192, wg_conv, 256, 1, 192, WG_STAGES_N192)
WG_ENTRY(conv_wgmma_n128, wg_conv, 256, 1, 128, WG_STAGES_N128)
WG_ENTRY(conv_wgmma_n64, wg_conv, 256, 2, 64, WG_STAGES_N64)
// Opt-in (APERTURE_WGMMA=ws|ws-force): built only then, since they add 60-70 % to the module's
// compile time (NVRTC 12.9, sm_90a, one core: 76-79 s without, 124-140 s with them) for no
// measured gain.
#ifdef WG_WARP_SPECIALISED
WG_ENTRY(conv_wgmma_ws_n192, wg_conv_ws, 384, 1, 192, WG_STAGES_N192)
WG_ENTRY(conv_wgmma_ws_n128, wg_conv_ws, 384, 1, 128, WG_STAGES_N128)
WG_ENTRY(conv_wgmma_ws_n64, wg_conv_ws, 384, 1, 64, WG_STAGES_N64)
#endif
