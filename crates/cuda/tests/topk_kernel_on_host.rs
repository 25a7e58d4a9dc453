//! The top-k detection and query selection kernels of detection.cu, run on the host: their source compiled by
//! g++ after `topk_emulation/emu.h` (one std::thread per CUDA thread, warp intrinsics and
//! barriers emulated) and every output row compared bit for bit with the CPU's
//! post-processing (`topk_emulation/main.cpp`). Checks the algorithm (radix select, tie
//! order, compaction, ranking) without a GPU (g++ required).

mod common;

#[test]
fn topk_kernels_match_the_cpu_post_processing_on_the_host() {
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
    let source = format!(
        "{}\n{kernels}\n{}",
        common::emulation_header(),
        common::test_file("topk_emulation/main.cpp")
    );
    let text = common::build_and_run("topk_emulation", &source, &[]);
    assert!(text.contains("ALL OK"), "{text}");
    // Every case ran.
    assert_eq!(text.matches(": ok (0 differences)").count(), 11, "{text}");
}
