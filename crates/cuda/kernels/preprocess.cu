// Image preprocessing: Pillow's bilinear resize on 8-bit RGB (HWC) with the fixed-point
// taps computed on the host (aperture_vision::resize_plan), then rescale and optional
// mean/std normalisation into f32 NCHW or NHWC. Integer arithmetic and the rounding
// of each pass to 8 bits follow the CPU implementation exactly, so the bytes agree.
//
// A tap table is one int array: start[n], count[n], then coeffs[n * ksize].

#define PRE_PRECISION_BITS 22

__device__ __forceinline__ unsigned char pre_clip8(int acc) {
    int v = acc >> PRE_PRECISION_BITS;
    return (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One output pixel (three channels) per thread: `rows` rows of `in_w` pixels resampled
// to `out_w` pixels.
extern "C" __global__ void pre_resize_h(const unsigned char* __restrict__ src,
                                        unsigned char* __restrict__ dst, int rows, int in_w,
                                        int out_w, const int* __restrict__ taps, int ksize) {
    const int* start = taps;
    const int* count = taps + out_w;
    const int* coeffs = taps + 2 * out_w;
    long long total = (long long)rows * out_w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long y = i / out_w;
        int x = (int)(i - y * out_w);
        const unsigned char* p = src + (y * in_w + start[x]) * 3;
        const int* k = coeffs + (long long)x * ksize;
        int n = count[x];
        int a0 = 1 << (PRE_PRECISION_BITS - 1), a1 = a0, a2 = a0;
        for (int t = 0; t < n; ++t) {
            int c = k[t];
            a0 += (int)p[3 * t] * c;
            a1 += (int)p[3 * t + 1] * c;
            a2 += (int)p[3 * t + 2] * c;
        }
        unsigned char* o = dst + i * 3;
        o[0] = pre_clip8(a0);
        o[1] = pre_clip8(a1);
        o[2] = pre_clip8(a2);
    }
}

// Four consecutive output bytes of one row per thread (the row's taps read once): rows of
// `w` pixels, the input's first row being source row `first_row`, resampled to `out_h`
// rows. Launched over out_h * ceil(3 * w / 4) threads.
extern "C" __global__ void pre_resize_v(const unsigned char* __restrict__ src,
                                        unsigned char* __restrict__ dst, int w, int first_row,
                                        int out_h, const int* __restrict__ taps, int ksize) {
    const int* start = taps;
    const int* count = taps + out_h;
    const int* coeffs = taps + 2 * out_h;
    long long row_len = (long long)w * 3;
    long long quads = (row_len + 3) / 4;
    long long total = quads * out_h;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int yy = (int)(i / quads);
        long long e = (i - yy * quads) * 4;
        int lanes = row_len - e < 4 ? (int)(row_len - e) : 4;
        const unsigned char* p = src + (long long)(start[yy] - first_row) * row_len + e;
        const int* k = coeffs + (long long)yy * ksize;
        int n = count[yy];
        int acc[4];
        for (int j = 0; j < 4; ++j) acc[j] = 1 << (PRE_PRECISION_BITS - 1);
        for (int t = 0; t < n; ++t) {
            const unsigned char* r = p + t * row_len;
            int c = k[t];
            for (int j = 0; j < 4; ++j)
                if (j < lanes) acc[j] += (int)r[j] * c;
        }
        unsigned char* o = dst + (long long)yy * row_len + e;
        for (int j = 0; j < 4; ++j)
            if (j < lanes) o[j] = pre_clip8(acc[j]);
    }
}

// HWC bytes of one image (`pixels` = H * W) -> f32 `v * scale`, then `(v - mean) / std`
// when `normalize`, into NCHW planes (`channels_last` = 0) or NHWC. The explicit
// round-to-nearest intrinsics keep the compiler from fusing into an FMA, so every
// value is rounded as on the CPU.
extern "C" __global__ void pre_to_float(const unsigned char* __restrict__ src,
                                        float* __restrict__ dst, long long pixels,
                                        int channels_last, float scale, int normalize,
                                        float m0, float m1, float m2, float s0, float s1,
                                        float s2) {
    long long total = pixels * 3;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long p = i / 3;
        int c = (int)(i - p * 3);
        float v = __fmul_rn((float)src[i], scale);
        if (normalize) {
            float m = c == 0 ? m0 : (c == 1 ? m1 : m2);
            float s = c == 0 ? s0 : (c == 1 ? s1 : s2);
            v = __fdiv_rn(__fsub_rn(v, m), s);
        }
        dst[channels_last ? i : c * pixels + p] = v;
    }
}
