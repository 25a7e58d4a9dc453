//! `aperture run`: the raw model on raw tensors (like trtexec's load-inputs mode).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use aperture_engine::{HostTensor, NamedTensors};
use clap::Args;

use crate::device::DeviceArgs;

#[derive(Args)]
pub struct RunArgs {
    /// Weights file or model folder.
    #[arg(long)]
    model: PathBuf,
    /// safetensors file holding the input tensor(s), NCHW float32.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the outputs (safetensors, NCHW float32, under the model's output names).
    #[arg(long)]
    output: PathBuf,
    /// Name of the input tensor to use when the file holds several.
    #[arg(long)]
    input_name: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let runner = args.device.load_runner(&args.model, 0, None)?;
    let file = aperture_weights::load(&args.input)
        .with_context(|| format!("reading inputs from {}", args.input.display()))?;
    let inputs = select_inputs(
        runner.inputs().iter().map(|s| s.name.clone()).collect(),
        file.into_tensors(),
        args.input_name.as_deref(),
    )?;
    let started = std::time::Instant::now();
    let outputs = runner.infer(&inputs)?;
    let elapsed = started.elapsed();
    let mut out = BTreeMap::new();
    for (name, t) in outputs {
        println!("{name}: {:?} {}", t.shape(), t.dtype());
        out.insert(name, t.to_f32());
    }
    aperture_weights::save_safetensors(&args.output, &out)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "ran on {} in {:.1} ms; wrote {}",
        runner.device(),
        elapsed.as_secs_f64() * 1e3,
        args.output.display()
    );
    Ok(())
}

/// Matches file tensors to the model's inputs: by name, by `--input-name`, or, for a
/// single-input model, the file's only tensor.
fn select_inputs(
    wanted: Vec<String>,
    mut file: BTreeMap<String, HostTensor>,
    chosen: Option<&str>,
) -> anyhow::Result<NamedTensors> {
    if let Some(name) = chosen {
        let Some(t) = file.remove(name) else {
            bail!(
                "the input file has no tensor '{name}' (it has: {})",
                file.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        let Some(first) = wanted.first() else {
            bail!("the model declares no inputs")
        };
        return Ok(vec![(first.clone(), t.to_f32())]);
    }
    if wanted.iter().all(|w| file.contains_key(w)) {
        return Ok(wanted
            .iter()
            .filter_map(|w| file.remove(w).map(|t| (w.clone(), t.to_f32())))
            .collect());
    }
    if let ([only], 1) = (wanted.as_slice(), file.len()) {
        if let Some((_, t)) = file.pop_first() {
            return Ok(vec![(only.clone(), t.to_f32())]);
        }
    }
    bail!(
        "the model takes inputs [{}] but the file holds [{}]; pick one with --input-name",
        wanted.join(", "),
        file.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> HostTensor {
        HostTensor::zeros(vec![1, 3, 8, 8])
    }

    #[test]
    fn single_tensor_is_taken_whatever_its_name() {
        let file = BTreeMap::from([("image".to_string(), t())]);
        let got = select_inputs(vec!["x".into()], file, None).unwrap();
        assert_eq!(got[0].0, "x");
    }

    #[test]
    fn ambiguous_file_needs_input_name() {
        let file = BTreeMap::from([("a".to_string(), t()), ("b".to_string(), t())]);
        let err = select_inputs(vec!["x".into()], file.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--input-name"), "{err}");
        assert!(select_inputs(vec!["x".into()], file, Some("b")).is_ok());
    }
}
