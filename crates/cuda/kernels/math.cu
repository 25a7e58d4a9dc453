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
