//! The top-k detection and query selection kernels of detection.cu, run on the host: their source compiled by
//! g++ after `topk_emulation/emu.h` (one std::thread per CUDA thread, warp intrinsics and
//! barriers emulated) and every output row compared bit for bit with the CPU's
//! post-processing (`topk_emulation/main.cpp`). Checks the algorithm (radix select, tie
//! order, compaction, ranking) without a GPU; skipped where g++ is missing.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn topk_kernels_match_the_cpu_post_processing_on_the_host() {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("skipped: g++ is not installed");
        return;
    }
    let src = aperture_cuda::detection::DETECTION_SOURCE;
    let start = src
        .find("// ---- Post-processing")
        .expect("detection.cu has a post-processing section");
    let kernels = src[start..]
        .replace("extern \"C\" ", "")
        .replace(
            "extern __shared__ unsigned det_topk_cand[];",
            "unsigned* det_topk_cand = g_dyn_smem;",
        )
        .replace(
            "extern __shared__ unsigned det_select_cand[];",
            "unsigned* det_select_cand = g_dyn_smem;",
        );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/topk_emulation");
    let emu = std::fs::read_to_string(dir.join("emu.h")).unwrap();
    let main = std::fs::read_to_string(dir.join("main.cpp")).unwrap();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cpp = tmp.join("topk_emulation.cpp");
    let exe = tmp.join("topk_emulation");
    std::fs::write(&cpp, format!("{emu}\n{kernels}\n{main}")).unwrap();
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
    // Every case ran.
    assert_eq!(text.matches(": ok (0 differences)").count(), 11, "{text}");
}
