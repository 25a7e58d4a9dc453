//! The plan run by a CPU emulation of `preprocess.cu` (same per-element index math as
//! the kernels) must give exactly what the CPU path gives, for every pass order.

use super::*;
use crate::preprocess::check::test_image;
use crate::preprocess::preprocess_cpu;
use aperture_vision::{pil_bilinear, RgbImage, HF_RESCALE_FACTOR};

/// Device memory of the emulation: the input buffer and the two scratch buffers.
struct Mem {
    input: Vec<u8>,
    tmp: Vec<u8>,
    resized: Vec<u8>,
}

impl Mem {
    fn get(&self, r: Region) -> &[u8] {
        match r {
            Region::Input(at) => &self.input[at..],
            Region::Tmp => &self.tmp,
            Region::Resized => &self.resized,
        }
    }
    fn taps(&self, at: usize, n: usize, ksize: usize) -> Vec<i32> {
        self.input[at..at + (2 * n + n * ksize) * 4]
            .chunks_exact(4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    fn put(&mut self, r: Region, data: Vec<u8>) {
        match r {
            Region::Tmp => self.tmp[..data.len()].copy_from_slice(&data),
            Region::Resized => self.resized[..data.len()].copy_from_slice(&data),
            Region::Input(_) => panic!("a pass writes into the input buffer"),
        }
    }
}

fn clip8(acc: i32) -> u8 {
    (acc >> 22).clamp(0, 255) as u8
}

/// `pre_resize_h`, one output pixel per "thread" index `i`.
fn resize_h(
    src: &[u8],
    rows: usize,
    in_w: usize,
    out_w: usize,
    taps: &[i32],
    ksize: usize,
) -> Vec<u8> {
    let (start, count, coeffs) = (&taps[..out_w], &taps[out_w..2 * out_w], &taps[2 * out_w..]);
    let mut dst = vec![0u8; rows * out_w * 3];
    for i in 0..rows * out_w {
        let (y, x) = (i / out_w, i % out_w);
        let p = (y * in_w + start[x] as usize) * 3;
        let k = &coeffs[x * ksize..];
        let mut a = [1i32 << 21; 3];
        for t in 0..count[x] as usize {
            for (c, acc) in a.iter_mut().enumerate() {
                *acc += i32::from(src[p + 3 * t + c]) * k[t];
            }
        }
        for c in 0..3 {
            dst[i * 3 + c] = clip8(a[c]);
        }
    }
    dst
}

/// `pre_resize_v`, one output byte per index `i`.
fn resize_v(
    src: &[u8],
    w: usize,
    first_row: usize,
    out_h: usize,
    taps: &[i32],
    ksize: usize,
) -> Vec<u8> {
    let (start, count, coeffs) = (&taps[..out_h], &taps[out_h..2 * out_h], &taps[2 * out_h..]);
    let row_len = w * 3;
    let mut dst = vec![0u8; out_h * row_len];
    for (i, d) in dst.iter_mut().enumerate() {
        let (yy, e) = (i / row_len, i % row_len);
        let p = (start[yy] as usize - first_row) * row_len + e;
        let k = &coeffs[yy * ksize..];
        let mut acc = 1i32 << 21;
        for t in 0..count[yy] as usize {
            acc += i32::from(src[p + t * row_len]) * k[t];
        }
        *d = clip8(acc);
    }
    dst
}

/// `pre_to_float` into `out` at element `at`.
fn to_float(src: &[u8], pixels: usize, spec: &PreprocessSpec, out: &mut [f32], at: usize) {
    let nhwc = spec.layout == TensorLayout::Nhwc;
    for i in 0..pixels * 3 {
        let (p, c) = (i / 3, i % 3);
        let mut v = f32::from(src[i]) * spec.scale;
        if let Some((m, s)) = spec.normalize {
            v = (v - m[c]) / s[c];
        }
        out[at + if nhwc { i } else { c * pixels + p }] = v;
    }
}

/// Runs a plan as the device would; returns the f32 output and the resized bytes of
/// every image.
fn emulate(
    plan: &BatchPlan,
    images: &[&RgbImage],
    spec: &PreprocessSpec,
) -> (Vec<f32>, Vec<Vec<u8>>) {
    let mut input = vec![0xAB; plan.input_bytes];
    let raw: Vec<&[u8]> = images.iter().map(|i| i.as_raw().as_slice()).collect();
    plan.fill_input(&raw, &mut input).unwrap();
    emulate_input(plan, input, images.len(), spec)
}

/// The plan's steps over an input buffer as given (tables and `n` images).
fn emulate_input(
    plan: &BatchPlan,
    input: Vec<u8>,
    n: usize,
    spec: &PreprocessSpec,
) -> (Vec<f32>, Vec<Vec<u8>>) {
    let mut mem = Mem {
        input,
        tmp: vec![0xCD; plan.tmp_bytes],
        resized: vec![0xEF; plan.resized_bytes],
    };
    let mut out = vec![f32::NAN; n * plan.image_elems()];
    let mut resized = Vec::new();
    for step in &plan.steps {
        match *step {
            Step::Horizontal {
                src,
                dst,
                rows,
                in_w,
                out_w,
                taps,
                ksize,
            } => {
                let t = mem.taps(taps, out_w, ksize);
                let y = resize_h(mem.get(src), rows, in_w, out_w, &t, ksize);
                mem.put(dst, y);
            }
            Step::Vertical {
                src,
                dst,
                w,
                first_row,
                out_h,
                taps,
                ksize,
            } => {
                let t = mem.taps(taps, out_h, ksize);
                let y = resize_v(mem.get(src), w, first_row, out_h, &t, ksize);
                mem.put(dst, y);
            }
            Step::ToFloat {
                src,
                pixels,
                out: at,
            } => {
                resized.push(mem.get(src)[..pixels * 3].to_vec());
                to_float(mem.get(src), pixels, spec, &mut out, at);
            }
        }
    }
    (out, resized)
}

fn sizes(images: &[&RgbImage]) -> Vec<(usize, usize)> {
    images
        .iter()
        .map(|i| (i.width() as usize, i.height() as usize))
        .collect()
}

#[test]
fn emulated_plan_is_bit_exact_for_every_pass_order() {
    let cases = [
        ((128, 96), (64, 64)), // both shrink: horizontal first over the rows read
        ((30, 20), (64, 64)),  // both grow
        ((33, 25), (9, 13)),   // odd sizes
        ((64, 64), (64, 64)),  // identity: no pass
        ((30, 90), (64, 64)),  // width grows, height shrinks: vertical first
        ((50, 64), (64, 64)),  // width only
        ((64, 43), (64, 64)),  // height only, growing
        ((64, 99), (64, 64)),  // height only, shrinking (vertical-first order)
        ((1, 1), (7, 5)),
        ((7, 5), (1, 1)),
        ((403, 302), (64, 64)), // strong downscale: wide filters
    ];
    for (i, ((w, h), (ow, oh))) in cases.into_iter().enumerate() {
        let img = test_image(w, h, i as u32);
        let spec = PreprocessSpec::resize(oh as usize, ow as usize).rescale(HF_RESCALE_FACTOR);
        let plan = plan_batch(&sizes(&[&img]), &spec).unwrap();
        let (out, resized) = emulate(&plan, &[&img], &spec);
        let want = pil_bilinear(&img, ow, oh).unwrap();
        assert_eq!(
            resized[0],
            *want.as_raw(),
            "{w}x{h}->{ow}x{oh}: resized bytes"
        );
        let cpu = preprocess_cpu(&[&img], &spec).unwrap();
        assert_eq!(out, cpu.to_f32_vec(), "{w}x{h}->{ow}x{oh}: f32 values");
    }
}

#[test]
fn batch_slots_layouts_and_normalisation_match_the_cpu_path() {
    let (a, b, c) = (
        test_image(128, 96, 1),
        test_image(30, 20, 2),
        test_image(64, 64, 3),
    );
    let images = [&a, &b, &c, &a];
    for layout in [TensorLayout::Nchw, TensorLayout::Nhwc] {
        let spec = PreprocessSpec::resize(64, 48)
            .rescale(HF_RESCALE_FACTOR)
            .normalized([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
            .with_layout(layout);
        let plan = plan_batch(&sizes(&images), &spec).unwrap();
        assert_eq!(
            plan.out_shape(4, layout).iter().product::<usize>(),
            4 * plan.image_elems()
        );
        let (out, _) = emulate(&plan, &images, &spec);
        let cpu = preprocess_cpu(&images, &spec).unwrap();
        assert_eq!(cpu.shape(), plan.out_shape(4, layout).as_slice());
        assert_eq!(out, cpu.to_f32_vec(), "{layout:?}");
    }
}

#[test]
fn input_buffer_layout_is_aligned_and_disjoint() {
    let (a, b) = (test_image(17, 9, 1), test_image(5, 3, 2));
    let spec = PreprocessSpec::resize(8, 8);
    let plan = plan_batch(&sizes(&[&a, &b]), &spec).unwrap();
    assert!(plan.image_at[0] >= plan.tables.len() * 4);
    assert!(plan.image_at.iter().all(|at| at % ALIGN == 0));
    assert!(plan.image_at[1] >= plan.image_at[0] + 17 * 9 * 3);
    assert!(plan.input_bytes >= plan.image_at[1] + 5 * 3 * 3);
    // Slots: image i's conversion writes at i * image_elems.
    let outs: Vec<usize> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::ToFloat { out, .. } => Some(*out),
            _ => None,
        })
        .collect();
    assert_eq!(outs, vec![0, plan.image_elems()]);
    // Tables: horizontal and vertical per image, each 2n + n*ksize values.
    let expect: usize = [(17usize, 8usize), (9, 8), (5, 8), (3, 8)]
        .iter()
        .map(|&(i, o)| {
            let t = aperture_vision::bilinear_taps(i, o);
            2 * o + o * t.ksize
        })
        .sum();
    assert_eq!(plan.tables.len(), expect);
}

#[test]
fn scratch_holds_the_first_pass_and_only_rows_that_are_read() {
    // 1280x960 -> 640x640: the horizontal pass covers only the rows the vertical one
    // reads (all of them here), the scratch holds those rows at the output width.
    let spec = PreprocessSpec::resize(640, 640);
    let plan = plan_batch(&[(1280, 960)], &spec).unwrap();
    assert_eq!(plan.tmp_bytes, 960 * 640 * 3);
    assert_eq!(plan.resized_bytes, 640 * 640 * 3);
    assert!(matches!(
        plan.steps[0],
        Step::Horizontal {
            rows: 960,
            src: Region::Input(_),
            dst: Region::Tmp,
            ..
        }
    ));
    assert!(matches!(
        plan.steps[1],
        Step::Vertical {
            first_row: 0,
            src: Region::Tmp,
            dst: Region::Resized,
            ..
        }
    ));
    // Vertical first: the scratch is out_h rows at the input width.
    let plan = plan_batch(&[(300, 900)], &spec).unwrap();
    assert_eq!(plan.tmp_bytes, 640 * 300 * 3);
    assert!(matches!(
        plan.steps[0],
        Step::Vertical {
            w: 300,
            src: Region::Input(_),
            ..
        }
    ));
    // Identity: no pass, conversion straight from the input.
    let plan = plan_batch(&[(640, 640)], &spec).unwrap();
    assert_eq!(plan.steps.len(), 1);
    assert!(matches!(
        plan.steps[0],
        Step::ToFloat {
            src: Region::Input(_),
            ..
        }
    ));
}

/// The pixel graphs (`crate::detection::PixelGraphCache`) upload the tables once and
/// then, per call, only the bytes from the first image on: that must be the whole
/// input of a batch of one size, whichever images it holds.
#[test]
fn one_size_batches_rewrite_only_the_images_after_tables_uploaded_once() {
    let spec = PreprocessSpec::resize(24, 32).rescale(HF_RESCALE_FACTOR);
    let plan = plan_batch(&[(37, 23); 3], &spec).unwrap();
    let pixels_at = plan.image_at[0];
    assert!(pixels_at >= plan.tables.len() * 4);
    // The device buffer as captured: tables, zeros where the images go.
    let mut device = vec![0u8; plan.input_bytes];
    let mut pinned = vec![0x5Au8; plan.input_bytes];
    plan.fill_input(&[], &mut pinned).unwrap();
    device[..pixels_at].copy_from_slice(&pinned[..pixels_at]);
    for seed in [1, 2] {
        let imgs: Vec<RgbImage> = (0..3).map(|i| test_image(37, 23, seed * 10 + i)).collect();
        let refs: Vec<&RgbImage> = imgs.iter().collect();
        let raw: Vec<&[u8]> = refs.iter().map(|i| i.as_raw().as_slice()).collect();
        plan.fill_input(&raw, &mut pinned).unwrap();
        device[pixels_at..].copy_from_slice(&pinned[pixels_at..]);
        let (got, _) = emulate_input(&plan, device.clone(), 3, &spec);
        let want = preprocess_cpu(&refs, &spec).unwrap().to_f32_vec();
        assert_eq!(got, want, "call with images of seed {seed}");
    }
}

#[test]
fn bad_batches_are_errors() {
    assert!(plan_batch(&[], &PreprocessSpec::resize(4, 4)).is_err());
    let e = plan_batch(&[(4, 4), (5, 4)], &PreprocessSpec::keep_size()).unwrap_err();
    assert!(e.to_string().contains("target size"), "{e}");
    assert!(plan_batch(&[(0, 4)], &PreprocessSpec::resize(4, 4)).is_err());
    let e = plan_batch(&[(1 << 30, 1)], &PreprocessSpec::resize(4, 4)).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    let plan = plan_batch(&[(4, 4), (4, 4)], &PreprocessSpec::keep_size()).unwrap();
    assert_eq!((plan.out_h, plan.out_w), (4, 4));
}

/// Writes every case's input buffer, launches and expected output for the harness.
fn write_harness_cases(dir: &std::path::Path) {
    use std::io::Write;
    let mut idx = std::fs::File::create(dir.join("cases.txt")).unwrap();
    let cases = [
        ((1280, 960), (640, 640), false, TensorLayout::Nchw),
        ((300, 200), (640, 640), true, TensorLayout::Nhwc),
        ((333, 251), (97, 131), true, TensorLayout::Nchw),
        ((640, 640), (640, 640), false, TensorLayout::Nchw),
        ((300, 900), (640, 640), true, TensorLayout::Nchw),
        ((500, 640), (640, 640), false, TensorLayout::Nhwc),
        ((640, 427), (640, 640), false, TensorLayout::Nchw),
        ((1, 1), (7, 5), false, TensorLayout::Nchw),
        ((7, 5), (1, 1), true, TensorLayout::Nchw),
        ((2016, 1512), (640, 640), true, TensorLayout::Nchw),
    ];
    for (ci, ((w, h), (ow, oh), norm, layout)) in cases.into_iter().enumerate() {
        let a = test_image(w, h, ci as u32);
        let b = test_image(w / 2 + 1, h / 3 + 1, ci as u32 + 50);
        let mut spec = PreprocessSpec::resize(oh as usize, ow as usize)
            .rescale(HF_RESCALE_FACTOR)
            .with_layout(layout);
        if norm {
            spec = spec.normalized([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        }
        let images = [&a, &b];
        let plan = plan_batch(&sizes(&images), &spec).unwrap();
        let raw: Vec<&[u8]> = images.iter().map(|i| i.as_raw().as_slice()).collect();
        let mut input = vec![0u8; plan.input_bytes];
        plan.fill_input(&raw, &mut input).unwrap();
        std::fs::write(dir.join(format!("{ci}.in")), &input).unwrap();
        let want = preprocess_cpu(&images, &spec).unwrap().to_f32_vec();
        let bytes: Vec<u8> = want.iter().flat_map(|v| v.to_ne_bytes()).collect();
        std::fs::write(dir.join(format!("{ci}.want")), bytes).unwrap();
        let (m, s) = spec.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
        let reg = |r: Region| match r {
            Region::Input(at) => format!("0 {at}"),
            Region::Tmp => "1 0".into(),
            Region::Resized => "2 0".into(),
        };
        writeln!(
            idx,
            "C {ci} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            plan.input_bytes,
            plan.tmp_bytes,
            plan.resized_bytes,
            want.len(),
            (spec.layout == TensorLayout::Nhwc) as i32,
            spec.scale.to_bits(),
            norm as i32,
            m[0].to_bits(),
            m[1].to_bits(),
            m[2].to_bits(),
            s[0].to_bits(),
            s[1].to_bits(),
            s[2].to_bits(),
            plan.steps.len()
        )
        .unwrap();
        for st in &plan.steps {
            match *st {
                Step::Horizontal {
                    src,
                    dst,
                    rows,
                    in_w,
                    out_w,
                    taps,
                    ksize,
                } => writeln!(
                    idx,
                    "H {} {} {rows} {in_w} {out_w} {taps} {ksize}",
                    reg(src),
                    reg(dst)
                ),
                Step::Vertical {
                    src,
                    dst,
                    w,
                    first_row,
                    out_h,
                    taps,
                    ksize,
                } => writeln!(
                    idx,
                    "V {} {} {w} {first_row} {out_h} {taps} {ksize}",
                    reg(src),
                    reg(dst)
                ),
                Step::ToFloat { src, pixels, out } => {
                    writeln!(idx, "F {} {pixels} {out}", reg(src))
                }
            }
            .unwrap();
        }
    }
}

/// The kernel source itself, compiled as C++ and run on the CPU (CUDA's launch
/// geometry, one thread at a time) over the plan's launches, gives exactly the CPU
/// path's values. Skipped where there is no C++ compiler.
#[test]
fn kernel_source_run_as_cpp_is_bit_exact() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // A missing compiler fails the test rather than skipping it.
    assert!(
        std::process::Command::new(&cxx)
            .arg("--version")
            .output()
            .is_ok(),
        "a C++ compiler ({cxx}) is needed to run preprocess.cu on the host"
    );
    let dir = std::env::temp_dir().join(format!("aperture-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_harness_cases(&dir);
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = here.join("kernels/preprocess.cu");
    let exe = dir.join("harness");
    let built = std::process::Command::new(&cxx)
        .args(["-O2", "-std=c++17", "-o"])
        .arg(&exe)
        .arg(format!("-DPRE_SOURCE=\"{}\"", source.display()))
        .arg(here.join("src/preprocess/cpu_harness.cpp"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = std::process::Command::new(&exe).arg(&dir).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.status.success() && out.contains("ALL BIT-EXACT"),
        "{out}"
    );
    assert_eq!(out.matches(" 0 differ").count(), 10, "{out}");
}
