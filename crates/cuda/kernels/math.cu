// Device math shared by the kernel modules (prepended to each translation unit).

// Exact-erf GELU with erf from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7; in fp32
// the GELU is within 4.3e-7 of the exact value, as close as 0.5x(1 + erff) rounds).
// h = erfc(|x|/sqrt 2) / 2 = p(t) t exp(-x^2/2) with t = 1 / (1 + 0.3275911 |x|/sqrt 2)
// (A&S's coefficients halved), then gelu = x (1 - h) for x >= 0 and x h below, so the
// negative side has no 1 + erf cancellation. 15 instructions against erff's 25 (two
// coefficient sets picked by 7 selects): the gated depthwise kernel evaluates one per
// output and is bound by instruction issue.
__device__ __forceinline__ float gelu_as(float x) {
    float t, e;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(fmaf(fabsf(x), 0.23164188826636045f, 1.0f)));
    float p = fmaf(0.5307027145f, t, -0.7265760135f);
    p = fmaf(p, t, 0.7107068705f);
    p = fmaf(p, t, -0.142248368f);
    p = fmaf(p, t, 0.127414796f);
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * x * -0.7213475204444817f));
    const float h = p * t * e;
    return x * (x >= 0.0f ? 1.0f - h : h);
}

// Shared-memory address of a generic pointer, for cp.async, ldmatrix and mbarriers.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n" : "=r"(a) : "l"(p));
    return a;
}

// cp.async (sm_80 and later; the modules built for older GPUs launch none of its
// callers): 16 bytes global -> shared through L2 only; with full == false nothing is
// read and 16 zero bytes are written (padding, tails).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool full) {
#if __CUDA_ARCH__ >= 800
    int n = full ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
