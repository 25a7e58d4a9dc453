//! D-FINE in the bench: the model folder's snapshot, the forward pass (logits and boxes)
//! as the sweep runs it, and its accuracy figure: logits and boxes of the first image
//! against the CPU backend's fp32 outputs, rows matched first (query selection is a
//! top-k, and near-tied scores swap rows between implementations).

use std::path::Path;

use anyhow::{bail, Context};
use aperture_cuda::detection::MultiGraphCache;
use aperture_cuda::{CudaBackend, CudaTensor};
use aperture_engine::cpu::CpuBackend;
use aperture_engine::{relative_l2, Backend, HostTensor};
use aperture_models::dfine::{load_dfine, DFineRunner, DFineSnapshot};
use serde_json::json;

use super::sweep::{Accuracy, BenchModel, Staged};
use super::{measure, BenchArgs, Outcome};
use crate::commands::check_dfine::align;

/// D-FINE prepared on a backend, with the query count of `--queries`.
struct DFineBench<B: Backend> {
    runner: DFineRunner<B>,
    /// `--postprocess`: the GPU graph ends in the top-K detection rows.
    postprocess: bool,
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
        // The accuracy column looks at the first image only: one eager pass of it.
        let s = x.shape();
        let per: usize = s.iter().skip(1).product();
        let mut one = vec![1];
        one.extend_from_slice(s.get(1..).unwrap_or_default());
        let first = HostTensor::from_f32(one, x.to_f32_vec().into_iter().take(per).collect())?;
        // Shaped as the batch's outputs (the sweep takes each output's first 1/batch),
        // the other images zero.
        let batch = s.first().copied().unwrap_or(1);
        let outputs = self
            .eager(&first)?
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
            .collect::<anyhow::Result<Vec<_>>>()?;
        let shape = x.shape().to_vec();
        Ok(Staged {
            outputs,
            run: Box::new(move || Ok(cache.replay(be, &shape)?)),
            memory: None,
        })
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
            bench.postprocess = args.postprocess;
            Ok(bench)
        },
    )?;
    let mut model = format!("dfine ({}) {h}x{w}", super::label(path));
    if let Some(q) = args.queries {
        model.push_str(&format!(", {q} of {} queries", snap.config.num_queries));
    }
    if args.postprocess && args.device == "cuda" {
        model.push_str(", post-processing in the graph");
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
    fn outputs_of_another_shape_give_an_infinite_error() {
        let m = tiny();
        let a = m.errors(&[vec![0.0; 3], vec![0.0; 4]], &[vec![0.0; 3], vec![0.0; 4]]);
        assert!(a.rel_l2.is_infinite());
        assert!(m.errors(&[], &[]).rel_l2.is_infinite());
    }
}
