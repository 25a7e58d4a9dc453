// Restormer's MDTA after the Gram products (done by cuBLASLt on the tensor cores):
// squared norms of q and k over H*W, then per (image, head) the softmax of the
// normalised, temperature-scaled d x d map folded into the project_out weights.

// Sums of squares of the first 2C channels of qkv ([N, HW, 3C]) into nrm[N][2C].
// Grid (chunks, N); each thread owns channels tid, tid + blockDim, ...; pixels of one
// chunk are walked in order so that a warp reads consecutive channels.
extern "C" __global__ void mdta_sumsq(const T* __restrict__ qkv, float* __restrict__ nrm, i64 HW, int C,
                                      int pix_per_block) {
    i64 n = blockIdx.y;
    i64 p0 = (i64)blockIdx.x * pix_per_block;
    i64 p1 = min(p0 + pix_per_block, HW);
    const T* base = qkv + n * HW * 3 * C;
    for (int ch = threadIdx.x; ch < 2 * C; ch += blockDim.x) {
        float s = 0.0f;
        for (i64 p = p0; p < p1; p++) {
            float v = ldf(base[p * 3 * C + ch]);
            s += v * v;
        }
        atomicAdd(&nrm[n * 2 * C + ch], s);
    }
}

// Grid (heads, N), dynamic shared memory d*d floats.
// gram: [N][chunks][heads][d*d] partial Gram maps, column-major per map (entry (i, j)
// at i + j*d), summed here over chunks. Writes attn[n][h][i][j] =
// softmax_j(G_ij / (max(|q_i|, eps) max(|k_j|, eps)) * t_h), row-major.
// Sums the per-chunk partial maps: gram[n][k][h][e] -> sum[n][h][e]. Grid
// (ceil(heads*d*d / blockDim), N); consecutive threads read consecutive entries.
extern "C" __global__ void mdta_gram_sum(const float* __restrict__ gram, float* __restrict__ sum, int chunks,
                                         int per_image) {
    i64 n = blockIdx.y;
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= per_image) return;
    const float* p = gram + n * chunks * (i64)per_image + e;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += p[(i64)k * per_image];
    sum[n * per_image + e] = s;
}

extern "C" __global__ void mdta_softmax(const float* __restrict__ gram, const float* __restrict__ nrm,
                                        const float* __restrict__ temp, float* __restrict__ attn, int chunks,
                                        int heads, int d, int C) {
    extern __shared__ float a[];
    int h = blockIdx.x;
    i64 n = blockIdx.y;
    const float* nq = nrm + n * 2 * C + h * d;
    const float* nk = nq + C;
    float t = temp[h];
    for (int e = threadIdx.x; e < d * d; e += blockDim.x) {
        int i = e % d, j = e / d;
        float s = 0.0f;
        for (int k = 0; k < chunks; k++) s += gram[((n * chunks + k) * heads + h) * (i64)d * d + e];
        float qn = fmaxf(sqrtf(nq[i]), 1e-12f), kn = fmaxf(sqrtf(nk[j]), 1e-12f);
        a[i * d + j] = s / (qn * kn) * t;
    }
    __syncthreads();
    // One warp per row.
    int lane = threadIdx.x & 31;
    float* out = attn + (n * heads + h) * (i64)d * d;
    for (int i = threadIdx.x >> 5; i < d; i += blockDim.x >> 5) {
        const float* row = a + i * d;
        float m = -3.402823466e38f;
        for (int j = lane; j < d; j += 32) m = fmaxf(m, row[j]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float z = 0.0f;
        for (int j = lane; j < d; j += 32) z += expf(row[j] - m);
        z = warp_sum(z);
        float inv = 1.0f / z;
        for (int j = lane; j < d; j += 32) out[i * d + j] = expf(row[j] - m) * inv;
    }
}

// Grid (ceil(Cout*d / blockDim), heads, N). w: project_out [Cout][C] fp32.
// folded[n][o][h*d + j] = sum_i attn[n][h][i][j] * w[o][h*d + i].
extern "C" __global__ void mdta_fold(const float* __restrict__ attn, const float* __restrict__ w,
                                     T* __restrict__ folded, int heads, int d, int C, int Cout) {
    int h = blockIdx.y;
    i64 n = blockIdx.z;
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= Cout * d) return;
    int o = e / d, j = e - (e / d) * d;
    const float* a = attn + (n * heads + h) * (i64)d * d;
    const float* wr = w + (i64)o * C + h * d;
    float s = 0.0f;
    for (int i = 0; i < d; i++) s += a[i * d + j] * wr[i];
    folded[(n * Cout + o) * C + h * d + j] = stf(s);
}
