// Host emulation of the CUDA features the top-k detection kernels use, so that their
// source runs under g++: one block at a time, one std::thread per CUDA thread, warps
// synchronised by barriers per (warp, mask).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <condition_variable>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
#define __launch_bounds__(n)
struct D3 { unsigned x = 0, y = 0, z = 0; };
thread_local D3 threadIdx;
D3 blockIdx, blockDim, gridDim;
// The storage type: fp32, unless the includer defines EMU_CUSTOM_T and its own T,
// ldf() and stf() first.
#ifndef EMU_CUSTOM_T
typedef float T;
inline float ldf(float v) { return v; }
inline float stf(float v) { return v; }
#endif
struct Sync {
    std::mutex m; std::condition_variable cv; int arrived = 0; unsigned gen = 0; unsigned vals[32];
    void wait(int n) {
        std::unique_lock<std::mutex> l(m);
        unsigned g = gen;
        if (++arrived == n) { arrived = 0; gen++; cv.notify_all(); }
        else cv.wait(l, [&] { return gen != g; });
    }
};
#include <map>
#include <memory>
// One barrier per (warp, mask): lanes outside a mask may run ahead to the next
// full-warp intrinsic, as on the hardware.
std::mutex g_warp_m;
std::map<std::pair<int, unsigned>, std::unique_ptr<Sync>> g_warp_syncs;
Sync& warp_sync(int w, unsigned mask) {
    std::lock_guard<std::mutex> l(g_warp_m);
    auto& p = g_warp_syncs[{w, mask}];
    if (!p) p.reset(new Sync());
    return *p;
}
Sync g_block;
inline void __syncthreads() { g_block.wait(blockDim.x); }
inline void exchange(unsigned mask, unsigned v, unsigned* all) {
    int lane = threadIdx.x % 32; Sync& s = warp_sync(threadIdx.x / 32, mask);
    int n = __builtin_popcount(mask);
    s.vals[lane] = v; s.wait(n);
    memcpy(all, s.vals, sizeof s.vals); s.wait(n);
}
inline unsigned __ballot_sync(unsigned mask, bool p) {
    unsigned all[32]; exchange(mask, p ? 1u : 0u, all); unsigned r = 0;
    for (int l = 0; l < 32; l++) if ((mask >> l & 1) && all[l]) r |= 1u << l;
    return r;
}
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
    unsigned all[32]; exchange(mask, v, all); unsigned r = 0;
    for (int l = 0; l < 32; l++) if ((mask >> l & 1) && all[l] == v) r |= 1u << l;
    return r;
}
inline int __shfl_up_sync(unsigned mask, int v, int o) {
    unsigned all[32]; exchange(mask, (unsigned)v, all); int lane = threadIdx.x % 32;
    return lane >= o ? (int)all[lane - o] : v;
}
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __double2float_rn(double d) { return (float)d; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
using std::isnan; using std::exp;
#define __CUDA_ARCH__ 900
typedef long long i64;
#define DET_LOOP(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)
unsigned g_dyn_smem[16384];
