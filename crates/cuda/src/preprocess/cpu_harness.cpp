// Runs kernels/preprocess.cu as plain C++ on the CPU: every "thread" of CUDA's launch
// geometry in turn, over the launches a Rust test wrote out (plan_tests.rs), and
// compares the output bit for bit with the CPU path's. Built by that test with
// -DPRE_SOURCE="path/to/preprocess.cu"; argument: the folder with cases.txt.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <fstream>
#include <algorithm>
struct D3 { unsigned x; };
static D3 blockIdx, blockDim, gridDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
#include PRE_SOURCE

template <class F> void launch(long long n, F f) {
    blockDim.x = 256;
    long long blocks = std::min<long long>((n + 255) / 256, 132 * 32);
    gridDim.x = (unsigned)std::max<long long>(blocks, 1);
    for (unsigned b = 0; b < gridDim.x; ++b)
        for (unsigned t = 0; t < 256; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}
static std::vector<unsigned char> slurp(const std::string& p) {
    std::ifstream f(p, std::ios::binary); return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), {});
}
static float bits(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
int main(int argc, char** argv) {
    if (argc < 2) return 2;
    std::string dir = argv[1];
    FILE* idx = fopen((dir + "/cases.txt").c_str(), "r");
    if (!idx) return 2;
    char kind[4]; int fails = 0;
    while (fscanf(idx, "%3s", kind) == 1) {
        long long ci, inb, tmpb, resb, outn, nhwc, nrm, nsteps; unsigned sc, m0, m1, m2, s0, s1, s2;
        fscanf(idx, "%lld %lld %lld %lld %lld %lld %u %lld %u %u %u %u %u %u %lld", &ci, &inb, &tmpb, &resb, &outn, &nhwc, &sc, &nrm, &m0, &m1, &m2, &s0, &s1, &s2, &nsteps);
        auto input = slurp(dir + "/" + std::to_string(ci) + ".in");
        auto wantb = slurp(dir + "/" + std::to_string(ci) + ".want");
        std::vector<unsigned char> tmp(tmpb + 1, 0xCD), res(resb, 0xEF);
        std::vector<float> out(outn, -12345.0f);
        auto ptr = [&](int k, long long off) -> unsigned char* { return k == 0 ? input.data() + off : (k == 1 ? tmp.data() : res.data()); };
        for (long long s = 0; s < nsteps; ++s) {
            char st[4]; fscanf(idx, "%3s", st);
            if (st[0] == 'H' || st[0] == 'V') {
                int sk, dk; long long so, dof, a, b, c, taps, ks;
                fscanf(idx, "%d %lld %d %lld %lld %lld %lld %lld %lld", &sk, &so, &dk, &dof, &a, &b, &c, &taps, &ks);
                const unsigned char* sp = ptr(sk, so); unsigned char* dp = ptr(dk, dof);
                const int* tp = (const int*)(input.data() + taps);
                if (st[0] == 'H') launch(a * c, [&] { pre_resize_h(sp, dp, a, b, c, tp, ks); });
                else launch(c * ((a * 3 + 3) / 4), [&] { pre_resize_v(sp, dp, a, b, c, tp, ks); });
            } else {
                int sk; long long so, pixels, o;
                fscanf(idx, "%d %lld %lld %lld", &sk, &so, &pixels, &o);
                const unsigned char* sp = ptr(sk, so);
                launch(pixels * 3, [&] { pre_to_float(sp, out.data() + o, pixels, nhwc, bits(sc), nrm, bits(m0), bits(m1), bits(m2), bits(s0), bits(s1), bits(s2)); });
            }
        }
        const float* want = (const float*)wantb.data();
        long long bad = 0;
        for (long long i = 0; i < outn; ++i) if (memcmp(&out[i], &want[i], 4) != 0) { if (bad < 3) printf("  case %lld [%lld]: got %.9g want %.9g\n", ci, i, out[i], want[i]); ++bad; }
        printf("case %lld: %lld values, %lld differ\n", ci, outn, bad);
        fails += bad != 0;
    }
    printf("%s\n", fails ? "FAIL" : "ALL BIT-EXACT");
    return fails;
}
