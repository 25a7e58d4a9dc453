//! The deformable-attention kernels of detection.cu, run on the host: their source
//! compiled by g++ after `topk_emulation/emu.h` (one std::thread per CUDA thread, warp
//! intrinsics emulated) and the vector kernels (`det_deformable_vec32` /
//! `det_deformable_vec`: four taps per load, the points' softmax and samples shared
//! across lanes, groups summed by shuffles) compared with `det_deformable` on random
//! inputs, with fewer and with more points than lanes, in fp32 and in a 2-byte
//! storage type
//! (`deformable_emulation/main.cpp`; g++ required), and both against the CPU backend's
//! deformable attention on the same inputs. On the GPU both are
//! checked against the CPU backend by `aperture check-dfine`.

mod common;

use std::path::PathBuf;

use aperture_engine::backend::{Backend, DeformableSpec};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::HostTensor;

#[test]
fn vector_deformable_kernel_matches_the_scalar_one_on_the_host() {
    let src = aperture_cuda::detection::DETECTION_SOURCE;
    let kernels = common::source_between(
        src,
        "// Multi-scale deformable attention",
        "// Per row, the largest channel",
    )
    .replace("extern \"C\" ", "");
    // The warp reductions the vector kernels share with the rest of detection.cu.
    let reductions = common::source_between(
        src,
        "__device__ __forceinline__ float det_warp_sum",
        "__device__ __forceinline__ float det_sigmoid",
    );
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
inline float __shfl_sync(unsigned mask, float v, int src) {
    unsigned all[32]; exchange(mask, __float_as_uint(v), all);
    return __uint_as_float(all[src & 31]);
}
inline int __shfl_sync(unsigned mask, int v, int src) {
    unsigned all[32]; exchange(mask, (unsigned)v, all);
    return (int)all[src & 31];
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
    let dump = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deformable_cases");
    std::fs::create_dir_all(&dump).expect("a folder for the cases");
    let dump_arg = dump.to_string_lossy().into_owned();
    for (name, storage, tolerance, args) in [
        ("deformable_emulation", "", "1e-6", vec![dump_arg.as_str()]),
        ("deformable_emulation_bf16", bf16, "1e-2", vec![]),
    ] {
        let source = format!(
            "{storage}\n{}\n{prelude}\n{reductions}\n#define TOLERANCE {tolerance}\n{kernels}\n{main}",
            common::emulation_header(),
        );
        let text = common::build_and_run(name, &source, &args);
        assert!(text.contains("ALL OK"), "{name}: {text}");
        assert_eq!(text.matches(" ok\n").count(), 12, "{name}: {text}");
    }
    // Both fp32 kernels against the CPU backend's deformable attention on each case:
    // det_deformable follows its operation order (identical), the vector kernel adds the
    // four taps' sums in another order.
    for i in 0..12 {
        let bytes = std::fs::read(dump.join(format!("case{i}.bin"))).expect("case written");
        let case = Case::parse(&bytes);
        let want = case.cpu_output();
        for (kernel, got, limit) in [
            ("det_deformable", &case.scalar, 0.0),
            ("the vector kernel", &case.vector, 1e-6),
        ] {
            let err = relative_l2(got, &want);
            assert!(
                err <= limit,
                "case {i}: {kernel} vs the CPU backend: {err:.2e}"
            );
        }
    }
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    assert!(den > 0.0, "all-zero reference");
    (num / den).sqrt()
}

/// One case written by the emulation: shapes, inputs and both kernels' outputs.
struct Case {
    dims: [usize; 4],
    levels: Vec<(usize, usize, usize)>,
    discrete: bool,
    inputs: [Vec<f32>; 4],
    scalar: Vec<f32>,
    vector: Vec<f32>,
}

impl Case {
    fn parse(bytes: &[u8]) -> Self {
        let word = |i: usize| -> [u8; 4] { bytes[4 * i..4 * i + 4].try_into().unwrap() };
        let int = |i: usize| i32::from_le_bytes(word(i)) as usize;
        let [b, q, c, heads] = [int(0), int(1), int(2), int(3)];
        let levels: Vec<_> = (0..int(4))
            .map(|l| (int(5 + 3 * l), int(6 + 3 * l), int(7 + 3 * l)))
            .collect();
        let s: usize = levels.iter().map(|(h, w, _)| h * w).sum();
        let p: usize = levels.iter().map(|l| l.2).sum();
        let sizes = [
            b * s * c,
            b * q * heads * p * 2,
            b * q * heads * p,
            b * q * 4,
            b * q * c,
            b * q * c,
        ];
        let mut at = 13;
        let mut arrays = sizes.iter().map(|&n| {
            let v: Vec<f32> = (at..at + n).map(|i| f32::from_le_bytes(word(i))).collect();
            at += n;
            v
        });
        let mut next = || arrays.next().unwrap();
        let inputs = [next(), next(), next(), next()];
        let (scalar, vector) = (next(), next());
        assert_eq!(4 * at, bytes.len(), "case file size");
        Case {
            dims: [b, q, c, heads],
            levels,
            discrete: int(11) != 0,
            inputs,
            scalar,
            vector,
        }
    }

    fn cpu_output(&self) -> Vec<f32> {
        let [b, q, c, heads] = self.dims;
        let s: usize = self.levels.iter().map(|(h, w, _)| h * w).sum();
        let p: usize = self.levels.iter().map(|l| l.2).sum();
        let cpu = CpuBackend::new();
        let up = |dims: Vec<usize>, v: &Vec<f32>| {
            cpu.upload_nhwc(&HostTensor::from_f32(dims, v.clone()).unwrap())
                .unwrap()
        };
        let [value, off, logits, boxes] = &self.inputs;
        let spec = DeformableSpec {
            heads,
            shapes: self.levels.iter().map(|&(h, w, _)| (h, w)).collect(),
            points: self.levels.iter().map(|l| l.2).collect(),
            offset_scale: 1.0,
            discrete: self.discrete,
        };
        let y = cpu
            .deformable_attention(
                &up(vec![b, 1, s, c], value),
                &up(vec![b, 1, q, heads * p * 2], off),
                &up(vec![b, 1, q, heads * p], logits),
                &up(vec![b, 1, q, 4], boxes),
                &spec,
            )
            .unwrap();
        cpu.download_nhwc(&y).unwrap().to_f32_vec()
    }
}
