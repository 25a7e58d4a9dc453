// Runs det_score_keys and the top-k detection kernels (detection.cu, after emu.h) on the
// host and compares every output row bit for bit with the CPU's post_process: sigmoid
// with expf, a stable sort by score, label = index % C, corners (cx - 0.5 * w, ...).
// Also the query selection (det_topk_select): indices against a stable sort of the
// scores, NaN first, -0 tied with +0.
#include <algorithm>
#include <cstdio>
#include <random>
typedef void (*Kernel)(const unsigned*, const float*, float*, int, int, int);

static void run_block(Kernel k, int threads, const unsigned* keys, const float* boxes, float* out, int N, int C,
                      int K) {
    blockDim.x = threads;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; t++) ts.emplace_back([=] {
        threadIdx.x = t;
        k(keys, boxes, out, N, C, K);
    });
    for (auto& t : ts) t.join();
}

static int check(const char* name, Kernel kern, int threads, int B, int Q, int C, const std::vector<float>& logits) {
    const int N = Q * C, K = Q;
    if (kern == det_topk_detections && N > DET_TOPK_ITEMS * threads) {
        printf("%-28s threads %4d: FAIL (more keys than the registers hold)\n", name, threads);
        return 1;
    }
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(0.05f, 0.95f);
    std::vector<float> boxes(B * Q * 4);
    for (auto& b : boxes) b = u(rng);
    std::vector<unsigned> keys(B * N);
    threadIdx.x = 0;
    blockIdx.x = 0;
    blockDim.x = 1;
    gridDim.x = 1;
    det_score_keys(logits.data(), keys.data(), (i64)B * N);
    std::vector<float> out(B * K * 6, -7.0f);
    int bad = 0;
    for (int b = 0; b < B; b++) {
        blockIdx.x = b;
        run_block(kern, threads, keys.data(), boxes.data(), out.data(), N, C, K);
        std::vector<float> s(N);
        for (int i = 0; i < N; i++) s[i] = 1.0f / (1.0f + expf(-logits[b * N + i]));
        std::vector<int> idx(N);
        for (int i = 0; i < N; i++) idx[i] = i;
        std::stable_sort(idx.begin(), idx.end(), [&](int a, int c) { return s[a] > s[c]; });
        for (int r = 0; r < K; r++) {
            const int i = idx[r], q = i / C;
            const float* bx = &boxes[(b * Q + q) * 4];
            const float want[6] = {s[i],
                                   (float)(i % C),
                                   bx[0] - 0.5f * bx[2],
                                   bx[1] - 0.5f * bx[3],
                                   bx[0] + 0.5f * bx[2],
                                   bx[1] + 0.5f * bx[3]};
            const float* got = &out[(b * K + r) * 6];
            for (int v = 0; v < 6; v++)
                if (memcmp(&got[v], &want[v], 4) != 0) {
                    if (bad < 5) printf("  %s image %d row %d value %d: got %.9g want %.9g\n", name, b, r, v, got[v], want[v]);
                    bad++;
                }
        }
    }
    printf("%-28s threads %4d: %s (%d differences)\n", name, threads, bad ? "FAIL" : "ok", bad);
    return bad;
}

typedef void (*SelectKernel)(const float*, int*, int, int);

static int check_select(const char* name, SelectKernel kern, int threads, int K, const std::vector<float>& scores) {
    const int L = (int)scores.size();
    if (kern == det_topk_select && L > DET_SELECT_ITEMS * threads) {
        printf("%-28s threads %4d: FAIL (more scores than the registers hold)\n", name, threads);
        return 1;
    }
    std::vector<int> got(K, -1);
    blockIdx.x = 0;
    blockDim.x = threads;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; t++) ts.emplace_back([&, t] {
        threadIdx.x = t;
        kern(scores.data(), got.data(), L, K);
    });
    for (auto& t : ts) t.join();
    std::vector<int> want(L);
    for (int i = 0; i < L; i++) want[i] = i;
    std::stable_sort(want.begin(), want.end(), [&](int a, int b) {
        const bool na = std::isnan(scores[a]), nb = std::isnan(scores[b]);
        if (na || nb) return na && !nb;
        return scores[a] > scores[b];
    });
    int bad = 0;
    for (int r = 0; r < K; r++)
        if (got[r] != want[r]) {
            if (bad < 5) printf("  %s rank %d: got row %d want %d\n", name, r, got[r], want[r]);
            bad++;
        }
    printf("%-28s threads %4d: %s (%d differences)\n", name, threads, bad ? "FAIL" : "ok", bad);
    return bad;
}

int main() {
    std::mt19937 rng(1);
    auto uni = [&](int n, float lo, float hi) {
        std::uniform_real_distribution<float> d(lo, hi);
        std::vector<float> v(n);
        for (auto& x : v) x = d(rng);
        return v;
    };
    auto ties = uni(24000, -3, 3);
    for (auto& x : ties) x = std::round(x * 2) / 2;
    int bad = 0;
    bad += check("100x80 distinct", det_topk_detections, 352, 1, 100, 80, uni(8000, -8, 8));
    bad += check("300x80 ties", det_topk_detections, 1024, 1, 300, 80, ties);
    bad += check("all equal", det_topk_detections, 192, 1, 50, 80, std::vector<float>(4000, 0.25f));
    bad += check("saturated", det_topk_detections, 352, 2, 100, 80, uni(16000, 14, 40));
    bad += check("7x3", det_topk_detections, 64, 2, 7, 3, uni(42, -2, 2));
    bad += check("wide 300x80 ties", det_topk_detections_wide, 384, 1, 300, 80, ties);
    bad += check("wide 60x365", det_topk_detections_wide, 256, 1, 60, 365, uni(21900, -9, 3));
    auto levels = uni(3000, 0, 7);
    const float level[7] = {-4.0f, -0.0f, 0.0f, 0.5f, INFINITY, -INFINITY, NAN};
    for (auto& x : levels) x = level[(int)x % 7];
    auto coarse = uni(5000, -2, 2);
    for (auto& x : coarse) x = std::floor(x * 16) / 16;
    bad += check_select("select 8400 distinct", det_topk_select, 1024, 300, uni(8400, -4, 4));
    bad += check_select("select levels nan zeros inf", det_topk_select, 256, 700, levels);
    bad += check_select("select all equal", det_topk_select, 128, 2000, std::vector<float>(2000, 1.5f));
    bad += check_select("select wide coarse", det_topk_select_wide, 128, 1000, coarse);
    printf(bad ? "FAILED\n" : "ALL OK\n");
    return bad != 0;
}
