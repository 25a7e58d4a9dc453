// Runs det_deformable and the vector kernel the host takes for the head width
// (det_deformable_vec32 up to 32 channels, else det_deformable_vec; detection.cu, after
// emu.h) on the host on the same random inputs, bilinear and discrete sampling, heads of
// 16, 32 and 48 channels, 6 points (one per lane) or 34 (more points than lanes), samples
// partly outside the maps, and compares the outputs (the kernels differ only in the order
// of the softmax sum and of the final additions). Built once with fp32 storage and once with
// a 2-byte storage type (bf16 bits: the vector kernel's 8-byte loads), TOLERANCE apart.
// With a folder argument, each case's inputs and both outputs are also written there
// (case<i>.bin: 13 int32 of shape, then value, offsets, logits, boxes and the two
// outputs as f32) for a comparison with the CPU backend.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

static const char* g_dump = nullptr;
static int g_case = 0;

static void dump_values(FILE* f, const std::vector<T>& v) {
    for (const T& x : v) {
        const float y = ldf(x);
        fwrite(&y, 4, 1, f);
    }
}
typedef void (*Kernel)(const T*, const T*, const T*, const T*, T*, int, int, int, int, int, int, float, int,
                       DetLevels);

static void run(Kernel k, const std::vector<T>& value, const std::vector<T>& off, const std::vector<T>& logits,
                const std::vector<T>& boxes, std::vector<T>& y, int B,
                int Q, int C, int heads, int S, int levels, int discrete, DetLevels lv) {
    const int threads = 64, tasks = B * Q * heads;
    blockDim.x = threads;
    gridDim.x = (tasks * 32 + threads - 1) / threads;
    for (unsigned b = 0; b < gridDim.x; b++) {
        blockIdx.x = b;
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; t++) ts.emplace_back([&, t] {
            threadIdx.x = t;
            k(value.data(), off.data(), logits.data(), boxes.data(), y.data(), B, Q, C, heads, S, levels, 1.0f,
              discrete, lv);
        });
        for (auto& t : ts) t.join();
    }
}

static int check(const char* name, int d, int discrete, bool many_points) {
    const int B = 2, Q = 5, heads = 2, C = heads * d;
    const int few[2][3] = {{6, 7, 4}, {3, 4, 2}};  // h, w, points
    const int many[2][3] = {{6, 7, 20}, {3, 4, 14}};
    const int (&shapes)[2][3] = many_points ? many : few;
    DetLevels lv{};
    int S = 0, P = 0;
    for (int l = 0; l < 2; l++) {
        lv.v[l * 4] = shapes[l][0];
        lv.v[l * 4 + 1] = shapes[l][1];
        lv.v[l * 4 + 2] = S;
        lv.v[l * 4 + 3] = shapes[l][2];
        S += shapes[l][0] * shapes[l][1];
        P += shapes[l][2];
    }
    std::mt19937 rng(d * 7 + discrete + (many_points ? 1000 : 0));
    auto fill = [&](std::vector<T>& v, float lo, float hi) {
        std::uniform_real_distribution<float> u(lo, hi);
        for (auto& x : v) x = stf(u(rng));
    };
    std::vector<T> value(B * S * C), off(B * Q * heads * P * 2), logits(B * Q * heads * P), boxes(B * Q * 4);
    fill(value, -1, 1);
    fill(off, -3, 3);  // some samples land outside the maps
    fill(logits, -2, 2);
    fill(boxes, 0.05f, 0.95f);
    std::vector<T> a(B * Q * C, stf(-7.0f)), b(B * Q * C, stf(-7.0f));
    run(det_deformable, value, off, logits, boxes, a, B, Q, C, heads, S, 2, discrete, lv);
    run(d <= 32 ? det_deformable_vec32 : det_deformable_vec, value, off, logits, boxes, b, B, Q, C, heads, S, 2,
        discrete, lv);
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        const double x = ldf(a[i]), y = ldf(b[i]);
        num += (x - y) * (x - y);
        den += x * x;
    }
    if (g_dump) {
        const std::string path = std::string(g_dump) + "/case" + std::to_string(g_case++) + ".bin";
        FILE* f = fopen(path.c_str(), "wb");
        if (!f) return 1;
        const int head[13] = {B, Q, C, heads, 2, shapes[0][0], shapes[0][1], shapes[0][2],
                              shapes[1][0], shapes[1][1], shapes[1][2], discrete, 0};
        fwrite(head, 4, 13, f);
        for (const auto* v : {&value, &off, &logits, &boxes, &a, &b}) dump_values(f, *v);
        fclose(f);
    }
    const double rel = std::sqrt(num / std::max(den, 1e-30));
    const bool ok = rel <= TOLERANCE && den > 0;
    printf("%-24s d %3d, %2d points: relative L2 %.2e %s\n", name, d, P, rel, ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}

int main(int argc, char** argv) {
    if (argc > 1) g_dump = argv[1];
    int bad = 0;
    for (bool many_points : {false, true})
        for (int d : {16, 32, 48}) {
            bad += check("bilinear", d, 0, many_points);
            bad += check("discrete", d, 1, many_points);
        }
    printf(bad ? "FAILED\n" : "ALL OK\n");
    return bad != 0;
}
