// A 1x1 convolution over a channel concatenation that is never written: each part is
// read where it lies (`sources_wgmma_n64`, `sources_wgmma_n128`; sm_90a only, appended
// after conv_wgmma.cu and using its helpers).
//
//   y[m, :] = act(W . [part_0[m, :] | part_1[m, :] | ...] + bias)
//
// HGNetV2's aggregation is the user: the block input and each layer's whole output are
// the parts, so the layers' outputs need no copy into a concatenation (cuDNN writes
// them packed). K runs over the parts in order; the host guarantees every part's channel
// count is a multiple of 64 (a 64-wide chunk lies in one part), row strides multiples of
// 8 elements, 16-byte aligned pointers, K == the weights' row length, at most
// SRC_PARTS parts, M < 2^31.
//
// A block computes 128 pixels x BN output channels with two warpgroups (64 pixels each)
// on wgmma, K chunks of 64 gathered by cp.async into the 128-byte swizzled layout as in
// wg_conv, STAGES chunks in flight.

#define SRC_PARTS 8

// Where the parts lie (64 bytes, passed by value as one 16-int argument).
struct SrcPointers {
    unsigned long long ptr[SRC_PARTS];
};
// Row stride (elements) of each part and the K position where it ends (prefix sums of
// the channel counts; unused parts repeat the last end).
struct SrcLayout {
    int ld[SRC_PARTS];
    int kend[SRC_PARTS];
};

#ifdef WG_ARCH_OK
// The loading state of one thread: which part the next chunk reads, its base pointer
// (already at this thread's 8-element piece), row stride and K range.
struct SrcCursor {
    const T* base;
    int ld;
    int kstart;
    int kend;
    int part;
};

__device__ __forceinline__ void src_select(SrcCursor& c, const SrcPointers& p, const SrcLayout& l, int part, int seg) {
    // Constant indices only: the tables stay in parameter space.
#pragma unroll
    for (int i = 0; i < SRC_PARTS; i++) {
        if (i == part) {
            c.base = reinterpret_cast<const T*>(p.ptr[i]) + seg * 8;
            c.ld = l.ld[i];
            c.kstart = i == 0 ? 0 : l.kend[i - 1];
            c.kend = l.kend[i];
        }
    }
    c.part = part;
}

template <int AR, int BR>
__device__ __forceinline__ void src_load_chunk(SrcCursor& c, const SrcPointers& p, const SrcLayout& l, int kb,
                                               unsigned as, unsigned bs, int lrow, int seg, const int (&row)[AR],
                                               const T* const (&wrow)[BR], const bool (&wok)[BR], int K) {
    while (kb >= c.kend && c.part + 1 < SRC_PARTS) src_select(c, p, l, c.part + 1, seg);
    const bool kin = kb < K;
    const T* part = c.base + (kb - c.kstart);
#pragma unroll
    for (int i = 0; i < AR; i++) {
        int r = lrow + 32 * i;
        bool ok = kin && row[i] >= 0;
        const T* src = ok ? part + (ig_i64)row[i] * c.ld : c.base;
        cp_async16(as + r * 128 + ((seg ^ (r & 7)) << 4), src, ok);
    }
#pragma unroll
    for (int j = 0; j < BR; j++) {
        int r = lrow + 32 * j;
        bool ok = kin && wok[j];
        const T* src = ok ? wrow[j] + kb : wrow[j];
        cp_async16(bs + r * 128 + ((seg ^ (r & 7)) << 4), src, ok);
    }
}

template <int BN, int STAGES>
__device__ __forceinline__ void src_product(const SrcPointers& p, const SrcLayout& l, const T* __restrict__ w,
                                            const T* __restrict__ bias, T* __restrict__ y, int M, int K, int Cout,
                                            int n_tiles, int act, int ldy) {
    constexpr int AR = WG_BM / 32;  // 256 threads: 8 pieces per row, 32 rows per pass
    constexpr int BR = BN / 32;
    constexpr int ACC = BN / 2;
    const unsigned base = (smem_addr(ig_shared) + 1023u) & ~1023u;
    const unsigned As = base;
    const unsigned Bs = base + STAGES * WG_BM * 128;

    const int tid = threadIdx.x;
    const int m0 = (int)(blockIdx.x / n_tiles) * WG_BM;
    const int n0 = (int)(blockIdx.x % n_tiles) * BN;
    const int seg = tid & 7;
    const int lrow = tid >> 3;

    int row[AR];
#pragma unroll
    for (int i = 0; i < AR; i++) {
        int m = m0 + lrow + 32 * i;
        row[i] = m < M ? m : -1;
    }
    const T* wrow[BR];
    bool wok[BR];
#pragma unroll
    for (int j = 0; j < BR; j++) {
        int co = n0 + lrow + 32 * j;
        wok[j] = co < Cout;
        wrow[j] = w + (wok[j] ? (ig_i64)co * K : 0) + seg * 8;
    }
    SrcCursor c;
    src_select(c, p, l, 0, seg);

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.0f;

    const int KT = (K + WG_BK - 1) / WG_BK;
    wg_k_loop<BN, STAGES>(acc, As, Bs, KT, [&](int chunk, unsigned a, unsigned b) {
        src_load_chunk<AR, BR>(c, p, l, chunk * WG_BK, a, b, lrow, seg, row, wrow, wok, K);
    });
    const int wg = tid >> 7;
    wg_epilogue<BN>(acc, m0 + wg * 64, n0, bias, nullptr, y, M, Cout, act, ldy);
}
#endif  // WG_ARCH_OK

// 128 x 64 (four stages: two blocks per multiprocessor) and 128 x 128 (five stages, one).
#define SRC_ENTRY(NAME, BLOCKS, BN, STAGES)                                                                         \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS)                                                      \
        NAME(SrcPointers parts, SrcLayout layout, const T* __restrict__ w, const T* __restrict__ bias,             \
             T* __restrict__ y, int M, int K, int Cout, int n_tiles, int act, int ldy) {                           \
        SRC_BODY(BN, STAGES)                                                                                       \
    }
#ifdef WG_ARCH_OK
#define SRC_BODY(BN, STAGES) src_product<BN, STAGES>(parts, layout, w, bias, y, M, K, Cout, n_tiles, act, ldy);
#else
#define SRC_BODY(BN, STAGES)
#endif
SRC_ENTRY(sources_wgmma_n64, 2, 64, WG_STAGES_N64)
SRC_ENTRY(sources_wgmma_n128, 1, 128, WG_STAGES_N128)
