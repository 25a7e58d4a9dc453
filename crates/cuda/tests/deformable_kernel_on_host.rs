//! The two deformable-attention kernels of detection.cu, run on the host: their source
//! compiled by g++ after `topk_emulation/emu.h` (one std::thread per CUDA thread, warp
//! intrinsics emulated) and `det_deformable_vec` (four taps per load, groups summed by
//! shuffles) compared with `det_deformable` on random inputs
//! (`deformable_emulation/main.cpp`). Skipped where g++ is missing; on the GPU both are
//! checked against the CPU backend by `aperture check-dfine`.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn vector_deformable_kernel_matches_the_scalar_one_on_the_host() {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("skipped: g++ is not installed");
        return;
    }
    let src = aperture_cuda::detection::DETECTION_SOURCE;
    let start = src
        .find("// Multi-scale deformable attention")
        .expect("detection.cu has the deformable attention");
    let end = src[start..]
        .find("// Per row, the largest channel")
        .map(|e| start + e)
        .expect("the deformable attention is followed by det_row_max");
    let kernels = src[start..end].replace("extern \"C\" ", "");
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests");
    let emu = std::fs::read_to_string(here.join("topk_emulation/emu.h")).unwrap();
    let main = std::fs::read_to_string(here.join("deformable_emulation/main.cpp")).unwrap();
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
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cpp = tmp.join("deformable_emulation.cpp");
    let exe = tmp.join("deformable_emulation");
    std::fs::write(&cpp, format!("{emu}\n{prelude}\n{kernels}\n{main}")).unwrap();
    let built = Command::new("g++")
        .args([
            "-std=c++17",
            "-O1",
            "-pthread",
            "-Wno-unknown-pragmas",
            "-o",
        ])
        .arg(&exe)
        .arg(&cpp)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && text.contains("ALL OK"), "{text}");
    assert_eq!(text.matches(" ok\n").count(), 6, "{text}");
}
