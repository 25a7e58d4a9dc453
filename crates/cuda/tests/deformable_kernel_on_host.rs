//! The two deformable-attention kernels of detection.cu, run on the host: their source
//! compiled by g++ after `topk_emulation/emu.h` (one std::thread per CUDA thread, warp
//! intrinsics emulated) and `det_deformable_vec` (four taps per load, groups summed by
//! shuffles) compared with `det_deformable` on random inputs, in fp32 and in a 2-byte
//! storage type
//! (`deformable_emulation/main.cpp`; g++ required). On the GPU both are
//! checked against the CPU backend by `aperture check-dfine`.

mod common;

#[test]
fn vector_deformable_kernel_matches_the_scalar_one_on_the_host() {
    let src = aperture_cuda::detection::DETECTION_SOURCE;
    let start = src
        .find("// Multi-scale deformable attention")
        .expect("detection.cu has the deformable attention");
    let end = src[start..]
        .find("// Per row, the largest channel")
        .map(|e| start + e)
        .expect("the deformable attention is followed by det_row_max");
    let kernels = src[start..end].replace("extern \"C\" ", "");
    // What the deformable kernels use beyond the top-k kernels' emulation.
    let prelude = r#"
#define DET_NEG_INF (-INFINITY)
using std::min; using std::max;
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
inline float __shfl_xor_sync(unsigned mask, float v, int o) {
    unsigned all[32]; exchange(mask, __float_as_uint(v), all);
    return __uint_as_float(all[(threadIdx.x % 32) ^ o]);
}
"#;
    // 2-byte storage: bf16 bits, rounded to nearest even (the vector kernel then loads
    // four channels as 8 bytes); its outputs may differ by a last-bit rounding.
    let bf16 = r#"
#define EMU_CUSTOM_T
#include <cstring>
struct T { unsigned short bits; };
inline float ldf(T v) { unsigned u = (unsigned)v.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline T stf(float f) {
    unsigned u; std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return T{(unsigned short)(u >> 16)};
}
"#;
    let main = common::test_file("deformable_emulation/main.cpp");
    for (name, storage, tolerance) in [
        ("deformable_emulation", "", "1e-6"),
        ("deformable_emulation_bf16", bf16, "1e-2"),
    ] {
        let source = format!(
            "{storage}\n{}\n{prelude}\n#define TOLERANCE {tolerance}\n{kernels}\n{main}",
            common::emulation_header(),
        );
        let text = common::build_and_run(name, &source);
        assert!(text.contains("ALL OK"), "{name}: {text}");
        assert_eq!(text.matches(" ok\n").count(), 6, "{name}: {text}");
    }
}
