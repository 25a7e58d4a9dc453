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
// at i + j*d), summed here over chunks. temp: [heads]. w: project_out [Cout][C] fp32.
// Writes folded[n][o][h*d + j] = sum_i softmax_j(G_ij / (|q_i| |k_j|) * t_h) * w[o][h*d + i].
extern "C" __global__ void mdta_fold(const float* __restrict__ gram, const float* __restrict__ nrm,
                                     const float* __restrict__ temp, const float* __restrict__ w,
                                     T* __restrict__ folded, int chunks, int heads, int d, int C, int Cout) {
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
        a[i * d + j] = s / (qn * kn) * t;  // row-major from here on
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float* row = a + i * d;
        float m = -3.402823466e38f;
        for (int j = 0; j < d; j++) m = fmaxf(m, row[j]);
        float z = 0.0f;
        for (int j = 0; j < d; j++) {
            row[j] = expf(row[j] - m);
            z += row[j];
        }
        float inv = 1.0f / z;
        for (int j = 0; j < d; j++) row[j] *= inv;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < Cout * d; e += blockDim.x) {
        int o = e / d, j = e % d;
        const float* wr = w + (i64)o * C + h * d;
        float s = 0.0f;
        for (int i = 0; i < d; i++) s += a[i * d + j] * wr[i];
        folded[(n * Cout + o) * C + h * d + j] = stf(s);
    }
}
