//! D-FINE in the bench: the model folder's snapshot, the forward pass (logits and boxes)
//! as the sweep runs it, and its accuracy figure: logits and boxes of the first image
//! against the CPU backend's fp32 outputs, rows matched first (query selection is a
//! top-k, and near-tied scores swap rows between implementations).

use std::path::Path;

use anyhow::{bail, Context};
use aperture_cuda::detection::{MultiGraphCache, PixelGraphCache, PixelGraphKey};
use aperture_cuda::preprocess::PreprocessSpec;
use aperture_cuda::{CudaBackend, CudaTensor};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, Backend, HostTensor};
use aperture_models::dfine::{load_dfine, DFineRunner, DFineSnapshot};
use aperture_vision::RgbImage;
use serde_json::{json, Value};

use super::sweep::{Accuracy, BenchModel, Staged};
use super::{measure, pixels, BenchArgs, Outcome};
use crate::commands::check_dfine::align;
use crate::commands::detect::preprocess_spec;

/// `--preprocess`: synthetic source images of one size and the model's preprocessing.
struct PixelInput {
    /// (width, height) of every source image.
    size: (usize, usize),
    /// The model's preprocessing, resizing to the benched input size.
    spec: PreprocessSpec,
}

/// D-FINE prepared on a backend, with the query count of `--queries`.
struct DFineBench<B: Backend> {
    runner: DFineRunner<B>,
    /// `--postprocess`: the GPU graph ends in the top-K detection rows.
    postprocess: bool,
    /// `--preprocess`: the GPU graph starts from 8-bit pixels (and ends in rows).
    pixels: Option<PixelInput>,
}

impl<B: Backend> DFineBench<B>
where
    B::Tensor: 'static,
{
    fn new(be: B, snap: &DFineSnapshot, queries: Option<usize>) -> anyhow::Result<Self> {
        let mut runner = DFineRunner::new(be, snap, 0)?;
        if let Some(q) = queries {
            runner.set_num_queries(q).context("--queries")?;
        }
        Ok(Self {
            runner,
            postprocess: false,
            pixels: None,
        })
    }

    fn eager(&self, x: &HostTensor) -> anyhow::Result<Staged<'_>> {
        let (be, model) = (self.runner.backend(), self.runner.model());
        let t = be.upload_nchw(x)?;
        let o = model.forward(be, &t)?;
        Ok(Staged {
            outputs: vec![be.download_nhwc(&o.logits)?, be.download_nhwc(&o.boxes)?],
            run: Box::new(move || {
                model.forward(be, &t)?;
                Ok(())
            }),
            memory: None,
        })
    }

    /// Logits and boxes errors after matching `got`'s rows to `want`'s by nearest box.
    fn errors(&self, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
        let q = self.runner.model().num_queries();
        let c = self.runner.config().num_labels;
        let shaped = |o: &[Vec<f32>]| match o {
            [l, b] if l.len() == q * c && b.len() == q * 4 => Some((l.clone(), b.clone())),
            _ => None,
        };
        let (Some((gl, gb)), Some((wl, wb))) = (shaped(got), shaped(want)) else {
            return Accuracy {
                rel_l2: f64::INFINITY,
                extra: Vec::new(),
            };
        };
        let (al, ab, moved) = align((&gl, &gb), &wb, q, c);
        let (el, eb) = (relative_l2(&al, &wl), relative_l2(&ab, &wb));
        Accuracy {
            rel_l2: el.max(eb),
            extra: vec![
                ("rel_l2_logits", json!(el)),
                ("rel_l2_boxes", json!(eb)),
                ("rows_moved", json!(moved)),
            ],
        }
    }
}

impl BenchModel for DFineBench<CpuBackend> {
    fn gpu(&self) -> Option<&CudaBackend> {
        None
    }

    fn stage(&self, x: &HostTensor, _graph: bool) -> anyhow::Result<Staged<'_>> {
        self.eager(x)
    }

    fn compare(&self, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
        self.errors(got, want)
    }
}

impl DFineBench<CudaBackend> {
    /// A graph of the forward pass and the post-processing (the `aperture detect`
    /// graph); the accuracy column still compares logits and boxes, from an eager pass.
    fn stage_postprocess(&self, x: &HostTensor) -> anyhow::Result<Staged<'_>> {
        let (be, model) = (self.runner.backend(), self.runner.model());
        let k = model.num_queries();
        let cache = MultiGraphCache::new();
        let fwd = |b: &CudaBackend, t: &CudaTensor| -> aperture_engine::Result<Vec<_>> {
            let o = model.forward(b, t)?;
            Ok(vec![b.top_k_detections(&o.logits, &o.boxes, k)?])
        };
        cache.infer(be, x, fwd)?;
        let outputs = self.first_image_outputs(x)?;
        let shape = x.shape().to_vec();
        Ok(Staged {
            outputs,
            run: Box::new(move || Ok(cache.replay(be, &shape)?)),
            memory: None,
        })
    }

    /// One graph from 8-bit pixels to detection rows (`--preprocess`): each timed run
    /// copies the batch's pixels in, replays (preprocessing, forward pass,
    /// post-processing) and copies the rows out, as `GraphDFine::detect_images_post`
    /// does for images of one size. The accuracy column compares logits and boxes of
    /// an eager pass on the sweep's input, as with `--postprocess`.
    fn stage_pixels(&self, x: &HostTensor, p: &PixelInput) -> anyhow::Result<Staged<'_>> {
        let (be, model) = (self.runner.backend(), self.runner.model());
        let k = model.num_queries();
        let batch = x.shape().first().copied().unwrap_or(1);
        let images = pixels::images(batch, p.size, 0x5eed);
        let refs: Vec<&RgbImage> = images.iter().collect();
        let key = PixelGraphKey::for_images(&refs, &p.spec)?
            .context("synthetic images of one size must give one graph")?;
        let input = key.model_input_shape();
        if x.shape().get(2..) != Some(&input[2..]) {
            bail!(
                "preprocessing gives {}x{} inputs, the bench measures {:?}",
                input[3],
                input[2],
                x.shape()
            );
        }
        let cache = PixelGraphCache::new();
        let fwd = |b: &CudaBackend, t: &CudaTensor| -> aperture_engine::Result<Vec<_>> {
            let o = model.forward(b, t)?;
            Ok(vec![b.top_k_detections(&o.logits, &o.boxes, k)?])
        };
        cache.infer(be, &key, &refs, fwd)?;
        let outputs = self.first_image_outputs(x)?;
        Ok(Staged {
            outputs,
            run: Box::new(move || Ok(cache.run_staged(be, &key)?)),
            memory: None,
        })
    }

    /// Logits and boxes of an eager pass on the first image of `x`, shaped as the
    /// batch's outputs (the sweep takes each output's first 1/batch), the other images
    /// zero: the accuracy column of graphs that end in detection rows.
    fn first_image_outputs(&self, x: &HostTensor) -> anyhow::Result<Vec<HostTensor>> {
        let s = x.shape();
        let per: usize = s.iter().skip(1).product();
        let mut one = vec![1];
        one.extend_from_slice(s.get(1..).unwrap_or_default());
        let first = HostTensor::from_f32(one, x.to_f32_vec().into_iter().take(per).collect())?;
        let batch = s.first().copied().unwrap_or(1);
        self.eager(&first)?
            .outputs
            .into_iter()
            .map(|t| {
                let mut dims = t.shape().to_vec();
                let mut v = t.to_f32_vec();
                v.resize(v.len() * batch, 0.0);
                if let Some(d) = dims.first_mut() {
                    *d *= batch;
                }
                Ok(HostTensor::from_f32(dims, v)?)
            })
            .collect()
    }
}

impl BenchModel for DFineBench<CudaBackend> {
    fn gpu(&self) -> Option<&CudaBackend> {
        Some(self.runner.backend())
    }

    /// The whole forward pass in one CUDA graph per batch size, as `GraphDFine` serves
    /// it (input conversion and output copies to f32 included in the graph); with
    /// `--postprocess` the graph ends in the top-K detection rows instead.
    fn stage(&self, x: &HostTensor, graph: bool) -> anyhow::Result<Staged<'_>> {
        if !graph {
            return self.eager(x);
        }
        if let Some(p) = &self.pixels {
            return self.stage_pixels(x, p);
        }
        if self.postprocess {
            return self.stage_postprocess(x);
        }
        let (be, model) = (self.runner.backend(), self.runner.model());
        let cache = MultiGraphCache::new();
        let fwd = |b: &CudaBackend, t: &CudaTensor| -> aperture_engine::Result<Vec<CudaTensor>> {
            let o = model.forward(b, t)?;
            Ok(vec![o.logits, o.boxes])
        };
        let outputs = cache.infer(be, x, fwd)?;
        let shape = x.shape().to_vec();
        Ok(Staged {
            outputs,
            run: Box::new(move || Ok(cache.replay(be, &shape)?)),
            memory: None,
        })
    }

    fn compare(&self, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
        self.errors(got, want)
    }

    fn graph_extra(&self) -> Vec<(&'static str, Value)> {
        graph_label(self.pixels.as_ref().map(|p| p.size), self.postprocess)
            .map(|l| vec![("graph", json!(l))])
            .unwrap_or_default()
    }
}

/// What one timed GPU run covers, for the rows: `None` for the plain forward pass.
fn graph_label(pixels: Option<(usize, usize)>, postprocess: bool) -> Option<String> {
    match (pixels, postprocess) {
        (Some((w, h)), _) => Some(format!(
            "u8 {w}x{h} in -> preprocess+forward+postprocess -> rows out"
        )),
        (None, true) => Some("f32 input -> forward+postprocess -> rows".into()),
        (None, false) => None,
    }
}

pub fn run(args: &BenchArgs, path: &Path) -> anyhow::Result<Outcome> {
    for (given, flag) in [
        (
            args.check || !args.reference.is_empty(),
            "--check/--reference",
        ),
        (args.dry_plan, "--dry-plan"),
    ] {
        if given {
            bail!(
                "{flag} is for Restormer; for D-FINE parity run `aperture check-dfine --model {}`",
                path.display()
            );
        }
    }
    let snap = load_dfine(path).with_context(|| format!("loading {}", path.display()))?;
    // The size the model's image processor resizes to (640 when it says none).
    let (ph, pw) = snap
        .processor
        .size
        .map_or((640, 640), |(h, w)| (h as usize, w as usize));
    let (h, w) = args.dims(ph, pw);
    let rows = measure(
        args,
        (3, h, w),
        || DFineBench::new(CpuBackend::new(), &snap, args.queries),
        |p| {
            let be = CudaBackend::new(args.gpu, p).context("opening the GPU")?;
            let mut bench = DFineBench::new(be, &snap, args.queries)?;
            bench.postprocess = args.postprocess || args.preprocess.is_some();
            bench.pixels = args.preprocess.map(|size| PixelInput {
                size,
                spec: PreprocessSpec {
                    size: Some((h, w)),
                    ..preprocess_spec(&snap.processor)
                },
            });
            Ok(bench)
        },
    )?;
    let mut model = format!("dfine ({}) {h}x{w}", super::label(path));
    if let Some(q) = args.queries {
        model.push_str(&format!(", {q} of {} queries", snap.config.num_queries));
    }
    if args.device == "cuda" {
        if let Some((sw, sh)) = args.preprocess {
            model.push_str(&format!(
                ", preprocessing (8-bit {sw}x{sh} -> {w}x{h}) and post-processing in the graph, pixel copy in and rows copy out timed"
            ));
        } else if args.postprocess {
            model.push_str(", post-processing in the graph");
        }
    }
    Ok(Outcome {
        model,
        rows,
        failures: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> DFineBench<CpuBackend> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dfine/tiny");
        let snap = load_dfine(&dir).unwrap();
        DFineBench::new(CpuBackend::new(), &snap, None).unwrap()
    }

    #[test]
    fn errors_match_rows_before_comparing_and_report_the_larger() {
        let m = tiny();
        let (q, c) = (m.runner.model().num_queries(), m.runner.config().num_labels);
        let logits: Vec<f32> = (0..q * c).map(|i| (i as f32 * 0.37).sin()).collect();
        let boxes: Vec<f32> = (0..q * 4)
            .map(|i| 0.1 + 0.8 * (i as f32 * 0.11).cos().abs())
            .collect();
        // The first two queries swap places and every logit moves by 1e-3.
        let mut got_l: Vec<f32> = logits.iter().map(|v| v + 1e-3).collect();
        let mut got_b = boxes.clone();
        for k in 0..c {
            got_l.swap(k, c + k);
        }
        for k in 0..4 {
            got_b.swap(k, 4 + k);
        }
        let a = m.errors(&[got_l, got_b], &[logits.clone(), boxes.clone()]);
        let field = |k: &str| {
            a.extra
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        let want_el = relative_l2(
            &logits.iter().map(|v| v + 1e-3).collect::<Vec<_>>(),
            &logits,
        );
        assert!((field("rel_l2_logits").unwrap().as_f64().unwrap() - want_el).abs() < 1e-9);
        assert_eq!(field("rel_l2_boxes").unwrap().as_f64(), Some(0.0));
        assert_eq!(field("rows_moved").unwrap().as_u64(), Some(2));
        assert_eq!(a.rel_l2, want_el);
    }

    #[test]
    fn rows_name_what_the_graph_covers() {
        let pre = graph_label(Some((640, 480)), true).unwrap();
        assert!(pre.starts_with("u8 640x480 in"), "{pre}");
        assert!(
            pre.contains("preprocess") && pre.contains("postprocess"),
            "{pre}"
        );
        assert_eq!(graph_label(Some((640, 480)), false), Some(pre));
        let post = graph_label(None, true).unwrap();
        assert!(post.contains("postprocess") && !post.contains("preprocess"));
        assert_eq!(graph_label(None, false), None);
    }

    #[test]
    fn outputs_of_another_shape_give_an_infinite_error() {
        let m = tiny();
        let a = m.errors(&[vec![0.0; 3], vec![0.0; 4]], &[vec![0.0; 3], vec![0.0; 4]]);
        assert!(a.rel_l2.is_infinite());
        assert!(m.errors(&[], &[]).rel_l2.is_infinite());
    }
}
