//! The PyTorch peers through tools/torch_peers.py, when torch with CUDA is importable:
//! same weights folder, same input size; their rows join the report's.

use std::path::Path;
use std::process::Command;

use super::doc::{Report, Row};
use super::sweep::Plan;

const SCRIPT: &str = "tools/torch_peers.py";
const DFINE_SCRIPT: &str = "tools/dfine_torch_peers.py";

fn torch_with_cuda() -> bool {
    Command::new("python3")
        .args([
            "-c",
            "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn list(b: &[usize]) -> String {
    b.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Adds the peers' rows, or a note saying why there are none.
pub fn restormer(weights: &Path, size: usize, plan: &Plan, report: &mut Report) {
    if !Path::new(SCRIPT).is_file() {
        report.notes.push(format!(
            "PyTorch peers: {SCRIPT} not found (run from the repository root)."
        ));
        return;
    }
    if !torch_with_cuda() {
        report
            .notes
            .push("PyTorch peers: `import torch` with CUDA failed here; no peer rows.".into());
        return;
    }
    if !weights.is_dir() {
        report
            .notes
            .push("PyTorch peers: need a weights folder (config.json + model.safetensors).".into());
        return;
    }
    plan.bar.set_message("PyTorch peers");
    let eager: Vec<usize> = plan.batches.iter().copied().filter(|b| *b <= 32).collect();
    // torch.compile costs ~40-90 s per batch size: batch 1 and the largest up to 8.
    let mut compile: Vec<usize> = eager.iter().copied().filter(|b| *b <= 8).collect();
    compile = [compile.first().copied(), compile.last().copied()]
        .into_iter()
        .flatten()
        .collect();
    compile.dedup();
    let out =
        std::env::temp_dir().join(format!("aperture-report-peers-{}.json", std::process::id()));
    let status = Command::new("python3")
        .arg(SCRIPT)
        .arg("bench")
        .arg("--weights")
        .arg(weights)
        .arg("--json")
        .arg(&out)
        .args([
            "--size",
            &size.to_string(),
            "--iters",
            &plan.iters.max(1).to_string(),
        ])
        .args(["--eager-fp32", &list(&eager), "--eager-fp16", &list(&eager)])
        .args(["--compile-fp16", &list(&compile)])
        .args(["--compile-default-fp16", &list(&compile)])
        .status();
    match status
        .map_err(anyhow::Error::from)
        .and_then(|_| Report::from_json_file(&out))
    {
        Ok(peers) => {
            report.rows.extend(peers.rows);
            report.notes.push(
                "PyTorch peers: tools/torch_peers.py (eager fp32, eager fp16, torch.compile fp16 in modes reduce-overhead and default).".into(),
            );
        }
        Err(e) => report.notes.push(format!("PyTorch peers failed: {e:#}")),
    }
    let _ = std::fs::remove_file(&out);
}

/// transformers' D-FINE on the same weights folder: eager fp32/fp16 and torch.compile
/// (reduce-overhead) fp16 timings; the script's precision study rows carry no timing
/// and are left out.
pub fn dfine(weights: &Path, plan: &Plan, report: &mut Report) {
    if !Path::new(DFINE_SCRIPT).is_file() || !torch_with_cuda() || !weights.is_dir() {
        report.notes.push(format!(
            "PyTorch peers for D-FINE: need {DFINE_SCRIPT}, torch with CUDA and a weights folder; no peer rows."
        ));
        return;
    }
    plan.bar.set_message("PyTorch peers (transformers D-FINE)");
    let batches: Vec<usize> = plan.batches.iter().copied().filter(|b| *b <= 32).collect();
    let out = std::env::temp_dir().join(format!(
        "aperture-report-dfine-peers-{}.json",
        std::process::id()
    ));
    let status = Command::new("python3")
        .arg(DFINE_SCRIPT)
        .arg(weights)
        .arg("--out")
        .arg(&out)
        .args(["--batches", &list(&batches)])
        .args(["--iters", &plan.iters.max(1).to_string(), "--compile"])
        .status();
    let rows = status
        .map_err(anyhow::Error::from)
        .and_then(|_| Ok(std::fs::read_to_string(&out)?))
        .and_then(|text| Ok(serde_json::from_str::<serde_json::Value>(&text)?));
    match rows {
        Ok(doc) => {
            let timed = doc["rows"]
                .as_array()
                .map(|rows| rows.iter().filter_map(peer_row).collect::<Vec<_>>())
                .unwrap_or_default();
            report.rows.extend(timed);
            report.notes.push(format!(
                "PyTorch peers for D-FINE: {DFINE_SCRIPT} (transformers, eager fp32 and fp16, torch.compile fp16 in modes reduce-overhead and default; p50 of CUDA-event timings, no percentiles)."
            ));
        }
        Err(e) => report
            .notes
            .push(format!("PyTorch peers for D-FINE failed: {e:#}")),
    }
    let _ = std::fs::remove_file(&out);
}

/// A timed row of dfine_torch_peers.py's JSON.
fn peer_row(v: &serde_json::Value) -> Option<Row> {
    let engine = v["engine"].as_str()?.to_string();
    // Rows name their torch.compile mode; files from before that held reduce-overhead.
    let variant = match v["variant"].as_str() {
        Some(mode) => mode,
        None if engine == "torch-compile" => "reduce-overhead",
        None => "eager",
    };
    Some(Row {
        precision: v["precision"].as_str()?.to_string(),
        batch: v["batch"].as_u64()? as usize,
        images_per_s: v["images_per_s"].as_f64()?,
        p50_ms: v["p50_ms"].as_f64(),
        variant: variant.into(),
        engine,
        ..Row::default()
    })
}

#[cfg(test)]
mod tests {
    use super::peer_row;
    use serde_json::json;

    #[test]
    fn dfine_peer_rows_keep_their_compile_mode() {
        let row = |v: serde_json::Value| peer_row(&v).map(|r| (r.engine, r.variant, r.batch));
        let timed = json!({"engine": "torch-compile", "variant": "default", "precision": "fp16",
                           "batch": 8, "images_per_s": 169.2, "p50_ms": 47.3});
        assert_eq!(
            row(timed),
            Some(("torch-compile".into(), "default".into(), 8))
        );
        let older = json!({"engine": "torch-compile", "precision": "fp16", "batch": 1,
                           "images_per_s": 68.8});
        assert_eq!(row(older).map(|r| r.1), Some("reduce-overhead".into()));
        let eager = json!({"engine": "torch-eager", "precision": "fp32", "batch": 32,
                           "images_per_s": 104.8});
        assert_eq!(row(eager).map(|r| r.1), Some("eager".into()));
        // The precision study's rows carry no timing: not a table row.
        let study = json!({"engine": "torch-eager", "precision": "bf16", "batch": 1,
                           "rel_l2_logits": 4e-3});
        assert_eq!(row(study), None);
    }
}
