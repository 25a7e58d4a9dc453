//! `aperture selftest preprocess`: GPU image preprocessing against the CPU path
//! (resized bytes identical, f32 within 1e-6), with a timing of both.
//!
//! `aperture selftest pipeline`: the graph caches' two-deep pipeline (one request's
//! input uploading while another replays): see [`pipeline`].

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use aperture_cuda::preprocess::check::{preprocess_parity, test_image};
use aperture_cuda::preprocess::{preprocess_cpu, GpuPreprocessor, PreprocessSpec};
use aperture_vision::{decode_file, DecodeLimits, HF_RESCALE_FACTOR};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Check {
    /// Resize + rescale + normalise on the GPU against the CPU path.
    Preprocess,
    /// Graph replays with two requests in flight (upload beside replay) against one at
    /// a time and against eager passes: bit-identical, plus a timing.
    Pipeline,
}

#[derive(Args)]
pub struct SelftestArgs {
    /// What to check.
    #[arg(value_enum)]
    check: Check,
    /// Which GPU (CUDA device ordinal).
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Real images to add to the cases (each resized to 640x640).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Timed repetitions of a 1280x960 -> 640x640 batch of 8 (0: no timing).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    match args.check {
        Check::Preprocess => preprocess(&args),
        Check::Pipeline => pipeline::run(args.gpu, args.iters),
    }
}

fn preprocess(args: &SelftestArgs) -> anyhow::Result<()> {
    let gpu = GpuPreprocessor::new(args.gpu).context("opening the GPU for preprocessing")?;
    let mut extra = Vec::new();
    for path in &args.image {
        let img = decode_file(path, &DecodeLimits::default())
            .with_context(|| format!("cannot read {}", path.display()))?
            .into_rgb8();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        extra.push((format!("{name} {}x{}", img.width(), img.height()), img));
    }
    println!("GPU preprocessing vs CPU on {}", gpu.device_name());
    println!(
        "{:<52} {:>13} {:>12}  result",
        "case", "u8 mismatch", "max |diff|"
    );
    let rows = preprocess_parity(&gpu, &extra)?;
    let mut failed = 0;
    for r in &rows {
        let bytes = r
            .u8_mismatches
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into());
        let ok = r.passed();
        failed += usize::from(!ok);
        println!(
            "{:<52} {:>13} {:>12.3e}  {}",
            r.case,
            bytes,
            r.f32_max_abs,
            if ok { "PASS" } else { "FAIL" }
        );
    }
    if args.iters > 0 {
        time_both(&gpu, args.iters)?;
    }
    println!(
        "preprocess selftest: {}/{} passed",
        rows.len() - failed,
        rows.len()
    );
    if failed > 0 {
        bail!("{failed} preprocessing case(s) differ between GPU and CPU");
    }
    Ok(())
}

/// Milliseconds per image of both paths on a batch of eight 1280x960 images (the GPU
/// figure includes the copies both ways).
fn time_both(gpu: &GpuPreprocessor, iters: usize) -> anyhow::Result<()> {
    let images: Vec<_> = (0..8).map(|i| test_image(1280, 960, i)).collect();
    let refs: Vec<_> = images.iter().collect();
    let spec = PreprocessSpec::resize(640, 640).rescale(HF_RESCALE_FACTOR);
    gpu.run(&refs, &spec)?;
    let t = Instant::now();
    for _ in 0..iters {
        gpu.run(&refs, &spec)?;
    }
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3 / (iters * refs.len()) as f64;
    let t = Instant::now();
    preprocess_cpu(&refs[..1], &spec)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "timing 1280x960 -> 640x640 f32: GPU {gpu_ms:.3} ms/image (batch 8, with copies), CPU {cpu_ms:.3} ms/image (one thread)"
    );
    Ok(())
}

mod pipeline {
    //! Every request of a set runs eagerly, then through a graph cache one at a time,
    //! then from two threads at once, several rounds (one thread's upload beside the
    //! other's replay, the slots reused many times): every graph result must equal the
    //! eager one bit for bit, for `GraphCache` (Restormer's) and `MultiGraphCache`
    //! (D-FINE's), in fp32 and fp16, on small inputs padded into the graph for 4 and on
    //! 512x512 images padded into the graph for 8 (uploads of several staged chunks).
    //! Then a timing: replay alone against one and two callers.

    use std::sync::Mutex;
    use std::time::Instant;

    use anyhow::{bail, Context};
    use aperture_cuda::detection::MultiGraphCache;
    use aperture_cuda::{CudaBackend, CudaTensor, GraphCache};
    use aperture_engine::{Backend, HostTensor, Precision};

    /// Times each request runs from the two threads.
    const ROUNDS: usize = 4;

    type Run<'a> = dyn Fn(&HostTensor) -> anyhow::Result<Vec<f32>> + Sync + 'a;

    /// Sigmoid-and-add rounds: element-wise (padding rows cannot reach the request's
    /// rows, so a padded replay equals an eager pass), `depth` kernels pairs long.
    fn chain(b: &CudaBackend, x: &CudaTensor, depth: usize) -> aperture_engine::Result<CudaTensor> {
        let mut y = b.sigmoid(x)?;
        for _ in 1..depth {
            y = b.add(&b.sigmoid(&y)?, x)?;
        }
        Ok(y)
    }

    /// `[rows, 3, side, side]` values in [-4, 4), different for every `seed`.
    fn input(rows: usize, side: usize, seed: u64) -> anyhow::Result<HostTensor> {
        let n = rows * 3 * side * side;
        let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data = (0..n)
            .map(|_| {
                z ^= z << 13;
                z ^= z >> 7;
                z ^= z << 17;
                (z >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0
            })
            .collect();
        Ok(HostTensor::from_f32(vec![rows, 3, side, side], data)?)
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    pub fn run(gpu: usize, iters: usize) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        let mut cases = 0;
        // Small inputs padded into the graph for 4, and batches of 512x512 images padded
        // into the graph for 8 (several staged chunks per upload).
        let small = Case::new("small", 12, 4, 32, 8)?;
        let large = Case::new("512x512", 4, 8, 512, 64)?;
        for p in [Precision::Fp32, Precision::Fp16] {
            let be = CudaBackend::new(gpu, p).context("opening the GPU")?;
            if p == Precision::Fp32 {
                println!("graph pipeline on {}", be.device_name());
            }
            for case in [&small, &large] {
                for (cache, result) in case.check_caches(&be)? {
                    cases += 1;
                    match result {
                        Ok(()) => println!(
                            "{p:>5} {cache:<15} {:<7} PASS: {} requests of {}-{} rows, alone and \
                             from 2 threads x {ROUNDS} rounds, bit-identical to eager passes",
                            case.name,
                            case.requests.len(),
                            case.graph_batch - 3,
                            case.graph_batch
                        ),
                        Err(e) => {
                            println!("{p:>5} {cache:<15} {:<7} FAIL: {e:#}", case.name);
                            failed.push(format!("{p} {cache} {}", case.name));
                        }
                    }
                }
            }
            if p == Precision::Fp16 && iters > 0 {
                timing(&be, iters)?;
            }
        }
        println!("pipeline selftest: {}/{cases} passed", cases - failed.len());
        if !failed.is_empty() {
            bail!("graph pipeline differs: {}", failed.join(", "));
        }
        Ok(())
    }

    /// Requests of `graph_batch - 3` to `graph_batch` rows run through a graph for
    /// `graph_batch` and a chain `depth` pairs long.
    struct Case {
        name: &'static str,
        graph_batch: usize,
        depth: usize,
        requests: Vec<HostTensor>,
    }

    impl Case {
        fn new(
            name: &'static str,
            requests: usize,
            graph_batch: usize,
            side: usize,
            depth: usize,
        ) -> anyhow::Result<Self> {
            let requests = (0..requests)
                .map(|i| input(graph_batch - 3 + i % 4, side, (side * 1000 + i) as u64))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Self {
                name,
                graph_batch,
                depth,
                requests,
            })
        }

        /// The eager results, as NCHW or (D-FINE's graphs) NHWC f32 values.
        fn eager(&self, be: &CudaBackend, nhwc: bool) -> anyhow::Result<Vec<Vec<f32>>> {
            self.requests
                .iter()
                .map(|x| {
                    let y = chain(be, &be.upload_nchw(x)?, self.depth)?;
                    let host = if nhwc {
                        be.download_nhwc(&y)?
                    } else {
                        be.download_nchw(&y)?
                    };
                    Ok(host.to_f32_vec())
                })
                .collect()
        }

        /// Both graph caches against the eager passes, on fresh caches.
        fn check_caches(
            &self,
            be: &CudaBackend,
        ) -> anyhow::Result<Vec<(&'static str, anyhow::Result<()>)>> {
            let (gb, depth) = (self.graph_batch, self.depth);
            let single = GraphCache::new();
            let run_single = |x: &HostTensor| -> anyhow::Result<Vec<f32>> {
                let fwd = |b: &CudaBackend, t: &CudaTensor| chain(b, t, depth);
                Ok(single.infer_padded(be, x, gb, fwd)?.to_f32_vec())
            };
            let multi = MultiGraphCache::new();
            let run_multi = |x: &HostTensor| -> anyhow::Result<Vec<f32>> {
                let fwd = |b: &CudaBackend, t: &CudaTensor| Ok(vec![chain(b, t, depth)?]);
                let outs = multi.infer_padded(be, x, gb, fwd)?;
                Ok(outs.first().map(|y| y.to_f32_vec()).unwrap_or_default())
            };
            Ok(vec![
                (
                    "GraphCache",
                    check(&run_single, &self.requests, &self.eager(be, false)?),
                ),
                (
                    "MultiGraphCache",
                    check(&run_multi, &self.requests, &self.eager(be, true)?),
                ),
            ])
        }
    }

    /// One at a time, then two threads at once; every result equal to `want`.
    fn check(run: &Run<'_>, requests: &[HostTensor], want: &[Vec<f32>]) -> anyhow::Result<()> {
        for (i, (x, w)) in requests.iter().zip(want).enumerate() {
            if !same_bits(&run(x)?, w) {
                bail!("request {i} (one at a time) differs from its eager pass");
            }
        }
        let first_error: Mutex<Option<String>> = Mutex::new(None);
        std::thread::scope(|s| {
            for t in 0..2 {
                let first_error = &first_error;
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        for i in (t..requests.len()).step_by(2) {
                            let problem = match run(&requests[i]) {
                                Ok(y) if same_bits(&y, &want[i]) => continue,
                                Ok(_) => format!(
                                    "request {i} (thread {t}, round {round}) differs from its eager pass"
                                ),
                                Err(e) => format!("request {i} (thread {t}): {e:#}"),
                            };
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert(problem);
                            }
                            return;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().ok().flatten() {
            Some(problem) => bail!("{problem}"),
            None => Ok(()),
        }
    }

    /// Batches of 8 images 512x512 through a graph deep enough to take about as long
    /// as their upload: replay alone (events), then the wall time per call of one and of
    /// two callers. With the pipeline, two callers approach the replay alone.
    fn timing(be: &CudaBackend, iters: usize) -> anyhow::Result<()> {
        let depth = 256;
        let cache = GraphCache::new();
        let fwd = |b: &CudaBackend, t: &CudaTensor| chain(b, t, depth);
        let xs = (0..4)
            .map(|i| input(8, 512, 100 + i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let shape = xs[0].shape().to_vec();
        cache.infer(be, &xs[0], fwd)?;
        let start = be.record_event()?;
        for _ in 0..iters {
            cache.replay(be, &shape)?;
        }
        let replay_ms = be.record_event()?.elapsed_ms(&start)? as f64 / iters as f64;
        let per_call = |threads: usize| -> anyhow::Result<f64> {
            let calls = 2 * iters;
            let t = Instant::now();
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..threads)
                    .map(|k| {
                        let (cache, xs) = (&cache, &xs);
                        s.spawn(move || -> anyhow::Result<()> {
                            for i in (k..calls).step_by(threads) {
                                cache.infer(be, &xs[i % xs.len()], fwd)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for w in workers {
                    w.join()
                        .map_err(|_| anyhow::anyhow!("a timing thread panicked"))??;
                }
                Ok::<(), anyhow::Error>(())
            })?;
            Ok(t.elapsed().as_secs_f64() * 1e3 / calls as f64)
        };
        let one = per_call(1)?;
        let two = per_call(2)?;
        println!(
            " fp16 timing, batch 8 x 3x512x512, {} kernels: replay alone {replay_ms:.2} ms; \
             per call, 1 caller {one:.2} ms ({:.2} of replay speed), 2 callers {two:.2} ms ({:.2})",
            2 * depth - 1,
            replay_ms / one,
            replay_ms / two
        );
        Ok(())
    }
}
